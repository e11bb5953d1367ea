"""Tensor-parallel slicing: the one place that decides which rows/columns of a canonical tensor each rank holds.

The same index math serves weights, biases and int8 scales (scales are sliced like the rows of their weight, and
row-parallel weights are quantized after slicing). `shard` goes canonical -> per rank; `unshard` goes back.

Layout per rank:
  qkv       column-parallel: this rank's q heads, then its k heads, then its v heads. When tp > kv heads the
            kv heads are replicated: rank r holds kv head r // (tp // kv_heads).
  attn_out  row-parallel over the same q heads; its bias lives on rank 0 only, so the all-reduce adds it once.
  mlp_in    column-parallel; gated MLPs hold this rank's gate rows, then its up rows.
  mlp_out   row-parallel; bias on rank 0 only.
  experts_in, experts_out  (mixture of experts) every expert sliced like mlp_in / mlp_out: rank r holds the same
            intermediate range of each expert, padded alike (experts_in's bias too; experts_out's bias lives on
            rank 0 only, like mlp_out's); the router is replicated.
  attn_sinks  (GPT-OSS) one logit per q head: this rank's q heads.
  attn_out_a  (DeepSeek-V4's grouped output projection, o_groups blocks of rows, each over its group's heads) this
            rank's groups, which hold its q heads; attn_out (wo_b, over every group's output) row-parallel. The one
            kv head, the compressors and the indexer are replicated, like the latent's projections below.
  q_b, kv_b  (latent attention) column-parallel over whole heads: each head's rows are contiguous. The latent's
            projections and norms (q_a, kv_a) are replicated: every rank computes the same latent and keeps its own
            copy of the one-head cache.
  qkv with a gate (Qwen3-Next, Qwen3.5; LFM3's one row per head): q, k, v as above, then this rank's q heads' gates.
  lin_in    (Gated DeltaNet) column-parallel over whole heads, part by part: this rank's q heads, k heads, v heads,
            z heads, b and a; value head j belongs with key head j // (v_heads / k_heads), so contiguous ranges of
            both line up. lin_conv (one channel per q|k|v row) likewise; lin_decay per v head; lin_out row-parallel;
            lin_norm (one weight for every head) replicated. Each rank keeps its heads' conv and recurrent state.
  lin_in of KDA (Kimi Linear) likewise over q, k, v and b, with its two low-rank halves f_a and g_a replicated;
            lin_f_b and lin_g_b (their widening, per head) and lin_decay.dt_bias (per key channel) with the heads.
  lin_qkv   (MiniMax's lightning attention: q|k|v interleaved per head) with this rank's heads, as are lin_gate and
            lin_out_norm (one weight per head channel); lin_out row-parallel. Each rank keeps its heads' states.
  sconv_in  (LFM2's short conv) column-parallel over channels, part by part: this rank's B, C and x channels;
            sconv_conv likewise, sconv_out row-parallel.
  ssm_in    (Mamba2) column-parallel over whole heads, part by part: this rank's z, x, B, C and dt; B and C hold
            whole groups, or all of the one group (replicated) when a single group serves every head. ssm_conv
            likewise over x|B|C; ssm.* and ssm_norm with the heads; ssm_out row-parallel (its bias on rank 0).
  mamba_in  (Mamba 1) column-parallel over channels, part by part: this rank's x and z channels; mamba_conv,
            mamba_dt, mamba.* with the channels; mamba_x row-parallel (its dt|B|C is a partial sum every rank adds
            up, one small all-reduce, then each rank computes its own channels' steps); its norms replicated;
            mamba_out row-parallel (its bias on rank 0).
  a mixture's dense layers (GLM-4.5's first)  mlp_in / mlp_out as above over their own width, chunked and padded
            alike (`dense_intermediate_*`).
  shared_in, shared_out  (Qwen2-MoE's shared expert) like mlp_in / mlp_out over its own width, chunked and
            padded alike (`shared_intermediate_*`); its sigmoid gate is replicated.
  q_norm, k_norm  when a weight per head (Command R+) or over all heads (OLMo 2): this rank's q heads, and its
            kv heads like qkv's; a weight shared by every head is replicated.
  embed, lm_head  vocab-parallel: the vocab is padded with zero rows to a multiple of tp, rank r holds rows
            [r*V/tp, (r+1)*V/tp) (of an lm_head bias too). Padded logits are dropped by the runtime.
  attn_sub_norm, mlp_sub_norm  (BitNet's norms inside each half) with this rank's q heads, and with its MLP units
            (padded with zeros like them).
  qkv of DiffLlama: its heads pair across the two halves (q head p with p + H/2, kv head j with j + KV/2), so rank r
            holds chunk r of the first half and chunk r of the second (tp divides both halves; attn_out, over the
            pairs' outputs, row-parallel as usual).
  dmask_dt  (Doge's dt_proj, over every kv head's values) row-parallel: chunk r of its columns, which lie in this
            rank's kv heads (a replicated kv head's channels split among the ranks that share it); each rank's
            partial sum is all-reduced. dmask_a and its bias replicated.
  moa_q, moa_out, moa_kv  (JetMoe's attention experts) by kv heads: every expert's q rows of this rank's kv heads
            (each expert gives every kv head its queries), the same columns of every expert's output projection
            (row-parallel; its bias on rank 0), and this rank's heads of k and of v; the router replicated.
  mlstm_in, mlstm_gates  (xLSTM) column-parallel over whole heads, part by part (q, k, v, o; the input and forget
            gates); mlstm_norm with the heads; mlstm_out row-parallel (its bias on rank 0).
  ngram_embed  (Qwen4-Exp's n-gram tables) split along the width: rank r holds columns [r*w/tp, (r+1)*w/tp) of
            every row; a lookup gives each rank its slice of every head's row, and one all-gather joins them. What
            reads the joined rows (ngram_key, ngram_value, the norms and the conv) is replicated.
  cross_q, cross_kv, cross_out  (an encoder-decoder's cross-attention, T5) like qkv and attn_out: this rank's q
            heads, its heads of k and of v (the encoder's output, read whole by every rank), the output row-parallel.
  cca_conv  (ZAYA's convs over q|k) this rank's q heads' channels, then its kv heads'; cca_temp with the kv heads
            (tp must divide them). Its router and residual scales replicated.
  macaron_in, macaron_out  (Wav2Vec2-Conformer's first feed-forward) exactly like mlp_in / mlp_out.
  conv_in   (the Conformer's convolution module: pointwise to the GLU's value|gate) column-parallel over channels,
            part by part: this rank's value channels, then the same channels' gates, so the GLU runs per rank;
            conv_dw and conv_bn (one row per channel) the same channels; conv_out row-parallel (no bias), all-reduced.
            rel_pos (relative attention's position projection) and its biases u, v with this rank's q heads.
            conv_dw_norm (Wav2Vec2-BERT's LayerNorm after the depthwise conv) with the channels, its statistics
            gathered over every rank's; rel_dist (relative_key's rows, read by every head) replicated, as is
            Wav2Vec2-BERT's adapter (adapter*: one or two small layers after the blocks, each rank runs it whole).
  the rest  replicated.
The intermediate size is split into chunks of ceil(I/tp) and each chunk is zero-padded to `intermediate_per_rank`
(a multiple of the int8 group size, or of a narrower power of two where whole groups would pad more than an
eighth). Padded units compute act(0 + 0) = 0 and meet zero columns: exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from .errors import FmError
from .policy import ModelSpec

COLUMN = ("qkv.weight", "qkv.bias", "mlp_in.weight", "mlp_in.bias", "lin_in.weight", "ssm_in.weight",
          "sconv_in.weight")
HEADS = ("q_b.weight", "kv_b.weight", "attn_sinks.weight", "attn_gate.bias", "attn_gate.weight",   # whole heads' rows, each contiguous
         "lin_decay.a_log", "lin_decay.dt_bias", "ssm.a_log", "ssm.dt_bias", "ssm.d", "ssm_norm.weight",
         "mamba_conv.weight", "mamba_conv.bias", "mamba_dt.weight", "mamba_dt.bias", "mamba.a_log", "mamba.d",
         "lin_f_b.weight", "lin_g_b.weight", "attn_sub_norm.weight", "lin_qkv.weight", "lin_out_norm.weight",
         "lin_gate.weight", "attn_out_a.weight", "rg_conv.weight", "rg_conv.bias", "rg_gate_x.weight",
         "rg_gate_x.bias", "rg_gate_a.weight", "rg_gate_a.bias", "rg_a", "mlstm_norm.weight", "mlstm_norm.bias",
         "rel_bias.weight", "attn_rel_bias.weight", "cca_temp", "cross_q.weight", "cross_q.bias", "rel_gate.const",
         # Wav2Vec2-Conformer: the convolution module's channels, relative attention's heads
         "conv_dw.weight", "conv_bn.weight", "conv_bn.bias", "conv_bn.mean", "conv_bn.var", "rel_pos.weight",
         "rel_pos.u", "rel_pos.v", "conv_dw_norm.weight", "conv_dw_norm.bias")
# Row-parallel slots: split along dim 1 (K), each rank's product a partial sum. The linear mixers' (ROW_K) split
# evenly along K with nothing padded, as does Doge's dt_proj (dmask_dt).
ROW_K = ("lin_out.weight", "ssm_out.weight", "sconv_out.weight", "mamba_out.weight", "mamba_x.weight",
         "rg_out.weight", "mlstm_out.weight", "dmask_dt.weight", "cross_out.weight")
ROW = ("attn_out.weight", "mlp_out.weight", *ROW_K)
# A linear mixer's fused slots, part by part: q, k, v(, z, b, a) for Gated DeltaNet, x(, B, C) or z, x, B, C, dt for
# Mamba2 (see `_mixer_parts`)
MIXER_PARTS = ("lin_in.weight", "moa_kv.weight", "mlstm_in.weight", "mlstm_in.bias", "mlstm_gates.weight",
               "mlstm_gates.bias", "lin_conv.weight", "lin_conv.bias", "ssm_in.weight", "ssm_in.bias", "rg_in.weight",
               "rg_in.bias",
               "ssm_conv.weight", "ssm_conv.bias", "sconv_in.weight", "sconv_in.bias", "sconv_conv.weight",
               "sconv_conv.bias", "mamba_in.weight", "mamba_in.bias",
               "cca_conv0.weight", "cca_conv0.bias", "cca_conv1.weight", "cca_conv1.bias",
               "cross_kv.weight", "cross_kv.bias", "conv_in.weight")
ROW_BIAS = ("attn_out.bias", "mlp_out.bias", "experts_out.bias", "ssm_out.bias", "sconv_out.bias", "mamba_out.bias",
            "rg_out.bias", "moa_out.bias", "experts_shared.bias", "mlstm_out.bias", "cross_out.bias",
            "macaron_out.bias")
VOCAB = ("embed.weight", "lm_head.weight", "lm_head.bias", "ple_embed.weight")   # Gemma 4's per-layer embeddings too
EXPERTS = ("experts_in.weight", "experts_out.weight")
# Tables split along their width: each rank holds a slice of every row (Qwen4-Exp's n-gram tables, tens of GB each;
# a lookup on each rank, then an all-gather of the slices)
WIDTH = ("ngram_embed.weight",)


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


def pow2_floor(x: int) -> int:
    return 1 << (x.bit_length() - 1)


@dataclass
class Layout:
    tp: int
    heads_per_rank: int
    kv_heads_per_rank: int
    kv_replication: int            # ranks sharing one kv head (1 = no replication)
    intermediate_chunk: int        # original intermediate units per rank (last rank may have fewer)
    intermediate_per_rank: int     # after zero padding
    vocab_padded: int
    vocab_per_rank: int
    num_experts: int = 0           # not serialized: read back from the model spec
    shared_intermediate_chunk: int = 0       # the shared expert's units per rank, before and after padding
    shared_intermediate_per_rank: int = 0    # (serialized only when there is one)
    dense_intermediate_chunk: int = 0        # a mixture's dense layers' MLP units per rank, before and after
    dense_intermediate_per_rank: int = 0     # padding (serialized only when it has such layers)
    global_kv_heads_per_rank: int = 0        # Gemma 4's global layers' kv heads per rank and their replication
    global_kv_replication: int = 0           # (serialized only with ModelSpec.global_attn)
    wide_intermediate_chunk: int = 0         # Gemma 4 E2B's wide MLP layers' units per rank, before and after
    wide_intermediate_per_rank: int = 0      # padding (serialized only with ModelSpec.wide_mlp_layers)
    per_layer_embeddings: bool = False       # not serialized: Gemma 4 E2B/E4B's, split by vocab like embed
    head_vocab_padded: int = 0               # a pruned lm_head's rows padded to a multiple of tp, and a rank's
    head_vocab_per_rank: int = 0             # (serialized only with ModelSpec.head_vocab_size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("num_experts")
        ple = d.pop("per_layer_embeddings")
        for part in ("shared", "dense"):
            if not d[f"{part}_intermediate_chunk"]:
                d.pop(f"{part}_intermediate_chunk")
                d.pop(f"{part}_intermediate_per_rank")
        if not d["head_vocab_padded"]:
            d.pop("head_vocab_padded")
            d.pop("head_vocab_per_rank")
        if not d["wide_intermediate_chunk"]:
            d.pop("wide_intermediate_chunk")
            d.pop("wide_intermediate_per_rank")
        if not d["global_kv_heads_per_rank"]:
            d.pop("global_kv_heads_per_rank")
            d.pop("global_kv_replication")
        d["slots"] = {**{s.split(".")[0]: "column" for s in COLUMN + HEADS[:2]},
                      **{s.split(".")[0]: "row" for s in ROW},
                      "embed": "vocab", "lm_head": "vocab", "other": "replicated"}
        if ple:
            d["slots"]["ple_embed"] = "vocab"
        if self.num_experts:
            d["slots"].update(experts_in="column per expert", experts_out="row per expert")
        if self.shared_intermediate_chunk:
            d["slots"].update(shared_in="column", shared_out="row")
        d["row_parallel_bias"] = "rank0"
        return d


def at(spec: ModelSpec, lay: Layout, layer: int | None) -> tuple[ModelSpec, Layout]:
    """(spec, layout) as one layer sees them: a Gemma 4 global layer's own head_dim, kv heads and their split; no kv
    heads in a layer that reads another's cache; a wide MLP's units per rank; a layer's own q heads per rank."""
    if spec.global_layer(layer):
        lay = replace(lay, kv_heads_per_rank=lay.global_kv_heads_per_rank, kv_replication=lay.global_kv_replication,
                      global_kv_heads_per_rank=0, global_kv_replication=0)
    if spec.kv_shared(layer):
        lay = replace(lay, kv_heads_per_rank=0, kv_replication=1)
    if layer in (spec.wide_mlp_layers or ()):
        lay = replace(lay, intermediate_chunk=lay.wide_intermediate_chunk,
                      intermediate_per_rank=lay.wide_intermediate_per_rank)
    if spec.layer_heads is not None and layer is not None:
        lay = replace(lay, heads_per_rank=spec.layer_heads[layer] // lay.tp)
    spec = spec.at(layer)
    if spec.mla and "heads" in spec.mla:     # Dots3 Note: a windowed layer's own latent heads
        lay = replace(lay, heads_per_rank=spec.mla["heads"] // lay.tp)
    return spec, lay


def _kv_split(KV: int, tp: int, what: str = "num_key_value_heads") -> tuple[int, int]:
    """(kv heads per rank, ranks sharing one kv head)."""
    if KV >= tp:
        if KV % tp:
            raise FmError(f"tp={tp} does not divide {what}={KV}")
        return KV // tp, 1
    if tp % KV:
        raise FmError(f"tp={tp} is larger than {what}={KV} and not a multiple of it; "
                      "kv heads can only be replicated evenly")
    return 1, tp // KV


def plan(spec: ModelSpec, tp: int, group_size: int | None) -> Layout:
    """Check that tp divides what it must, and size the padded dims. group_size is None for float output."""
    if tp < 1:
        raise FmError(f"--tp must be at least 1, got {tp}")
    H, KV = spec.num_heads, spec.num_kv_heads
    if spec.mamba and spec.mamba["inner"] % tp:
        raise FmError(f"tp={tp} does not divide the Mamba layers' channels (intermediate_size="
                      f"{spec.mamba['inner']})")
    if H % tp:
        raise FmError(f"tp={tp} does not divide num_attention_heads={H}; each rank must hold whole heads")
    if spec.compressed and spec.compressed["o_groups"] % tp:
        raise FmError(f"tp={tp} does not divide o_groups={spec.compressed['o_groups']}; each rank must hold whole "
                      f"output groups")
    odd = sorted({n for n in spec.layer_heads or () if n % tp})
    if odd:
        raise FmError(f"tp={tp} does not divide the {', '.join(map(str, odd))} heads of some layers "
                      f"(num_attention_heads_per_layer); each rank must hold whole heads")
    local = (spec.mla or {}).get("local")
    if local and local["heads"] % tp:
        raise FmError(f"tp={tp} does not divide the sliding_attention layers' {local['heads']} heads; each rank must "
                      f"hold whole heads")
    kv_per_rank, repl = _kv_split(KV, tp)
    wide = _kv_split(spec.global_attn["num_kv_heads"], tp, "the global layers' num_global_key_value_heads") \
        if spec.global_attn else (0, 0)
    la = spec.linear_attn
    ssm = spec.ssm
    if spec.rglru and spec.rglru["heads"] % tp:
        raise FmError(f"tp={tp} does not divide the RG-LRU's heads ({spec.rglru['heads']}); each rank must hold whole "
                      f"heads")
    if ssm and (ssm["heads"] % tp or (ssm["groups"] % tp and ssm["groups"] != 1)):
        raise FmError(f"tp={tp} does not divide the Mamba2 heads (mamba_n_heads={ssm['heads']}) and groups "
                      f"(mamba_n_groups={ssm['groups']}, which may also be 1); each rank must hold whole heads")
    if spec.mlstm and spec.mlstm["heads"] % tp:
        raise FmError(f"tp={tp} does not divide the mLSTM's heads ({spec.mlstm['heads']}); each rank must hold whole "
                      f"heads")
    if spec.diff_attn and (H % (2 * tp) or KV % (2 * tp)):
        raise FmError(f"tp={tp} must divide half the heads ({H // 2}) and half the kv heads ({KV // 2}): differential "
                      f"attention pairs each head with one in the other half, on the same rank")
    if spec.dyn_mask and (KV * spec.head_dim) % tp:
        raise FmError(f"tp={tp} does not divide the {KV * spec.head_dim} value channels that Doge's dt_proj reads; "
                      f"each rank reads its share of them")
    if spec.cca and KV % tp:
        raise FmError(f"tp={tp} does not divide num_key_value_heads={KV}; ZAYA's CCA averages each kv head's group "
                      f"of q heads into its key, so each rank holds whole kv heads")
    if spec.moa and KV % tp:
        raise FmError(f"tp={tp} does not divide num_key_value_heads={KV}; JetMoe's attention experts each give "
                      f"every kv head its queries, so each rank holds whole kv heads")
    ng = spec.ngram
    width = ng["dim"] // ((ng["size"] - 1) * ng["heads"]) if ng else 0
    if ng and width % tp:
        raise FmError(f"tp={tp} does not divide the n-gram tables' width ({width} per head: ple_embed_dim / "
                      f"((ngram_size - 1) * heads_per_ngram)); each rank holds a slice of every row")
    if la and (la["k_heads"] % tp or la["v_heads"] % tp):
        raise FmError(f"tp={tp} does not divide the linear attention's heads (linear_num_key_heads={la['k_heads']}, "
                      f"linear_num_value_heads={la['v_heads']}); each rank must hold whole heads")
    chunk, per_rank = _chunk(spec.intermediate_size, tp, group_size)
    shared = _chunk(spec.shared_intermediate_size, tp, group_size) if spec.shared_intermediate_size else (0, 0)
    dense = _chunk(spec.dense_intermediate_size, tp, group_size) if spec.dense_intermediate_size else (0, 0)
    wide_mlp = _chunk(spec.wide_intermediate_size, tp, group_size) if spec.wide_intermediate_size else (0, 0)
    vocab_padded = _ceil_to(spec.vocab_size, tp)
    head = _ceil_to(spec.head_vocab_size, tp)
    return Layout(tp, H // tp, kv_per_rank, repl, chunk, per_rank, vocab_padded, vocab_padded // tp,
                  spec.num_experts, *shared, *dense, *wide, *wide_mlp, bool(spec.per_layer_input), head, head // tp)


# A rank's MLP units are padded to whole int8 groups; when that would add more than 1/MAX_PAD_WASTE of the units, a
# narrower group (down to MIN_PAD_GROUP) is used for that slot instead: Qwen3-30B-A3B's experts at tp 8 (96 units
# each) take groups of 32, not 96 units padded to 128. Padding is bytes every token reads; a narrower group costs
# one scale per group.
MAX_PAD_WASTE = 8
MIN_PAD_GROUP = 16


def _chunk(size: int, tp: int, group_size: int | None) -> tuple[int, int]:
    """(units per rank, units per rank padded to a multiple of the int8 group, or of a narrower one)."""
    chunk = -(-size // tp)
    if group_size is None:
        return chunk, chunk
    unit = group_for(chunk, group_size)
    while unit > MIN_PAD_GROUP and (_ceil_to(chunk, unit) - chunk) * MAX_PAD_WASTE > chunk:
        unit //= 2
    return chunk, _ceil_to(chunk, unit)


def group_for(k: int, group_size: int) -> int:
    """The group size used for a K of this width: the requested one, or the largest power of two <= K if smaller."""
    return group_size if k >= group_size else pow2_floor(k)


def padded_group(k: int, group_size: int) -> int:
    """The group size of a padded K (a rank's MLP units, see _chunk): the largest power of two up to the requested
    one that divides it."""
    g = min(group_size, k & -k)
    return g if g else group_size


def _width(spec: ModelSpec, lay: Layout, slot: str) -> tuple[int, int, int]:
    """(units, units per rank, units per rank padded) of the MLP a slot belongs to: a shared expert's, a mixture's
    dense layers', or the main one (every expert's, or the dense MLP's)."""
    if slot.startswith("shared_"):
        return spec.shared_intermediate_size, lay.shared_intermediate_chunk, lay.shared_intermediate_per_rank
    if slot.startswith("mlp_") and spec.dense_intermediate_size:
        return spec.dense_intermediate_size, lay.dense_intermediate_chunk, lay.dense_intermediate_per_rank
    return spec.intermediate_size, lay.intermediate_chunk, lay.intermediate_per_rank


def _inter_ranges(spec: ModelSpec, lay: Layout, slot: str):
    I, c, _ = _width(spec, lay, slot)
    return [(min(r * c, I), min((r + 1) * c, I)) for r in range(lay.tp)]


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], dim=0)


def _kv_index(lay: Layout, r: int) -> slice:
    first = r // lay.kv_replication * lay.kv_heads_per_rank
    return slice(first, first + lay.kv_heads_per_rank)


def _kv_heads(lay: Layout, n_heads: int, slot: str, pieces) -> list[torch.Tensor]:
    """Each rank's rows for its kv heads (kv_heads_per_rank equal blocks along dim 0) -> the blocks of every kv
    head in order. The copies of a replicated head must agree."""
    heads = [None] * n_heads
    if not lay.kv_heads_per_rank:            # a layer that reads another's cache: q only
        return heads
    for r, p in enumerate(pieces):
        kv = _kv_index(lay, r)
        for head, rows in zip(range(kv.start, kv.stop), torch.chunk(p, lay.kv_heads_per_rank, dim=0)):
            if heads[head] is not None and not torch.equal(heads[head], rows):
                raise FmError(f"{slot}: replicated kv head {head} differs between ranks")
            heads[head] = rows
    return heads


def shard(spec: ModelSpec, lay: Layout, slot: str, t: torch.Tensor) -> list[torch.Tensor]:
    """One canonical tensor -> its tp pieces, in rank order."""
    tp, hd = lay.tp, spec.head_dim
    H, KV = spec.num_heads, spec.num_kv_heads
    if slot.startswith("qkv."):
        vd = spec.v_dim
        q, k, v, gate = torch.split(t, [H * hd, KV * hd, KV * vd, H * spec.gate_width], dim=0)
        q = q.reshape(H, hd, *t.shape[1:])
        k = k.reshape(KV, hd, *t.shape[1:])
        v = v.reshape(KV, vd, *t.shape[1:])
        gate = gate.reshape(H, spec.gate_width, *t.shape[1:])
        if spec.diff_attn:      # DiffLlama: each rank's chunk of the first half of the heads, then its partners'
            q, k, v = q[_diff_order(H, tp)], k[_diff_order(KV, tp)], v[_diff_order(KV, tp)]
        out = []
        for r in range(tp):
            heads = slice(r * lay.heads_per_rank, (r + 1) * lay.heads_per_rank)
            kv = _kv_index(lay, r)
            out.append(torch.cat([x.reshape(-1, *t.shape[1:]) for x in (q[heads], k[kv], v[kv], gate[heads])]))
        return [o.contiguous() for o in out]
    if slot in MIXER_PARTS:
        sizes, split = zip(*_mixer_parts(spec, slot, tp))
        parts = [torch.chunk(p, tp, dim=0) if cut else (p,) * tp for p, cut in zip(torch.split(t, sizes), split)]
        return [torch.cat([p[r] for p in parts], dim=0).contiguous() for r in range(tp)]
    if slot in ROW_K or slot in WIDTH or slot == "conv_out.weight":
        return [c.contiguous() for c in torch.chunk(t, tp, dim=1)]
    if slot == "moa_q.weight":           # every attention expert's rows of this rank's kv heads
        E = spec.moa["experts"]
        return [c.reshape(-1, t.shape[1]).contiguous() for c in torch.chunk(t.view(E, KV, -1, t.shape[1]), tp, 1)]
    if slot == "moa_out.weight":         # and the same columns of every expert's output projection
        E = spec.moa["experts"]
        return [c.reshape(-1, c.shape[-1]).contiguous() for c in torch.chunk(t.view(E, -1, t.shape[1]), tp, 2)]
    if slot == "attn_out.weight":
        return [c.contiguous() for c in torch.chunk(t, tp, dim=1)]
    if slot.startswith(("mlp_in.", "macaron_in.")) or slot == "shared_in.weight":
        parts = torch.chunk(t, 2, dim=0) if spec.gated_mlp else (t,)      # a shared expert is gated like the MLP
        rows = _width(spec, lay, slot)[2]
        out = []
        for lo, hi in _inter_ranges(spec, lay, slot):
            out.append(torch.cat([_pad_rows(p[lo:hi], rows) for p in parts], dim=0))
        return [o.contiguous() for o in out]
    if slot in ("mlp_out.weight", "shared_out.weight", "macaron_out.weight"):
        rows = _width(spec, lay, slot)[2]
        return [_pad_rows(t[:, lo:hi].t(), rows).t().contiguous() for lo, hi in _inter_ranges(spec, lay, slot)]
    if slot == "mlp_sub_norm.weight":       # BitNet: one weight per MLP unit, split and padded like the units
        rows = _width(spec, lay, slot)[2]
        return [_pad_rows(t[lo:hi], rows).contiguous() for lo, hi in _inter_ranges(spec, lay, slot)]
    if slot.startswith("experts_in."):      # [E * (gate; up) * I, h] -> per rank [E * (gate; up) * ipr, h]
        g = t.reshape(spec.num_experts * (1 + spec.gated_mlp), spec.intermediate_size, *t.shape[1:])
        return [torch.cat([_pad_rows(part[lo:hi], lay.intermediate_per_rank) for part in g]).contiguous()
                for lo, hi in _inter_ranges(spec, lay, slot)]
    if slot == "experts_out.weight":        # [E * h, I] -> per rank [E * h, ipr]
        return [_pad_rows(t[:, lo:hi].t(), lay.intermediate_per_rank).t().contiguous()
                for lo, hi in _inter_ranges(spec, lay, slot)]
    if slot in ROW_BIAS:
        return [t.contiguous()] + [None] * (tp - 1)
    if slot in VOCAB:
        rows = lay.head_vocab_padded if slot.startswith("lm_head.") and spec.head_vocab_size else lay.vocab_padded
        return [c.contiguous() for c in torch.chunk(_pad_rows(t, rows), tp, dim=0)]
    if slot in HEADS or (slot == "q_norm.weight" and spec.qk_norm != "head"):  # this rank's heads
        return [c.contiguous() for c in torch.chunk(t, tp, dim=0)]
    if slot == "k_norm.weight" and spec.qk_norm != "head":       # its kv heads, replicated as in qkv
        heads = t.reshape(KV, -1)
        return [heads[_kv_index(lay, r)].reshape(-1, *t.shape[1:]).contiguous() for r in range(tp)]
    return [t] * tp


def unshard(spec: ModelSpec, lay: Layout, slot: str, pieces: list[torch.Tensor | None]) -> torch.Tensor:
    """Inverse of `shard`: rank pieces -> the canonical tensor. Replicated copies must agree."""
    hd, KV = spec.head_dim, spec.num_kv_heads
    if slot.startswith("qkv."):
        hq, hk, hv = lay.heads_per_rank * hd, lay.kv_heads_per_rank * hd, lay.kv_heads_per_rank * spec.v_dim
        hg = lay.heads_per_rank * spec.gate_width
        q, k, v, gate = zip(*(torch.split(p, [hq, hk, hv, hg], dim=0) for p in pieces))
        if spec.diff_attn:      # DiffLlama: the heads back in their order
            q, k, v = (torch.cat(x).unflatten(0, (n, -1))[torch.argsort(_diff_order(n, lay.tp))].flatten(0, 1)
                       for x, n in ((q, spec.num_heads), (k, KV), (v, KV)))
            return torch.cat([q, k, v, *gate], dim=0)
        return torch.cat(list(q) + _kv_heads(lay, KV, slot, k) + _kv_heads(lay, KV, slot, v) + list(gate), dim=0)
    if slot in MIXER_PARTS:
        sizes, split = zip(*_mixer_parts(spec, slot, lay.tp))
        sizes = [n // lay.tp if cut else n for n, cut in zip(sizes, split)]
        out = []
        for part, cut in zip(zip(*(torch.split(p, sizes, dim=0) for p in pieces)), split):   # every rank's piece
            if not cut and any(not torch.equal(x, part[0]) for x in part[1:]):
                raise FmError(f"{slot}: a replicated part differs between ranks")
            out += part if cut else part[:1]
        return torch.cat(out, dim=0)
    if slot in ("attn_out.weight", "conv_out.weight") or slot in ROW_K or slot in WIDTH:
        return torch.cat(pieces, dim=1)
    if slot == "moa_q.weight":
        E = spec.moa["experts"]
        return torch.cat([p.view(E, -1, p.shape[1]) for p in pieces], 1).reshape(-1, pieces[0].shape[1])
    if slot == "moa_out.weight":
        E = spec.moa["experts"]
        return torch.cat([p.view(E, -1, p.shape[1]) for p in pieces], 2).reshape(-1, pieces[0].shape[1] * lay.tp)
    if slot.startswith(("mlp_in.", "macaron_in.")) or slot == "shared_in.weight":
        n = 2 if spec.gated_mlp else 1
        halves = [[] for _ in range(n)]
        for (lo, hi), p in zip(_inter_ranges(spec, lay, slot), pieces):
            for j, part in enumerate(torch.chunk(p, n, dim=0)):
                halves[j].append(part[:hi - lo])
        return torch.cat([torch.cat(h, dim=0) for h in halves], dim=0)
    if slot in ("mlp_out.weight", "experts_out.weight", "shared_out.weight", "macaron_out.weight"):
        ranges = _inter_ranges(spec, lay, slot)
        return torch.cat([p[:, :hi - lo] for (lo, hi), p in zip(ranges, pieces)], dim=1)
    if slot == "mlp_sub_norm.weight":
        return torch.cat([p[:hi - lo] for (lo, hi), p in zip(_inter_ranges(spec, lay, slot), pieces)], dim=0)
    if slot.startswith("experts_in."):
        glu = 1 + spec.gated_mlp
        parts = [p.reshape(spec.num_experts * glu, lay.intermediate_per_rank, *p.shape[1:])[:, :hi - lo]
                 for (lo, hi), p in zip(_inter_ranges(spec, lay, slot), pieces)]
        return torch.cat(parts, dim=1).reshape(-1, *pieces[0].shape[1:])
    if slot in ROW_BIAS:
        if any(p is not None for p in pieces[1:]):
            raise FmError(f"{slot}: row-parallel bias must live on rank 0 only")
        if pieces[0] is None:
            raise FmError(f"{slot}: row-parallel bias is missing from rank 0")
        return pieces[0]
    if slot in VOCAB:
        return torch.cat(pieces, dim=0)[:spec.head_vocab_size if slot.startswith("lm_head.") and spec.head_vocab_size
                                        else spec.per_layer_vocab if slot == "ple_embed.weight" and spec.per_layer_vocab
                                        else spec.vocab_size]
    if slot in HEADS or (slot == "q_norm.weight" and spec.qk_norm != "head"):
        return torch.cat(pieces, dim=0)
    if slot == "k_norm.weight" and spec.qk_norm != "head":
        return torch.cat(_kv_heads(lay, KV, slot, pieces), dim=0)
    for r, p in enumerate(pieces[1:], 1):
        if not torch.equal(p, pieces[0]):
            raise FmError(f"{slot}: replicated tensor differs between rank 0 and rank {r}")
    return pieces[0]


def _diff_order(n: int, tp: int) -> torch.Tensor:
    """DiffLlama's n heads in rank order: rank r holds its chunk of the first half and the same chunk of the second,
    so head p's partner p + n / 2 sits on its rank, c places after it (c = n / (2 tp))."""
    c = n // (2 * tp)
    return torch.cat([torch.cat([torch.arange(r * c, (r + 1) * c), n // 2 + torch.arange(r * c, (r + 1) * c)])
                      for r in range(tp)])


def _mixer_parts(spec: ModelSpec, slot: str, tp: int) -> list[tuple[int, bool]]:
    """(rows, split over ranks) of each part of a linear mixer's fused slot. Gated DeltaNet: q, k, v (, z, b, a),
    whole heads each. Mamba2: (z,) x, B, C (, dt); B and C hold whole groups, and are replicated when a single
    group serves every head (Granite 4.0)."""
    if slot == "conv_in.weight":                # Wav2Vec2-Conformer: the GLU's values, then its gates, by channel
        return [(spec.hidden_size, True)] * 2
    if slot.startswith("cross_kv"):             # an encoder-decoder's cross-attention: k, then v, split over heads
        return [(spec.num_heads * spec.head_dim, True)] * 2
    if slot.startswith("cca_conv"):             # ZAYA: the convs' q channels, then k's, each split over heads
        return [(spec.num_heads * spec.head_dim, True), (spec.num_kv_heads * spec.head_dim, True)]
    if slot.startswith("mlstm_in"):             # xLSTM: q, k, v, o, each split over heads
        a = spec.mlstm
        return [(a["qk_dim"], True)] * 2 + [(a["v_dim"], True)] * 2
    if slot.startswith("mlstm_gates"):          # and the input then the forget gate's logits, a head each
        return [(spec.mlstm["heads"], True)] * 2
    if slot.startswith("moa_kv"):               # JetMoe: k, then v, each split over kv heads
        return [(spec.num_kv_heads * spec.head_dim, True)] * 2
    if slot.startswith("sconv_"):               # LFM2: B, C, x (or the conv's channels), each split over channels
        return [(spec.hidden_size, True)] * (3 if slot.startswith("sconv_in.") else 1)
    if slot.startswith("rg_"):                  # RecurrentGemma: y, x, each split over channels (whole heads)
        return [(spec.rglru["width"], True)] * 2
    if slot.startswith("mamba_"):               # Mamba 1: x, z, each split over channels
        return [(spec.mamba["inner"], True)] * 2
    if slot.startswith("lin_") and spec.linear_attn.get("decay") == "channel":
        la = spec.linear_attn          # KDA: q, k, v, b (, f_a, g_a: the low-rank halves every rank computes whole;
        Kd, Vd, Hv = la["k_heads"] * la["k_dim"], la["v_heads"] * la["v_dim"], la["v_heads"]   # Ling 2.5's full f, g
        full = la.get("gates") == "full"                                                      # with the heads)
        parts = [(Kd, True), (Kd, True), (Vd, True), (Hv, True), (Kd if full else la["k_dim"], full),
                 (Vd if full else la["v_dim"], full)]
        return parts if slot == "lin_in.weight" else parts[:3]
    if slot.startswith("lin_"):
        la = spec.linear_attn
        Kd, Vd, Hv = la["k_heads"] * la["k_dim"], la["v_heads"] * la["v_dim"], la["v_heads"]
        return [(n, True) for n in (Kd, Kd, Vd, Vd, Hv, Hv)][:6 if slot == "lin_in.weight" else 3]
    s = spec.ssm
    I, BC, cut = s["heads"] * s["head_dim"], s["groups"] * s["state"], s["groups"] % tp == 0
    xbc = [(I, True), (BC, cut), (BC, cut)]
    return [(I, True), *xbc, (s["heads"], True)] if slot.startswith("ssm_in.") else xbc


# K is a rank's (padded) MLP units
PADDED_K = ("mlp_out.weight", "experts_out.weight", "shared_out.weight", "macaron_out.weight")


def k_per_rank(spec: ModelSpec, lay: Layout, slot: str) -> int:
    """The input width (K) of a linear slot on one rank: what the int8 group size must divide."""
    mla = spec.mla or {}
    return {
        "qkv.weight": spec.attn_input or spec.hidden_size, "mlp_in.weight": spec.hidden_size,
        "attn_out.weight": (spec.compressed["o_groups"] * spec.compressed["o_rank"] // lay.tp if spec.compressed
                            else lay.heads_per_rank * mla.get("v_dim", spec.v_dim)),
        "q_a.weight": spec.hidden_size if mla.get("q_rank") or spec.compressed else 0,    # 0: no such slot
        "q_b.weight": ((2 if mla.get("gated_q") else 1) * mla["q_rank"] or spec.hidden_size) if mla else
        spec.compressed["q_rank"] if spec.compressed else 0,
        "kv_a.weight": spec.hidden_size if mla or spec.compressed else 0, "kv_b.weight": mla.get("kv_rank", 0),
        "attn_out_a.weight": spec.num_heads * spec.head_dim // spec.compressed["o_groups"] if spec.compressed else 0,
        "mlp_out.weight": _width(spec, lay, "mlp_out.")[2],
        "experts_in.weight": spec.hidden_size, "experts_out.weight": lay.intermediate_per_rank,
        "shared_in.weight": spec.hidden_size if spec.shared_intermediate_size else 0,     # 0: no such slot
        "shared_out.weight": lay.shared_intermediate_per_rank,
        "embed.weight": spec.embed_dim, "lm_head.weight": spec.embed_dim,
        "ple_embed.weight": spec.num_layers * spec.per_layer_input,
        "mlstm_in.weight": spec.hidden_size if spec.mlstm else 0,
        "mlstm_out.weight": spec.mlstm["v_dim"] // lay.tp if spec.mlstm else 0,
        "moa_q.weight": spec.hidden_size if spec.moa else 0, "moa_kv.weight": spec.hidden_size if spec.moa else 0,
        "moa_out.weight": spec.num_kv_heads * spec.head_dim // lay.tp if spec.moa else 0,
        "ngram_embed.weight": spec.ngram["dim"] // ((spec.ngram["size"] - 1) * spec.ngram["heads"]) // lay.tp
        if spec.ngram else 0,
        "lin_in.weight": spec.hidden_size if spec.linear_attn else 0,
        "lin_out.weight": spec.linear_attn["v_heads"] * spec.linear_attn["v_dim"] // lay.tp if spec.linear_attn
        else spec.num_heads * spec.head_dim // lay.tp if spec.lightning else 0,
        "lin_qkv.weight": spec.hidden_size if spec.lightning else 0,
        "lin_gate.weight": spec.hidden_size if spec.lightning else 0,
        "ssm_in.weight": spec.hidden_size if spec.ssm else 0,
        "sconv_in.weight": spec.hidden_size if spec.short_conv else 0,
        "sconv_out.weight": spec.hidden_size // lay.tp if spec.short_conv else 0,
        "ssm_out.weight": spec.ssm["heads"] * spec.ssm["head_dim"] // lay.tp if spec.ssm else 0,
        "mamba_in.weight": spec.hidden_size if spec.mamba else 0,
        "rg_in.weight": spec.hidden_size if spec.rglru else 0,
        "rg_out.weight": spec.rglru["width"] // lay.tp if spec.rglru else 0,
        "mamba_out.weight": spec.mamba["inner"] // lay.tp if spec.mamba else 0,
        "macaron_in.weight": spec.hidden_size if spec.conformer else 0,
        "macaron_out.weight": _width(spec, lay, "mlp_out.")[2] if spec.conformer else 0,
        "conv_in.weight": spec.hidden_size if spec.conformer else 0,
        "conv_out.weight": spec.hidden_size // lay.tp if spec.conformer else 0,
        "cross_q.weight": spec.hidden_size if spec.encoder else 0, "cross_kv.weight": spec.hidden_size if spec.encoder
        else 0, "cross_out.weight": lay.heads_per_rank * spec.head_dim if spec.encoder else 0,
    }[slot]
