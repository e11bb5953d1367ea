"""The fused model, rebuilt from the manifest spec and one rank's tensors alone (no transformers code).

One block = add+norm, fused QKV, positions, attention with KV cache, row-parallel out + all-reduce, add+norm,
fused MLP-in with its activation, row-parallel MLP-out + all-reduce. Pre-LN, post-LN and the parallel residual
(attention and MLP side by side, one all-reduce) come from the spec.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import FmError
from ..manifest import TABLE_POSITIONS, block_owners, is_global_layer, latent_at, loop_owners
from ..policy import SHARED_BLOCK_SLOTS, audio_front, frames_of, samples_for
from .comm import SingleComm
from .ops import Int8Weight, TorchOps, _explicit_attention, activate, rope_tables

LIGHTNING_NORM_EPS = 1e-6    # MiniMax's norm over the lightning attention's output keeps RMSNorm's default eps


class KVCache:
    """Static per-layer caches [B, Hkv_local, S_max, D]; `length` tokens are filled (same for the whole batch).

    A layer that attends within a window shorter than max_len keeps only that many positions, as a ring buffer:
    position p lives in row p % window (`ring[i]`, 0 for a plain cache). RoPE is applied before a key is cached
    and softmax does not care about key order, so a decode step attends over the ring as it lies. A chunked layer
    (Llama 4) keeps a ring of one chunk (`chunked[i]`): its chunk starts at a multiple of the ring size, so the
    positions a query at p sees sit in rows 0 .. p % chunk, in order."""

    def __init__(self, n_layers, batch, kv_heads, max_len, head_dim, dtype, device, windows=None, latent=0,
                 chunks=None, linear=None, keyless=(), index=None, linear_attends=False):
        """latent: latent attention's cache, whose values are the first `latent` columns of its keys (a view).
        chunks: each layer's attention chunk (0: none), for the layers without a window.
        linear: a hybrid's linear layers -> (conv channels, conv taps, state shape) of this rank: such a layer keeps
        no keys, only its conv's last taps - 1 inputs [B, C, taps - 1] and its recurrent state [B, *shape] (fp32;
        Gated DeltaNet: v heads, k_dim, v_dim; Mamba2: heads, head_dim, state), both a fixed size whatever the
        context. keyless: layers that attend to nothing (Nemotron-H's MLP layers): no keys either. kv_heads and
        head_dim may be lists, one per layer (Gemma 4's global layers are wider, with fewer kv heads). index: the
        layers with a sparse attention indexer -> its key width (DeepSeek-V3.2). linear_attends: the linear layers
        keep keys too (Falcon-H1's attention beside its SSM)."""
        windows = windows or [0] * n_layers
        kv_heads = kv_heads if isinstance(kv_heads, list) else [kv_heads] * n_layers
        head_dim = head_dim if isinstance(head_dim, list) else [head_dim] * n_layers
        chunks = chunks or [0] * n_layers
        linear = linear or {}
        self.ring = [w if 0 < w < max_len else c if 0 < c < max_len else 0 for w, c in zip(windows, chunks)]
        self.chunked = [not (0 < w < max_len) and 0 < c < max_len for w, c in zip(windows, chunks)]
        self.k = [torch.zeros(batch, kv_heads[i], 0 if (i in linear and not linear_attends) or i in keyless
                              else r or max_len, head_dim[i],
                              dtype=dtype, device=device) for i, r in enumerate(self.ring)]
        latent = latent if isinstance(latent, list) else [latent] * n_layers   # Dots3 Note: a width per layer
        self.v = [t[..., :w] for t, w in zip(self.k, latent)] if any(latent) else [torch.zeros_like(t) for t in self.k]
        self.conv = [None] * n_layers
        self.state = [None] * n_layers
        # DeepSeek Sparse Attention: the indexer's key per position [B, S_max, dim], in the layers that run one
        self.index_k = [None] * n_layers
        for i, dim in (index or {}).items():
            self.index_k[i] = torch.zeros(batch, max_len, dim, dtype=dtype, device=device)
        for i, (C, K, shape) in linear.items():
            self.conv[i] = torch.zeros(batch, C, K - 1, dtype=dtype, device=device)
            if shape is not None:                     # LFM2's short conv keeps its conv tail only
                self.state[i] = torch.zeros(batch, *shape, dtype=torch.float32, device=device)
        self.length = 0
        self.max_len = max_len

    def reset(self):
        """Empty the cache. The recurrent states are zeroed too: unlike keys, they are read from the first token."""
        self.length = 0
        for t in self.conv + self.state:
            if t is not None:
                t.zero_()


# A.X K2: the low-rank gate on each norm's output, where a layer has it (the MLP's in the mixture layers only)
_NORM_GATES = {"attn_norm": "attn_norm_gate", "mlp_norm": "moe_norm_gate"}


# The sparse-attention prompts (DeepSeek Sparse Attention, MiniMax-M3's blocks): queries scored, masked and attended
# this many at a time, so their scores and masks take heads x chunk x keys, never heads x T x keys
QUERY_CHUNK = 256


class Block(nn.Module):
    def __init__(self, model: "FusedModel", i: int, tensors: dict):
        super().__init__()
        object.__setattr__(self, "m", model)  # a plain back-reference, not a registered submodule (no cycle)
        self.i = i
        self.t = tensors  # slot -> tensor or Int8Weight, this rank's piece
        sp = model.spec
        layers = sp["window_layers"]
        self.window = sp["sliding_window"] if layers is None or i in layers else 0   # 0: every earlier position
        self.rope_table = "local" if self.window and "local" in sp["position"] else "global"
        self.rope = model.rope is not None and i not in (sp.get("nope_layers") or ())   # SmolLM3: NoPE layers
        pos = sp["position"]      # the width this layer's table rotates (Gemma 4's windowed heads are narrower)
        self.rotary_dim = pos.get("local", {}).get("rotary_dim", pos.get("rotary_dim")) \
            if self.rope_table == "local" else pos.get("rotary_dim")
        self.gate_in = None       # WavLM: the attention's input, which its position bias's gate reads (attention())
        # Gemma 4's global layers: wider heads, fewer kv heads
        wide = is_global_layer(sp["global_attn"], layers, sp["linear_layers"], i)
        self.head_dim = sp["global_attn"]["head_dim"] if wide else model.head_dim
        self.kv_heads = model.par["global_kv_heads_per_rank"] if wide else model.kv_heads
        self.heads = sp["layer_heads"][i] // model.tp if sp["layer_heads"] else model.heads   # Laguna: per layer
        # latent attention's widths and softmax scale here (None: the model's): Dots3 Note's windowed layers have
        # heads of their own
        self.mla, self.mla_scale = latent_at(sp["mla"], layers, i), None
        if self.mla is not sp["mla"]:
            self.heads = self.mla["heads"] // model.tp
            self.mla_scale = (self.mla["nope_dim"] + self.mla["rope_dim"]) ** -0.5
        # MiMo-V2-Flash: v heads narrower than q and k's, padded with zeros to head_dim for the cache and kernels
        # (the padded channels of the output are zero, and dropped before attn_out)
        self.v_dim = sp["v_head_dim"] or self.head_dim
        # How each half's output x joins the stream r: h = (x * x_scale + r) * gain. Granite: x_scale its
        # residual_scale. Beam's k-th addition (k = 2i + 2 for layer i's attention, 2i + 3 for its MLP) is
        # x / sqrt(k) + r sqrt((k - 1) / k): x_scale 1 / sqrt(k - 1), gain sqrt((k - 1) / k)
        self.attn_add = self.mlp_add = (model.residual_scale, None)
        if sp["residual"] == "normed":        # MiniMax: the MLP's output joins the stream times its beta
            self.mlp_add = (sp["residual_factors"]["mlp"][1], None)
        if sp["residual_depth_scale"]:
            self.attn_add, self.mlp_add = (
                (1 / math.sqrt(k - 1), torch.tensor([math.sqrt((k - 1) / k)], dtype=model.dtype, device=model.device))
                for k in (2 * i + 2, 2 * i + 3))
        self.v_ones = torch.ones(self.head_dim, dtype=model.dtype, device=model.device) if sp["v_norm"] else None
        self.kv_from = sp["kv_source"][i] if sp["kv_source"] else i   # Gemma 4 E2B/E4B: an earlier layer's cache
        self.mlp_units = (sp["wide_intermediate_size"] if i in (sp["wide_mlp_layers"] or ()) else
                          sp["dense_intermediate_size"] or sp["intermediate_size"])     # the MLP's whole width
        self.router_ones = torch.ones(sp["hidden_size"], dtype=model.dtype, device=model.device) \
            if "router.scale" in tensors else None
        self.sinks = tensors.get("attn_sinks.weight")     # GPT-OSS: one softmax sink logit per head of this rank
        chunked = sp["attn_chunk"] and (sp["chunk_layers"] is None or i in sp["chunk_layers"])
        self.chunk = sp["attn_chunk"] if chunked else 0      # Llama 4: attention within aligned chunks
        # Llama 4 scales q by its temperature only in the layers without RoPE; Ministral 3 in every layer
        self.query_scale = None if sp["query_scale_nope_only"] and self.rope else model.query_scale
        if sp["qk_norm"] == "l2" and self.rope:   # Llama 4: RMS without a weight after RoPE, as a weight of ones
            ones = torch.ones(self.head_dim, dtype=model.dtype, device=model.device)
            self.t = tensors = {**tensors, "q_norm.weight": ones, "k_norm.weight": ones}
        self.activation = model.activation
        # Gemma 3n: this layer's MLP gate sparsity (0: none) and its normal quantile
        self.sparsity = (sp.get("gate_sparsity") or [0.0] * sp["num_layers"])[i]
        self.sparsity_z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(self.sparsity, dtype=torch.float32)) \
            if self.sparsity else None
        cp = sp["compressed"]
        # DeepSeek-V4: this layer's compressor ("csa", "hca" or None) and the tokens an entry pools; its compressed
        # layers take the main RoPE table (the compressors'), the purely sliding ones the local one
        self.compress = "csa" if cp and i in cp["csa_layers"] else "hca" if cp and i in cp["hca_layers"] else None
        self.rate = cp["rates"][self.compress] if self.compress else 0
        if cp:
            self.rope_table = "global" if self.compress else "local"
            self.head_ones = torch.ones(self.head_dim, dtype=model.dtype, device=model.device)
            self.out_a = _group_blocks(tensors["attn_out_a.weight"], cp["o_groups"] // model.tp)
        ng = sp.get("ngram")
        if ng and i in ng["layers"]:     # Qwen4-Exp: this layer's hash multipliers and table sizes, on the device
            tab = ng["tables"][str(i)]
            self.ng_mult, self.ng_sizes, self.ng_offsets = (
                torch.tensor(tab[k], dtype=torch.long, device=model.device)
                for k in ("multipliers", "sizes", "offsets"))
        # DiffLlama: its differential attention runs as plain attention over heads twice as wide: q and k padded
        # with zeros, each value head carrying both halves' values (see `_diff_qkv`); lambda per layer
        self.diff = sp.get("diff_attn", False)
        if self.diff:
            self.head_dim = self.v_dim = 2 * self.head_dim
            lq1, lk1, lq2, lk2 = tensors["diff_lambda"].float().view(4, -1)
            self.diff_init = 0.8 - 0.6 * math.exp(-0.3 * i)
            self.diff_ones = torch.ones(self.head_dim, dtype=model.dtype, device=model.device)
            self.diff_lambda = ((lq1 * lk1).sum().exp().to(model.dtype) - (lq2 * lk2).sum().exp().to(model.dtype)
                                + self.diff_init)
        # Doge: the keys a query keeps at most (0: no dynamic mask); this rank's kv heads among dt_proj's outputs,
        # and the channels of its v that its dt_proj columns read (a kv head shared by several ranks splits them)
        dm = sp.get("dyn_mask")
        self.dyn_window = dm["keep_window"] if dm else 0
        if dm:
            rep, r = model.par["kv_replication"], model.rank
            self.dyn_heads = slice(r // rep * self.kv_heads, (r // rep + 1) * self.kv_heads)
            w = self.kv_heads * self.head_dim // rep
            self.dyn_cols = slice(r % rep * w, (r % rep + 1) * w)
        # ZAYA's CCA: which of this rank's v channels are the delayed half (the kv heads' channels from
        # KV * head_dim / 2 on, counted over every rank), and the conv's inputs it keeps (taps - 1 of each conv)
        self.cca = sp.get("cca")
        if self.cca:
            first = model.rank * self.kv_heads * self.head_dim
            ch = torch.arange(first, first + self.kv_heads * self.head_dim, device=model.device)
            self.cca_delayed = ch >= sp["num_kv_heads"] * self.head_dim // 2
            self.cca_keep = self.cca["depthwise"] + self.cca["grouped"] - 2
        # the keys a kept block holds: MiniMax-M3's blocks, Qwen4-Exp's QSA blocks
        self.keep_block = (sp["block_sparse"] or {}).get("block") or (sp.get("qsa") or {}).get("rate")
        # a hybrid's linear layer: (its mixer method, its output projection's slot); None: attention
        self.linear = None
        if i in (sp["linear_layers"] or ()):
            self.linear = (("mamba", "ssm_out") if sp["ssm"] else ("short_conv", "sconv_out") if sp["short_conv"]
                           else ("mamba1", "mamba_out") if sp["mamba"]
                           else ("rglru", "rg_out") if sp.get("rglru")
                           else ("mlstm", "mlstm_out") if sp.get("mlstm")
                           else ("lightning", "lin_out") if sp["lightning"]
                           else ("kda", "lin_out") if sp["linear_attn"].get("decay") == "channel"
                           else ("linear_attention", "lin_out"))
        self.part = sp["block_parts"][i] if sp["block_parts"] else None     # Nemotron-H: "mixer" or "mlp" alone
        # HRM-Text: the first block of a stack's run (but the first run) ends the run before it, whose stack's state
        # ("L" or "H") it sets
        lp, self.loop_from = sp.get("loop"), None
        if lp and i % lp["stack_layers"] == 0 and i:
            before = i // lp["stack_layers"] - 1
            self.loop_from = "H" if before % (lp["l_cycles"] + 1) == lp["l_cycles"] else "L"
        if self.linear and sp["ssm"]:        # Mamba2's per-head A = -exp(A_log), step bias and skip, fp32 once
            self.ssm_a = -tensors["ssm.a_log"].float().exp()
            self.dt_bias, self.ssm_d = tensors["ssm.dt_bias"].float(), tensors["ssm.d"].float()
        elif self.linear and sp["mamba"]:     # Mamba 1's per-channel decay rows and skip, fp32 once
            self.ssm_a = -tensors["mamba.a_log"].float().exp()
            self.ssm_d = tensors["mamba.d"].float()
            if sp["mamba"]["norms"] == "plain":   # FalconMamba's dt/B/C norms have no weight: a weight of ones
                R, N = sp["mamba"]["dt_rank"], sp["mamba"]["state"]
                self.t = tensors = {**tensors, **{f"mamba_{n}_norm.weight": torch.ones(w, dtype=model.dtype,
                                                                                       device=model.device)
                                                  for n, w in (("dt", R), ("b", N), ("c", N))}}
        elif self.linear and sp["lightning"]:      # MiniMax: each head's state decays by exp(-slope), fp32
            H, L = model.heads * model.tp, sp["num_layers"]
            slope = (1 / (2 ** (8 / H))) ** (torch.arange(H) + 1) * (1 - i / (L - 1 + 1e-5) + 1e-5)
            self.slope = slope[model.rank * model.heads:(model.rank + 1) * model.heads].to(model.device)
        elif self.linear and sp["linear_attn"]:      # the decay's parameters in fp32: g = -exp(A_log) * softplus(..)
            self.decay_rate = tensors["lin_decay.a_log"].float().exp()
            self.dt_bias = tensors["lin_decay.dt_bias"].float()
        # latent attention's decode step takes kv_b into q and o: [H, nope, R], [H, R, v] (Kimi Linear: not in
        # its KDA layers)
        if sp["mla"] and not self.linear:
            kv_b, nd = tensors["kv_b.weight"], self.mla["nope_dim"]
            kv_b = kv_b.dequantize(model.dtype) if isinstance(kv_b, Int8Weight) else kv_b
            kv_b = kv_b.view(self.heads, nd + self.mla["v_dim"], -1)
            self.w_uk, self.w_uv = kv_b[:, :nd].contiguous(), kv_b[:, nd:].transpose(1, 2).contiguous()
            if "q_scale" in self.mla:      # Dots3 Note: the normed q and kv latents times sqrt(hidden / rank),
                self.t = tensors = {**tensors, **{      # folded into their norms' weights once, here
                    f"{n}_norm.weight": (tensors[f"{n}_norm.weight"].float() * self.mla[f"{n[:-2]}_scale"])
                    .to(tensors[f"{n}_norm.weight"].dtype) for n in ("q_a", "kv_a")}}
        self.conformer = sp.get("conformer")
        if self.conformer and self.conformer["position"] == "rotary":   # q and k read a rotated input, v the plain
            w = tensors["qkv.weight"]                                   # one: the projection as its q, k, v blocks
            self.qkv_parts = (_group_blocks(w, 3), tensors["qkv.bias"].view(3, -1))
        if self.activation == "xielu":      # Apertus: this layer's parameters, read and transformed once, here
            ap, an, beta, eps = (tensors[f"act.{p}"].float().reshape(-1)[0].cpu()
                                 for p in ("alpha_p", "alpha_n", "beta", "eps"))
            softplus = torch.nn.functional.softplus
            self.activation = ("xielu", float(softplus(ap)), float(beta + softplus(an)), float(beta), float(eps))

    def forward(self, x, residual, positions, cache, key_padding_mask, pos_t=None, seq_t=None, x_norm=None,
                x_gain=None, x_scale=None):
        """x_norm: the previous block's output norm (Gemma 2/3), still to be applied to x: it rides in this
        block's first add+norm, as does x_gain, the previous block's scalar on the whole stream (Gemma 4), and
        x_scale, the previous block's factor on x as it joins the stream. This block's own are left to the next
        (see `out_norm`, `out_gain`, `out_scale`). Granite scales each half's output by residual_scale as it joins
        the stream (x too, unless it is the embedding); Beam scales both by the addition's depth (`attn_add`)."""
        m, t = self.m, self.t
        ops = m.ops
        if self.conformer:
            return self._conformer(x, key_padding_mask), None
        if m.spec["residual"] == "parallel":
            return self._parallel(x, residual, positions, cache, key_padding_mask, pos_t, seq_t)
        if m.spec["residual"] == "normed":
            return self._normed(x, residual, positions, cache, key_padding_mask, pos_t, seq_t, x_scale)
        if m.spec["residual"] == "hyper":
            return self._hyper(x, positions, cache, key_padding_mask, pos_t, seq_t), None
        if m.spec["residual"] == "altup":
            return self._altup(x, positions, cache, key_padding_mask, pos_t, seq_t), None
        if m.spec["residual"] == "gated_hyper":
            return self._gated_hyper(x, positions, cache, key_padding_mask, pos_t, seq_t), None
        if self.loop_from is not None:     # HRM-Text: a stack's run begins
            return self._loop_turn(x, residual, positions, cache, key_padding_mask, pos_t, seq_t)
        if "attn_residual" in t:      # Doge: the stream weighted per channel before each half's output joins it
            return self._weighted(x, residual, positions, cache, key_padding_mask, pos_t, seq_t)
        if self.cca:                  # ZAYA: an fp32 stream, each half's output scaled in
            return self._cca_block(x, positions, cache, key_padding_mask, pos_t, seq_t)
        pre = m.spec["residual"] == "pre"
        if self.part == "hybrid":     # Zamba2: a shared transformer block feeds the Mamba2 layer's input
            return self._zamba_hybrid(x, residual, positions, cache, key_padding_mask, pos_t, seq_t)
        if self.part == "mlp":        # Nemotron-H: a layer of one half, pre-norm; the next layer adds its output
            h, residual = self._add_norm(x, residual, "mlp_norm", x_norm)
            return m.comm.all_reduce(self.mlp(h)), residual
        if self.part == "mixer":
            h, residual = self._add_norm(x, residual, "attn_norm", x_norm)
            return m.comm.all_reduce(self.mix(h, positions, cache, key_padding_mask, pos_t, seq_t)), residual
        if pre:
            h, residual = self._add_norm(x, residual, "attn_norm", x_norm, x_gain, x_scale)
        else:
            h = x
        a = m.comm.all_reduce(self.mix(h, positions, cache, key_padding_mask, pos_t, seq_t))
        cross = "cross_q.weight" in t     # an encoder-decoder (T5, BART): cross-attention over the source
        if cross and pre:
            h, residual = self._add_norm(a, residual, "cross_norm", None)
            a = m.comm.all_reduce(self.cross_attention(h))
        if pre:       # Gemma 2/3 norm the attention's output before it joins the stream: one launch for both
            h, residual = self._add_norm(a, residual, "mlp_norm", t.get("attn_post_norm.weight"), self.attn_add[1],
                                         self.attn_add[0])
        else:
            h, _ = ops.add_norm(a, x, t["attn_norm.weight"], t.get("attn_norm.bias"), m.eps, m.norm)
            if cross:       # BART: post-LN, its own norm after the residual add
                h, _ = ops.add_norm(m.comm.all_reduce(self.cross_attention(h)), h, t["cross_norm.weight"],
                                    t.get("cross_norm.bias"), m.eps, m.norm)
        if pre and "experts_norm.weight" in t:
            f = self._beside_dense(h, residual)
        else:
            f = m.comm.all_reduce(self.mlp(h))
        if pre and "ple_gate.weight" in t:
            return self._per_layer_input(f, residual)
        if pre:
            return f, residual
        y, _ = ops.add_norm(f, h, t["mlp_norm.weight"], t.get("mlp_norm.bias"), m.eps, m.norm)
        return y, None

    def _zamba_hybrid(self, x, residual, positions, cache, key_padding_mask, pos_t, seq_t):
        """Zamba2's hybrid layer, pre-norm (the stream s = x + residual): its shared block reads s beside the
        embeddings, RMS-normed (mem_norm), through attention (with this layer's adapters on q|k|v) and, after
        mlp_norm, the GeGLU MLP (with this layer's adapter on its input), with no residuals inside; this layer's
        mem_proj gives T, and the Mamba2 mixer reads attn_norm(s + T). Returns (the mixer's output, s): the next
        layer adds them, as the residual stays s. The block's attention and MLP are split over ranks like any
        layer's (one all-reduce after each); the adapters' down projections and mem_proj are replicated."""
        m, t = self.m, self.t
        ops = m.ops
        s = x if residual is None else x + residual
        a = ops.add_norm(torch.cat([s, m.embeds], -1), None, t["mem_norm.weight"], None, m.eps, m.norm)[0]
        qkv = ops.linear(a, t["qkv.weight"])
        if "qkv.lora_up" in t:
            qkv = qkv + ops.linear(ops.linear(a, t["qkv_lora_down.weight"]), t["qkv.lora_up"])
        a = m.comm.all_reduce(ops.linear(self._attend(qkv, positions, cache, key_padding_mask, pos_t, seq_t),
                                         t["attn_out.weight"]))
        f = ops.add_norm(a, None, t["mlp_norm.weight"], None, m.eps, m.norm)[0]
        g = ops.linear(f, t["mlp_in.weight"], t.get("mlp_in.bias")) + \
            ops.linear(ops.linear(f, t["mlp_lora_down.weight"]), t["mlp_in.lora_up"])
        f = m.comm.all_reduce(ops.linear(activate(g, self.activation), t["mlp_out.weight"], t.get("mlp_out.bias")))
        h = ops.add_norm(s + ops.linear(f, t["mem_proj.weight"]), None, t["attn_norm.weight"], None, m.eps,
                         m.norm)[0]
        return m.comm.all_reduce(self.mix(h, positions, cache, key_padding_mask, pos_t, seq_t)), s

    def _loop_turn(self, x, residual, positions, cache, key_padding_mask, pos_t, seq_t):
        """HRM-Text: the stream so far (x + residual) is the run before this one; normed (no weight: every norm of
        the family has none) it is that stack's new state. This run's input is z_L + z_H, through the plain
        pre-norm block; the stream restarts from it."""
        m = self.m
        m.loop_state[self.loop_from] = m.ops.add_norm(x, residual, m.g["final_norm.weight"], None, m.eps, m.norm)[0]
        h, residual = self._add_norm(m.loop_state["L"] + m.loop_state["H"], None, "attn_norm", None)
        a = m.comm.all_reduce(self.mix(h, positions, cache, key_padding_mask, pos_t, seq_t))
        h, residual = self._add_norm(a, residual, "mlp_norm", None)
        return m.comm.all_reduce(self.mlp(h)), residual

    def _per_layer_input(self, f, residual):
        """Gemma 4 E2B/E4B, after the MLP: the stream s = residual + mlp_post_norm(f) times gelu(ple_gate(s)) gates this
        layer's per-layer input, and ple_out projects it back; that output, still to be normed (ple_post_norm, the
        block's out_norm) and added to s, is returned with s. Replicated weights: every rank computes it whole."""
        m, t = self.m, self.t
        s = m.ops.add_norm(f, None, t["mlp_post_norm.weight"], None, m.eps, m.norm)[0] + residual
        g = m.ops.linear(s, t["ple_gate.weight"], None, m.ple_activation) * m.ple_inputs[:, :, self.i]
        return m.ops.linear(g, t["ple_out.weight"]), s

    def _add_norm(self, x, residual, norm: str, pre_weight, gain=None, x_scale=None):
        """The pre-norm residual's add+norm with this layer's `norm` (attn_norm / mlp_norm). OLMo 2 has neither: it
        norms only each half's output (pre_weight), so there the stream itself is the next half's input. x_scale:
        x's factor as it joins the stream (None: the model's residual_scale)."""
        m, t = self.m, self.t
        x_scale = m.residual_scale if x_scale is None else x_scale
        w = t.get(norm + ".weight")
        if w is not None:
            h, residual = m.ops.add_norm(x, residual, w, t.get(norm + ".bias"), m.eps, m.norm, pre_weight=pre_weight,
                                         x_scale=x_scale, gain=gain)
            gate = _NORM_GATES.get(norm)
            if gate is not None and gate + "_down.weight" in t:       # A.X K2: y times sigmoid(up(silu(down(y)))), in fp32, rounded
                g = m.ops.linear(m.ops.linear(h, t[gate + "_down.weight"], None, "silu"), t[gate + "_up.weight"])
                h = (h * torch.sigmoid(g.float())).to(h.dtype)
            return h, residual
        if gain is not None:
            raise ValueError("a layer scalar needs the next layer's input norm")   # the manifest rules this out
        if pre_weight is not None:
            x = m.ops.add_norm(x, None, pre_weight, None, m.eps, m.norm)[0]
        if residual is None:
            return x, x
        h = x * x_scale + residual if x_scale != 1.0 else x + residual
        return h, h

    def _normed(self, x, residual, positions, cache, key_padding_mask, pos_t, seq_t, x_scale):
        """MiniMax: the stream restarts from each norm's output. h = attn_norm(stream); s = a1 h + b1 mix(h);
        h2 = mlp_norm(s); the layer's output is a2 h2 + b2 mlp(h2), returned as (mlp(h2), a2 h2) with b2 the next
        add+norm's x_scale (`out_scale`). (a1, b1) are the linear layers' or the attention layers' factors."""
        m, t = self.m, self.t
        x_scale = m.residual_scale if x_scale is None else x_scale
        h, _ = m.ops.add_norm(x, residual, t["attn_norm.weight"], None, m.eps, m.norm, x_scale=x_scale)
        a = m.comm.all_reduce(self.mix(h, positions, cache, key_padding_mask, pos_t, seq_t))
        alpha, beta = m.spec["residual_factors"]["linear" if self.linear else "attn"]
        h, _ = m.ops.add_norm(a, h * alpha if alpha != 1.0 else h, t["mlp_norm.weight"], None, m.eps, m.norm,
                              x_scale=beta)
        alpha = m.spec["residual_factors"]["mlp"][0]
        return m.comm.all_reduce(self.mlp(h)), (h * alpha if alpha != 1.0 else h)

    def _hyper(self, x, positions, cache, key_padding_mask, pos_t, seq_t):
        """HY-V4's hyper-connections: x holds the stream's copies, [B, T, n, hidden]. Before each half
        (`FusedModel.hyper_mix`) weights read off all the copies mix them into the half's input and say how much of
        its output each copy takes; the half's output (all-reduced) joins every copy so weighted, in fp32, rounded
        once. Every rank computes the same weights."""
        m, t = self.m, self.t
        post, h = m.hyper_mix(x, t["attn_hc.fn"], t["attn_hc.base"], t["attn_hc.scale"])
        h = m.ops.add_norm(h, None, t["attn_norm.weight"], None, m.eps, m.norm)[0]
        a = m.comm.all_reduce(self.mix(h, positions, cache, key_padding_mask, pos_t, seq_t))
        x = _hyper_add(post, a, x)
        post, h = m.hyper_mix(x, t["mlp_hc.fn"], t["mlp_hc.base"], t["mlp_hc.scale"])
        h = m.ops.add_norm(h, None, t["mlp_norm.weight"], None, m.eps, m.norm)[0]
        f = m.comm.all_reduce(self.mlp(h))
        return _hyper_add(post, f, x)

    def _gated_hyper(self, x, positions, cache, key_padding_mask, pos_t, seq_t):
        """Qwen4-Exp: x holds the stream's copies [B, T, n, hidden]. An n-gram layer first adds its hashed n-gram
        features to every copy (`_ngram`). Before each half, `FusedModel.gated_mix` reads the copies into the half's
        input and says how much of its output each copy takes; the half's output (all-reduced) joins each copy so
        weighted. Replicated around the halves, in the model dtype as transformers computes it."""
        m, t = self.m, self.t
        if "ngram_key.weight" in t:
            x = x + self._ngram(x, cache, key_padding_mask, pos_t)
        w, h = m.gated_mix(x, t, "attn_hc")
        a = m.comm.all_reduce(self.mix(h, positions, cache, key_padding_mask, pos_t, seq_t))
        x = x + a.unsqueeze(-2) * w.unsqueeze(-1)
        w, h = m.gated_mix(x, t, "mlp_hc")
        f = m.comm.all_reduce(self.mlp(h))
        return x + f.unsqueeze(-2) * w.unsqueeze(-1)

    def _ngram(self, x, cache, key_padding_mask, pos_t):
        """Qwen4-Exp's hashed n-gram features for the copies x [B, T, n, hidden] (see configs/qwen4_exp.toml). The
        n-grams ending at each token read the last size - 1 ids before it (the cache's, or eos before a sequence),
        any that reaches back past an eos gives eos instead; each order's hash is the XOR of id times multiplier
        over its places, reduced modulo each of its heads' prime table sizes. Each rank looks up its slice of every
        head's row; one all-gather joins them. With a cache the last ids and the conv's last inputs carry over
        (fixed-size: a decode step is graph-safe)."""
        m, t, ng = self.m, self.t, self.m.spec["ngram"]
        ops = m.ops
        B, T, n, hs = x.shape
        L, eos, dil = ng["size"] - 1, ng["eos"], ng["size"]
        ids = m.token_ids.long()
        padded = key_padding_mask is not None and pos_t is None
        if padded:                                # transformers reads padding as eos
            ids = torch.where(key_padding_mask[:, -T:], ids, eos)
        st = None if cache is None else cache.ngram[self.i]
        if st is not None and pos_t is None and cache.length == 0:      # a new sequence: nothing carried over
            st["ids"].fill_(eos)
            st["conv"].zero_()
        prev = st["ids"] if st is not None else torch.full((B, L), eos, dtype=torch.long, device=ids.device)
        hist = torch.cat([prev, ids], 1)                                            # [B, L + T]
        if st is not None:
            st["ids"].copy_(hist[:, -L:])
        is_eos, ok, hashed = hist == eos, torch.ones_like(hist, dtype=torch.bool), hist * self.ng_mult[0]
        parts, k = [], ng["heads"]
        for s in range(1, L + 1):       # the id s places back, unless an eos lies between (or it is before 0)
            ok = ok & ~torch.nn.functional.pad(is_eos, (s, 0), value=True)[:, :-s]
            back = torch.nn.functional.pad(hist, (s, 0), value=eos)[:, :-s]
            hashed = hashed ^ (torch.where(ok, back, eos) * self.ng_mult[s])
            parts.append(torch.remainder(hashed[:, -T:, None], self.ng_sizes[(s - 1) * k:s * k])
                         + self.ng_offsets[(s - 1) * k:s * k])
        table, idx = t["ngram_embed.weight"], torch.cat(parts, -1)
        rows = table.rows(idx, x.dtype) if isinstance(table, Int8Weight) else table[idx]   # [B, T, heads, width / tp]
        if m.tp > 1:
            rows = m.comm.all_gather(rows.contiguous(), dim=-1)
        e = rows.flatten(-2)
        key = m.copy_norm(ops.linear(e, t["ngram_key.weight"]).view(B, T, n, hs), t["ngram_key_norm.weight"])
        value = ops.linear(e, t["ngram_value.weight"])
        gate = (key * m.copy_norm(x, t["ngram_query_norm.weight"])).sum(-1, keepdim=True) / math.sqrt(hs)
        gate = gate.abs().clamp_min(1e-6).sqrt() * gate.sign()
        v = torch.sigmoid(gate) * value.unsqueeze(-2)                           # [B, T, n, hidden]
        vn = m.copy_norm(v, t["ngram_conv_norm.weight"])
        if padded:
            keep = key_padding_mask[:, -T:, None, None].to(v.dtype)
            v, vn = v * keep, vn * keep
        C, S = n * hs, (ng["conv_kernel"] - 1) * dil
        inp = vn.reshape(B, T, C).transpose(1, 2)
        inp = torch.cat([st["conv"] if st is not None else inp.new_zeros(B, C, S), inp], -1)       # [B, C, S + T]
        if st is not None:
            st["conv"].copy_(inp[..., -S:])
        y = torch.nn.functional.conv1d(inp, t["ngram_conv.weight"].unsqueeze(1), groups=C, dilation=dil)
        return v + torch.nn.functional.silu(y).transpose(1, 2).reshape(B, T, n, hs)

    def _altup(self, x, positions, cache, key_padding_mask, pos_t, seq_t):
        """Gemma 3n: x holds the AltUp copies [B, T, n, hidden], copy 0 the active one. Each copy's prediction mixes
        every copy in (router-weighted, plus itself); the layer runs on the active copy's: attention beside LAuReL,
        both over the normed input, (input + attention + LAuReL) / sqrt(2), then the MLP, each half's output normed.
        Each copy then adds the layer's innovation (its output minus the active prediction) times 1 + its
        correction weight, and every copy but the active one the per-layer input term of the corrected active copy.
        Replicated around the halves (their outputs all-reduced), in the model dtype as transformers computes it."""
        m, t = self.m, self.t
        ops, n = m.ops, m.spec["altup"]["streams"]
        norm = lambda y, w: ops.add_norm(y, None, t[w], None, m.eps, m.norm)[0]      # noqa: E731
        route = self._altup_route
        pred = x + torch.einsum("btkj,btjh->btkh", ops.linear(route(x[..., 0, :]), t["altup_predict.weight"])
                                .unflatten(-1, (n, n)), x)
        active = pred[..., 0, :]
        h = norm(active, "attn_norm.weight")
        laurel = h + norm(ops.linear(ops.linear(h, t["laurel_left.weight"]), t["laurel_right.weight"]),
                          "laurel_norm.weight")
        a = norm(m.comm.all_reduce(self.mix(h, positions, cache, key_padding_mask, pos_t, seq_t)),
                 "attn_post_norm.weight")
        s = (active + a + laurel) / math.sqrt(2)
        out = s + norm(m.comm.all_reduce(self.mlp(norm(s, "mlp_norm.weight"))), "mlp_post_norm.weight")
        coef = ops.linear(route(out), t["altup_correct.weight"]) + 1.0                        # [B, T, n]
        x = pred + (out - active).unsqueeze(-2) * coef.unsqueeze(-1)
        first = x[..., 0, :]
        if m.spec["altup"]["correct_scale"]:
            first = first * t["altup_out_scale.weight"]
        g = ops.linear(first, t["ple_gate.weight"], None, m.ple_activation) * m.ple_inputs[:, :, self.i]
        return torch.cat([x[..., :1, :], x[..., 1:, :] + norm(ops.linear(g, t["ple_out.weight"]),
                                                               "ple_post_norm.weight").unsqueeze(-2)], -2)

    def _altup_route(self, y):
        """AltUp's router over one copy y: tanh(router(norm(y) / hidden)), [B, T, n]."""
        m, t = self.m, self.t
        r = m.ops.add_norm(y, None, t["altup_router_norm.weight"], None, m.eps, m.norm)[0] * y.shape[-1] ** -1.0
        return torch.tanh(m.ops.linear(r, t["altup_router.weight"]).float()).to(y.dtype)

    def _parallel(self, x, residual, positions, cache, key_padding_mask, pos_t, seq_t):
        """GPT-NeoX, GPT-J, Phi: attention and MLP both read the normed stream (GPT-NeoX normalises it twice, the
        others share one norm) and their outputs are added to it together. Both halves are row-parallel, so their
        partial sums meet in one all-reduce per block instead of two."""
        m, t = self.m, self.t
        ops = m.ops
        h, residual = ops.add_norm(x, residual, t["attn_norm.weight"], t.get("attn_norm.bias"), m.eps, m.norm)
        hm = h
        if "mlp_norm.weight" in t:
            hm, _ = ops.add_norm(residual, None, t["mlp_norm.weight"], t.get("mlp_norm.bias"), m.eps, m.norm)
        a = self.mix(h, positions, cache, key_padding_mask, pos_t, seq_t)
        return m.comm.all_reduce(a + self.mlp(hm)), residual

    def mix(self, h, positions, cache, key_padding_mask, pos_t=None, seq_t=None):
        """This rank's partial output of the token mixer, attention or a hybrid's linear attention, through its
        row-parallel output projection (the caller all-reduces)."""
        m, t = self.m, self.t
        if self.linear:
            mixer, out = self.linear
            y = getattr(self, mixer)(h, cache, key_padding_mask, pos_t)
            y = m.ops.linear(y, t[out + ".weight"], t.get(out + ".bias"))
            if not m.spec["ssm_beside_attention"]:
                return y
            # Falcon-H1: attention beside the SSM on the same input; both row-parallel, one all-reduce for the sum
            a = self.attention(h, positions, cache, key_padding_mask, pos_t, seq_t)
            return y + m.ops.linear(a, t["attn_out.weight"], t.get("attn_out.bias"))
        if "moa_router.weight" in t:          # JetMoe: attention experts, their own output projections
            return self._moa(h, positions, cache, key_padding_mask, pos_t, seq_t)
        a = self.attention(h, positions, cache, key_padding_mask, pos_t, seq_t)
        if self.diff:
            a = self._diff_combine(a)
        if "attn_sub_norm.weight" in t:       # BitNet: normed over every head of every rank first
            a = self._sub_norm(a, t["attn_sub_norm.weight"], self.heads * m.tp * self.v_dim)
        return m.ops.linear(a, t["attn_out.weight"], t.get("attn_out.bias"))

    def _moa(self, h, positions, cache, key_padding_mask, pos_t=None, seq_t=None):
        """JetMoe's mixture of attention heads -> this rank's partial output (the caller all-reduces). A softmax
        router (fp32) picks each token's top_k experts; expert e's q projection gives this rank's kv heads one
        query each, so a token has kv heads x top_k queries, attending over the one k and v every expert shares
        (kv head j's group: its queries of every expert). Each expert's outputs go through its own output
        projection, weighted by the router, summed; the bias joins once (rank 0)."""
        m, t = self.m, self.t
        B, T, hs = h.shape
        x = h.reshape(-1, hs)
        k = m.spec["moa"]["top_k"]
        probs = torch.nn.functional.linear(x, t["moa_router.weight"]).float().softmax(-1)
        weight, chosen = probs.topk(k, dim=-1)
        weight = weight / weight.sum(-1, keepdim=True)
        kv, hd = self.kv_heads, self.head_dim
        q = self._pairs(x, t["moa_q.weight"], chosen, k)                               # [N * k, kv * hd]
        q = q.view(B, T, k, kv, hd).transpose(2, 3).reshape(B, T, kv * k * hd)       # kv head j's queries together
        o = self._attend(torch.cat([q, m.ops.linear(h, t["moa_kv.weight"])], -1), positions, cache, key_padding_mask,
                         pos_t, seq_t)
        o = o.view(B * T, kv, k, hd).transpose(1, 2).reshape(B * T * k, kv * hd)     # each expert's heads together
        y = self._pairs(o, t["moa_out.weight"], chosen, 1).view(B * T, k, hs)
        y = (y.float() * weight.unsqueeze(-1)).sum(1).to(h.dtype)
        if "moa_out.bias" in t:
            y = y + t["moa_out.bias"]
        return y.view(B, T, hs)

    def _pairs(self, x, w, chosen, x_every: int):
        """Expert chosen[n, s]'s projection (of the experts `w`) of row n // x_every of x, for every (token, slot)
        pair in order: [N * k, out]. On the device where the backend indexes experts (a few pairs: graph-safe),
        else one product per expert picked."""
        m = self.m
        pairs = chosen.reshape(-1)
        if self._on_device(w, pairs.numel()):
            return m.ops.expert_linear(x, w.stacked, len(w), pairs, x_every, None)
        out = None
        for e in pairs.unique().tolist():
            rows = (pairs == e).nonzero(as_tuple=True)[0]
            y = m.ops.linear(x[rows // x_every], w[e])
            if out is None:
                out = y.new_empty(pairs.numel(), y.shape[-1])
            out[rows] = y
        return out

    def linear_attention(self, h, cache, key_padding_mask, pos_t=None):
        """Gated DeltaNet (Qwen3-Next, Qwen3.5). One projection gives q|k|v, the output gate z and the per-head b and
        a; a causal depthwise conv with SiLU runs over q|k|v; then each value head's [k_dim, v_dim] state decays by
        exp(g), g = -exp(A_log) * softplus(a + dt_bias), and learns v at rate sigmoid(b) by the delta rule (what it
        already recalls for k is replaced, not added to), and q reads it. The output is RMS-normed per head, times
        silu(z). With a cache the conv's last inputs and the state carry over: fixed-size, so a decode step is
        graph-safe as is, and a prompt continues from them."""
        m, t, la = self.m, self.t, self.m.spec["linear_attn"]
        B, T, _ = h.shape
        hk, hv = la["k_heads"] // m.tp, la["v_heads"] // m.tp
        dk, dv = la["k_dim"], la["v_dim"]
        h, _ = self._unpadded(h, key_padding_mask, pos_t)
        y = m.ops.linear(h, t["lin_in.weight"])                            # (B, T, 2 Kd + 2 Vd + 2 hv)
        qkv, z, b, a = y.split([2 * hk * dk + hv * dv, hv * dv, hv, hv], dim=-1)
        conv, state = self._linear_cache(cache, pos_t, (B, hv, dk, dv), h.device)
        qkv = m.ops.causal_conv1d(qkv, t["lin_conv.weight"], t.get("lin_conv.bias"), conv)
        q, k, v = qkv.split([hk * dk, hk * dk, hv * dv], dim=-1)
        beta = torch.sigmoid(b)                          # in the model dtype first, as HF computes it
        if "beta_scale" in la:                           # OLMo Hybrid (allow_neg_eigval): beta in (0, 2)
            beta = beta * la["beta_scale"]
        g = -self.decay_rate * torch.nn.functional.softplus(a.float() + self.dt_bias)
        o = m.ops.gated_delta(q.view(B, T, hk, dk), k.view(B, T, hk, dk), v.view(B, T, hv, dv), g, beta.float(),
                              state, dk ** -0.5)                            # (B, T, hv, dv)
        o = m.ops.gated_rms_norm(o, z.view(B, T, hv, dv), t["lin_norm.weight"], la.get("norm_eps", m.eps),
                                 gate=la.get("gate", "silu"))       # Qwen4-Exp may gate by sigmoid(z)
        return o.reshape(B, T, hv * dv)

    def kda(self, h, cache, key_padding_mask, pos_t=None):
        """Kimi Linear's KDA: Gated DeltaNet whose state decays per key channel. One projection gives q|k|v, each
        head's b and the narrow halves of two low-rank projections: f (the decay, widened by lin_f_b to one per
        head and key channel) and the output gate (widened by lin_g_b). The conv and the delta rule are Gated
        DeltaNet's; the output is RMS-normed per head times sigmoid(gate). Ling 2.5: f and the gate come out of
        lin_in whole (this rank's heads), and the decay may be bounded: bound * sigmoid(exp(A_log) (f + dt_bias))."""
        m, t, la = self.m, self.t, self.m.spec["linear_attn"]
        B, T, _ = h.shape
        H, dk, dv = la["v_heads"] // m.tp, la["k_dim"], la["v_dim"]
        full = la.get("gates") == "full"
        h, _ = self._unpadded(h, key_padding_mask, pos_t)
        y = m.ops.linear(h, t["lin_in.weight"])                  # (B, T, H (2 dk + dv + 1) + dk + dv)
        qkv, b, fa, ga = y.split([H * (2 * dk + dv), H, H * dk if full else dk, H * dv if full else dv], dim=-1)
        conv, state = self._linear_cache(cache, pos_t, (B, H, dk, dv), h.device)
        qkv = m.ops.causal_conv1d(qkv, t["lin_conv.weight"], t.get("lin_conv.bias"), conv)
        q, k, v = qkv.split([H * dk, H * dk, H * dv], dim=-1)
        f = (fa if full else m.ops.linear(fa, t["lin_f_b.weight"])).float().view(B, T, H, dk)
        f = f + self.dt_bias.view(H, dk)
        if "decay_bound" in la:
            g = la["decay_bound"] * torch.sigmoid(self.decay_rate[:, None] * f)
        else:
            g = -self.decay_rate[:, None] * torch.nn.functional.softplus(f)
        o = m.ops.gated_delta(q.view(B, T, H, dk), k.view(B, T, H, dk), v.view(B, T, H, dv), g,
                              torch.sigmoid(b).float(), state, dk ** -0.5)            # (B, T, H, dv)
        gate = (ga if full else m.ops.linear(ga, t["lin_g_b.weight"])).view(B, T, H, dv)
        return m.ops.gated_rms_norm(o, gate, t["lin_norm.weight"], m.eps, gate="sigmoid").reshape(B, T, H * dv)

    def lightning(self, h, cache, key_padding_mask, pos_t=None):
        """MiniMax's lightning attention: q|k|v = silu of one projection (interleaved per head), each head's [d, d]
        state S decays by exp(-slope) per token and adds k^T v, and q reads it (no softmax, no RoPE). The output is
        RMS-normed over every head of every rank, times sigmoid of a gate read off the layer's input. With a cache
        the state carries over: fixed-size, so a decode step is graph-safe as is."""
        m, t = self.m, self.t
        B, T, _ = h.shape
        H, d = self.heads, m.head_dim
        x, _ = self._unpadded(h, key_padding_mask, pos_t)
        q, k, v = m.ops.linear(x, t["lin_qkv.weight"], None, "silu").view(B, T, H, 3, d).unbind(3)
        _, state = self._linear_cache(cache, pos_t, (B, H, d, d), h.device)
        o = m.ops.lightning(q, k, v, self.slope, state).reshape(B, T, H * d)
        o = self._sub_norm(o, t["lin_out_norm.weight"], H * m.tp * d, LIGHTNING_NORM_EPS)
        return o * torch.sigmoid(m.ops.linear(h, t["lin_gate.weight"]))

    @staticmethod
    def _unpadded(h, key_padding_mask, pos_t):
        """(h with padded positions zeroed, the [B, T, 1] mask or None): padding must not enter a linear layer's
        conv or state (HF zeroes it too). A graph-safe decode step has no padding."""
        if key_padding_mask is None or pos_t is not None:
            return h, None
        mask = key_padding_mask[:, -h.shape[1]:, None].to(h.dtype)
        return h * mask, mask

    def _linear_cache(self, cache, pos_t, state_shape=None, device=None):
        """This layer's (conv inputs, recurrent state) in the cache, zeroed when a prompt starts a sequence.
        Without a cache: no conv inputs, and a zero state of state_shape (None: none) for this forward alone."""
        if cache is None:
            fresh = None if state_shape is None else torch.zeros(state_shape, dtype=torch.float32, device=device)
            return None, fresh
        conv, state = cache.conv[self.i], cache.state[self.i]
        if pos_t is None and cache.length == 0:      # a new sequence: nothing carried over
            conv.zero_()
            if state is not None:
                state.zero_()
        return conv, state

    def short_conv(self, h, cache, key_padding_mask, pos_t=None):
        """LFM2's gated short convolution: one projection gives B, C and x per channel; a causal depthwise conv
        (no activation) runs over B * x, and C gates its output. With a cache the conv's last inputs carry over."""
        m, t = self.m, self.t
        h, _ = self._unpadded(h, key_padding_mask, pos_t)
        b, c, x = m.ops.linear(h, t["sconv_in.weight"], t.get("sconv_in.bias")).chunk(3, dim=-1)
        conv, _ = self._linear_cache(cache, pos_t)
        return c * m.ops.causal_conv1d(b * x, t["sconv_conv.weight"], t.get("sconv_conv.bias"), conv, silu=False)

    def mamba(self, h, cache, key_padding_mask, pos_t=None):
        """Mamba2 (Granite 4.0's hybrids). One projection gives the gate z, x|B|C and each head's step dt; a causal
        depthwise conv with SiLU runs over x|B|C; then each head's [head_dim, state] matrix decays by exp(dt A) and
        takes in dt x B^T, C reads it, plus D x. The output times silu(z) is RMS-normed over each group's channels.
        With a cache the conv's last inputs and the state carry over, as in `linear_attention`."""
        m, t, s = self.m, self.t, self.m.spec["ssm"]
        B, T, _ = h.shape
        (H, G), P, N = m._ssm_local(), s["head_dim"], s["state"]
        h, mask = self._unpadded(h, key_padding_mask, pos_t)
        z, xbc, dt = m.ops.linear(h, t["ssm_in.weight"], t.get("ssm_in.bias")).split(
            [H * P, H * P + 2 * G * N, H], dim=-1)
        conv, state = self._linear_cache(cache, pos_t, (B, H, P, N), h.device)
        xbc = m.ops.causal_conv1d(xbc, t["ssm_conv.weight"], t.get("ssm_conv.bias"), conv)
        if mask is not None:
            xbc = xbc * mask
        x, b, c = xbc.split([H * P, G * N, G * N], dim=-1)
        dt = torch.nn.functional.softplus(dt.float() + self.dt_bias).clamp(s["dt_min"], s["dt_max"])
        y = m.ops.ssm_scan(x.view(B, T, H, P), dt, self.ssm_a, b.view(B, T, G, N), c.view(B, T, G, N), self.ssm_d,
                           state).reshape(B, T, H * P)
        gate = s.get("gate", "gate_first")      # Falcon-H1: the norm before the gate, or none
        if gate == "none":
            return (y.float() * torch.nn.functional.silu(z.float())).to(y.dtype)
        w, eps = t["ssm_norm.weight"], s.get("norm_eps", m.eps)       # Zamba2: its gated norm's own eps
        if m.tp > 1 and s["groups"] % m.tp:      # one group over every rank's heads: its RMS needs all their sums
            g = y.float() * torch.nn.functional.silu(z.float()) if gate == "gate_first" else y.float()
            ss = m.comm.all_reduce(g.square().sum(-1, keepdim=True))
            n = w * (g * torch.rsqrt(ss / (s["heads"] * P) + eps)).to(y.dtype)
            return n if gate == "gate_first" else (n.float() * torch.nn.functional.silu(z.float())).to(y.dtype)
        return m.ops.gated_rms_norm(y, z, w, eps, group_size=s["heads"] * P // s["groups"],
                                    gate_first=gate == "gate_first")

    def mamba1(self, h, cache, key_padding_mask, pos_t=None):
        """Mamba (1) (Mamba, FalconMamba, Jamba). One projection gives x and the gate z per channel; a causal
        depthwise conv with SiLU runs over x; x_proj reads all channels for dt's low rank, B and C (row-parallel:
        the ranks add up their partial sums), FalconMamba and Jamba RMS-norm those three, and dt_proj widens dt back
        to one step per channel. Each channel's [state] row decays at its own rates exp(dt A) and takes in dt x B,
        C reads it, plus D x, times silu(z). With a cache the conv's last inputs and the state carry over."""
        m, t, s = self.m, self.t, self.m.spec["mamba"]
        B, T, _ = h.shape
        Dc, N, R = s["inner"] // m.tp, s["state"], s["dt_rank"]
        h, mask = self._unpadded(h, key_padding_mask, pos_t)
        x, z = m.ops.linear(h, t["mamba_in.weight"], t.get("mamba_in.bias")).split([Dc, Dc], dim=-1)
        conv, state = self._linear_cache(cache, pos_t, (B, Dc, N), h.device)
        x = m.ops.causal_conv1d(x, t["mamba_conv.weight"], t.get("mamba_conv.bias"), conv)
        if mask is not None:
            x = x * mask
        p = m.comm.all_reduce(m.ops.linear(x, t["mamba_x.weight"]))           # (B, T, R + 2N), every rank's sum
        dt, b, c = p.split([R, N, N], dim=-1)
        if s["norms"]:
            dt, b, c = (m.ops.add_norm(v, None, t[f"mamba_{n}_norm.weight"], None, s["norm_eps"], "rms")[0]
                        for v, n in ((dt, "dt"), (b, "b"), (c, "c")))
        dt = m.ops.linear(dt, t["mamba_dt.weight"], t["mamba_dt.bias"])       # (B, T, Dc): softplus in the scan
        return m.ops.mamba_scan(x, dt, self.ssm_a, b, c, self.ssm_d, z, state)

    def mlstm(self, h, cache, key_padding_mask, pos_t=None):
        """xLSTM's mLSTM: one projection gives q, k, v and the output gate o; the input and forget gates are a logit
        per head (with a bias), soft-capped as cap tanh(x / cap); the matrix memory recurrence (kernels/mlstm.py)
        runs per head from a fixed-size fp32 state (C, n and m packed in one tensor: a decode step is graph-safe);
        each head's output is LayerNormed in fp32 (rounded, then times its weight), times sigmoid(o). Split over
        ranks by heads. Padding is zeroed at its input, as in every linear mixer here (transformers' xLSTM reads no
        attention mask)."""
        m, t, a = self.m, self.t, self.m.spec["mlstm"]
        B, T, _ = h.shape
        H, Q, V = a["heads"] // m.tp, a["qk_dim"] // m.tp, a["v_dim"] // m.tp
        dk, dv = Q // H, V // H
        h, _ = self._unpadded(h, key_padding_mask, pos_t)
        q, k, v, o = m.ops.linear(h, t["mlstm_in.weight"], t.get("mlstm_in.bias")).split([Q, Q, V, V], dim=-1)
        g = m.ops.linear(h, t["mlstm_gates.weight"], t["mlstm_gates.bias"])
        g = a["gate_cap"] * torch.tanh(g / a["gate_cap"])
        _, state = self._linear_cache(cache, pos_t, (B, H, dk + 1, dv + 1), h.device)
        y = m.ops.mlstm(q.view(B, T, H, dk), k.view(B, T, H, dk), v.view(B, T, H, dv), g[..., :H], g[..., H:],
                        state, a["eps"]).float()
        y = ((y - y.mean(-1, keepdim=True)) * torch.rsqrt(y.var(-1, keepdim=True, unbiased=False) + m.eps)).to(h.dtype)
        y = y.reshape(B, T, V) * t["mlstm_norm.weight"]
        if "mlstm_norm.bias" in t:
            y = y + t["mlstm_norm.bias"]
        return torch.sigmoid(o) * y

    def rglru(self, h, cache, key_padding_mask, pos_t=None):
        """RecurrentGemma's RG-LRU. One projection gives the y branch (through the activation) and x; a causal
        depthwise conv runs over x; each head's block-diagonal gates read it: the input gate i and the recurrence
        gate r, both sigmoid; a = exp(-8 r softplus(rg_a)); each channel's state h = a h + sqrt(1 - a^2) i x, in fp32
        (at position 0: x i enters whole and a is 0), and the output is h times y. With a cache the conv's last
        inputs and the state carry over: fixed-size, graph-safe. The recurrence: ops.linear_scan (one kernel launch
        on the Triton backend)."""
        m, t, rg = self.m, self.t, self.m.spec["rglru"]
        B, T, _ = h.shape
        W, H = rg["width"] // m.tp, rg["heads"] // m.tp
        h, mask = self._unpadded(h, key_padding_mask, pos_t)
        y, x = m.ops.linear(h, t["rg_in.weight"], t.get("rg_in.bias")).split([W, W], dim=-1)
        y = activate(y, rg["activation"])
        conv, state = self._linear_cache(cache, pos_t, (B, W), h.device)
        x = m.ops.causal_conv1d(x, t["rg_conv.weight"], t.get("rg_conv.bias"), conv, silu=False)
        if mask is not None:
            x = x * mask
        xs = x.view(B, T, H, W // H)
        gate = lambda w: torch.sigmoid(torch.einsum("bthi,hio->btho", xs, t[w + ".weight"])     # noqa: E731
                                       + t[w + ".bias"]).reshape(B, T, W)
        log_a = -8.0 * gate("rg_gate_a") * torch.nn.functional.softplus(t["rg_a"])
        a, mult = torch.exp(log_a), torch.sqrt(1 - torch.exp(2 * log_a))
        if pos_t is not None:             # a step at position 0 starts the sequence
            first = (pos_t == 0).view(1, 1, 1)
        else:
            first = (torch.arange(T, device=h.device) + (cache.length if cache is not None else 0) == 0).view(1, T, 1)
        a, mult = a.masked_fill(first, 0.0), mult.masked_fill(first, 1.0)
        return m.ops.linear_scan(a, (x * gate("rg_gate_x")) * mult.to(x.dtype), state) * y

    def _head_norm(self, q, k, qk_norm):
        """Each q and k head normalised with the weight (and bias) every head shares (q_norm, k_norm)."""
        ops, eps, kind = self.m.ops, qk_norm[2], qk_norm[3]
        return (ops.add_norm(q, None, qk_norm[0], qk_norm[4], eps, kind)[0],
                ops.add_norm(k, None, qk_norm[1], qk_norm[5], eps, kind)[0])

    def _wide_qk_norm(self, q, k):
        """q/k norms whose weight is not shared by every head, in fp32 then rounded once: Command R+ normalises each
        head with its own weight (LayerNorm), OLMo 2 takes one RMS over all heads of the projection. Across ranks
        that RMS needs every rank's sum of squares: one small all-reduce each for q and k, where a kv head held by
        several ranks (replication) is counted once."""
        m, t, sp = self.m, self.t, self.m.spec
        out = []
        for x, w, heads, repl in ((q, t["q_norm.weight"], self.heads * m.tp, 1),
                                  (k, t["k_norm.weight"], sp["num_kv_heads"], m.par["kv_replication"])):
            xf = x.float()                                       # (B, T, this rank's heads, hd)
            if sp["qk_norm"] == "full":
                ss = xf.square().sum((-2, -1), keepdim=True)
                if m.tp > 1:
                    ss = m.comm.all_reduce(ss) / repl
                y = xf * torch.rsqrt(ss / (heads * x.shape[-1]) + m.eps)
            elif m.norm.startswith("layer"):
                y = nn.functional.layer_norm(xf, (x.shape[-1],), None, None, m.eps)
            else:
                y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + m.eps)
            out.append((y * w.float().view(x.shape[-2], x.shape[-1])).to(x.dtype))
        return out

    @property
    def out_norm(self):
        """The norm of this block's MLP output (Gemma 2/3; A.X K1: in its mixture layers only), which the caller
        folds into the next add+norm."""
        if self.m.spec["residual"] == "altup":      # Gemma 3n: every norm is applied in the block
            return None
        if "ple_post_norm.weight" in self.t:      # Gemma 4 E2B/E4B: the MLP's norm is applied in the block
            return self.t["ple_post_norm.weight"]
        w = self.t.get("mlp_post_norm.weight")
        return w if w is not None else self.t.get("moe_post_norm.weight")

    @property
    def out_gain(self):
        """Gemma 4's scalar on the whole stream after this block ([1]), likewise folded into the next add+norm; Beam's
        on the stream as the MLP's output joins it."""
        return self.mlp_add[1] if self.mlp_add[1] is not None else self.t.get("layer_scale.weight")

    @property
    def out_scale(self) -> float:
        """The factor on this block's MLP output as the next add+norm adds it to the stream."""
        return self.mlp_add[0]

    def device_routed(self, tokens: int) -> bool:
        """Whether a mixture's experts run from device-side routing for this many tokens (see `experts`)."""
        return self._on_device(self.t.get("experts_in.weight"), tokens * self.m.spec["experts_per_token"])

    def _on_device(self, experts, pairs: int) -> bool:
        """Whether this many (token, expert) pairs of these experts run in one launch with the expert ids left on
        the device (no host sync: a decode step stays graph-safe): a backend that indexes experts, a few pairs, the
        experts stacked."""
        return pairs <= 64 and hasattr(self.m.ops, "expert_linear") and getattr(experts, "stacked", None) is not None

    def mlp(self, h):
        """This rank's partial MLP output (row-parallel: the caller all-reduces)."""
        m, t = self.m, self.t
        if "router.weight" in t:
            y = self.experts(h)
            if m.spec["shortcut_experts"]:      # LongCat-Flash: the mixture's output joins after the next layer's MLP
                m.shortcut, y = y, 0
            if "shared_in.weight" in t:      # an always-on expert (Qwen2-MoE: scaled by its own sigmoid gate)
                f = m.ops.linear(m.ops.linear(h, t["shared_in.weight"], None, m.activation), t["shared_out.weight"])
                if "shared_gate.weight" in t:    # replicated, so it scales each rank's partial sum alike
                    f = torch.sigmoid(torch.nn.functional.linear(h, t["shared_gate.weight"])) * f
                if m.spec["shared_scale"] != 1.0:      # Cohere 2 MoE's "average" of routed and shared
                    f = f * m.spec["shared_scale"]
                y = y + f
            if "experts_shared.bias" in t:       # JetMoe: one bias on the weighted sum (rank 0 only)
                y = y + t["experts_shared.bias"]
            return y
        if self.sparsity:            # Gemma 3n: the gate thinned before its activation
            gate, up = m.ops.linear(h, t["mlp_in.weight"], t.get("mlp_in.bias")).chunk(2, -1)
            f = activate(torch.cat([self._sparse_gate(gate), up], -1), self.activation)
        else:
            f = m.ops.linear(h, t["mlp_in.weight"], t.get("mlp_in.bias"), self.activation)
        if "mlp_sub_norm.weight" in t:        # BitNet: normed over every unit of every rank first
            f = self._sub_norm(f, t["mlp_sub_norm.weight"], self.mlp_units)
        y = m.ops.linear(f, t["mlp_out.weight"], t.get("mlp_out.bias"))
        if m.shortcut is not None:              # the previous layer's mixture (a partial sum, as y is)
            y, m.shortcut = y + m.shortcut, None
        return y

    def _sparse_gate(self, gate):
        """Gemma 3n's activation sparsity: relu(gate - (mean + std * z)), mean and std over the MLP's whole width (every
        rank's units; padded ones are zero and left out of the count), z the normal quantile of the layer's target
        sparsity, in the gate's dtype."""
        m = self.m
        z = self.sparsity_z.to(gate.dtype)
        if m.tp == 1:
            mean, std = gate.mean(-1, keepdim=True), gate.std(-1, keepdim=True, unbiased=False)
        else:
            g = gate.float()
            sums = m.comm.all_reduce(torch.cat([g.sum(-1, keepdim=True), g.square().sum(-1, keepdim=True)], -1))
            mean = sums[..., :1] / self.mlp_units
            std = (sums[..., 1:] / self.mlp_units - mean.square()).clamp(min=0).sqrt()
            mean, std = mean.to(gate.dtype), std.to(gate.dtype)
        return torch.relu(gate - (mean + std * z))

    def _sub_norm(self, x, weight, n: int, eps: float | None = None):
        """BitNet's RMSNorm inside a half, over a width split across ranks (this rank's heads, or its MLP units, the
        padded ones zero): every rank's sum of squares, over n, the whole width; rounded, then times the weight.
        MiniMax's lightning attention norms its output so too, with its own eps."""
        m = self.m
        eps = m.eps if eps is None else eps
        if m.tp == 1 and x.shape[-1] == n:
            return m.ops.add_norm(x, None, weight, None, eps, "rms")[0]
        xf = x.float()
        ss = m.comm.all_reduce(xf.square().sum(-1, keepdim=True))
        return (xf * torch.rsqrt(ss / n + eps)).to(x.dtype) * weight

    def _beside_dense(self, h, stream):
        """Gemma 4 26B-A4B: the dense MLP reads h (mlp_norm of the stream), the experts the stream through their
        own norm, the router the stream itself; each branch's output is normed before the two are added. Both
        branches are row-parallel: one all-reduce of the two partial sums side by side, then the norms."""
        m, t = self.m, self.t
        ops = m.ops
        d = ops.linear(ops.linear(h, t["shared_in.weight"], None, m.activation), t["shared_out.weight"])
        x = ops.add_norm(stream, None, t["experts_norm.weight"], None, m.eps, m.norm)[0]
        e = self.experts(x, route=stream)
        d, e = m.comm.all_reduce(torch.cat([d, e], -1)).split(d.shape[-1], -1)
        d = ops.add_norm(d.contiguous(), None, t["shared_post_norm.weight"], None, m.eps, m.norm)[0]
        e = ops.add_norm(e.contiguous(), None, t["experts_post_norm.weight"], None, m.eps, m.norm)[0]
        return d + e

    def experts(self, h, route=None):
        """A sparse MLP (Mixtral, Qwen3-MoE, GPT-OSS): a softmax router (fp32) picks each token's top-k experts,
        their weights renormalised to sum to 1 where the model does so, and the token's output is the weighted sum
        of those experts' gated MLPs. Each expert runs once on the tokens routed to it. With a backend that
        indexes experts on the device (Triton; int8 or float experts), a few tokens (a decode step) take one launch
        per projection over (token, expert) pairs instead: no host sync, so the step stays CUDA-graph capturable.
        Otherwise the routing is read on the host. GPT-OSS's router and experts have biases; experts_out's is on
        rank 0 only (row-parallel), so it is weighted and summed once. route: what the router reads, if not h
        (Gemma 4: the stream, while the experts read it normed)."""
        m, t = self.m, self.t
        x = h.reshape(-1, h.shape[-1])
        k = m.spec["experts_per_token"]
        weight, chosen = self._route(x if route is None else route.reshape(-1, route.shape[-1]), k)
        ins, outs = t["experts_in.weight"], t["experts_out.weight"]
        n = len(ins)
        act = m.experts_activation or m.activation      # HY-V4's experts clamp their inputs; its MLP does not
        # LongCat-Flash: ids from n on are identity experts, each passing x through times its weight; their sum is
        # added on rank 0 only, as the routed experts' outputs are partial sums over the ranks
        passed = (weight * (chosen >= n)).sum(-1, keepdim=True) if m.spec["zero_experts"] else None
        passed = passed if m.rank == 0 else None
        b_in, b_out = t.get("experts_in.bias"), t.get("experts_out.bias")
        b_in = None if b_in is None else b_in.view(n, -1)
        b_out = None if b_out is None else b_out.view(len(outs), -1)
        scale_in = m.spec["experts_scale_input"]     # Llama 4: the weight scales what goes into the expert
        if self.device_routed(x.shape[0]):
            if m.spec["zero_experts"]:                # an identity pick runs expert 0 with a weight of zero
                weight, chosen = weight * (chosen < n), chosen.masked_fill(chosen >= n, 0)
            pairs = chosen.reshape(-1)
            if scale_in:                             # one input row per (token, expert) pair
                xs = (x.repeat_interleave(k, 0).float() * weight.reshape(-1, 1)).to(x.dtype)
                y = m.ops.expert_linear(xs, ins.stacked, n, pairs, 1, act, b_in)
            else:
                y = m.ops.expert_linear(x, ins.stacked, n, pairs, k, act, b_in)  # [tokens * k, I]
            y = m.ops.expert_linear(y, outs.stacked, len(outs), pairs, 1, None, b_out)      # [tokens * k, h]
            y = y.view(-1, k, y.shape[-1]).float()
            y = (y if scale_in else y * weight[..., None]).sum(1)
            return (y if passed is None else y + x.float() * passed).to(x.dtype).view_as(h)
        out = torch.zeros_like(x) if passed is None else (x.float() * passed).to(x.dtype)
        for e in chosen.unique().tolist():
            if e >= n:
                continue
            token, k = (chosen == e).nonzero(as_tuple=True)
            xe = (x[token].float() * weight[token, k, None]).to(x.dtype) if scale_in else x[token]
            y = m.ops.linear(xe, ins[e], None if b_in is None else b_in[e], act)
            y = m.ops.linear(y, outs[e], None if b_out is None else b_out[e])
            out.index_add_(0, token, y if scale_in else (y.float() * weight[token, k, None]).to(out.dtype))
        return out.view_as(h)

    def _route(self, x, k: int):
        """(weights [tokens, k] fp32, expert ids [tokens, k]) of each token's top-k experts, on the device.
        softmax: over every expert's logit, the top k kept (chosen with correction_bias added, ERNIE 4.5; within
        the router_topk_groups groups whose best expert scores highest, DeepSeek-V2) and, where the model does,
        renormalised, then times routed_scale. sigmoid (DeepSeek-V3, GLM-4.5): each expert scored on its own in fp32;
        the choice adds correction_bias to the scores and keeps to the router_topk_groups groups whose two best
        scores sum highest; the weights are the chosen experts' own scores, renormalised where the model does, times
        routed_scale. sigmoid_logits (Kolibri): the same, but the correction_bias is added to the logits, not the
        scores, for the choice (top k of logits + bias; sigmoid is monotonic, the bias is not added in its range)."""
        sp, t = self.m.spec, self.t
        if "router_in.weight" in t:      # ZAYA's router MLP
            return self._eda_route(x)
        G = sp["router_groups"]
        if sp["router"] == "sparsemixer":
            return self._sparsemixer(torch.nn.functional.linear(x, t["router.weight"]), sp["router_jitter"])
        if "router.scale" in t:          # Gemma 4: the router reads x RMS-normed (no weight) times scale / sqrt(hidden)
            x = self.m.ops.add_norm(x, None, self.router_ones, None, self.m.eps, "rms")[0]
            x = x * t["router.scale"] * x.shape[-1] ** -0.5
        if sp["router"] == "softmax":
            probs = torch.nn.functional.linear(x, t["router.weight"], t.get("router.bias")).float().softmax(-1)
            if "router.token_experts" in t:       # DeepSeek-V4's hash layers (with scoring_func softmax)
                chosen = t["router.token_experts"][self.m.token_ids.reshape(-1)]
                weight = probs.gather(1, chosen)
                return weight / (weight.sum(-1, keepdim=True) + 1e-20) * sp["routed_scale"], chosen
            pick = probs
            if "router.correction_bias" in t:     # ERNIE 4.5: the choice adds it to the probabilities
                pick = probs + t["router.correction_bias"].float()
            if G > 1:        # DeepSeek-V2: only within the router_topk_groups groups holding the best single experts
                E = probs.shape[-1]
                best = pick.view(-1, G, E // G).amax(-1)                                  # [tokens, G]
                keep = torch.zeros_like(best).scatter_(1, best.topk(sp["router_topk_groups"], dim=-1)[1], 1.0)
                pick = pick.masked_fill(~keep.bool().repeat_interleave(E // G, dim=1), float("-inf"))
            chosen = pick.topk(k, dim=-1)[1]
            weight = probs.gather(1, chosen)
            if sp["experts_renormalize"]:
                weight = weight / weight.sum(-1, keepdim=True)
            if "router.expert_factor" in t:       # Gemma 4: each expert's own factor on its weight
                weight = weight * t["router.expert_factor"].float()[chosen]
            return weight * sp["routed_scale"], chosen
        logits = torch.nn.functional.linear(x.float(), t["router.weight"].float())
        if sp["router_softcap"]:                  # Laguna: the logits capped before they are scored
            logits = torch.tanh(logits / sp["router_softcap"]) * sp["router_softcap"]
        # DeepSeek-V4: sqrt(softplus) scores; its hash layers take each token's experts from a table by its id
        scores = logits.sigmoid() if sp["router"] != "sqrtsoftplus" else \
            torch.nn.functional.softplus(logits).sqrt()
        if "router.token_experts" in t:
            chosen = t["router.token_experts"][self.m.token_ids.reshape(-1)]
            weight = scores.gather(1, chosen)
            weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
            return weight * sp["routed_scale"], chosen
        pick = logits if sp["router"] == "sigmoid_logits" else scores
        if "router.correction_bias" in t:
            pick = pick + t["router.correction_bias"].float()
        E = scores.shape[-1]
        if G > 1:
            best = pick.view(-1, G, E // G).topk(2, dim=-1)[0].sum(-1)                      # [tokens, G]
            keep = torch.zeros_like(best).scatter_(1, best.topk(sp["router_topk_groups"], dim=-1)[1], 1.0)
            pick = pick.masked_fill(~keep.bool().repeat_interleave(E // G, dim=1), float("-inf"))
        chosen = pick.topk(k, dim=-1)[1]
        weight = scores.gather(1, chosen)
        if sp["experts_renormalize"]:
            weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
        return weight * sp["routed_scale"], chosen

    @staticmethod
    def _sparsemixer(scores, jitter: float):
        """Phi-MoE's SparseMixer at inference: the best expert, then the best of the rest. Each pick's weight is a
        softmax over the scores within 2 * jitter of its own (relative to the larger magnitude, the pick itself
        included), read at the pick. In the router's dtype, as transformers computes it."""
        weights, chosen, rest = [], [], scores
        for _ in range(2):
            best, pick = rest.max(-1, keepdim=True)
            far = (best - scores) / scores.abs().clamp(min=best) > 2 * jitter
            weights.append(rest.masked_fill(far, float("-inf")).softmax(-1).gather(-1, pick))
            chosen.append(pick)
            rest = rest.scatter(-1, pick, float("-inf"))
        return torch.cat(weights, -1).float(), torch.cat(chosen, -1)

    def attention(self, h, positions, cache, key_padding_mask, pos_t=None, seq_t=None):
        """pos_t (a device tensor [1]) and seq_t ({ring size: int32 [B]}, the rows to attend over: pos_t + 1, or
        at most the ring) select the graph-safe decode path: cache writes and lengths come from device memory, so
        the same captured graph serves every step."""
        m, t = self.m, self.t
        self.gate_in = h if "rel_gate.weight" in t else None     # WavLM: its position bias's gate reads h
        if self.cca:
            return self._cca_attention(h, positions, cache, key_padding_mask, pos_t, seq_t)
        if m.spec["compressed"]:
            return self._compressed_attention(h, positions, cache, key_padding_mask, pos_t)
        if m.spec["mla"]:
            x, q, gate = self._latent_query(h)
            o = self._latent_attention(h, x, q, positions, cache, key_padding_mask, pos_t, seq_t)
            if gate is not None:       # A.X K2: each output channel times sigmoid(its gate), in fp32
                return (o.unflatten(-1, (self.heads, -1)) * torch.sigmoid(gate.float())).to(o.dtype).flatten(-2)
            if "attn_gate.weight" not in t:
                return o
            gate = m.ops.linear(h, t["attn_gate.weight"])
            if gate.shape[-1] == o.shape[-1]:      # HY-V4: every output channel times its own sigmoid(gate)
                return o * torch.sigmoid(gate)
            # Ling 2.5: each head's output times sigmoid(gate . x), in fp32 rounded to the model dtype
            gate = torch.sigmoid(gate.float()).to(o.dtype)
            return (o.unflatten(-1, (self.heads, -1)) * gate.unsqueeze(-1)).flatten(-2)
        # MiniMax-M3's sparse layers: the blocks of keys each of this rank's kv heads' queries keep
        keep = self._block_keep(h, positions, cache, pos_t) if "block_index_q.weight" in t else \
            self._qsa_keep(h, positions, cache, key_padding_mask, pos_t) if "qsa_qk.weight" in t else None
        qkv = m.ops.linear(h, t["qkv.weight"], t.get("qkv.bias"))
        if m.spec["qkv_clip"]:           # OLMo, MPT
            qkv = qkv.clamp(-m.spec["qkv_clip"], m.spec["qkv_clip"])
        if not m.spec["attn_gate"]:
            return self._attend(qkv, positions, cache, key_padding_mask, pos_t, seq_t, keep)
        gw = 1 if m.spec["attn_gate_heads"] else self.head_dim   # Qwen3.5: each head's output times sigmoid(gate);
        gate = qkv[..., -self.heads * gw:]                    # LFM3: one gate per head, over all its channels
        if "attn_gate.bias" in self.t:                        # Beam: a bias per head, before the sigmoid
            gate = (gate.unflatten(-1, (self.heads, gw)) + self.t["attn_gate.bias"].unsqueeze(-1)).flatten(-2)
        # Laguna: softplus in fp32, rounded to the model dtype
        gate = torch.sigmoid(gate) if m.spec["attn_gate_fn"] == "sigmoid" else \
            torch.nn.functional.softplus(gate.float()).to(gate.dtype)
        o = self._attend(qkv[..., :-self.heads * gw], positions, cache, key_padding_mask, pos_t, seq_t, keep)
        if gw == 1:
            return (o.unflatten(-1, (self.heads, self.head_dim)) * gate.unsqueeze(-1)).flatten(-2)
        return o * gate

    def _attend(self, qkv, positions, cache, key_padding_mask, pos_t=None, seq_t=None, keep=None):
        """keep: MiniMax-M3's block choice, (blocks [B, kv heads, T, blocks], positions [B, T]) (see _block_keep)."""
        if self.kv_from != self.i:
            return self._attend_shared(qkv, positions, cache, pos_t, seq_t)
        m, t = self.m, self.t
        B, T, _ = qkv.shape
        hd, Hq, Hk, vd = self.head_dim, self.heads, self.kv_heads, self.v_dim
        if self.diff:
            q, k, v = self._diff_qkv(qkv)
        else:
            q, k, v = qkv.split([Hq * hd, Hk * hd, Hk * vd], dim=-1)
            q, k, v = q.view(B, T, Hq, hd), k.view(B, T, Hk, hd), v.view(B, T, Hk, vd)
        dyn = self._dyn_bias(v) if self.dyn_window else None      # Doge: each new key's bias, from its value
        if m.spec["value_scale"] != 1.0:   # MiMo-V2-Flash: v scaled as projected, in the model dtype
            v = v * m.spec["value_scale"]
        if vd != hd:
            v = torch.nn.functional.pad(v, (0, hd - vd))
        v_norm = None
        if self.v_ones is not None:        # Gemma 4: each v head RMS-normed, no weight (in the append when decoding)
            if pos_t is None:
                v = m.ops.add_norm(v, None, self.v_ones, None, m.eps, "rms")[0]
            else:
                v_norm = (self.v_ones, m.eps)
        qk_norm = (t["q_norm.weight"], t["k_norm.weight"], m.eps, m.norm, t.get("q_norm.bias"), t.get("k_norm.bias")) \
            if "q_norm.weight" in t else None                   # Persimmon's q/k LayerNorms have biases
        if qk_norm is not None and m.spec["qk_norm"] not in ("head", "l2"):
            q, k = self._wide_qk_norm(q, k)
            qk_norm = None
        after = qk_norm is not None and m.spec["qk_norm_after_rope"]      # Hunyuan: rotate, then normalise
        if pos_t is not None:
            kc, vc, ring = cache.k[self.i], cache.v[self.i], cache.ring[self.i]
            key = -ring if cache.chunked[self.i] else ring           # which of the step's lengths this layer reads
            rope = (*m.rope_tables(self.rope_table, decode=True), m.rope_style, self.rotary_dim) \
                if self.rope else (None,) * 4
            if after:
                if self.rope:
                    q, k = m.ops.rope(q, k, rope[0], rope[1], pos_t.view(1, 1).expand(B, 1), m.rope_style,
                                      self.rotary_dim)
                q, k = self._head_norm(q, k, qk_norm)
                rope, qk_norm = (None,) * 4, None
            q = m.ops.decode_append(q, k, v, kc, vc, pos_t, *rope, qk_norm=qk_norm, ring=bool(ring),
                                    v_norm=v_norm)                                                  # (B, Hq, hd)
            if self.query_scale is not None:
                q = q * self.query_scale(pos_t).view(1, 1, 1)
            if dyn is not None:      # Doge: each key's bias, the keep window over the whole static cache
                return self._dyn_decode(q, kc, vc, dyn, cache, pos_t, seq_t[key])
            if keep is not None:     # MiniMax-M3: the chosen blocks of the whole static cache
                o = m.ops.decode_attention(q, kc, vc, seq_t[key], m.scale, None, 0, m.softcap, sinks=self.sinks,
                                           keep=keep[0][:, :, 0].contiguous(), keep_block=self.keep_block)
                return self._narrow(o.reshape(B, 1, Hq * hd))
            # a ring holds exactly the window (or the chunk so far): attend over its first seq_t[key] rows,
            # nothing to mask. T5's decoder: its relative bias over the cache rows (a table per layer in UMT5)
            bias = None
            if m.spec["rel_bias"]:
                table = t["attn_rel_bias.weight"] if "attn_rel_bias.weight" in t else m.g["rel_bias.weight"]
                bias = table[:, m.step_index]                                               # (Hq, S)
            o = m.ops.decode_attention(q, kc, vc, seq_t[key], m.scale, m.alibi, 0 if ring else self.window,
                                       m.softcap, sinks=self.sinks, chunk=0 if ring else self.chunk, bias=bias)
            return self._narrow(o.reshape(B, 1, Hq * hd))
        if qk_norm is not None and not after:    # Qwen3: each q and k head RMS-normalised before RoPE
            q, k = self._head_norm(q, k, qk_norm)
        if self.rope:
            q, k = m.ops.rope(q, k, *m.rope_for(positions, self.rope_table), positions, m.rope_style,
                              self.rotary_dim)
        if after:
            q, k = self._head_norm(q, k, qk_norm)
        if self.query_scale is not None:
            q = q * self.query_scale(positions)[..., None, None]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)          # (B, H, T, hd)
        if keep is not None:      # MiniMax-M3: each query over the blocks its indexer head chose
            blocks, qpos = keep[:2]
            if cache is not None:
                kc, vc, start = cache.k[self.i], cache.v[self.i], cache.length
                kc[:, :, start:start + T].copy_(k)
                vc[:, :, start:start + T].copy_(v)
                k, v = kc[:, :, :start + T], vc[:, :, :start + T]
            kpm = None if key_padding_mask is None else key_padding_mask.bool()[:, -k.shape[2]:]
            kblock = keep[2] if len(keep) > 2 else None
            return self._narrow(self._kept_attention(q, k, v, blocks, qpos, kpm, kblock).transpose(1, 2)
                                .reshape(B, T, -1))
        if dyn is not None:
            return self._dyn_attend(q, k, v, dyn, cache, key_padding_mask)
        bias = self._disentangled(q, k) if m.spec["disentangled"] else \
            self.t["attn_rel_bias.weight"][:, m.rel_index] if "attn_rel_bias.weight" in self.t else \
            self._gated_bias(self.gate_in) if self.gate_in is not None else None
        attend = self._keys(k, v, cache, key_padding_mask, bias)
        if self.i in m.kv_shared:           # later layers attend over these keys too (Gemma 4 E2B/E4B)
            m.shared_attend[self.i] = attend
        return self._narrow(attend(q))

    def _gated_bias(self, h):
        """WavLM: the model's relative-position bias [heads, T, S] with each query's row of each of this rank's heads
        times a gate made of that head's slice of the attention's input h [B, T, hidden]: rel_gate's 8 outputs summed
        in two fours, (a, b) = their sigmoids, gate = a * (b * const - 1) + 2. -> [B, heads, T, S]."""
        t, B, T = self.t, h.shape[0], h.shape[1]
        lo = self.m.rank * self.heads
        x = h.view(B, T, -1, self.head_dim)[:, :, lo:lo + self.heads]                   # [B, T, heads, hd]
        g = F.linear(x, t["rel_gate.weight"], t["rel_gate.bias"]).view(B, T, self.heads, 2, 4).sum(-1).sigmoid()
        gate = g[..., 0] * (g[..., 1] * t["rel_gate.const"] - 1.0) + 2.0                # [B, T, heads]
        return gate.transpose(1, 2).unsqueeze(-1) * self.m.score_bias

    def _conformer(self, x, key_padding_mask):
        """Wav2Vec2-Conformer's block on the stream x [B, T, hidden]: half of a feed-forward, self-attention, the
        convolution module and half of the second feed-forward, each added in turn, then the block's LayerNorm. Its
        own LayerNorms take conformer.norm_eps (Wav2Vec2-BERT's: the model's eps). key_padding_mask [B, T]: the real
        frames (None: all)."""
        m, t, eps = self.m, self.t, self.conformer["norm_eps"]

        def norm(y, name):
            return m.ops.add_norm(y, None, t[f"{name}.weight"], t[f"{name}.bias"], eps, "layer")[0]
        h = m.ops.linear(norm(x, "macaron_norm"), t["macaron_in.weight"], t["macaron_in.bias"], self.activation)
        x = m.comm.all_reduce(m.ops.linear(h, t["macaron_out.weight"], t.get("macaron_out.bias"))) * 0.5 + x
        x = m.comm.all_reduce(self._conformer_attention(norm(x, "attn_norm"), key_padding_mask)) + x
        x = x + m.comm.all_reduce(self._conformer_conv(norm(x, "conv_norm"), key_padding_mask))
        x = m.comm.all_reduce(self.mlp(norm(x, "mlp_norm"))) * 0.5 + x
        return norm(x, "block_norm")

    def _conformer_attention(self, h, key_padding_mask):
        """This rank's heads of self-attention over the normed stream h [B, T, hidden] -> its partial output. Rotary:
        h itself is rotated per head-sized chunk (half-split) before q and k read it; v reads it as it is. Relative
        (Transformer-XL): q + u scores the keys, q + v the projected sinusoid of each key's offset, both scaled.
        relative_key (Shaw): q also scores rel_dist's row [head_dim] of each key's offset j - i, clamped, scaled
        alike; every head reads the one table."""
        m, t = self.m, self.t
        B, T, _ = h.shape
        H, hd, pos = self.heads, self.head_dim, self.conformer["position"]
        if pos == "rotary":
            cos, sin = m.conformer_pos                                                    # [T, 1, hd] each
            x = h.view(B, T, -1, hd)
            x = (x * cos + torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin).view(B, T, -1)
            w, b = self.qkv_parts
            q, k, v = (m.ops.linear(y, w[j], b[j]) for j, y in enumerate((x, x, h)))
        else:
            q, k, v = m.ops.linear(h, t["qkv.weight"], t["qkv.bias"]).split(H * hd, -1)
        q, k, v = (y.view(B, T, H, hd).transpose(1, 2) for y in (q, k, v))                 # (B, H, T, hd)
        bias = None
        if pos == "relative":
            table, index = m.conformer_pos          # [2T - 1, hidden] for offsets T - 1 .. 1 - T; [T, T] into it
            p = F.linear(table, t["rel_pos.weight"]).view(-1, H, hd).permute(1, 2, 0)    # (H, hd, 2T - 1)
            scores = (q + t["rel_pos.v"].unsqueeze(1)) @ p                                # (B, H, T, 2T - 1)
            # the skew: query i, key j reads the offset i - j
            bias = scores.gather(-1, index.expand(B, H, T, T)) * m.scale
            q = q + t["rel_pos.u"].unsqueeze(1)
        elif pos == "relative_key":
            index = m.conformer_pos                 # [T, T]: query i, key j's row of rel_dist
            scores = q @ t["rel_dist.weight"].t()                                         # (B, H, T, rows)
            bias = scores.gather(-1, index.expand(B, H, T, T)) * m.scale
        o = m.ops.attention(q, k, v, m.scale, False, None, key_padding_mask, bias=bias)
        return m.ops.linear(o.transpose(1, 2).reshape(B, T, -1), t["attn_out.weight"], t.get("attn_out.bias"))

    def _conformer_conv(self, h, key_padding_mask=None):
        """The convolution module over the normed stream h [B, T, hidden] -> this rank's partial sum: the GLU of
        the first pointwise conv (this rank's channels), the depthwise conv over time, BatchNorm from its running
        statistics, the activation, then the second pointwise conv (row-parallel). Wav2Vec2-Conformer: 'same'
        padding, and padded frames read as they stand, as transformers reads them. Wav2Vec2-BERT (causal): padded
        frames (key_padding_mask False) zeroed first, taps - 1 frames of left padding, and a LayerNorm over all
        channels (conv_dw_norm) in place of BatchNorm."""
        m, t, cf = self.m, self.t, self.conformer
        causal = cf.get("causal", False)
        if causal and key_padding_mask is not None:
            h = h * key_padding_mask.unsqueeze(-1).to(h.dtype)
        a, gate = m.ops.linear(h, t["conv_in.weight"]).chunk(2, -1)
        w = t["conv_dw.weight"]                                                           # [channels, taps]
        y = (a * torch.sigmoid(gate)).transpose(1, 2)                                    # (B, channels, T)
        y = F.conv1d(F.pad(y, (w.shape[1] - 1, 0)) if causal else y, w.unsqueeze(1),
                     padding=0 if causal else w.shape[1] // 2, groups=w.shape[0]).transpose(1, 2)
        if cf.get("conv_norm") == "layer":
            y = self._channel_norm(y, t["conv_dw_norm.weight"], t["conv_dw_norm.bias"], cf["norm_eps"])
        else:
            y = F.batch_norm(y.transpose(1, 2), t["conv_bn.mean"], t["conv_bn.var"], t["conv_bn.weight"],
                             t["conv_bn.bias"], False, 0.0, cf["norm_eps"]).transpose(1, 2)
        return m.ops.linear(activate(y, self.activation), t["conv_out.weight"])

    def _channel_norm(self, y, weight, bias, eps):
        """A LayerNorm over every channel of y [B, T, channels], of which this rank holds its share (weight and
        bias its channels'): the others' gathered for the statistics, then this rank's normed."""
        m = self.m
        if m.tp == 1:
            return F.layer_norm(y, y.shape[-1:], weight, bias, eps)
        c = y.shape[-1]
        full = F.layer_norm(m.comm.all_gather(y.contiguous(), -1), (c * m.tp,), eps=eps)
        return full[..., m.rank * c:(m.rank + 1) * c] * weight + bias

    def cross_attention(self, h):
        """An encoder-decoder's cross-attention: this rank's q heads of h (B, T, hidden) over the source's keys and
        values (`FusedModel.attach`), no mask but the source's padding, no position bias."""
        m, t = self.m, self.t
        B, T, _ = h.shape
        if m.cross is None:
            raise ValueError("an encoder-decoder's decoder needs its source: call attach(encoder states) first")
        k, v = m.cross[self.i]
        if k.shape[0] != B:
            raise ValueError(f"the attached source has {k.shape[0]} rows and this batch {B}: attach its own source")
        q = m.ops.linear(h, t["cross_q.weight"], t.get("cross_q.bias")).view(B, T, self.heads, -1).transpose(1, 2)
        if m.cross_probe is not None:
            m.cross_probe(self.i, q, k)
        o = m.ops.attention(q, k, v, m.scale, False, None, m.cross_mask)                  # (B, H, T, hd)
        return m.ops.linear(o.transpose(1, 2).reshape(B, T, -1), t["cross_out.weight"], t.get("cross_out.bias"))

    def _disentangled(self, q, k):
        """DeBERTa's position terms for q, k (B, H, T, hd): q_i . k_rel[r] (c2p) plus k_j . q_rel[r] (p2c), r the
        row of i - j's bucket, k_rel and q_rel this layer's own key and query projections of the (normed) relative
        embeddings; scaled like the content term, [B, H, T, T]."""
        m, t = self.m, self.t
        H, hd, sp = self.heads, self.head_dim, m.spec["disentangled"]
        rel = m.ops.linear(m.rel_embed, t["qkv.weight"], t.get("qkv.bias"))         # (2 span, this rank's q|k|v)
        idx = m.rel_index.expand(*q.shape[:2], -1, -1)
        bias = 0
        if sp["c2p"]:
            k_rel = rel[:, H * hd:2 * H * hd].view(-1, H, hd)
            bias = bias + torch.einsum("bhtd,shd->bhts", q, k_rel).gather(-1, idx)
        if sp["p2c"]:           # key j's score against row r(i - j), transposed to (query, key)
            q_rel = rel[:, :H * hd].view(-1, H, hd)
            bias = bias + torch.einsum("bhtd,shd->bhts", k, q_rel).gather(-1, idx.transpose(-1, -2)).transpose(-1, -2)
        return bias * m.scale

    def _block_keep(self, h, positions, cache, pos_t=None):
        """MiniMax-M3's block indexer: which blocks of keys each of this rank's kv heads' queries keep, [B, kv heads,
        T, blocks] bool (over every cached position, or in a graph-safe decode step the whole static cache), with
        the queries' positions [B, T]. Its heads' queries and its one key per token come from the stream h, each
        RMS-normed per head and rotated like the attention's (over the first rotary_dim columns); a key's score for
        an indexer head is q . k; the scores of later keys are -inf; each block of `block` keys scores its best; the
        query's own block and the `local` - 1 before it score +inf; the `topk` best blocks are kept (fewer when fewer
        have a finite score). Indexer head g serves the q heads of kv group g. Replicated: every rank scores every
        indexer head, then takes its own kv heads' rows. The scores are made QUERY_CHUNK queries at a time, so a long
        prompt holds [heads, chunk, keys] of them, never [heads, T, keys]."""
        m, t, bs = self.m, self.t, self.m.spec["block_sparse"]
        B, T, _ = h.shape
        Hi, D, blk = bs["heads"], bs["dim"], bs["block"]
        q = m.ops.linear(h, t["block_index_q.weight"]).view(B, T, Hi, D)
        k = m.ops.linear(h, t["block_index_k.weight"]).view(B, T, 1, D)
        q = m.ops.add_norm(q, None, t["block_index_q_norm.weight"], None, m.eps, m.norm)[0]
        k = m.ops.add_norm(k, None, t["block_index_k_norm.weight"], None, m.eps, m.norm)[0]
        positions, cos, sin = self._rotation(positions, pos_t, B)
        q, k = m.ops.rope(q.contiguous(), k.contiguous(), cos, sin, positions, m.rope_style, self.rotary_dim)
        k = k.view(B, T, D)
        keys = self._index_keys(k, cache, pos_t)
        S = keys.shape[1]
        nb = -(-S // blk)
        group = (m.rank * self.heads + torch.arange(self.heads, device=h.device)) // (m.heads * m.tp // Hi)
        mine = group[::self.heads // self.kv_heads]          # the indexer head of each of this rank's kv heads
        kpos = torch.arange(S, device=h.device)
        out = []
        for c in range(0, T, QUERY_CHUNK):
            pos = positions[:, c:c + QUERY_CHUNK]
            n = pos.shape[1]
            score = torch.einsum("bthd,bsd->bhts", q[:, c:c + n, mine].float(), keys.float())
            later = kpos.view(1, 1, 1, S) > pos[:, None, :, None]
            score = torch.nn.functional.pad(score.masked_fill(later, float("-inf")), (0, nb * blk - S),
                                            value=float("-inf"))
            best = score.view(B, len(mine), n, nb, blk).amax(-1)                         # [B, kv, n, blocks]
            if bs["local"]:
                near = (pos[..., None] // blk - torch.arange(bs["local"], device=h.device)).clamp(min=0)
                best = best.scatter(-1, near.unsqueeze(1).expand(B, len(mine), n, bs["local"]), float("inf"))
            top, chosen = best.topk(min(bs["topk"], nb), dim=-1)
            out.append(torch.zeros_like(best, dtype=torch.bool).scatter_(-1, chosen, top > float("-inf")))
        return torch.cat(out, 2), positions

    def _qsa_keep(self, h, positions, cache, key_padding_mask, pos_t=None):
        """Qwen4-Exp's QSA indexer: the blocks of keys each query keeps, as `_block_keep`'s (blocks, positions), one
        row for every kv head. A query's visible keys (causal, padding left out) fall in blocks of `rate` in the
        order it sees them; a complete block's key is the mean of its raw keys (the cache keeps those), RMS-normed
        and turned at its first key's position. Its score is the sum over the indexer's heads of
        relu(q . key) / sqrt(dim), the heads' queries normed and turned like the attention's. The best
        budget / rate complete blocks are kept, and the block after the last complete one (the keys past it).
        A prompt also gets each key's block [B, S] (a sentinel past the last for padding). With a cache every
        complete block's key is kept too (`cache.qsa_blocks`): a graph-safe decode step (no padding: blocks start at
        position 0) pools only its own block into that table and scores every block of it, those not yet complete
        at -inf, so no step depends on the context's length for its shapes or pools the context again.
        Replicated: every rank makes the same choice."""
        m, t, qs = self.m, self.t, self.m.spec["qsa"]
        ops = m.ops
        B, T, _ = h.shape
        Hi, D, r = qs["heads"], qs["dim"], qs["rate"]
        q, k = ops.linear(h, t["qsa_qk.weight"]).split([Hi * D, D], -1)
        q = ops.add_norm(q.reshape(B, T, Hi, D), None, t["qsa_q_norm.weight"], None, m.eps, m.norm)[0]
        positions, cos, sin = self._rotation(positions, pos_t, B)
        q = ops.rope(q.contiguous(), q[:, :, :1].contiguous(), cos, sin, positions, m.rope_style, self.rotary_dim)[0]
        keys = self._index_keys(k, cache, pos_t)
        S = keys.shape[1]
        nb = S // r
        plain = nb <= qs["budget"] // r       # every complete block is kept, so every visible key: plain attention
        table = None if cache is None else cache.qsa_blocks[self.i]     # every complete block's key, [B, n, D]
        if plain and (table is None or pos_t is not None):
            return None
        norm = lambda x: ops.add_norm(x, None, t["qsa_k_norm.weight"], None, m.eps, m.norm)[0]      # noqa: E731
        if pos_t is not None:       # blocks of the static cache from position 0; the ones not yet complete masked
            # this step's block, pooled into the table (not read until complete, when all its keys are in)
            c = pos_t // r
            entry = norm(keys.index_select(1, (c * r + torch.arange(r, device=h.device)).clamp(max=S - 1)).float()
                         .mean(1, keepdim=True).to(keys.dtype))
            entry = ops.rope(entry.view(B, 1, 1, D).contiguous(), entry.view(B, 1, 1, D).contiguous(), cos, sin,
                             (c * r).view(1, 1).expand(B, 1), m.rope_style, self.rotary_dim)[0].view(B, 1, D)
            table.index_copy_(1, c, entry)
            pooled = table[:, :nb]
            count = (pos_t + 1).view(1, 1).expand(B, 1)
        else:
            seen = torch.ones(B, S, dtype=torch.bool, device=h.device) if key_padding_mask is None else \
                key_padding_mask.bool()[:, -S:]
            count = seen.long().cumsum(1)               # visible keys up to each position
            rank = count - 1
            kblock = torch.where(seen, rank // r, nb + 1)
            first = torch.where(seen & (rank % r == 0), kblock, nb + 1)
            starts = torch.zeros(B, nb + 2, dtype=torch.long, device=h.device).scatter_(
                1, first, torch.arange(S, device=h.device).expand(B, S))[:, :nb]
            count = count[:, S - T:]
            sums = torch.zeros(B, nb + 2, D, dtype=torch.float32, device=h.device).scatter_add_(
                1, kblock.clamp(max=nb + 1)[..., None].expand(B, S, D), keys.float() * seen[..., None])
            pooled = norm((sums[:, :nb] / r).to(keys.dtype))
            pooled = ops.rope(pooled.view(B, nb, 1, D).contiguous(), pooled.view(B, nb, 1, D)[..., :1, :].contiguous(),
                              cos, sin, starts, m.rope_style, self.rotary_dim)[0].view(B, nb, D)
            if table is not None:       # for the graph-safe steps after this forward
                table[:, :nb] = pooled
            if plain:
                return None
        complete = count // r                                                # [B, T]
        k_best = qs["budget"] // r
        out = []
        for c in range(0, T, QUERY_CHUNK):
            done = complete[:, c:c + QUERY_CHUNK]
            n = done.shape[1]
            score = torch.relu(torch.einsum("bthd,bnd->bthn", q[:, c:c + n].float(), pooled.float())).sum(2) \
                / math.sqrt(D)
            score = score.masked_fill(torch.arange(nb, device=h.device) >= done[..., None], float("-inf"))
            keep = torch.zeros(B, n, nb + 2, dtype=torch.bool, device=h.device)
            top, chosen = score.topk(k_best, dim=-1)
            keep.scatter_(-1, chosen, top > float("-inf"))
            keep.scatter_(-1, done.clamp(max=nb)[..., None], True)          # the keys past the last complete block
            out.append(keep)
        keep = torch.cat(out, 1).unsqueeze(1).expand(B, self.kv_heads, T, nb + 2)
        if pos_t is not None:      # the decode kernel's blocks cover the whole static cache
            nbc = -(-S // r)
            return keep[..., :nbc], positions
        return keep, positions, kblock

    def _rotation(self, positions, pos_t, B: int):
        """(positions, cos, sin) of this layer's RoPE table for a forward: a graph-safe step's position pos_t from
        device memory, else the forward's own positions."""
        m = self.m
        if pos_t is not None:
            return (pos_t.view(1, 1).expand(B, 1), *m.rope_tables(self.rope_table, decode=True))
        return (positions, *m.rope_for(positions, self.rope_table))

    def _index_keys(self, k, cache, pos_t):
        """A sparse-attention indexer's keys [B, S, dim]: this forward's k [B, T, dim] written into the layer's
        cache, then every cached one (a graph-safe step: written at pos_t, the whole static cache); k alone without
        a cache."""
        if cache is None:
            return k
        keys = cache.index_k[self.i]
        if pos_t is not None:
            keys.index_copy_(1, pos_t, k)
            return keys
        keys[:, cache.length:cache.length + k.shape[1]] = k
        return keys[:, :cache.length + k.shape[1]]

    def _kept_attention(self, q, k, v, blocks, positions, key_padding_mask=None, kblock=None):
        """Attention of q (B, Hq, T, hd) over k, v (B, Hkv, S, hd) within each kv head's kept blocks (B, Hkv, T,
        blocks) and the causal mask (the queries at positions [B, T]), in fp32 with the layer's sinks and soft cap;
        a query that may see nothing gives zeros. QUERY_CHUNK queries at a time: [Hq, chunk, S] scores at most.
        kblock [B, S]: each key's block where blocks do not simply hold `keep_block` keys in a row from position 0
        (Qwen4-Exp's QSA counts only the keys a row can see)."""
        rep = q.shape[1] // k.shape[1]
        blk, S = self.keep_block, k.shape[2]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        kpos = torch.arange(S, device=q.device)
        out = []
        for c in range(0, q.shape[2], QUERY_CHUNK):
            pos = positions[:, c:c + QUERY_CHUNK]
            if kblock is None:
                keep = blocks[:, :, c:c + QUERY_CHUNK].repeat_interleave(blk, dim=-1)[..., :S]
            else:
                part = blocks[:, :, c:c + QUERY_CHUNK]
                keep = part.gather(-1, kblock[:, None, None, :].expand(*part.shape[:3], S))
            keep = keep.repeat_interleave(rep, 1)
            keep = keep & (kpos.view(1, 1, 1, S) <= pos[:, None, :, None])
            if key_padding_mask is not None:
                keep = keep & key_padding_mask[:, None, None, :]
            out.append(_explicit_attention(q[:, :, c:c + QUERY_CHUNK], k, v, self.m.scale, keep, self.m.softcap,
                                           self.sinks))
        return torch.cat(out, 2)

    def _compressed_attention(self, h, positions, cache, key_padding_mask, pos_t=None):
        """DeepSeek-V4's attention (model.compressed) -> this rank's output of the grouped projection attn_out_a,
        [B, T, its groups * o_rank] (attn_out, row-parallel, follows in `mix`). q: the q bottleneck, then each of this
        rank's heads RMS-normed without a weight; one key per token that is also its value (kv_a, normed; replicated:
        every rank computes it); both rotated over their last rope_dim columns. Each query attends, with a sink per
        head, to the keys of the last `window` positions and, in a compressed layer, to the compressed entries it may
        see (`_pool`): every complete one (hca), or the top index_topk its indexer scores (csa). The output's rotated
        columns turn back by the query's angle; then each group of heads goes through its own block of
        attn_out_a."""
        m, t, cp = self.m, self.t, self.m.spec["compressed"]
        ops = m.ops
        B, T, _ = h.shape
        H, D, rd, W = self.heads, self.head_dim, cp["rope_dim"], self.window
        x = ops.add_norm(ops.linear(h, t["q_a.weight"]), None, t["q_a_norm.weight"], None, m.eps, "rms")[0]
        q = ops.add_norm(ops.linear(x, t["q_b.weight"]).view(B, T, H, D), None, self.head_ones, None, m.eps, "rms")[0]
        kv = ops.add_norm(ops.linear(h, t["kv_a.weight"]), None, t["kv_a_norm.weight"], None, m.eps, "rms")[0]
        start = 0 if cache is None else cache.length
        if pos_t is not None:
            positions = pos_t.view(1, 1).expand(B, 1)
            cos, sin = m.rope_tables(self.rope_table, decode=True)
            qpos = pos_t
        else:
            cos, sin = m.rope_for(positions, self.rope_table)
            qpos = torch.arange(start, start + T, device=h.device)
        q = _rope_tail(ops, q, cos, sin, positions, m.rope_style, rd)
        kv = _rope_tail(ops, kv.view(B, T, 1, D), cos, sin, positions, m.rope_style, rd)[:, :, 0]     # [B, T, D]
        # the window's keys [B, S, D] and the position of each: consecutive positions from k0 on in a prompt, the
        # rows of the ring (any order) in a graph-safe step
        k0 = 0
        if pos_t is not None:             # graph-safe: the whole ring, rows not yet written or out of reach masked
            kc, ring = cache.k[self.i], cache.ring[self.i]
            R = kc.shape[2]
            kc.index_copy_(2, pos_t % R if ring else pos_t, kv.view(B, 1, 1, D))
            rows = torch.arange(R, device=h.device)
            kpos = pos_t - (pos_t - rows) % R if ring else rows
            keys = kc[:, 0]
        elif cache is None:
            keys, kpos, k0 = kv, qpos, start
        else:
            kc, ring = cache.k[self.i], cache.ring[self.i]
            if ring:                      # the ring's last min(start, ring) positions in order, then the new ones
                k0 = start - min(start, ring)
                old = torch.arange(k0, start, device=h.device)
                keys, kpos = torch.cat([kc[:, 0, old % ring], kv], 1), torch.cat([old, qpos])
                kc[:, 0, qpos[-ring:] % ring] = kv[:, -ring:]
            else:
                kc[:, 0, start:start + T] = kv
                keys, kpos = kc[:, 0, :start + T], torch.arange(start + T, device=h.device)
        kpm = None if key_padding_mask is None else key_padding_mask.bool()[:, -(start + T - k0):]   # from k0 on
        entries = index = None
        if self.compress:
            entries = self._pool(h, cache, pos_t, "comp", D)                                    # [B, N, D]
            if self.compress == "csa":
                index = self._indexer(h, x, positions, cache, pos_t)
        qh = q.transpose(1, 2)                                                                     # [B, H, T, D]
        out = []
        for c in range(0, T, QUERY_CHUNK):    # QUERY_CHUNK queries at a time, each over its windows' keys only
            qp = qpos[c:c + QUERY_CHUNK].view(1, -1, 1)
            ks, ps, pm = keys, kpos, kpm
            if pos_t is None:
                lo, hi = max(start + c - W + 1 - k0, 0), start + c + qp.shape[1] - k0
                ks, ps, pm = keys[:, lo:hi], kpos[lo:hi], None if kpm is None else kpm[:, lo:hi]
            seen = (ps.view(1, 1, -1) <= qp) & (qp - ps.view(1, 1, -1) < W) & (ps.view(1, 1, -1) >= 0)
            if pm is not None:            # the sliding keys only: the compressors pool padding as they do tokens
                seen = seen & pm.unsqueeze(1)
            if entries is not None:
                N = entries.shape[1]
                ready = torch.arange(N, device=h.device).view(1, 1, N) < (qp + 1) // self.rate
                if index is not None:
                    ready = ready & self._index_pick(index, c, ready)
                ks = torch.cat([ks, entries], 1)
                seen = torch.cat([seen.expand(B, -1, -1), ready.expand(B, -1, N)], -1)
            ks = ks.unsqueeze(1)                                                                   # [B, 1, S, D]
            out.append(_explicit_attention(qh[:, :, c:c + QUERY_CHUNK], ks, ks, m.scale, seen.unsqueeze(1), 0.0,
                                           self.sinks))
        o = torch.cat(out, 2).transpose(1, 2)                                                      # [B, T, H, D]
        o = _rope_tail(ops, o, cos, -sin, positions, m.rope_style, rd)      # the values' rotation, turned back
        o = o.reshape(B, T, len(self.out_a), -1)
        if isinstance(self.out_a, torch.Tensor):       # float: every group in one batched product
            return torch.einsum("btgi,goi->btgo", o, self.out_a).reshape(B, T, -1)
        return torch.cat([ops.linear(o[:, :, j], w) for j, w in enumerate(self.out_a)], -1)     # int8: a block each

    def _pool(self, h, cache, pos_t, name: str, width: int):
        """The entries of this layer's compressor `name` ("comp", or "index": the indexer's own), [B, N, width]:
        entry w pools the `rate` positions from w * rate (a csa layer's, and any indexer's, also the rate before
        them: each row holds two series, the second pooled into its own window's entry, the first into the next
        one's) by a softmax over their gates (plus a learned bias per place), then is RMS-normed and rotated at
        position w * rate (the main RoPE table). Entry w may be seen from position w * rate + rate - 1 on. Without a
        cache: the complete windows of this forward. With one: every entry so far (its last rows kept in a ring of
        2 * rate positions); a graph-safe step recomputes the entry of its own window (partial, and unseen, until
        the window's last position) into the static table of every slot, and returns all of them."""
        m, t = self.m, self.t
        ops, rate = m.ops, self.rate
        two = self.compress == "csa" or name == "index"        # overlapping windows
        T = h.shape[1]
        kv = ops.linear(h, t[name + "_kv.weight"])
        gate = ops.linear(h, t[name + "_gate.weight"])
        st = None if cache is None else cache.pools[self.i][name]
        ring = 2 * rate
        if pos_t is not None:
            st["kv"].index_copy_(1, pos_t % ring, kv)
            st["gate"].index_copy_(1, pos_t % ring, gate)
            w = pos_t // rate
            pos = w * rate - (rate if two else 0) + torch.arange((1 + two) * rate, device=h.device)
            e = self._entries(st["kv"][:, pos % ring], st["gate"][:, pos % ring], pos, w, name, width, two)
            st["entries"].index_copy_(1, w, e)
            return st["entries"]
        start = 0 if st is None else cache.length
        lo, hi = start // rate, (start + T) // rate             # the windows that close in this forward
        first = lo * rate - (rate if two else 0)
        pos = torch.arange(first, hi * rate, device=h.device)
        if st is not None:                                      # positions before this forward: from the ring
            back = pos[(pos >= 0) & (pos < start)]
            kv_rows = torch.cat([st["kv"][:, back % ring], kv], 1)
            gate_rows = torch.cat([st["gate"][:, back % ring], gate], 1)
            new = torch.arange(max(start, start + T - ring), start + T, device=h.device)
            st["kv"][:, new % ring] = kv[:, new - start]
            st["gate"][:, new % ring] = gate[:, new - start]
            skip = start - int(back.shape[0])                   # where kv_rows begins
        else:
            kv_rows, gate_rows, skip = kv, gate, 0
        have = pos.clamp(min=0) - skip                           # each wanted position's row (negative: none)
        have = have.clamp(max=kv_rows.shape[1] - 1)
        e = self._entries(kv_rows[:, have], gate_rows[:, have], pos, torch.arange(lo, hi, device=h.device), name,
                          width, two)
        if st is None:
            return e
        st["entries"][:, lo:hi] = e
        return st["entries"][:, :hi]

    def _entries(self, kv, gate, pos, windows, name: str, width: int, two: bool):
        """Compressed entries of these windows [n] from the rows kv, gate [B, (n + two) * rate, (1 + two) * width]
        at positions pos (the rows before position 0 take no weight)."""
        m, t, rate = self.m, self.t, self.rate
        B, n = kv.shape[0], windows.shape[0]
        dtype = kv.dtype
        gate = gate.view(B, -1, rate, gate.shape[-1]) + t[name + "_bias"].float()
        gate = gate.masked_fill((pos < 0).view(1, -1, rate, 1), float("-inf"))
        kv = kv.view(B, -1, rate, kv.shape[-1]).masked_fill((pos < 0).view(1, -1, rate, 1), 0.0)
        if two:      # entry j: the first series of window j's rows beside the second of window j + 1's
            kv = torch.cat([kv[:, :-1, :, :width], kv[:, 1:, :, width:]], 2)
            gate = torch.cat([gate[:, :-1, :, :width], gate[:, 1:, :, width:]], 2)
        e = (kv * gate.softmax(2).to(dtype)).sum(2)                                            # [B, n, width]
        e = m.ops.add_norm(e, None, t[name + "_norm.weight"], None, m.eps, "rms")[0]
        where = (windows * rate).view(1, n).expand(B, n)
        cos, sin = m.rope_tables("global")          # grown by this forward's rope_for (no entry is past a query)
        return _rope_tail(m.ops, e.view(B, n, 1, width), cos, sin, where, m.rope_style,
                          m.spec["compressed"]["rope_dim"])[:, :, 0]

    def _indexer(self, h, x, positions, cache, pos_t):
        """DeepSeek-V4's lightning indexer in a csa layer: (its queries [B, T, heads, dim], their weights [B, T,
        heads], its keys [B, N, dim]) for `_index_pick`. The queries come from the q bottleneck's output x, rotated
        like the layer's; the weights from the stream (index_w, / sqrt(heads)); the keys are its own compressor's
        entries. Replicated: every rank makes the same choice."""
        m, t, ix = self.m, self.t, self.m.spec["compressed"]["index"]
        B, T, _ = h.shape
        Hi, Di = ix["heads"], ix["dim"]
        keys = self._pool(h, cache, pos_t, "index", Di)
        cos, sin = m.rope_tables("global", decode=True) if pos_t is not None else m.rope_for(positions, "global")
        q = _rope_tail(m.ops, m.ops.linear(x, t["index_q.weight"]).view(B, T, Hi, Di), cos, sin, positions,
                       m.rope_style, m.spec["compressed"]["rope_dim"])
        return q, m.ops.linear(h, t["index_w.weight"]).float() * Hi ** -0.5, keys

    def _index_pick(self, index, c: int, ready):
        """Which entries the queries c .. c + QUERY_CHUNK attend to, [B, chunk, N] bool: the index_topk that score
        best among those each may see (`ready`); an entry's score is the sum over the indexer's heads of
        relu(q . k / sqrt(dim)) times the head's weight."""
        q, w, keys = index
        s = _index_score(q[:, c:c + QUERY_CHUNK], keys, w[:, c:c + QUERY_CHUNK]).masked_fill(~ready, float("-inf"))
        top = s.topk(min(self.m.spec["compressed"]["index"]["topk"], keys.shape[1]), dim=-1).indices
        return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top, True)

    def _diff_qkv(self, qkv):
        """DiffLlama's q|k|v (heads head_dim / 2 wide) as plain attention's over heads twice as wide: q and k padded
        with zeros (the scores stay q . k; RoPE turns the first half only), and kv head j's value the values of kv
        heads j mod n and n + j mod n side by side (n: half this rank's kv heads), what both halves' heads read."""
        B, T, _ = qkv.shape
        d, Hq, Hk = self.head_dim // 2, self.heads, self.kv_heads
        q, k, v = qkv.split([Hq * d, Hk * d, Hk * d], dim=-1)
        q, k, v = q.view(B, T, Hq, d), k.view(B, T, Hk, d), v.view(B, T, Hk, d)
        zeros = torch.nn.functional.pad
        a, b = v.chunk(2, dim=2)
        return zeros(q, (0, d)), zeros(k, (0, d)), torch.cat([a, b], -1).repeat(1, 1, 2, 1)

    def _diff_combine(self, o):
        """DiffLlama: the attention output (B, T, heads * 2d) -> each head pair's difference, (o_p - lambda
        o_{p + heads / 2}) over the two values side by side, RMS-normed without a weight, times 1 - lambda_init:
        (B, T, heads / 2 * 2d), the order o_proj reads."""
        B, T, _ = o.shape
        o = o.view(B, T, self.heads, self.head_dim)
        c = self.heads // 2
        y = o[:, :, :c] - self.diff_lambda * o[:, :, c:]
        y = self.m.ops.add_norm(y.contiguous(), None, self.diff_ones, None, self.m.eps, "rms")[0]
        return (y * (1 - self.diff_init)).reshape(B, T, -1)

    def _weighted(self, x, residual, positions, cache, key_padding_mask, pos_t, seq_t):
        """Doge's pre-norm block, its stream s weighted per channel before each half's output joins it:
        s' = attn_residual * s + attn(norm(s)), then s'' = mlp_residual * s' + mlp(norm(s')). Returns (the MLP's
        output, mlp_residual * s'), which the next add+norm (or the final norm) adds as usual."""
        m, t = self.m, self.t
        h, residual = self._add_norm(x, residual, "attn_norm", None)
        a = m.comm.all_reduce(self.mix(h, positions, cache, key_padding_mask, pos_t, seq_t))
        h, residual = self._add_norm(a, residual * t["attn_residual"], "mlp_norm", None)
        return m.comm.all_reduce(self.mlp(h)), residual * t["mlp_residual"]

    def _dyn_bias(self, v):
        """Doge: the score bias of each new key, exp(A * softplus(dt_proj(v))) per kv head, in the model dtype as
        transformers computes it; v (B, T, kv heads, hd) -> (B, T, this rank's kv heads). dt_proj reads every kv
        head's values, so each rank's partial sum over its own channels is all-reduced (one value a kv head)."""
        m, t = self.m, self.t
        x = v.flatten(2)[..., self.dyn_cols]
        b = t.get("dmask_dt.bias")      # a few outputs, never int8: torch's linear on either backend
        dt = m.comm.all_reduce(nn.functional.linear(x, t["dmask_dt.weight"], b if m.tp == 1 else None))
        if b is not None and m.tp > 1:          # added once, after the partial sums
            dt = dt + b
        return torch.exp(t["dmask_a"] * nn.functional.softplus(dt))[..., self.dyn_heads]

    def _dyn_keep(self, bias):
        """Doge's keep window over bias (..., keys), -inf where a query may not look: with more keys than
        keep_window, only its keep_window largest stay (transformers' top-k, ties broken as torch.topk breaks them;
        a -inf never outranks a key the query sees)."""
        W = self.dyn_window
        if bias.shape[-1] <= W:
            return bias
        top = bias.topk(W, dim=-1, largest=True, sorted=False).indices
        keep = torch.zeros_like(bias, dtype=torch.bool).scatter_(-1, top, True)
        return bias.masked_fill(~keep, float("-inf"))

    def _dyn_attend(self, q, k, v, dyn, cache, key_padding_mask):
        """Doge's attention for T new queries q (B, Hq, T, hd) after every key the cache holds (k, v (B, Hkv, T, hd)
        and dyn (B, T, Hkv), the new keys' biases, written into it first): each score plus its key's bias, and each
        query over the keep window of the keys it may see (causal, not padding). Queries go QUERY_CHUNK at a time,
        so the bias is heads x chunk x keys."""
        m = self.m
        B, _, T, _ = q.shape
        dyn = dyn.transpose(1, 2)                                         # (B, Hkv, T)
        if cache is not None:
            start, end = cache.length, cache.length + T
            kc, vc, dc = cache.k[self.i], cache.v[self.i], cache.dyn_bias[self.i]
            kc[:, :, start:end].copy_(k)
            vc[:, :, start:end].copy_(v)
            dc[:, :, start:end].copy_(dyn)
            k, v, dyn = kc[:, :, :end], vc[:, :, :end], dc[:, :, :end]
        S, rep = k.shape[2], self.heads // self.kv_heads
        seen = _visible(S, T, key_padding_mask, q.device).unsqueeze(1)     # (B or 1, 1, T, S)
        out = []
        for a in range(0, T, QUERY_CHUNK):
            bias = dyn.unsqueeze(2).masked_fill(~seen[:, :, a:a + QUERY_CHUNK], float("-inf"))
            bias = self._dyn_keep(bias).repeat_interleave(rep, 1)          # (B, Hq, chunk, S)
            out.append(m.ops.attention(q[:, :, a:a + QUERY_CHUNK], k, v, m.scale, False, bias=bias))
        return torch.cat(out, 2).transpose(1, 2).reshape(B, T, -1)

    def _dyn_decode(self, q, kc, vc, dyn, cache, pos_t, seq):
        """Doge's graph-safe decode step: the new key's bias dyn (B, 1, Hkv) goes into the cache at pos_t beside
        its key, then q (B, Hq, hd) attends over the whole static cache, the rows from seq (B,) on masked and the
        keep window taken over every row (a masked row never outranks a filled one), so no shape depends on the
        step."""
        B, Hq, hd = q.shape
        dc = cache.dyn_bias[self.i]
        dc.index_copy_(2, pos_t, dyn.transpose(1, 2))
        S = dc.shape[2]
        filled = torch.arange(S, device=q.device).view(1, 1, 1, S) < seq.view(B, 1, 1, 1)
        bias = self._dyn_keep(dc.unsqueeze(2).masked_fill(~filled, float("-inf")))     # (B, Hkv, 1, S)
        o = self.m.ops.attention(q.unsqueeze(2), kc, vc, self.m.scale, False,
                                 bias=bias.repeat_interleave(Hq // dc.shape[1], 1))
        return o.reshape(B, 1, Hq * hd)

    def _cca_block(self, x, positions, cache, key_padding_mask, pos_t, seq_t):
        """ZAYA's pre-norm block over an fp32 stream s (x: the stream, or the embeddings): each half reads norm(s)
        in the model dtype, and its output y joins as (y + out_shift) * out_gain + (s + shift) * gain. Returns (s, None);
        the last layer rounds s to the model dtype for the final norm, as transformers does."""
        m, t = self.m, self.t
        s = x.float()
        h = m.ops.add_norm(s.to(m.dtype), None, t["attn_norm.weight"], None, m.eps, m.norm)[0]
        a = m.comm.all_reduce(self.mix(h, positions, cache, key_padding_mask, pos_t, seq_t))
        s = (a + t["attn_res.out_shift"]) * t["attn_res.out_gain"] + (s + t["attn_res.shift"]) * t["attn_res.gain"]
        h = m.ops.add_norm(s.to(m.dtype), None, t["mlp_norm.weight"], None, m.eps, m.norm)[0]
        f = m.comm.all_reduce(self.mlp(h))
        s = (f + t["mlp_res.out_shift"]) * t["mlp_res.out_gain"] + (s + t["mlp_res.shift"]) * t["mlp_res.gain"]
        return (s.to(m.dtype) if self.i == len(m.blocks) - 1 else s), None

    def _cca_attention(self, h, positions, cache, key_padding_mask, pos_t=None, seq_t=None):
        """ZAYA's compressed convolutional attention -> this rank's heads' output (B, T, heads * head_dim). q|k go
        through a causal depthwise conv then a conv grouped per head, over the inputs before them (the cache's, or
        zeros at a sequence's start), and gain residuals: q the mean of itself and its kv head's k, k the mean of
        that over its group. The delayed half of v is the token before's (the first token's: the projection of
        zeros). q and k are L2-normed to sqrt(head_dim), k times its kv head's scale; RoPE, the cache and attention
        are the plain ones. Padding is zeroed before the projections, as transformers does."""
        m, t = self.m, self.t
        B, T, _ = h.shape
        Hq, Hk, hd = self.heads, self.kv_heads, self.head_dim
        h, _ = self._unpadded(h, key_padding_mask, pos_t)
        q, k, v = m.ops.linear(h, t["qkv.weight"], t.get("qkv.bias")).split([Hq * hd, Hk * hd, Hk * hd], -1)
        qr = (q.view(B, T, Hk, Hq // Hk, hd) + k.view(B, T, Hk, 1, hd)) * 0.5
        fresh = cache is None or (pos_t is None and cache.length == 0)      # a new sequence: nothing carried over
        K, C = self.cca_keep, (Hq + Hk) * hd
        x = torch.cat([q, k], -1).transpose(1, 2)                                   # (B, C, T)
        x = torch.cat([x.new_zeros(B, C, K) if fresh else cache.conv[self.i], x], -1)
        if cache is not None and K:
            cache.conv[self.i].copy_(x[..., -K:])
        y = nn.functional.conv1d(x, t["cca_conv0.weight"].unsqueeze(1), t["cca_conv0.bias"], groups=C)
        y = nn.functional.conv1d(y, t["cca_conv1.weight"], t["cca_conv1.bias"], groups=Hq + Hk).transpose(1, 2)
        q = y[..., :Hq * hd].reshape(B, T, Hq, hd) + qr.reshape(B, T, Hq, hd)
        k = y[..., Hq * hd:].reshape(B, T, Hk, hd) + qr.mean(-2)
        eps, scale = torch.finfo(q.dtype).eps, hd ** 0.5
        q = q * (scale / q.norm(dim=-1, keepdim=True).clamp_min(eps))
        k = k * (scale / k.norm(dim=-1, keepdim=True).clamp_min(eps)) * t["cca_temp"].view(1, 1, Hk, 1)
        b = t.get("qkv.bias")
        before = (b[-Hk * hd:] if b is not None else v.new_zeros(Hk * hd)).expand(B, 1, -1) if fresh else \
            cache.state[self.i].to(v.dtype).unsqueeze(1)
        last = v[:, -1]
        v = torch.where(self.cca_delayed, torch.cat([before, v[:, :-1]], 1), v)     # before may view the state
        if cache is not None:
            cache.state[self.i].copy_(last)
        return self._attend(torch.cat([q.flatten(2), k.flatten(2), v], -1), positions, cache, key_padding_mask,
                            pos_t, seq_t)

    def _eda_route(self, x):
        """ZAYA's router for tokens x [N, hidden] -> (weights [N, 1] fp32, expert ids [N, 1]). down_proj, plus the
        previous layer's router state times router_eda (that sum is the next layer's state), RMS-normed, two GELU
        layers, then logits over the experts and a skip expert; the pick adds the fp32 balancing biases to the
        softmax, the weight is the unbiased probability, and a skip pick runs expert 0 with weight 0. Replicated;
        in the model dtype as transformers computes it."""
        m, t = self.m, self.t
        r = F.linear(x, t["router_in.weight"], t["router_in.bias"])
        if "router_eda" in t:
            r = r + m.router_state * t["router_eda"]
        m.router_state = r
        z = m.ops.add_norm(r, None, t["router_norm.weight"], None, m.eps, m.norm)[0]
        z = F.gelu(F.linear(F.gelu(F.linear(z, t["router_fc1.weight"], t["router_fc1.bias"])),
                            t["router_fc2.weight"], t["router_fc2.bias"]))
        probs = F.linear(z, t["router.weight"]).softmax(-1)
        chosen = (probs.float() + t["router.balance"].float()).topk(1, dim=-1)[1]
        skip = chosen == probs.shape[-1] - 1
        return probs.gather(1, chosen).float().masked_fill(skip, 0.0), chosen.masked_fill(skip, 0)

    def _narrow(self, o):
        """Attention output (B, T, heads * head_dim) -> each head's first v_dim channels (MiMo-V2-Flash's narrower v
        heads: the rest is the zero padding's); as it is otherwise."""
        if self.v_dim == self.head_dim:
            return o
        return o.unflatten(-1, (self.heads, self.head_dim))[..., :self.v_dim].flatten(-2)

    def _keys(self, k, v, cache, key_padding_mask, bias=None):
        """This forward's keys and values k, v (B, Hkv, T, hd), written into the cache -> a function from the queries
        (B, Hq, T, hd) to the attention output (B, T, Hq * hd) over them, with every earlier key the cache holds.
        bias: this layer's own score bias (DeBERTa's), else the model's (MPNet's) if any."""
        m = self.m
        B, _, T, _ = k.shape
        flat = lambda o: o.transpose(1, 2).reshape(B, T, -1)           # noqa: E731
        if cache is None:
            bias = m.score_bias if bias is None else bias
            return lambda q: flat(m.ops.attention(q, k, v, m.scale, m.causal, m.alibi, key_padding_mask, self.window,
                                                  m.softcap, sinks=self.sinks, chunk=self.chunk, bias=bias))
        kc, vc = cache.k[self.i], cache.v[self.i]
        start = cache.length
        if cache.ring[self.i]:
            return self._ring_attention(k, v, kc, vc, start, cache.ring[self.i], key_padding_mask,
                                        cache.chunked[self.i])
        kc[:, :, start:start + T].copy_(k)
        vc[:, :, start:start + T].copy_(v)
        S = start + T
        bias = m.score_bias if bias is None else bias          # T5's decoder: its keys' relative bias
        if T == 1 and m.ops.name != "torch" and bias is None:
            seq = torch.full((B,), S, dtype=torch.int32, device=k.device)
            return lambda q: m.ops.decode_attention(q[:, :, 0], kc, vc, seq, m.scale, m.alibi, self.window, m.softcap,
                                                    sinks=self.sinks, chunk=self.chunk).reshape(B, 1, -1)
        return lambda q: flat(m.ops.attention(q, kc[:, :, :S], vc[:, :, :S], m.scale, m.causal, m.alibi,
                                              key_padding_mask, self.window, m.softcap, sinks=self.sinks,
                                              chunk=self.chunk, bias=bias))

    def _attend_shared(self, q, positions, cache, pos_t=None, seq_t=None):
        """Gemma 4 E2B/E4B's last layers: q alone, normed and rotated as usual, attends over the keys and values of
        layer kv_from (of this layer's kind): in a decode step its cache, otherwise what it attended over in this
        forward."""
        m, t = self.m, self.t
        B, T, _ = q.shape
        Hq, hd = self.heads, self.head_dim
        q = q.view(B, T, Hq, hd)
        if "q_norm.weight" in t:
            q = m.ops.add_norm(q, None, t["q_norm.weight"], None, m.eps, m.norm)[0]
        if self.rope:
            if pos_t is not None:
                cos, sin = m.rope_tables(self.rope_table, decode=True)
                positions = pos_t.view(1, 1).expand(B, 1)
            else:
                cos, sin = m.rope_for(positions, self.rope_table)
            q = m.ops.rope(q, q[:, :, :1].contiguous(), cos, sin, positions, m.rope_style, self.rotary_dim)[0]
        if pos_t is None:
            return m.shared_attend[self.kv_from](q.transpose(1, 2))
        src = self.kv_from
        ring = cache.ring[src]
        o = m.ops.decode_attention(q.reshape(B, Hq, hd), cache.k[src], cache.v[src],
                                   seq_t[-ring if cache.chunked[src] else ring], m.scale, m.alibi,
                                   0 if ring else self.window, m.softcap, sinks=self.sinks,
                                   chunk=0 if ring else self.chunk)
        return o.reshape(B, 1, Hq * hd)

    @property
    def latent_scale(self) -> float:
        """Latent attention's softmax scale: the model's, or a windowed layer's own (Dots3 Note)."""
        return self.mla_scale or self.m.scale

    def _latent_query(self, h):
        """(x, q, gate) of latent attention: x the q bottleneck's normed output (h without a bottleneck), q each
        head's query [B, T, H, nope + rope], gate A.X K2's per-channel output gate [B, T, H, v_dim] or None (gated_q:
        q_b reads the normed and the raw latent side by side and gives each head its q, then its gate)."""
        m, t, ml = self.m, self.t, self.mla
        B, T, _ = h.shape
        H, nd, rd, vd = self.heads, ml["nope_dim"], ml["rope_dim"], ml["v_dim"]
        x = h
        if "q_a.weight" in t:          # the q bottleneck (V3; V2-Lite has none)
            raw = m.ops.linear(h, t["q_a.weight"], t.get("q_a.bias"))
            x = m.ops.add_norm(raw, None, t["q_a_norm.weight"], None, ml["norm_eps"], "rms")[0]
        if not ml.get("gated_q"):
            return x, m.ops.linear(x, t["q_b.weight"]).view(B, T, H, nd + rd), None
        q = m.ops.linear(torch.cat([x, raw], -1), t["q_b.weight"]).view(B, T, H, nd + rd + vd)
        return x, q[..., :nd + rd], q[..., nd + rd:]

    def _latent_attention(self, h, x, q, positions, cache, key_padding_mask, pos_t=None, seq_t=None):
        """Multi-head latent attention (DeepSeek-V2/V3). Each head's k and v are kv_b's expansion of one latent per
        token (kv_rank wide, normed), its k completed by one rotated key all heads share (rope_dim). The cache keeps
        only that row, [B, 1, S, kv_rank + rope_dim] per layer. A prompt expands the cached latents through kv_b
        and attends as usual; a decode step takes kv_b into the query and the output instead (absorbed), so it
        reads each latent once for every head, and no expansion grows with the context. With a sparse attention
        indexer (DeepSeek-V3.2) each query attends to the keys `_index_choice` picks: a prompt through a mask, a
        decode step over just those cache rows, gathered. x and q: `_latent_query`'s."""
        m, t, ml = self.m, self.t, self.mla
        ops = m.ops
        B, T, _ = h.shape
        H, R, nd, rd, vd = self.heads, ml["kv_rank"], ml["nope_dim"], ml["rope_dim"], ml["v_dim"]
        kv = ops.linear(h, t["kv_a.weight"], t.get("kv_a.bias"))                  # (B, T, R + rd)
        latent = ops.add_norm(kv[..., :R], None, t["kv_a_norm.weight"], None, ml["norm_eps"], "rms")[0]
        k_pe = kv[..., R:].reshape(B, T, 1, rd).contiguous()
        if "kv_a_rope_norm.weight" in t:      # Dots3 Note: the shared key's rope part RMS-normed before RoPE
            k_pe = ops.add_norm(k_pe, None, t["kv_a_rope_norm.weight"], None, ml["norm_eps"], "rms")[0]
        rot = None
        if not self.rope:              # Kimi Linear: no positional encoding; the shared key part stays as it is
            q_pe = q[..., nd:].contiguous()
        else:
            if pos_t is not None:
                cos, sin = m.rope_tables(self.rope_table, decode=True)
                positions = pos_t.view(1, 1).expand(B, 1)
            else:
                cos, sin = m.rope_for(positions, self.rope_table)
            rot = (cos, sin, positions)
            q_pe, k_pe = ops.rope(q[..., nd:].contiguous(), k_pe, cos, sin, positions, m.rope_style, rd)
        choice = self._index_choice(h, x, rot, cache, key_padding_mask, pos_t) if "index" in ml else None
        row = torch.cat([latent, k_pe.view(B, T, rd)], -1)                       # what the cache keeps
        q_nope = q[..., :nd]
        if self.query_scale is not None:      # Mistral 4: Llama 4's factor on the whole (rotated) query
            s = self.query_scale(pos_t.view(1, 1).expand(B, 1) if pos_t is not None else positions)[..., None, None]
            q_nope, q_pe = q_nope * s, q_pe * s
        if pos_t is not None:        # graph-safe: the row goes in at pos_t, the lengths come from device memory
            kc, ring = cache.k[self.i], cache.ring[self.i]     # (a windowed layer's ring: row pos_t % window)
            kc.index_copy_(2, pos_t % ring if ring else pos_t, row.view(B, 1, 1, R + rd))
            if choice is None:
                return self._absorbed(q_nope, q_pe, kc, seq_t[ring])
            # the chosen rows, best first: fewer than k positions so far leaves the unwritten ones last
            return self._absorbed(q_nope, q_pe, _rows(kc, choice[:, 0]), seq_t[0].clamp(max=choice.shape[-1]))
        rows = row
        if cache is not None and cache.ring[self.i]:     # Dots3 Note's windowed layers
            rows, key_padding_mask, seq = self._latent_ring(row, cache, key_padding_mask)
            if T == 1 and key_padding_mask is None:
                return self._absorbed(q_nope, q_pe, cache.k[self.i], seq)
        elif cache is not None:
            kc, start = cache.k[self.i], cache.length
            kc[:, 0, start:start + T] = row
            if T == 1 and key_padding_mask is None:
                if choice is None:
                    seq = torch.full((B,), start + 1, dtype=torch.int32, device=h.device)
                    return self._absorbed(q_nope, q_pe, kc, seq)
                seq = torch.full((B,), choice.shape[-1], dtype=torch.int32, device=h.device)
                return self._absorbed(q_nope, q_pe, _rows(kc, choice[:, 0]), seq)
            rows = kc[:, 0, :start + T]
        S = rows.shape[1]
        kvb = ops.linear(rows[..., :R], t["kv_b.weight"]).view(B, S, H, nd + vd)
        k = torch.cat([kvb[..., :nd], rows[..., R:].view(B, S, 1, rd).expand(B, S, H, rd)], -1)
        q = torch.cat([q_nope, q_pe], -1)
        v, D = kvb[..., nd:], max(nd + rd, vd)
        # one head width for q, k and v (what the kernels take): zero columns, dropped from the output after
        q, k, v = (y if y.shape[-1] == D else torch.nn.functional.pad(y, (0, D - y.shape[-1])) for y in (q, k, v))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if choice is None:
            o = ops.attention(q, k, v, self.latent_scale, m.causal, None, key_padding_mask, self.window,
                              sinks=self.sinks)
        else:                        # each query's chosen keys, as a mask beside the causal one and the padding's
            visible, parts = _visible(S, T, key_padding_mask, h.device), []
            for c in range(0, T, QUERY_CHUNK):       # a mask of [chunk, keys] at a time, not [T, keys]
                pick = choice[:, c:c + QUERY_CHUNK]
                allowed = torch.zeros(B, pick.shape[1], S, dtype=torch.bool, device=h.device).scatter_(-1, pick, True)
                allowed &= visible[:, c:c + QUERY_CHUNK]
                allowed |= ~allowed.any(-1, keepdim=True)      # a padding query that sees nothing: any finite row
                qc = q[:, :, c:c + QUERY_CHUNK]
                if self.sinks is not None:       # HY-V4: a sink logit per head in each softmax
                    parts.append(_explicit_attention(qc, k, v, m.scale, allowed.unsqueeze(1), 0.0, self.sinks))
                else:
                    parts.append(torch.nn.functional.scaled_dot_product_attention(
                        qc, k, v, attn_mask=allowed.unsqueeze(1), scale=m.scale))
            o = torch.cat(parts, 2)
        return o[..., :vd].transpose(1, 2).reshape(B, T, H * vd)

    def _index_choice(self, h, x, rot, cache, key_padding_mask, pos_t=None):
        """DeepSeek Sparse Attention's indexer: the keys each new query attends to, [B, T, k] indices best first,
        or None where every earlier key is chosen (no more of them than index_topk). Its heads' queries come from
        the q bottleneck's output x, one key per token from the stream h (LayerNormed; cached per layer), both
        rotated over their first rope_dim columns; a key's score is the sum over heads of relu(q . k / sqrt(dim))
        times the head's weight. Replicated: every rank computes the same choice. A layer without an indexer of
        its own (GLM-5's shared layers) takes the one before it's. Graph-safe decode scores the whole static cache
        (unwritten positions last), so its shapes never depend on the step."""
        m, t = self.m, self.t
        if "index_k.weight" not in t:
            return m.index_choice
        ops, ix, rd = m.ops, m.spec["mla"]["index"], m.spec["mla"]["rope_dim"]
        B, T, _ = h.shape
        Hi, D = ix["heads"], ix["dim"]
        q = ops.linear(x, t["index_q.weight"]).view(B, T, Hi, D)
        k = ops.add_norm(ops.linear(h, t["index_k.weight"]), None, t["index_k_norm.weight"], t["index_k_norm.bias"],
                         ix.get("norm_eps", 1e-6), "layer")[0].view(B, T, 1, D)
        if rot is not None:
            cos, sin, positions = rot
            lo = D - rd if ix.get("rope_at") == "last" else 0      # HY-V4: the last rope_dim columns turn
            q_pe, k_pe = ops.rope(q[..., lo:lo + rd].contiguous(), k[..., lo:lo + rd].contiguous(), cos, sin,
                                  positions, ix["rope_style"], rd)
            q = torch.cat([q[..., :lo], q_pe, q[..., lo + rd:]], -1)
            k = torch.cat([k[..., :lo], k_pe, k[..., lo + rd:]], -1)
        k = k.view(B, T, D)
        keys = self._index_keys(k, cache, pos_t)
        S = keys.shape[1]
        if S <= ix["topk"]:              # every key is chosen (graph-safe decode: whatever the step)
            m.index_choice = None
            return None
        w = ops.linear(h, t["index_w.weight"]).float() * Hi ** -0.5
        if pos_t is not None:
            seen = (torch.arange(S, device=h.device) <= pos_t).view(1, 1, S)
        else:
            seen = _visible(S, T, key_padding_mask, h.device)
        chosen = []          # QUERY_CHUNK queries at a time: [chunk, heads, keys] scores, not [T, heads, keys]
        for c in range(0, T, QUERY_CHUNK):
            score = _index_score(q[:, c:c + QUERY_CHUNK], keys, w[:, c:c + QUERY_CHUNK])
            score = score.masked_fill(~seen[:, c:c + QUERY_CHUNK], float("-inf"))
            chosen.append(score.topk(ix["topk"], dim=-1).indices)
        m.index_choice = torch.cat(chosen, 1)
        return m.index_choice

    def _absorbed(self, q_nope, q_pe, kc, seq):
        """One query per sequence against the latent cache, kv_b folded in: each head's q_nope goes into the latent
        space (w_uk), attends over whole cache rows as keys and their latent part as values, and comes back out
        through w_uv. q_nope (B, 1, H, nope), q_pe (B, 1, H, rope) -> (B, 1, H * v)."""
        m = self.m
        B = q_nope.shape[0]
        q_lat = torch.bmm(q_nope[:, 0].transpose(0, 1), self.w_uk).transpose(0, 1)     # (B, H, R)
        o = m.ops.mla_decode(torch.cat([q_lat, q_pe[:, 0]], -1), kc, seq, self.latent_scale, q_lat.shape[-1],
                             sinks=self.sinks)
        return torch.bmm(o.transpose(0, 1), self.w_uv).transpose(0, 1).reshape(B, 1, -1)

    def _latent_ring(self, row, cache, key_padding_mask):
        """A windowed layer's latent cache as a ring of `window` rows (position p in row p % window): this
        forward's rows [B, T, width] -> (the rows its queries attend over: the ring's last positions in order, then
        these; the key padding mask cut to them; the ring's filled rows [B] after these are written, for a decode
        step, which attends over the ring as it lies)."""
        kc, start, ring = cache.k[self.i][:, 0], cache.length, cache.ring[self.i]
        B, T, _ = row.shape
        old = min(start, ring)
        # the oldest cached position sits in row start % ring once the ring has wrapped: rotate it first
        before = kc.roll(-(start % ring), 1) if start > ring else kc[:, :old]
        rows = torch.cat([before, row], 1)                 # a copy: the ring may be written now
        where = torch.arange(start, start + T, device=row.device)[-ring:] % ring
        kc.index_copy_(1, where, row[:, -ring:])
        kpm = None if key_padding_mask is None else key_padding_mask[:, -(old + T):]
        return rows, kpm, torch.full((B,), min(start + T, ring), dtype=torch.int32, device=row.device)

    def _ring_attention(self, k, v, kc, vc, start, ring, key_padding_mask, chunked=False):
        """`_keys` for T new tokens at positions start.. when this layer's cache is a ring of `ring` rows (its
        window): the keys are the ring's last min(start, ring) positions in order, then the new ones; the newest
        min(T, ring) then go into the ring. chunked (a ring of one chunk): the keys are the current chunk's
        cached positions, rows 0 .. start % ring, then the new ones; the first key then sits at a multiple of the
        chunk, so masking chunks by index within those keys masks them by position."""
        m = self.m
        B, _, T, _ = k.shape
        rows = torch.arange(start, start + T, device=k.device)[-ring:] % ring
        if T == 1 and m.ops.name != "torch":
            kc.index_copy_(2, rows, k)
            vc.index_copy_(2, rows, v)
            seq = torch.full((B,), start % ring + 1 if chunked else min(start + 1, ring), dtype=torch.int32,
                             device=k.device)
            return lambda q: m.ops.decode_attention(q[:, :, 0], kc, vc, seq, m.scale, m.alibi, 0, m.softcap,
                                                    sinks=self.sinks).reshape(B, 1, -1)
        old = start % ring if chunked else min(start, ring)
        if start > ring and not chunked:  # the oldest cached position sits in row start % ring: rotate it first
            ok, ov = kc.roll(-(start % ring), 2), vc.roll(-(start % ring), 2)
        else:
            ok, ov = kc[:, :, :old], vc[:, :, :old]
        ka, va = torch.cat([ok, k], 2), torch.cat([ov, v], 2)          # copies: the ring may be written now
        kpm = None if key_padding_mask is None else key_padding_mask[:, -(old + T):]
        kc.index_copy_(2, rows, k[:, :, -ring:])
        vc.index_copy_(2, rows, v[:, :, -ring:])
        return lambda q: m.ops.attention(q, ka, va, m.scale, m.causal, m.alibi, kpm, self.window, m.softcap,
                                         sinks=self.sinks, chunk=self.chunk).transpose(1, 2).reshape(B, T, -1)


def _index_score(q, keys, w):
    """A sparse-attention indexer's scores [B, T, S] (DeepSeek-V3.2's, DeepSeek-V4's): the sum over its heads of
    relu(q . k / sqrt(dim)) times the head's weight; q [B, T, heads, dim], keys [B, S, dim], w [B, T, heads] fp32."""
    s = torch.relu(torch.einsum("bthd,bsd->bths", q.float(), keys.float()) * q.shape[-1] ** -0.5)
    return torch.einsum("bth,bths->bts", w, s)


def _conv_blocks(w: torch.Tensor, stride: int) -> list[torch.Tensor]:
    """A Conv1d weight [out, in, k] as the matmul blocks `_strided_conv` reads: its taps in runs of `stride` (the
    last run shorter where stride does not divide k), each [run * in, out] with rows (tap, in channel)."""
    co, ci, k = w.shape
    rows = w.permute(2, 1, 0).reshape(k * ci, co)
    return [rows[b * stride * ci:min(k, (b + 1) * stride) * ci].contiguous() for b in range(-(-k // stride))]


def _strided_conv(x: torch.Tensor, blocks: list[torch.Tensor], k: int, stride: int, bias=None) -> torch.Tensor:
    """A strided Conv1d (no padding) over channels-last x [B, T, C] -> [B, (T - k) // stride + 1, out], as one matmul
    per run of `stride` taps: output frame t's run b reads input frames (t + b) * stride onwards, which in x's memory
    are one row of a [frames, stride * C] view (a stride of stride * C between rows), so no copy of x is made. At
    the Wav2Vec2 stack's widths this runs at the matmul's rate, well above a direct convolution's on CPU."""
    B, T, C = x.shape
    n = (T - k) // stride + 1
    x = x.contiguous()
    y = x.new_empty(B, n, blocks[0].shape[1])
    for i in range(B):
        row = x[i]
        for b, wb in enumerate(blocks):
            v = row.as_strided((n, wb.shape[0]), (stride * C, 1), row.storage_offset() + b * stride * C)
            if b:
                y[i].addmm_(v, wb)
            elif bias is not None:
                torch.addmm(bias, v, wb, out=y[i])
            else:
                torch.mm(v, wb, out=y[i])
    return y


def _rms_matched(y, x):
    """Gemma 3n's AltUp copies y [B, T, k, hidden] rescaled to the RMS of x [B, T, hidden], in the model dtype."""
    target = x.square().mean(-1, keepdim=True).sqrt().unsqueeze(-2)
    return y * target / y.square().mean(-1, keepdim=True).clamp(min=1e-5).sqrt()


def _group_blocks(w, groups: int):
    """DeepSeek-V4's attn_out_a [groups * rank, K] -> [groups, rank, K] (float), or one Int8Weight per group (views;
    packed for the CPU GEMV where the whole was)."""
    if not isinstance(w, Int8Weight):
        return w.view(groups, w.shape[0] // groups, -1)
    blocks = [Int8Weight(q, s, w.group_size) for q, s in zip(w.q.chunk(groups), w.scale.chunk(groups))]
    if w.packed is not None:
        from ..kernels import int8_gemv_cpu
        for b in blocks:
            b.packed = int8_gemv_cpu.pack(b.q, b.scale, b.group_size)
    return blocks


def _hyper_add(post, y, x):
    """A half's output y [B, T, hidden] joining the copies x [B, T, n, hidden]: each copy plus y times its weight
    (HY-V4: in fp32, rounded once), or, with DeepSeek-V4's mix (post a pair), copy k becomes post[k] y +
    sum_j comb[j, k] x[j], in the model dtype as transformers computes it."""
    if isinstance(post, tuple):
        post, comb = post
        return post.to(x.dtype).unsqueeze(-1) * y.unsqueeze(-2) + torch.matmul(comb.to(x.dtype).transpose(-1, -2), x)
    return (post.unsqueeze(-1) * y.float().unsqueeze(-2) + x.float()).to(x.dtype)


def _rope_tail(ops, x, cos, sin, positions, style, rd):
    """x [B, T, heads, D] with RoPE over its last rd columns (DeepSeek-V4 lays each head out [nope | rope])."""
    lo = x.shape[-1] - rd
    tail = x[..., lo:].contiguous()
    tail = ops.rope(tail, tail[:, :, :1].contiguous(), cos, sin, positions, style, rd)[0]
    return torch.cat([x[..., :lo], tail], -1)


def _rel_buckets(T: int, buckets: int, max_distance: int, device=None, causal: bool = False, S: int | None = None):
    """MPNet's (T5's bidirectional) bucket of each key's offset from each query, [T, S]: half the buckets for keys
    after the query; in each half, offsets below a quarter of the buckets exactly, then log-spaced up to
    max_distance, the last bucket beyond. In float32, truncated, as transformers computes it. causal (T5's decoder):
    every bucket for the keys at or before the query, half of them exact (a later key takes bucket 0, and is masked).
    S: the keys, of which the T queries are the last (a decode step's, over its cache); None: T."""
    S = T if S is None else S
    d = torch.arange(S, device=device).view(1, S) - torch.arange(S - T, S, device=device).view(T, 1)  # key - query
    return _bucket_of(d, buckets, max_distance, causal)


def _bucket_of(d: torch.Tensor, buckets: int, max_distance: int, causal: bool) -> torch.Tensor:
    """The bucket of each offset d (key - query) of `_rel_buckets`: a tensor op, so a decode step can take it from
    its position on the device."""
    half = buckets if causal else buckets // 2
    exact, n = half // 2, (-d).clamp(min=0) if causal else d.abs()
    far = exact + (torch.log(n.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                   * (half - exact)).to(torch.long)
    near = torch.where(n < exact, n, far.clamp(max=half - 1))
    return near if causal else (d > 0).long() * half + near


def _log_buckets(T: int, span: int, buckets: int, max_position: int, device=None, **_):
    """DeBERTa's row of the relative embeddings for each (query i, key j), [T, T]: i - j, log-bucketed when buckets
    is set (offsets within buckets / 2 kept, larger ones ceil-log-spaced towards max_position, in float32 as
    transformers computes them), plus span, clamped to [0, 2 span)."""
    d = torch.arange(T, device=device).view(T, 1) - torch.arange(T, device=device).view(1, T)   # query - key
    if buckets:
        mid = buckets // 2
        n = torch.where(d.abs() < mid, torch.full_like(d, mid - 1), d.abs())
        far = torch.ceil(torch.log(n / mid) / torch.log(torch.tensor((max_position - 1) / mid)) * (mid - 1)) + mid
        d = torch.where(n <= mid, d.float(), far * torch.sign(d)).long()
    return (d + span).clamp(0, 2 * span - 1)


def _rows(cache, idx):
    """Latent cache rows [B, 1, S, D] at the indices idx [B, k]: [B, 1, k, D], contiguous."""
    B, k = idx.shape
    return cache[:, 0].gather(1, idx.unsqueeze(-1).expand(B, k, cache.shape[-1])).unsqueeze(1)


def _visible(S: int, T: int, key_padding_mask, device):
    """[B or 1, T, S]: which of S keys each of the last T queries may see, causally, padding keys left out."""
    qpos = torch.arange(S - T, S, device=device).view(T, 1)
    out = (torch.arange(S, device=device).view(1, S) <= qpos).unsqueeze(0)
    return out if key_padding_mask is None else out & key_padding_mask[:, -S:].view(-1, 1, S)


def _decode_graph_safe(model) -> bool:
    return all(b.device_routed(1) for b in model.blocks if "router.weight" in b.t) and all(   # dense blocks are
        b._on_device(b.t["moa_q.weight"], model.spec["moa"]["top_k"]) for b in model.blocks    # JetMoe's attention
        if "moa_q.weight" in b.t)                                                            # experts likewise


class FusedModel(nn.Module):
    """One rank of a converted model. `forward` returns logits (decoders) or (hidden, pooled) (encoders)."""

    def __init__(self, manifest: dict, tensors: dict, rank: int, comm=None, ops=None, device="cpu"):
        super().__init__()
        self.manifest = manifest
        sp = self.spec = manifest["model"]
        par = self.par = manifest["parallel"]
        self.rank, self.tp = rank, par["tp"]
        self.comm = comm or SingleComm()
        self.ops = ops or TorchOps()
        self.device = torch.device(device)
        self.dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[manifest["dtype"]]
        self.head_dim, self.heads, self.kv_heads = sp["head_dim"], par["heads_per_rank"], par["kv_heads_per_rank"]
        self.eps, self.norm, self.activation = sp["norm_eps"], sp["norm"], sp["activation"]
        if self.activation == "swiglu_oai":      # GPT-OSS: the epilogue carries its two constants
            self.activation = ("swiglu_oai", sp["glu_alpha"], sp["glu_limit"])
        elif self.activation == "swiglu_limit":  # DeepSeek-V4: every SwiGLU clamps its inputs
            self.activation = ("swiglu_limit", sp["glu_limit"])
        self.token_ids = None        # the forward's token ids [B, T]: DeepSeek-V4's hash layers route by them
        self.frames = None           # Wav2Vec2: the last forward's real frames [B, T] (None: all of them)
        self._pos_conv = None        # Wav2Vec2: the positional conv's weight, made from its g and v at first use
        self._wave_blocks = None     # Wav2Vec2: each conv's weight as matmul blocks (_conv_blocks), at first use
        self.conformer_pos = None    # Wav2Vec2-Conformer: this forward's position tables (_conformer_positions)
        # HY-V4: the routed experts clamp their SwiGLU's inputs; the dense MLP and the shared experts do not
        self.experts_activation = ("swiglu_limit", sp["experts_glu_limit"]) if sp["experts_glu_limit"] else None
        self.scale, self.softcap, self.residual_scale = sp["attn_scale"], sp["attn_softcap"], sp["residual_scale"]
        self.causal = sp["kind"] == "decoder" or sp["causal_encoder"]      # CLIP's text encoder is causal too
        self.query_scale = self._query_scale if sp["query_scale_beta"] else None
        self.vocab_lo = rank * par["vocab_per_rank"]
        # Gemma scales its embeddings by sqrt(hidden) rounded to the model dtype, as HF does; a device tensor made
        # once, so a captured decode step copies nothing from the host.
        scale = float(sp["embed_scale"])
        self.embed_scale = None if scale == 1.0 else torch.tensor(scale, dtype=self.dtype, device=self.device)
        if not sp["norm_affine"]:        # OLMo, nanochat: norms without a weight, as a weight of ones
            ones = torch.ones(sp["hidden_size"], dtype=self.dtype, device=self.device)
            tensors = {**tensors, "final_norm.weight": ones,
                       **({"embed_norm.weight": ones} if sp["embed_norm"] else {}),
                       **{f"layers.{i}.{n}.weight": ones for i in range(sp["num_layers"])
                          for n in ("attn_norm", "mlp_norm")}}
        self.g = {k: v for k, v in tensors.items() if not k.startswith("layers.")}  # global slots only
        # Gemma 4 E2B/E4B: the layers whose keys later layers attend over too, and (per forward) how to attend
        # over them; the per-layer inputs of a forward [B, T, layers, dim] and the activation of their gate
        self.kv_shared = {j for i, j in enumerate(sp["kv_source"] or ()) if j != i}
        self.shared_attend: dict = {}
        self.index_choice = None      # DeepSeek Sparse Attention: the last full indexer layer's choice (GLM-5)
        self.ple_inputs = None
        self.ple_scale = torch.tensor(float(sp["per_layer_input"]) ** 0.5, dtype=self.dtype, device=self.device)
        self.ple_activation = {"geglu": "gelu_tanh", "geglu_erf": "gelu", "swiglu": "silu", "reglu2": "relu2"}.get(
            sp["activation"], sp["activation"])
        pos = sp["position"]
        self.rope, self.long_from = None, None
        self._rope_checked, self._forwards = None, 0
        self.shortcut = None
        self.alibi = tensors.get("alibi.slopes")
        self.score_bias = None          # MPNet: this forward's relative-position bias [heads, T, T]
        if pos["type"] == "rope":
            self.rope = tensors["rope.inv_freq"]
            self.rope_style = pos["style"]
            # name -> [inv_freq, attention scaling, cos, sin]; Gemma 3's windowed layers have their own ("local")
            self._tables = {"global": [self.rope, pos.get("attention_scaling", 1.0)]}
            if "local" in pos:
                self._tables["local"] = [tensors["rope_local.inv_freq"], pos["local"].get("attention_scaling", 1.0)]
            self.long_from = pos.get("long_from")      # LongRoPE: the first position of the long factors
            if self.long_from is not None:
                self._tables["long"] = [tensors["rope_long.inv_freq"], pos.get("attention_scaling", 1.0)]
            for tab in self._tables.values():
                tab += rope_tables(tab[0], max(sp["max_positions"], 1), tab[1])
            self._merge_long()
        per_layer = [{} for _ in range(sp["num_layers"])]
        for k, v in tensors.items():
            if k.startswith("layers."):
                _, i, slot = k.split(".", 2)
                per_layer[int(i)][slot] = v
        # Zamba2: a hybrid layer reads its shared block's weights from the layer that holds them (the same tensors)
        for i, owner in block_owners(sp["block_parts"], sp.get("shared_blocks")).items():
            per_layer[i].update({k: v for k, v in per_layer[owner].items() if k.startswith(SHARED_BLOCK_SLOTS)})
        # HRM-Text: a virtual layer reads its block's weights from the block's first run, which holds them
        for i, owner in loop_owners(sp.get("loop"), sp["num_layers"], sp["shared_layers"]).items():   # ALBERT too
            if owner != i:
                per_layer[i].update(per_layer[owner])
        self.cross = self.cross_mask = None    # an encoder-decoder: each layer's source keys and values (attach)
        # a function (layer, q, k) every cross-attention calls with its q [B, H, T, hd] and source keys [B, H, S, hd]
        # (this rank's heads), None: no call (alignment.py reads Whisper's alignment heads through it)
        self.cross_probe = None
        self.step_index = None      # T5's decoder in a decode step: each cache row's relative-position bucket
        self.loop_state = {}        # HRM-Text: the forward's latest z_L and z_H
        self.embeds = None          # Zamba2: the forward's embeddings, which every shared block reads again
        self.router_state = None    # ZAYA: the last router's state in this forward, which the next one reads
        self.blocks = nn.ModuleList(Block(self, i, per_layer[i]) for i in range(sp["num_layers"]))

    # -- pieces ---------------------------------------------------------------------------------------------------
    def _query_scale(self, positions):
        """Ministral 3's and Llama 4's factor for q at these positions: 1 + beta * log(1 + floor((p + offset) / n)),
        1 for the first span, then growing with the log of how many spans lie behind (Llama 4 counts p + 1).
        Device ops only."""
        sp = self.spec
        if sp["query_scale_kind"] == "power":      # Beam: exp(beta * log1p((p + offset) / n)), in fp32
            s = torch.exp(sp["query_scale_beta"] * torch.log1p((positions + sp["query_scale_offset"]).float()
                                                               / sp["query_scale_from"]))
            return s.to(self.dtype)
        s = 1 + sp["query_scale_beta"] * torch.log(1 + torch.floor((positions + sp["query_scale_offset"])
                                                                   / sp["query_scale_from"]))
        return s.to(self.dtype)

    def rope_for(self, positions, table: str = "global"):
        """(cos, sin) covering these positions; grown (every table alike) the first time a forward asks."""
        checked = self._rope_checked      # every layer of a forward asks about the same positions
        if not (checked is not None and checked[0] is positions and checked[1] == self._forwards):
            need = int(positions.max()) + 1
            if any(need > tab[2].shape[0] for tab in self._tables.values()):
                for tab in self._tables.values():
                    tab[2:] = rope_tables(tab[0], max(need, 2 * tab[2].shape[0]), tab[1])
                self._merge_long()
            self._rope_checked = checked = (positions, self._forwards, need)
        if self.long_from is not None and checked[2] > self.long_from:
            table = "long"     # LongRoPE as transformers does it: a forward past the switch is long throughout
        return self.rope_tables(table)

    def rope_tables(self, table: str = "global", decode: bool = False):
        """(cos, sin) as they stand, without a host sync: what a captured decode step reads (`rope_for` has grown
        them to cover every position first). decode: a step's table, which with LongRoPE is the short one's rows
        before the switch and the long one's from it on (a step at position p is a forward whose furthest
        position is p)."""
        if decode and self.long_from is not None:
            return self._decode_long
        return tuple(self._tables[table][2:])

    def _merge_long(self):
        if self.long_from is not None:
            (_, _, sc, ss), (_, _, lc, ls), n = self._tables["global"], self._tables["long"], self.long_from
            self._decode_long = (torch.cat([sc[:n], lc[n:]]), torch.cat([ss[:n], ls[n:]]))

    def _begin_forward(self):
        """Per-forward memos (the positions checked above, the ops' gathered cos/sin) last one forward only."""
        self._forwards += 1
        self.shortcut = None        # LongCat-Flash: a mixture's output waiting for the next layer (Block.mlp)
        begin = getattr(self.ops, "begin_forward", None)
        if begin is not None:
            begin()

    def _lookup(self, table, ids):
        """Rows of a vocab-parallel table (the embedding, Gemma 4's per-layer embeddings) for these token ids."""
        lookup = (lambda i: table.rows(i, self.dtype)) if isinstance(table, Int8Weight) else table.__getitem__
        if self.tp == 1:
            return lookup(ids)
        local = ids - self.vocab_lo
        inside = (local >= 0) & (local < self.par["vocab_per_rank"])
        x = lookup(local.clamp(0, self.par["vocab_per_rank"] - 1))
        return self.comm.all_reduce(x * inside.unsqueeze(-1).to(x.dtype))

    def _per_layer_inputs(self, ids, x):
        """Gemma 4 E2B/E4B: each layer's input [B, T, layers, dim]: (the token's per-layer embedding times
        sqrt(dim) + the embedded token x projected by ple_proj, times 1/sqrt(hidden), RMS-normed per layer) / sqrt(2),
        rounded to the model dtype at each step as transformers does."""
        g, sp = self.g, self.spec
        L, P = sp["num_layers"], sp["per_layer_input"]
        if sp["per_layer_vocab"]:       # Gemma 3n: ids past its per-layer table read row 0
            ids = torch.where(ids < sp["per_layer_vocab"], ids, 0)
        tok = self._lookup(g["ple_embed.weight"], ids) * self.ple_scale
        proj = self.ops.linear(x, g["ple_proj.weight"]) * sp["hidden_size"] ** -0.5
        proj = self.ops.add_norm(proj.view(*proj.shape[:-1], L, P), None, g["ple_proj_norm.weight"], None, self.eps,
                                 self.norm)[0]
        return (proj + tok.view(*tok.shape[:-1], L, P)) * 2 ** -0.5

    def audio_front(self, features):
        """Whisper's encoder: log-mel features [B, mels, 2 * max_positions] -> [B, max_positions, hidden] through
        conv1 and conv2 (stride 2), each with GELU. transformers takes 30 s (padded) and no other length; so does
        this."""
        sp, g = self.spec, self.g
        want = (sp["audio_mels"], 2 * sp["max_positions"])
        if features.dim() != 3 or tuple(features.shape[1:]) != want:
            raise ValueError(f"{sp['architecture']} takes log-mel features [batch, {want[0]}, {want[1]}], got "
                             f"{list(features.shape)}")
        x = F.gelu(F.conv1d(features.to(self.dtype), g["audio_conv1.weight"], g["audio_conv1.bias"], padding=1))
        x = F.gelu(F.conv1d(x, g["audio_conv2.weight"], g["audio_conv2.bias"], stride=2, padding=1))
        return x.transpose(1, 2)                                        # (B, S, hidden)

    def clip_frames(self, samples):
        """A speech encoder's frames of a clip of this many 16 kHz samples (an int or a tensor of counts): what its
        conv stack, or its feature extractor, makes of them (policy.audio_front)."""
        return frames_of(audio_front(self.spec), samples)

    def frame_mask(self, sample_mask):
        """Wav2Vec2: which frames of the conv stack's output are real, from which samples are [B, samples] (a row's
        first n samples make its first frames_of(n) frames); None stays None."""
        if sample_mask is None:
            return None
        n = frames_of(self.spec["wave"], sample_mask.long().sum(-1))
        T = int(frames_of(self.spec["wave"], sample_mask.shape[-1]))
        return torch.arange(T, device=sample_mask.device) < n.unsqueeze(-1)

    def wave_front(self, waves, sample_mask=None):
        """Wav2Vec2, HuBERT: raw waveforms [B, samples] (normalized as the feature extractor does) -> [B, frames,
        hidden]: the conv stack (each conv normed as the spec says, then its activation), the features normed and
        projected, padded frames (sample_mask) zeroed, and the positional conv's output added through the activation
        (Data2Vec-Audio: pos_layers convs in turn, each LayerNormed without weights before its activation).
        Also sets self.frames, the real frames' mask (None without a sample mask)."""
        sp, g, w = self.spec, self.g, self.spec["wave"]
        if waves.dim() != 2 or not waves.is_floating_point():
            raise ValueError(f"{sp['architecture']} takes waveforms [batch, samples] as floats, got "
                             f"{list(waves.shape)} {waves.dtype}")
        if int(frames_of(w, waves.shape[1])) < 1:
            raise ValueError(f"{sp['architecture']} needs at least {self.min_samples()} samples, got {waves.shape[1]}")
        if self._wave_blocks is None:
            self._wave_blocks = [None] + [_conv_blocks(g[f"wave_conv{c}.weight"], st)
                                          for c, st in enumerate(w["stride"]) if c]
        # the first conv reads one channel, which a matmul over runs of taps would read poorly: torch's conv, and its
        # GroupNorm (a group per channel: each over its own time steps) channels first; then channels last
        x = F.conv1d(waves.to(self.dtype).unsqueeze(1), g["wave_conv0.weight"], g.get("wave_conv0.bias"),
                     stride=w["stride"][0])
        if w["norm"] == "group":
            x = F.group_norm(x, x.shape[1], g["wave_norm0.weight"], g["wave_norm0.bias"])
        x = x.transpose(1, 2).contiguous()
        for c, (k, st) in enumerate(zip(w["kernel"], w["stride"])):
            if c:
                x = _strided_conv(x, self._wave_blocks[c], k, st, g.get(f"wave_conv{c}.bias"))
            if w["norm"] == "layer":            # over each frame's channels (transformers' default eps)
                x = F.layer_norm(x, x.shape[-1:], g[f"wave_norm{c}.weight"], g[f"wave_norm{c}.bias"])
            x = activate(x, w["act"])
        if w["feat_norm"]:
            x = F.layer_norm(x, x.shape[-1:], g["feat_norm.weight"], g["feat_norm.bias"], self.eps)
        x = F.linear(x, g["feat_proj.weight"], g["feat_proj.bias"])
        self.frames = self.frame_mask(sample_mask)
        if self.frames is not None:
            x = x * self.frames.unsqueeze(-1).to(x.dtype)
        if w.get("pos_conv") is False:      # Wav2Vec2-Conformer: positions are its blocks' (the conv is never run)
            return x
        K, layers = w["pos_kernel"], w.get("pos_layers", 0)
        if not layers and self._pos_conv is None:      # weight_norm over all but the taps, once, in float32
            v = g["pos_conv.v"].float()
            self._pos_conv = (v * (g["pos_conv.g"].float() / v.square().sum((0, 1), keepdim=True).sqrt())
                              ).to(self.dtype)
        pos = x.transpose(1, 2)
        for p in range(max(layers, 1)):
            weight, bias = (g[f"pos_conv{p}.weight"], g[f"pos_conv{p}.bias"]) if layers else \
                (self._pos_conv, g["pos_conv.bias"])
            pos = F.conv1d(pos, weight, bias, padding=K // 2, groups=w["pos_groups"])
            if K % 2 == 0:              # an even kernel makes one frame too many: the last goes
                pos = pos[..., :-1]
            if layers:                  # Data2Vec-Audio: each conv's output LayerNormed over channels, no weights
                pos = F.layer_norm(pos.transpose(1, 2), pos.shape[1:2]).transpose(1, 2)
            pos = activate(pos, w["act"])
        return x + pos.transpose(1, 2)

    def feature_front(self, features, frame_mask=None):
        """Wav2Vec2-BERT: feature rows [B, T, dim] (SeamlessM4TFeatureExtractor's) -> [B, T, hidden]: LayerNormed
        at the model's eps, projected, padded frames zeroed. frame_mask [B, T] is the extractor's attention mask,
        the real frames as they are; it sets self.frames (None without one)."""
        sp, g, dim = self.spec, self.g, self.spec["features"]["dim"]
        if features.dim() != 3 or features.shape[-1] != dim or not features.is_floating_point():
            raise ValueError(f"{sp['architecture']} takes feature rows [batch, frames, {dim}] as floats, got "
                             f"{list(features.shape)} {features.dtype}")
        x = F.layer_norm(features.to(self.dtype), (dim,), g["feat_norm.weight"], g["feat_norm.bias"], self.eps)
        x = F.linear(x, g["feat_proj.weight"], g["feat_proj.bias"])
        self.frames = None if frame_mask is None else frame_mask.bool()
        return x if self.frames is None else x * self.frames.unsqueeze(-1).to(x.dtype)

    def adapter(self, x):
        """Wav2Vec2-BERT's adapter on the blocks' output x [B, T, hidden] -> [B, T', width], T' what its strided
        convs make of T (policy.audio_front counts a clip's alone); self.frames becomes the mask of T' that
        transformers' lengths give (their padding kernel // 2, not the convs' stride // 2). Every rank runs it
        whole, its weights replicated: one or two small layers after the blocks."""
        ad, g, eps = self.spec["adapter"], self.g, self.eps
        k, st, o, H = ad["kernel"], ad["stride"], ad["width"], self.spec["num_heads"]
        if ad["ffn"]:       # added at half weight
            y = F.relu(F.linear(x, g["adapter_ffn_in.weight"], g["adapter_ffn_in.bias"]))
            x = x + 0.5 * F.linear(y, g["adapter_ffn_out.weight"], g["adapter_ffn_out.bias"])
        if "adapter_proj.weight" in g:
            x = F.layer_norm(F.linear(x, g["adapter_proj.weight"], g["adapter_proj.bias"]), (o,),
                             g["adapter_proj_norm.weight"], g["adapter_proj_norm.bias"], eps)
        n = None if self.frames is None else self.frames.long().sum(-1)

        def glu_conv(p, y):     # LayerNorm, the strided conv to 2 * width channels, GLU: (B, T', width)
            y = F.layer_norm(y, (o,), g[f"{p}_norm.weight"], g[f"{p}_norm.bias"], eps).transpose(1, 2)
            y = F.conv1d(y, g[f"{p}_conv.weight"], g[f"{p}_conv.bias"], stride=st, padding=st // 2)
            return F.glu(y, dim=1).transpose(1, 2)
        for a in range(ad["layers"]):
            p = f"adapter{a}."
            res, h = glu_conv(p + "res", x), glu_conv(p + "attn", x)
            B, T, _ = h.shape
            mask = None
            if n is not None:
                n = (n + 2 * (k // 2) - k) // st + 1
                mask = torch.arange(T, device=h.device) < n.unsqueeze(-1)                    # (B, T')
            q, kk, v = F.linear(h, g[p + "qkv.weight"], g[p + "qkv.bias"]).view(B, T, 3, H, o // H).unbind(2)
            att = F.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), v.transpose(1, 2),
                                                 None if mask is None else mask[:, None, None, :],
                                                 scale=(o // H) ** -0.5)                     # (B, H, T', o/H)
            x = F.linear(att.transpose(1, 2).reshape(B, T, o), g[p + "attn_out.weight"], g[p + "attn_out.bias"]) + res
            y = F.layer_norm(x, (o,), g[p + "mlp_norm.weight"], g[p + "mlp_norm.bias"], eps)
            y = activate(F.linear(y, g[p + "mlp_in.weight"], g[p + "mlp_in.bias"]), ad["act"])
            x = x + F.linear(y, g[p + "mlp_out.weight"], g[p + "mlp_out.bias"])
            self.frames = mask
        return x

    def _conformer_positions(self, T: int, device):
        """Wav2Vec2-Conformer's position tables for T frames, made in float32 as transformers makes them: rotary's
        (cos, sin), each [T, 1, head_dim] (the half-split angles twice); relative's sinusoid of every offset from
        T - 1 down to 1 - T (a key to the left is positive) [2T - 1, hidden], interleaved sin|cos, with the index
        [T, T] of query i and key j's row, T - 1 - i + j; relative_key's index [T, T] of query i and key j's row
        of rel_dist, j - i clamped to [-max_left, max_right], plus max_left; None without positions."""
        cf, h, hd = self.spec["conformer"], self.spec["hidden_size"], self.head_dim
        if cf["position"] == "rotary":      # the checkpoint's frequencies where it keeps them
            inv = self.g.get("conformer_rope.inv_freq")
            if inv is None:
                inv = 1.0 / cf["rotary_base"] ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd)
            f = torch.arange(T, device=device).float()[:, None] * inv
            f = torch.cat([f, f], -1)[:, None]
            return f.cos().to(self.dtype), f.sin().to(self.dtype)
        if cf["position"] == "relative":
            div = torch.exp(torch.arange(0, h, 2, dtype=torch.int64, device=device).float() * -(math.log(10000.0) / h))
            angle = torch.arange(T - 1, -T, -1, device=device).float()[:, None] * div
            table = torch.stack([angle.sin(), angle.cos()], -1).view(2 * T - 1, h).to(self.dtype)
            i = torch.arange(T, device=device)
            return table, (T - 1 - i[:, None] + i[None, :])
        if cf["position"] == "relative_key":
            i = torch.arange(T, device=device)
            return (i[None, :] - i[:, None]).clamp(-cf["max_left"], cf["max_right"]) + cf["max_left"]
        return None

    def min_samples(self) -> int:
        """The shortest waveform the conv stack (or the feature extractor) makes a frame of."""
        return samples_for(audio_front(self.spec))

    def embed(self, ids, positions, token_type_ids, sample_mask=None):
        g, sp = self.g, self.spec
        self.token_ids = ids
        x = self.audio_front(ids) if sp["audio_mels"] else self.wave_front(ids, sample_mask) if sp.get("wave") else \
            self.feature_front(ids, sample_mask) if sp.get("features") else self._lookup(g["embed.weight"], ids)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        if "input_gain" in g:      # ZAYA: (e + shift) * gain, before the fp32 stream
            x = (x + g["input_shift"]) * g["input_gain"]
        if sp["per_layer_input"]:
            self.ple_inputs = self._per_layer_inputs(ids, x)
        if sp["project"]:
            x = self.ops.linear(x, g["project_in.weight"])
        if sp["position"]["type"] in TABLE_POSITIONS:
            pad = sp["position"].get("pad_id")
            if pad is not None:            # RoBERTa: only non-pad tokens count; a pad token reads row pad_id
                real = ids != pad
                positions = (real.cumsum(1) + positions[:, :1]) * real - 1
            x = x + g["pos_embed.weight"][positions + sp["position"]["offset"]]
        if "type_embed.weight" in g:
            tt = torch.zeros_like(ids) if token_type_ids is None else token_type_ids
            x = x + g["type_embed.weight"][tt]
        if sp["embed_norm"]:
            x, _ = self.ops.add_norm(x, None, g["embed_norm.weight"], g.get("embed_norm.bias"), self.eps, self.norm)
        if sp["embed_proj"]:       # ELECTRA: the normed embedding_size-wide sum taken to hidden_size
            x = self.ops.linear(x, g["embed_proj.weight"], g["embed_proj.bias"])
        if sp["altup"]:            # Gemma 3n: the other copies are projections of it, scaled to its RMS
            w = g["altup_proj.weight"]
            y = torch.einsum("bth,koh->btko", x, w.view(-1, x.shape[-1], x.shape[-1]))
            x = torch.cat([x.unsqueeze(-2), _rms_matched(y, x)], -2)
        if sp.get("shared_blocks"):
            self.embeds = x
        if sp.get("loop"):         # HRM-Text: z_H starts as the embeddings, z_L as loop_init; the first run reads both
            self.loop_state = {"H": x, "L": g["loop_init"].expand_as(x)}
            x = self.loop_state["L"] + x
        if sp["hyper"]:            # HY-V4: the stream starts as n copies of the embedding
            x = x.unsqueeze(-2).expand(*x.shape[:-1], sp["hyper"]["streams"], x.shape[-1]).contiguous()
        return x

    def copy_norm(self, x, weight):
        """Qwen4-Exp's RMS norm of each copy [.., n, hidden] with its own weight ([n * hidden], scaling by
        1 + weight), in fp32, rounded once."""
        xf = x.float()
        w = weight.float().view(x.shape[-2], x.shape[-1])
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps) * (1.0 + w)).to(x.dtype)

    def gated_mix(self, x, t, name: str, inject: bool = True):
        """Qwen4-Exp's gated hyper-connection `name` over the copies x [B, T, n, hidden]: the copies normed
        (`copy_norm`), then the half's input is their mean, each channel of each copy weighted by
        sigmoid(up(silu(down(all of them) / n))), and each copy's share of the half's output is
        2 sigmoid(inject(all of them) / n). Returns (the shares [B, T, n] or None, the input [B, T, hidden])."""
        n = x.shape[-2]
        xn = self.copy_norm(x, t[name + ".norm"])
        flat = xn.flatten(-2)
        mix = torch.sigmoid(self.ops.linear(torch.nn.functional.silu(self.ops.linear(flat, t[name + ".down"]) / n),
                                            t[name + ".up"]))
        h = (mix.view_as(xn) * xn).mean(-2)
        if not inject:
            return None, h
        return 2 * torch.sigmoid(self.ops.linear(flat, t[name + ".inject"]) / n), h

    def hyper_mix(self, x, fn, base, scale, post: bool = True):
        """HY-V4's hyper-connection weights, in fp32, from the stream's copies x [B, T, n, hidden] flattened and
        RMS-normed (no weight): logits = (flat @ fn^T) / rms(flat); each copy's input weight
        pre = sigmoid(l * scale[0] + base[:n]) + eps and, with post, its output weight
        magnitude * sigmoid(l' * scale[1] + base[n:]) + eps. Returns (post or None, sum of pre * copies)."""
        hc = self.spec["hyper"]
        n = hc["streams"]
        flat = x.flatten(-2).float()
        mixes = torch.nn.functional.linear(flat, fn.float()) * torch.rsqrt(flat.square().mean(-1, keepdim=True)
                                                                          + self.eps)
        scale, base = scale.float(), base.float()
        pre = torch.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + hc["eps"]
        out = (pre.unsqueeze(-1) * x.float()).sum(-2).to(x.dtype)
        if not post:
            return None, out
        weight = hc["magnitude"] * torch.sigmoid(mixes[..., n:2 * n] * scale[1] + base[n:2 * n])
        if hc.get("post_eps", True):
            weight = weight + hc["eps"]
        iters = hc.get("sinkhorn", 0)
        if not iters:
            return weight, out
        # DeepSeek-V4's copy-to-copy mix [.., n, n]: a softmax per row, then Sinkhorn-Knopp towards doubly
        # stochastic (columns first, then rows and columns iters - 1 times), as its reference does
        comb = torch.softmax(mixes[..., 2 * n:].unflatten(-1, (n, n)) * scale[2] + base[2 * n:].view(n, n), -1) \
            + hc["eps"]
        comb = comb / (comb.sum(-2, keepdim=True) + hc["eps"])
        for _ in range(iters - 1):
            comb = comb / (comb.sum(-1, keepdim=True) + hc["eps"])
            comb = comb / (comb.sum(-2, keepdim=True) + hc["eps"])
        return (weight, comb), out

    def project_out(self, h):
        """OPT's projection from hidden_size to the embedding width, applied before lm_head."""
        return self.ops.linear(h, self.g["project_out.weight"]) if self.spec["project"] else h

    def logits(self, h):
        g, sp = self.g, self.spec
        if sp["headless"]:
            raise FmError(f"{sp['architecture']} was converted without its language-model head (an embedding "
                          f"model, or a bare *Model): it gives hidden states; use `fmconvert embed`")
        h = self.project_out(h)
        if sp["head_activation"]:       # ModernBERT's decoder: a dense layer, its activation and a norm first
            h = self.ops.linear(h, g["head_dense.weight"], g.get("head_dense.bias"), sp["head_activation"])
            h, _ = self.ops.add_norm(h, None, g["head_norm.weight"], g.get("head_norm.bias"), self.eps, self.norm)
        head = g["embed.weight"] if sp["tied_embeddings"] else g["lm_head.weight"]
        local = self.ops.linear(h, head, g.get("lm_head.bias"))   # (B, T, V / tp)
        cap, scale = sp["logit_softcap"], sp["logit_scale"]
        if cap or scale != 1.0:           # Cohere, Granite: logits scaled; Gemma 2: squashed into (-cap, cap)
            lf = local.float() if scale == 1.0 else local.float() * scale
            local = (torch.tanh(lf / cap) * cap if cap else lf).to(local.dtype)
        return self.comm.all_gather(local, dim=-1)[..., :sp["head_vocab_size"] or sp["vocab_size"]]

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        # ALiBi biases by key position, which a ring buffer does not keep; no family has both
        windows = [0 if self.alibi is not None else b.window for b in self.blocks]
        keyless = {b.i for b in self.blocks if b.part == "mlp" or b.kv_from != b.i   # Nemotron-H's MLP layers attend
                   or (self.spec.get("shared_blocks") and b.part != "hybrid")}   # (Zamba2: only hybrid layers do)
        #                                           to nothing; Gemma 4 E2B/E4B's last layers read an earlier cache
        chunks = [b.chunk for b in self.blocks]
        la, ssm, linear = self.spec["linear_attn"], self.spec["ssm"], {}
        if self.spec["short_conv"]:      # LFM2: the conv over this rank's channels, no recurrent state
            linear = {b.i: (self.spec["hidden_size"] // self.tp, self.spec["short_conv"]["conv_kernel"], None)
                      for b in self.blocks if b.linear}
        if la:           # this rank's conv channels (its q, k and v heads) and recurrent state, per linear layer
            hk, hv = la["k_heads"] // self.tp, la["v_heads"] // self.tp
            linear = {b.i: (2 * hk * la["k_dim"] + hv * la["v_dim"], la["conv_kernel"], (hv, la["k_dim"], la["v_dim"]))
                      for b in self.blocks if b.linear}
        if self.spec["lightning"]:    # MiniMax: no conv; a [head_dim, head_dim] state per head of this rank
            linear = {b.i: (0, 1, (self.heads, self.head_dim, self.head_dim)) for b in self.blocks if b.linear}
        if self.spec.get("mlstm"):    # xLSTM: no conv; per head of this rank its C, n and m packed in one state
            a = self.spec["mlstm"]
            H = a["heads"] // self.tp
            shape = (H, a["qk_dim"] // a["heads"] + 1, a["v_dim"] // a["heads"] + 1)
            linear = {b.i: (0, 1, shape) for b in self.blocks}
        if self.spec.get("rglru"):    # RecurrentGemma: the conv over this rank's channels of x; a state per channel
            W = self.spec["rglru"]["width"] // self.tp
            linear = {b.i: (W, self.spec["rglru"]["conv_kernel"], (W,)) for b in self.blocks if b.linear}
        if self.spec["mamba"]:     # Mamba 1: the conv over this rank's channels of x; a [state] row per channel
            mb = self.spec["mamba"]
            linear = {b.i: (mb["inner"] // self.tp, mb["conv_kernel"], (mb["inner"] // self.tp, mb["state"]))
                      for b in self.blocks if b.linear}
        if ssm:          # Mamba2: the conv over this rank's x, B and C; a [head_dim, state] matrix per head
            H, G = self._ssm_local()
            linear = {b.i: (H * ssm["head_dim"] + 2 * G * ssm["state"], ssm["conv_kernel"],
                            (H, ssm["head_dim"], ssm["state"])) for b in self.blocks if b.linear}
        if self.spec.get("cca"):      # ZAYA: beside its keys, each layer's conv inputs over this rank's q|k channels
            C = (self.heads + self.kv_heads) * self.head_dim     # and the last token's v (its delayed half read)
            linear = {b.i: (C, b.cca_keep + 1, (self.kv_heads * self.head_dim,)) for b in self.blocks}
        cp = self.spec["compressed"]
        if cp:     # DeepSeek-V4: one key (= value) row a position in a ring of the window; per compressor, its last
            #        2 * rate positions' projections and a table of every entry the context can fill
            cache = KVCache(len(self.blocks), batch, 1, max_len, self.head_dim, self.dtype, self.device, windows,
                            latent=self.head_dim)
            cache.pools = [None] * len(self.blocks)
            for b in self.blocks:
                if b.compress:
                    ix = cp["index"]
                    parts = {"comp": self.head_dim, **({"index": ix["dim"]} if b.compress == "csa" else {})}
                    cache.pools[b.i] = {
                        name: {"kv": torch.zeros(batch, 2 * b.rate, (1 + (b.compress == "csa" or name == "index"))
                                                 * w, dtype=self.dtype, device=self.device),
                               "entries": torch.zeros(batch, -(-max_len // b.rate), w, dtype=self.dtype,
                                                      device=self.device)} for name, w in parts.items()}
                    for st in cache.pools[b.i].values():
                        st["gate"] = torch.zeros_like(st["kv"])
            return cache
        mla = self.spec["mla"]
        if mla:               # one latent row per position: kv_rank columns (the values too), then the rotated key
            index = {i: mla["index"]["dim"] for i in mla["index"]["layers"]} if "index" in mla else None
            lm = [b.mla for b in self.blocks]       # each layer's widths (Dots3 Note's windowed layers: their own)
            return KVCache(len(self.blocks), batch, 1, max_len, [a["kv_rank"] + a["rope_dim"] for a in lm],
                           self.dtype, self.device, windows, latent=[a["kv_rank"] for a in lm], linear=linear,
                           index=index)
        bsp, qsa = self.spec["block_sparse"], self.spec.get("qsa")
        index = {i: bsp["dim"] for i in bsp["layers"]} if bsp else None     # MiniMax-M3's block keys
        if qsa:                     # Qwen4-Exp: the QSA indexer's raw key per position in every attention layer
            index = {b.i: qsa["dim"] for b in self.blocks if not b.linear}
        cache = KVCache(len(self.blocks), batch, [b.kv_heads for b in self.blocks], max_len,
                       [b.head_dim for b in self.blocks], self.dtype, self.device, windows, chunks=chunks,
                       linear=linear, keyless=keyless, index=index,
                       linear_attends=self.spec["ssm_beside_attention"] or bool(self.spec.get("shared_blocks"))
                       or bool(self.spec.get("cca")))
        cache.qsa_blocks = [None] * len(self.blocks)    # Qwen4-Exp: every complete block's pooled key, per layer
        if qsa:
            for i in index:
                cache.qsa_blocks[i] = torch.zeros(batch, -(-max_len // qsa["rate"]), qsa["dim"], dtype=self.dtype,
                                                  device=self.device)
        ng = self.spec.get("ngram")
        cache.dyn_bias = [torch.zeros(batch, b.kv_heads, max_len, dtype=self.dtype, device=self.device)
                          if b.dyn_window else None for b in self.blocks]     # Doge: each cached key's bias
        cache.ngram = [None] * len(self.blocks)
        for i in (ng or {}).get("layers", ()):     # Qwen4-Exp: the last size - 1 ids and the dilated conv's inputs
            n, h = self.spec["hyper"]["streams"], self.spec["hidden_size"]
            cache.ngram[i] = {"ids": torch.full((batch, ng["size"] - 1), ng["eos"], dtype=torch.long,
                                                device=self.device),
                              "conv": torch.zeros(batch, n * h, (ng["conv_kernel"] - 1) * ng["size"], dtype=self.dtype,
                                                  device=self.device)}
        return cache

    def _ssm_local(self) -> tuple[int, int]:
        """(heads, groups) of the Mamba2 layers on this rank: the groups are split with the heads, or all held when
        one group serves every head."""
        s = self.spec["ssm"]
        return s["heads"] // self.tp, s["groups"] // self.tp if s["groups"] % self.tp == 0 else s["groups"]

    @torch.inference_mode()
    def attach(self, source, source_mask=None):
        """An encoder-decoder's decoder: the encoder's output for this batch, source [B, S, hidden] (and its padding
        mask [B, S]), projected once into every layer's cross-attention keys and values for the steps that follow.
        The encoder's output is the same on every rank; each projects its own heads."""
        if not self.spec.get("encoder"):
            raise ValueError(f"{self.spec['architecture']} has no cross-attention to attach a source to")
        B, S, _ = source.shape
        self.cross_mask = None if source_mask is None or bool(source_mask.all()) else source_mask.bool()
        self.cross = {}
        for blk in self.blocks:
            kv = self.ops.linear(source.to(self.dtype), blk.t["cross_kv.weight"], blk.t.get("cross_kv.bias"))
            k, v = kv.view(B, S, 2, blk.heads, -1).permute(2, 0, 3, 1, 4).contiguous()   # each (B, H, S, hd)
            self.cross[blk.i] = (k, v)

    # -- forward --------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def hidden(self, ids, cache=None, attention_mask=None, token_type_ids=None, output_hidden_states=False):
        self._begin_forward()
        wave, speech = self.spec.get("wave"), audio_front(self.spec)
        # Whisper reads mels (its positions fixed), Wav2Vec2 samples (a frame every few hundred), Wav2Vec2-BERT
        # feature rows (a frame each), the rest token ids
        B, T = (ids.shape[0], self.spec["max_positions"]) if self.spec["audio_mels"] else \
            (ids.shape[0], int(frames_of(wave, ids.shape[1]))) if wave else ids.shape[:2]
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + T, device=ids.device).unsqueeze(0).expand(B, T)
        x, residual = self.embed(ids, positions, token_type_ids, attention_mask if speech else None), None
        if speech:      # the mask was the samples' (or the feature rows'); the layers mask frames
            attention_mask = self.frames
        if self.spec.get("conformer"):
            self.conformer_pos = self._conformer_positions(T, x.device)
        rb = self.spec["rel_bias"]
        if rb:      # MPNet, T5: one score bias for every layer, by the keys' offsets (UMT5: a table per layer)
            self.rel_index = _rel_buckets(T, rb["buckets"], rb["max_distance"], device=ids.device,
                                          causal=rb.get("causal", False), S=start + T)
            self.score_bias = None if rb.get("per_layer") else self.g["rel_bias.weight"][:, self.rel_index]
        if self.spec["disentangled"]:  # DeBERTa: every layer's position terms read these rows
            sp, g = self.spec["disentangled"], self.g
            self.rel_index = _log_buckets(T, **sp, device=ids.device)
            self.rel_embed = g["rel_embed.weight"] if "rel_embed_norm.weight" not in g else self.ops.add_norm(
                g["rel_embed.weight"], None, g["rel_embed_norm.weight"], g.get("rel_embed_norm.bias"), self.eps,
                self.norm)[0]
        states = [x] if output_hidden_states else None
        kpm = None if attention_mask is None else attention_mask.bool()
        x_norm = x_gain = None
        x_scale = self.residual_scale
        for blk in self.blocks:
            x, residual = blk(x, residual, positions, cache, kpm, x_norm=x_norm, x_gain=x_gain, x_scale=x_scale)
            x_norm, x_gain, x_scale = blk.out_norm, blk.out_gain, blk.out_scale
            if output_hidden_states:  # the residual stream after each block, as HF reports it
                xs = x if x_norm is None else self.ops.add_norm(x, None, x_norm, None, self.eps, self.norm)[0]
                xs = xs if residual is None else xs * x_scale + residual
                states.append(xs if x_gain is None else xs * x_gain)
        self.shared_attend.clear()
        if cache is not None:
            cache.length += T
        x = self._final(x, residual, x_norm, x_gain, x_scale)
        if self.spec.get("adapter"):        # Wav2Vec2-BERT: after the blocks, on fewer frames; not a layer's state
            x = self.adapter(x)
        return (x, states) if output_hidden_states else x

    def _final(self, x, residual, x_norm, x_gain=None, x_scale=None):
        x_scale = self.residual_scale if x_scale is None else x_scale
        if self.spec["residual"] == "gated_hyper":     # Qwen4-Exp: the copies mixed into the head's input
            return self.gated_mix(x, self.g, "hc_head", inject=False)[1]
        if self.spec["hyper"]:      # HY-V4: the copies folded into one (hc_head) before the final norm
            g = self.g
            x = self.hyper_mix(x, g["hc_head.fn"], g["hc_head.base"], g["hc_head.scale"], post=False)[1]
        if self.spec["altup"]:      # Gemma 3n: the other copies projected back, scaled to the active one's RMS, averaged
            w, h0 = self.g["altup_unembed.weight"], x[..., 0, :]
            y = torch.einsum("btkh,koh->btko", x[..., 1:, :], w.view(-1, h0.shape[-1], h0.shape[-1]))
            x = torch.cat([h0.unsqueeze(-2), _rms_matched(y, h0)], -2).mean(-2)
        if self.spec["final_norm"]:
            return self.ops.add_norm(x, residual, self.g["final_norm.weight"], self.g.get("final_norm.bias"),
                                     self.spec.get("final_norm_eps") or self.eps, self.norm, pre_weight=x_norm,
                                     x_scale=x_scale, gain=x_gain)[0]
        if x_norm is not None:
            x = self.ops.add_norm(x, None, x_norm, None, self.eps, self.norm)[0]
        x = x if residual is None else x * x_scale + residual
        return x if x_gain is None else x * x_gain

    @torch.inference_mode()
    def decode_step(self, ids, cache: KVCache, pos_t: torch.Tensor) -> torch.Tensor:
        """One token per sequence at position pos_t (device tensor [1]); logits [B, vocab]. No host syncs and no
        shapes that depend on the step, so it can be captured once in a CUDA graph and replayed. The caller
        advances cache.length."""
        self._begin_forward()
        B = ids.shape[0]
        positions = pos_t.view(1, 1).expand(B, 1)
        # The lengths to attend over, once per step (not per layer): ring size -> filled rows (0: a plain cache;
        # minus a chunk's size: its ring's rows up to pos_t in the current chunk)
        filled = pos_t + 1
        seq_t = {(-r if c else r): (pos_t % r + 1 if c else filled.clamp(max=r) if r else filled)
                 .to(torch.int32).expand(B).contiguous() for r, c in sorted(set(zip(cache.ring, cache.chunked)))}
        x, residual, x_norm, x_gain, x_scale = self.embed(ids, positions, None), None, None, None, None
        rb = self.spec["rel_bias"]
        if rb:      # T5's decoder: the bucket of every cache row's offset from the step's position
            d = torch.arange(cache.max_len, device=ids.device) - pos_t
            self.step_index = _bucket_of(d, rb["buckets"], rb["max_distance"], True)
        for blk in self.blocks:
            x, residual = blk(x, residual, positions, cache, None, pos_t, seq_t, x_norm=x_norm, x_gain=x_gain,
                              x_scale=x_scale)
            x_norm, x_gain, x_scale = blk.out_norm, blk.out_gain, blk.out_scale
        return self.logits(self._final(x, residual, x_norm, x_gain, x_scale))[:, -1]

    @torch.inference_mode()
    def forward(self, ids, cache=None, attention_mask=None, token_type_ids=None):
        h = self.hidden(ids, cache, attention_mask, token_type_ids)
        if self.spec["kind"] == "encoder":
            return h, self.pooled(h)
        return self.logits(h)

    def pooled(self, h):
        eos = self.spec["eos_pool"]
        if eos:     # CLIP: each text's first eos token (or its largest id), through text_proj when there is one
            ids = self.token_ids
            at = ids.argmax(-1) if eos["eos_id"] < 0 else (ids == eos["eos_id"]).int().argmax(-1)
            x = h[torch.arange(h.shape[0], device=h.device), at]
            return self.ops.linear(x, self.g["text_proj.weight"]) if "text_proj.weight" in self.g else x
        if not self.spec.get("pooler"):
            return None
        return torch.tanh(self.ops.linear(h[:, 0], self.g["pooler.weight"], self.g["pooler.bias"]))
