"""The conversion pipeline: read -> policy (fuse) -> slice -> quantize -> write shards + manifest.

Streams slot by slot: the main thread reads (through maps whose pages are dropped once a slot is written), fuses
and slices; a small thread pool quantizes row blocks; a writer thread streams each tensor into its shard file,
hashing it on the way; with --source-sha256 the source files are hashed alongside. The bytes in flight are bounded,
so peak memory follows the largest layer, not the model. The output does not depend on the number of threads.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import json
import math
import mmap
import os
import queue
import shutil
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from . import manifest as mf
from . import slice as sl
from . import srchash
from .errors import EXIT_IO, FmError
from .policy import (DEPTHWISE, ENCODER_DIR, INT_SLOTS, ModelSpec, Policy, SlotSource, _config_value, encoder_half,
                     per_layer_type, policy_of, stored_dtype)
from .quantize import ErrorStats, quantize, scale_dtype_for
from .read import SIDECAR_FILES, Checkpoint, sentence_files, fp8_block, int4_format, load_config, quant_method
from .write import AtomicDir, ShardWriter, dtype_name, parse_size

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
QUANT_SLOTS = ("qkv.weight", "attn_out.weight", "mlp_in.weight", "mlp_out.weight", "experts_in.weight",
               "experts_out.weight", "shared_in.weight", "shared_out.weight",
               "q_a.weight", "q_b.weight", "kv_a.weight", "kv_b.weight",     # latent attention's projections
               "attn_out_a.weight",                      # DeepSeek-V4's grouped output projection, a block per group
               "moa_q.weight", "moa_kv.weight", "moa_out.weight",     # JetMoe's attention experts
               "mlstm_in.weight", "mlstm_out.weight",                 # xLSTM's mLSTM
               "cross_q.weight", "cross_kv.weight", "cross_out.weight",    # an encoder-decoder's cross-attention
               "lin_in.weight", "lin_out.weight", "ssm_in.weight", "ssm_out.weight",   # linear mixers
               "lin_qkv.weight", "lin_gate.weight",
               "sconv_in.weight", "sconv_out.weight", "mamba_in.weight", "mamba_out.weight",
               "rg_in.weight", "rg_out.weight",
               "macaron_in.weight", "macaron_out.weight", "conv_in.weight", "conv_out.weight")   # the Conformer's
HEAD_SLOTS = ("lm_head.weight",)     # an untied head is a matmul read whole every token: int8 by default
EMBED_SLOTS = ("embed.weight", "lm_head.weight", "ple_embed.weight", "ngram_embed.weight")   # and Qwen4-Exp's
#                                                                                              n-gram tables


@dataclass
class Options:
    tp: int = 1
    int8: bool = False
    group_size: int | None = None     # None: 128, or the largest power of two below it that divides every K
    dtype: str = "auto"
    max_shard_size: str = "2GB"
    force: bool = False
    allow_pickle: bool = False
    int8_embeddings: bool = False
    int8_lm_head: bool = True         # with int8: an untied lm_head too (a tied one follows int8_embeddings)
    source_sha256: bool = False       # record every source file's full sha256 (else only a fingerprint)
    dry_run: bool = False             # check and size the output from config.json and the headers; write nothing


@dataclass
class Plan:
    """Everything decided before a byte is written: the spec, the layout, and where each slot comes from."""

    policy: Policy
    spec: ModelSpec
    layout: sl.Layout
    dtype: torch.dtype
    globals_: list[SlotSource]
    layers: list[list[SlotSource]]
    extras: list[str]
    tied_lm_head: str | None          # an lm_head tensor present although the embeddings are tied
    groups: dict[str, int]            # quantized slot -> group size
    group_size: int | None            # the group size asked for, or picked (see Options.group_size)
    quant_slots: tuple[str, ...]
    bytes_in: int
    params: int
    prefix: str = ""                  # prepended to the policy's tensor names in this checkpoint
    aliases: dict = field(default_factory=dict)   # slot key -> index of the other spelling this checkpoint uses
    flipped: list = field(default_factory=list)   # stacked slot keys stored in the other orientation (Policy.flipped)
    dropped: dict | None = None       # a vision-language wrapper's left-out towers: tensors, bytes, prefixes
    consumed: frozenset = frozenset()  # the checkpoint's tensors it reads (an encoder-decoder's halves share some)


def _resolve_dtype(opt: str, config, ckpt: Checkpoint, sources) -> torch.dtype:
    if opt != "auto":
        if opt not in DTYPES:
            raise FmError(f"--dtype must be auto, bf16, fp16 or fp32, got {opt!r}")
        return DTYPES[opt]
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = DTYPES.get(d.replace("torch.", ""))
    if isinstance(d, torch.dtype) and d in DTYPES.values():
        return d
    first = ckpt.dtype(sources[0].names[0])
    return first if first in DTYPES.values() else torch.float32


def make_plan(model_dir: Path, opts: Options, ckpt: Checkpoint, config) -> Plan:
    policy, arch = policy_of(config)
    spec = policy.spec(config, arch)
    flags = policy.flags(config, arch)
    first = policy.sources(spec, flags, "", None)[0]          # the first global, under any of its spellings
    prefix = next((p for p in policy.prefixes if any(p + names[0] in ckpt for names in [first.names, *first.aliases])),
                  None)
    if prefix is None:
        want = policy.sources(spec, flags, "", None)[0].names[0]
        raise FmError(f"missing tensor {want} (tried prefixes {policy.prefixes}); is this really {arch}?")
    globals_ = policy.sources(spec, flags, prefix, None)
    layers = [policy.sources(spec, flags, prefix, i) for i in range(spec.num_layers)]
    head = next((s for s in globals_ if s.slot == "lm_head.weight"), None)
    if head is not None and not any(all(n in ckpt for n in names) for names in [head.names, *head.aliases]) and (
            not arch.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
            or sentence_files(model_dir)):
        # a decoder saved without its head: a bare *Model, or a sentence-transformers embedding model that keeps
        # the body alone (Qwen3-Embedding-4B/8B); its hidden states are what it is for
        spec.headless = True
        globals_ = [s for s in globals_ if not s.slot.startswith("lm_head.")]

    consumed: set[str] = set()
    bytes_in = params = 0
    spelled: dict[str, int | None] = {}
    flips: dict[str, bool] = {}
    keyed = [(s.slot, s) for s in globals_] + [(f"layers.{s.slot}", s) for layer in layers for s in layer]
    for key, src in keyed:
        present = [n in ckpt for n in src.names]
        which = None
        if not all(present):                # another spelling (an older transformers' name) may be there instead
            which = next((j for j, a in enumerate(src.aliases) if all(n in ckpt for n in a)), None)
            if which is not None:
                src.names, present = src.aliases[which], [True] * len(src.aliases[which])
        if spelled.setdefault(key, which) != which:
            raise FmError(f"{src.names[0]}: the layers of this checkpoint spell {key} in different ways")
        if src.optional and not any(present):
            src.names = []
            continue
        if src.slot in DEPTHWISE and len(src.names) > 1 and all(present):
            # a conv over concatenated channels may be stored in pieces of other sizes: transformers saves OLMo
            # Hybrid's q|k|v conv as three equal chunks, the checkpoints as q, k and v
            got = [ckpt.shape(n) for n in src.names]
            if {g[1:] for g in got} == {tuple(s[1:]) for s in src.shapes} and \
                    sum(g[0] for g in got) == sum(s[0] for s in src.shapes):
                src.shapes = [tuple(g) for g in got]
        for n, shape, ok in zip(src.names, src.shapes, present):
            if not ok:
                raise FmError(f"missing tensor {n} (needed for {src.slot} of {arch})")
            got = ckpt.shape(n)
            flip = got != tuple(shape) and policy.flippable(src.slot) and len(got) == 3 and \
                got == (shape[0], shape[2], shape[1])
            if got != tuple(shape) and not flip:
                raise FmError(f"tensor {n} has shape {list(got)}, but config.json implies {list(shape)}")
            if flips.setdefault(key, flip) != flip:
                raise FmError(f"{n}: the layers of this checkpoint store {key} in different orientations")
            if src.slot in INT_SLOTS:        # DeepSeek-V4's token -> expert table: integers, read as they are
                if ckpt.dtype(n).is_floating_point or ckpt.dtype(n) == torch.bool:
                    raise FmError(f"tensor {n} has dtype {ckpt.dtype(n)}, expected an integer dtype")
            elif not ckpt.dtype(n).is_floating_point:
                raise FmError(f"tensor {n} has dtype {ckpt.dtype(n)}, expected a float dtype")
            if n in consumed:
                continue                # read twice (Gemma 4's k_proj as v): counted once
            consumed.add(n)
            numel = math.prod(got)
            params += numel
            bytes_in += ckpt.stored_bytes(n)
    own = getattr(config, "fmconvert_own", None)
    if own is not None:     # an encoder half whose embeddings are the table both halves read (T5's and BART's shared)
        emb = next((s for s in globals_ if s.slot == "embed.weight" and s.names), None)
        if emb is not None and not emb.names[0].startswith((*own, *(prefix + o for o in own))):
            spec.embed_from = ".."          # stored once, with the decoder, which counts it
            params -= sum(math.prod(ckpt.shape(n)) for n in emb.names)
            bytes_in -= sum(ckpt.stored_bytes(n) for n in emb.names)
            emb.names = []
    globals_ = [s for s in globals_ if s.names]
    flipped = sorted(k for k, f in flips.items() if f)
    if flipped:
        policy = policy.flipped(k.removeprefix("layers.") for k in flipped)
    spec.pooler = any(s.slot == "pooler.weight" for s in globals_)
    per_layer = list(dict.fromkeys(s.slot for layer in layers for s in layer))    # a mixture's dense layers differ
    head = policy.head_prefix(prefix) + "lm_head.weight"
    if policy.layout.get("tied") == "unless_head_differs" and spec.tied_embeddings and head in ckpt and \
            not spec.headless:
        # T5 under transformers 5, which calls every T5 tied: its head is the embeddings unless the checkpoint holds an
        # lm_head that differs from them (T5 v1.1, Flan-T5), as transformers then leaves it untied
        emb = next(s for s in globals_ if s.slot == "embed.weight")
        if ckpt.shape(head) != ckpt.shape(emb.names[0]) or not torch.equal(ckpt.get(head), ckpt.get(emb.names[0])):
            spec.tied_embeddings = False
            globals_.append(SlotSource("lm_head.weight", [head], [tuple(ckpt.shape(emb.names[0]))]))
            consumed.add(head)
            params += math.prod(ckpt.shape(head))
            bytes_in += ckpt.stored_bytes(head)
    spec.slots = [s.slot for s in globals_] + [f"layers.{s}" for s in per_layer]
    tied_lm_head = head if spec.tied_embeddings and head in ckpt else None
    if tied_lm_head:
        consumed.add(tied_lm_head)
    ignore = policy.ignored(prefix, spec.num_layers)
    extras = []
    dropped = {"tensors": 0, "bytes": 0}
    L = spec.num_layers
    # a drop prefix with {i} names a part of every layer (Zamba2: the copies of a shared block some checkpoints
    # keep in each layer that runs it, beside the one its first layer holds, which its slots read)
    drop = [d.format(i=i) for d in policy.drop for i in (range(L) if "{i}" in d else (0,))] + \
        [f"{prefix}layers.{i}." for i in range(L, L + _mtp(policy, config))]
    # an encoder-decoder converts in two halves: each leaves the other's tensors to it
    other = getattr(config, "fmconvert_skip", None) or tuple((policy.seq2seq or {}).get("encoder_prefixes", ()))
    for n in ckpt.names():
        if n in consumed or any(p.fullmatch(n) for p in ignore) or n.startswith(other) or \
                n.startswith(tuple(prefix + o for o in other)):
            continue
        if any(n.startswith(p) for p in drop):
            dropped["tensors"] += 1
            dropped["bytes"] += math.prod(ckpt.shape(n)) * ckpt.dtype(n).itemsize
            continue
        if any(n.startswith(p) for p in policy.passthrough()):
            extras.append(n)
            continue
        raise FmError(f"unexpected tensor {n}: the {policy.family} policy has no slot for it")

    spec.classifier = policy.classifier(config, spec.architecture, extras)
    if spec.classifier and spec.classifier["pool"] == "pooler" and not spec.pooler:
        raise FmError(f"{spec.architecture}: its classifier reads the pooler, which the checkpoint lacks")
    dtype = _resolve_dtype(opts.dtype, config, ckpt, globals_)
    layout, group, quant_slots, groups = _quant_plan(spec, opts)
    return Plan(policy, spec, layout, dtype, globals_, layers, extras, tied_lm_head, groups, group, quant_slots,
                bytes_in, params, prefix, {k: v for k, v in sorted(spelled.items()) if v is not None}, flipped,
                {**dropped, "prefixes": drop, "what": "vision" if policy.wrapper else
                 "copies" if spec.shared_blocks else "mtp"}
                if policy.wrapper or dropped["tensors"] else None, frozenset(consumed))


# The smallest group the default picks before it asks for --group-size: narrower groups spend more on scales
# (a 2-byte scale per 8 int8 values is 25%) than they gain in accuracy.
MIN_AUTO_GROUP = 16


def _quant_plan(spec: ModelSpec, opts: Options):
    """(layout, group size, quantized slots, {slot: group}). Without --group-size the group is 128, or the largest
    power of two below it that divides every rank's K: GPT-OSS's hidden size 2880 takes 64."""
    auto = opts.group_size is None
    group = 128 if auto else opts.group_size
    if opts.int8 and (type(group) is not int or group < 1 or group & (group - 1)):
        raise FmError(f"--group-size must be a power of two, got {group}")
    while True:
        layout = sl.plan(spec, opts.tp, group if opts.int8 else None)
        if not opts.int8:
            return layout, None, (), {}
        quant_slots = QUANT_SLOTS + (EMBED_SLOTS if opts.int8_embeddings else HEAD_SLOTS if opts.int8_lm_head else ())
        groups = {}
        wide = next((i for i in range(spec.num_layers) if spec.global_layer(i)), None)
        views = [(spec, layout)] + ([sl.at(spec, layout, wide)] if wide is not None else []) + (
            [sl.at(spec, layout, spec.wide_mlp_layers[0])] if spec.wide_mlp_layers else []) + [    # Gemma 4 E2B
            sl.at(spec, layout, spec.layer_heads.index(n)) for n in sorted(set(spec.layer_heads or ()))] + (  # Laguna
            [sl.at(spec, layout, spec.window_layers[0])] if (spec.mla or {}).get("local") else [])   # Dots3 Note
        for slot in quant_slots:
            k = sl.k_per_rank(spec, layout, slot)
            if not k:
                continue                      # a slot this model does not have (a shared expert's, say)
            g = sl.padded_group(k, group) if slot in sl.PADDED_K else sl.group_for(k, group)
            # one group per slot, dividing its K in every layer (Gemma 4's global layers' attn_out is wider)
            k = next((kk for kk in (sl.k_per_rank(s, lay, slot) for s, lay in views) if kk % g), k)
            if k % g:
                break
            groups[slot] = g
        else:
            return layout, group, quant_slots, groups
        if not auto or group <= MIN_AUTO_GROUP:
            how = "--group-size" + (f" {group}" if not auto else f" (no power of two from 128 to {MIN_AUTO_GROUP})")
            raise FmError(f"{how} does not divide K={k} of {slot} on each rank (tp={opts.tp}); pick a group size "
                          f"that divides {k}")
        group //= 2


def _mtp(policy: Policy, config) -> int:
    """Layers stored after the last one that are multi-token-prediction heads (GLM-4.5's num_nextn_predict_layers):
    training aids that transformers leaves out too. Their tensors are counted in source.dropped."""
    key = policy.table["config"].get("mtp_layers")
    n = 0 if key is None else _config_value(config, key, "mtp_layers") or 0
    if type(n) is not int or not 0 <= n <= 64:
        raise FmError(f"config.json: {key.split('|')[0]} must be a small non-negative integer, got {n!r}")
    return n


def _rope_inv_freq(config, spec: ModelSpec, local: bool = False, seq_len: int | None = None
                   ) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention scaling) of the model's RoPE, or with local=True of its windowed layers' (Gemma 3).
    seq_len: the sequence length it is computed for (LongRoPE's long factors: past the original context)."""
    pos = spec.position
    p = pos["local"] if local else pos
    dim = p.get("rotary_dim", pos["rotary_dim"])     # Gemma 4: the windowed layers rotate their narrower heads
    if p["rope_type"] == "default":
        inv = 1.0 / (p["theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        return inv.float(), 1.0
    if p["rope_type"] == "ntk_alpha":        # Hunyuan: the base stretched by alpha^(d / (d - 2)), once
        base = p["theta"] * p["parameters"]["alpha"] ** (dim / (dim - 2))
        return (1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))), 1.0
    if p["rope_type"] == "dynamic":
        raise FmError("RoPE type 'dynamic' rescales its base with every sequence length at run time; not supported")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    if p["rope_type"] not in ROPE_INIT_FUNCTIONS:
        raise FmError(f"RoPE type {p['rope_type']!r} is not supported")
    kind = {} if seq_len is None else {"seq_len": seq_len}
    params = getattr(config, "rope_parameters", None) or {}
    if set(params) == {"main", "compress"}:      # DeepSeek-V4: the compressed layers' RoPE is the main table
        kind["layer_type"] = "main" if local else "compress"
    elif per_layer_type(params):
        kind["layer_type"] = "sliding_attention" if local else "full_attention"
    try:
        inv, scaling = ROPE_INIT_FUNCTIONS[p["rope_type"]](config, torch.device("cpu"), **kind)
    except Exception as e:
        raise FmError(f"RoPE parameters are invalid ({type(e).__name__}: {e})") from None
    return inv.float().contiguous(), float(scaling)


def rope_tensors(config, spec: ModelSpec) -> dict[str, tuple[torch.Tensor, float]]:
    """The derived RoPE tensors every rank holds, each with its attention scaling."""
    if spec.position["type"] != "rope":
        return {}
    out = {"rope.inv_freq": _rope_inv_freq(config, spec)}
    if "local" in spec.position:
        out["rope_local.inv_freq"] = _rope_inv_freq(config, spec, local=True)
    if "long_from" in spec.position:   # LongRoPE: transformers' own long set, as it computes it past the switch
        out["rope_long.inv_freq"] = _rope_inv_freq(config, spec, seq_len=spec.position["long_from"] + 1)
    if spec.position.get("reversed"):  # nanochat: rotation by -angle; cos stays, sin flips, in every table
        out = {k: (-inv, scaling) for k, (inv, scaling) in out.items()}
    return out


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """BLOOM's ALiBi slopes: a geometric sequence for the nearest power of two, then interleaved extras."""
    p = 2 ** math.floor(math.log2(n_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(p) - 3)))
    slopes = [base ** (i + 1) for i in range(p)]
    if p != n_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * p) - 3)))
        slopes += [extra ** (2 * i + 1) for i in range(n_heads - p)]
    return torch.tensor(slopes, dtype=torch.float32)


def sinusoidal_table(spec: ModelSpec, dtype: torch.dtype) -> torch.Tensor:
    """XGLM's fixed positions (fairseq's): row p is sin(p w) then cos(p w), w_i = 10000^(-i / (d/2 - 1)), a zero
    column when d is odd, computed in float32 and rounded once to dtype as transformers rounds its buffer. Rows below
    the offset are never read; the one before it, the padding index, is zero. Style `marian` (Marian, Pegasus):
    w_i = 10000^(-2i / d), computed in float64 and rounded to float32 as transformers' create_weight does, the sin
    half ceil(d/2) wide; no row zeroed."""
    n, d = spec.max_positions + spec.position["offset"], spec.hidden_size
    if spec.position.get("style") == "marian":
        i = torch.arange((d + 1) // 2, dtype=torch.float64)
        angle = torch.arange(n, dtype=torch.float64)[:, None] / torch.pow(10000.0, 2 * i / d)[None, :]
        return torch.cat([torch.sin(angle), torch.cos(angle[:, :d // 2])], dim=1).float().to(dtype)
    half = d // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / max(half - 1, 1)))
    angle = torch.arange(n, dtype=torch.float32)[:, None] * freq[None, :]
    table = torch.cat([torch.sin(angle), torch.cos(angle), torch.zeros(n, d % 2)], dim=1)
    if spec.position["offset"] > 0:
        table[spec.position["offset"] - 1] = 0
    return table.to(dtype)


def derived_tensors(config, spec: ModelSpec, heads_per_rank: int, tp: int, dtype: torch.dtype
                    ) -> dict[str, list[torch.Tensor]]:
    """The tensors the converter computes instead of reading, each as its ranks' pieces: RoPE's inverse
    frequencies (every rank), ALiBi's slopes (each rank its heads'), XGLM's position table (every rank). The converter
    writes them; verify recomputes them."""
    out = {name: [inv] * tp for name, (inv, _) in rope_tensors(config, spec).items()}
    if spec.position["type"] == "alibi":
        slopes, h = alibi_slopes(spec.num_heads), heads_per_rank
        out["alibi.slopes"] = [slopes[r * h:(r + 1) * h].clone() for r in range(tp)]
    if spec.position["type"] == "sinusoidal":
        out["pos_embed.weight"] = [sinusoidal_table(spec, dtype)] * tp
    return out


def _check_finite(name: str, t: torch.Tensor):
    """One cheap reduction (NaN and +-Inf all show in the min or max); the exact count only on failure."""
    if t.numel() == 0 or not t.is_floating_point():
        return
    lo, hi = torch.aminmax(t)
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return
    bad = int((~torch.isfinite(t)).sum())
    raise FmError(f"tensor {name} contains {bad} NaN/Inf values; refusing to convert it")


# -- reading -----------------------------------------------------------------------------------------------------
_ST_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


class _Source:
    """The checkpoint's tensors as views of private read-only maps of its safetensors files.

    The Checkpoint (safetensors' own handles) validated the files and answers names, shapes and dtypes; tensors are
    read through these maps instead because their pages can be handed back (`drop`, `release`) as soon as they are
    used, so resident memory follows the slots in flight, not the checkpoint size. Pickled checkpoints go through
    the Checkpoint as before."""

    def __init__(self, ckpt: Checkpoint, model_dir: Path):
        self.ckpt = ckpt
        self.maps: list[tuple[int, int, mmap.mmap]] = []          # (address, size, map)
        self.where: dict[str, tuple] = {}                         # name -> (map, begin, end, dtype, shape)
        for fname in ckpt.files:
            if not fname.endswith(".safetensors"):
                continue
            with open(model_dir / fname, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
                size = os.fstat(f.fileno()).st_size
                if size <= 8 + n:
                    continue
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self.maps.append((torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr(), size, mm))
            base = 8 + n
            for name, e in header.items():
                if name == "__metadata__" or e["dtype"] not in _ST_TORCH or name in ckpt.fp4 or name in ckpt.fp8:
                    continue                # (quantized weights are decoded by the Checkpoint)
                dtype = _ST_TORCH[e["dtype"]]
                b, t = e["data_offsets"]
                if (base + b) % dtype.itemsize or t == b:   # unaligned or empty: let safetensors handle it
                    continue
                self.where[name] = (mm, base + b, base + t, dtype, tuple(e["shape"]))

    def get(self, name: str) -> torch.Tensor:
        w = self.where.get(name)
        if w is None:
            return self.ckpt.get(name)
        mm, b, e, dtype, shape = w
        return torch.frombuffer(mm, dtype=dtype, count=(e - b) // dtype.itemsize, offset=b).view(shape)

    def nbytes(self, name: str) -> int:
        return math.prod(self.ckpt.shape(name)) * self.ckpt.dtype(name).itemsize

    def _span(self, t: torch.Tensor):
        """(map, begin, end) of the bytes a view of a map covers; None when t is not such a view."""
        if t.numel() == 0:
            return None
        lo = t.data_ptr()
        hi = lo + (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) * t.element_size()
        for addr, size, mm in self.maps:
            if addr <= lo < addr + size:
                return mm, lo - addr, min(hi - addr, size)
        return None

    def owns(self, t: torch.Tensor | None) -> bool:
        return t is not None and self._span(t) is not None

    def drop(self, t: torch.Tensor):
        """Hand back the pages under a view of the source (after its last use; a later read just faults them in)."""
        span = self._span(t)
        if span is not None:
            srchash.drop_pages(*span)

    def release(self, names):
        for name in names:
            w = self.where.get(name)
            if w is not None:
                srchash.drop_pages(w[0], w[1], w[2])


# -- the pipeline ------------------------------------------------------------------------------------------------
# Quantizer threads. torch ops release the GIL, so these overlap with each other, with the main thread (reading,
# fusing, slicing), the writer thread (writing + hashing) and any source hashers. Intra-op threads are set to 1 for
# the run: on a small machine the pipeline's own threads fill the cores.
WORKERS = max(1, min(4, os.cpu_count() or 1))
# Rows of a quantized piece per task. Fixed (not derived from WORKERS) so the error sums, and the manifest, do not
# depend on the machine.
BLOCK_ROWS = 512
# Bytes of work between reading and writing: source pages, pieces and outputs of the slots in flight. Together with
# the interpreter's own ~330 MiB this bounds peak RSS; a single slot larger than this still goes through, alone.
INFLIGHT_BYTES = 128 << 20


class _Budget:
    """Bytes in flight between the main thread and the writer; `take` blocks while over the limit."""

    def __init__(self, limit: int, failed: threading.Event):
        self.limit, self.used, self.failed = limit, 0, failed
        self.cond = threading.Condition()

    def take(self, n: int):
        with self.cond:
            while self.used > 0 and self.used + n > self.limit and not self.failed.is_set():
                self.cond.wait(0.1)
            self.used += n

    def give(self, n: int):
        with self.cond:
            self.used -= n
            self.cond.notify_all()


@dataclass
class _Item:
    """One step of the output, in plan order: its (rank, name, tensor or pending) outputs and what to do after."""

    outs: list
    cost: int = 0
    release: list = field(default_factory=list)   # views of the source to drop once quantized
    early: int = 0                                 # part of `cost` given back before the write (see _Countdown)
    est: int = 0                                   # meta runs: bytes held while the item is made
    quant: tuple | None = None                     # (name, src, group, [piece pendings]) for a quantized slot
    check: SlotSource | None = None                # a float slot: its pieces are checked for NaN/Inf
    layer_done: bool = False


class _Buffers:
    """Output tensors handed back once written, for the next layer's same-shaped slot: every layer has the same
    shapes, and fresh memory costs a page fault per 4 KB (1.2 GB of int8 output for a 1B model)."""

    def __init__(self, keep: int = 4):
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.keep, self.lock = keep, threading.Lock()

    def get(self, shape, dtype) -> torch.Tensor:
        with self.lock:
            got = self.free.get((tuple(shape), dtype))
            if got:
                return got.pop()
        return torch.empty(shape, dtype=dtype)

    def put(self, t: torch.Tensor):
        with self.lock:
            free = self.free.setdefault((tuple(t.shape), t.dtype), [])
            if len(free) < self.keep:
                free.append(t)


class _Countdown:
    """Calls `fn` once, when `tick` has been called n times (at once if n == 0). Ticks come from pool threads."""

    def __init__(self, n: int, fn):
        self.n, self.fn, self.lock = n, fn, threading.Lock()
        if n == 0:
            fn()

    def tick(self, _future=None):
        with self.lock:
            self.n -= 1
            last = self.n == 0
        if last:
            self.fn()


class _Pending:
    """A quantized piece: its int8 weight and scales, filled in row blocks by the quantizer threads."""

    def __init__(self, futures, q, s):
        self.futures, self.q, self.s = futures, q, s

    def wait(self) -> list[ErrorStats]:
        return [f.result() for f in self.futures]


def _quantize_block(piece, lo, hi, group, scale_dtype, q, s) -> ErrorStats:
    stats = ErrorStats()
    quantize(piece[lo:hi], group, scale_dtype, stats, out=(q[lo:hi], s[lo:hi]))
    return stats


def _quantize_rows(jobs, group, scale_dtype, q, s) -> ErrorStats:
    """Rows [lo, hi) of a piece from a view of the source (None: padding rows, which quantize to zeros)."""
    stats = ErrorStats()
    for lo, hi, view in jobs:
        if view is None:
            q[lo:hi].zero_()
            s[lo:hi].zero_()
        else:
            quantize(view, group, scale_dtype, stats, out=(q[lo:hi], s[lo:hi]))
    return stats


def _root(t: torch.Tensor) -> torch.Tensor:
    return t if t._base is None else t._base


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Run:
    """Walks the plan in output order. The same walk runs twice: on meta tensors to declare every output to the
    writer (names, dtypes, shapes: the file headers), then for real."""

    def __init__(self, plan: Plan, opts: Options, ckpt: Checkpoint, src: _Source | None, derived: dict):
        self.plan, self.opts, self.ckpt, self.src, self.derived = plan, opts, ckpt, src, derived
        self.scale_dtype = scale_dtype_for(plan.dtype)
        self.pool: ThreadPoolExecutor | None = None
        self.budget: _Budget | None = None
        self.buffers = _Buffers()
        self._traces: dict = {}

    def steps(self):
        p = self.plan
        if p.tied_lm_head:
            yield "tied", None, None, False
        for src in p.globals_:
            yield "slot", src.slot, src, False
        if self.derived:
            yield "derived", None, None, False
        for i, layer in enumerate(p.layers):
            for j, src in enumerate(layer):
                yield "slot", f"layers.{i}.{src.slot}", src, j == len(layer) - 1
        for n in p.extras:
            yield "extra", n, None, False

    def item(self, kind, name, src, meta: bool) -> _Item:
        p, tp = self.plan, self.opts.tp
        if kind == "tied":
            if not meta:
                head = self.src.get(p.tied_lm_head)
                emb = next(s for s in p.globals_ if s.slot == "embed.weight").names[0]
                same = torch.equal(head, self.src.get(emb))
                self.src.release([p.tied_lm_head, emb])
                if not same:
                    raise FmError("tie_word_embeddings is true but lm_head.weight differs from the embeddings")
            return _Item([])
        if kind == "derived":
            return _Item([(r, name, t) for name, pieces in self.derived.items() for r, t in enumerate(pieces)])
        if kind == "extra":
            if meta:
                t = torch.empty(self.ckpt.shape(name), dtype=self.ckpt.dtype(name), device="meta")
                return _Item([(r, f"extra.{name}", t) for r in range(tp)])
            t = self.src.get(name)
            return _Item([(r, f"extra.{name}", t) for r in range(tp)], cost=_nbytes(t))
        return self._slot(name, src, meta)

    def _slot(self, name: str, src: SlotSource, meta: bool) -> _Item:
        p, slot = self.plan, src.slot
        quantized = slot in p.quant_slots
        trace = self._trace(src) if quantized else None
        if trace is not None:
            if meta:    # the same outputs as the slicer's pieces would give, and nothing held while making them
                outs = []
                for r, runs in enumerate(trace[1]):
                    n = sum(c for _, _, c in runs)
                    N, K = (n, self._width(src, 1)) if trace[0] == 0 else (self._width(src, 0), n)
                    outs += [(r, name, torch.empty(N, K, dtype=torch.int8, device="meta")),
                             (r, name + "_scale", torch.empty(N, K // p.groups[slot], dtype=self.scale_dtype,
                                                              device="meta"))]
                return _Item(outs)
            return self._quantize_in_place(name, src, *trace)
        dtype = stored_dtype(slot, p.dtype)
        if meta:
            parts = [torch.empty(self.ckpt.shape(n), dtype=dtype, device="meta") for n in src.names]
        else:
            # NaN/Inf: the writer checks each piece as it writes it (quantized ones through their scales, for free)
            parts = [self.src.get(n).to(dtype) for n in src.names]
        spec, lay = sl.at(p.spec, p.layout, src.layer)
        t = p.policy.fuse(spec, slot, parts)
        if not meta and not self.src.owns(t):
            self.src.release(src.names)           # fuse made a copy: the source pages are done with
        pieces = sl.shard(spec, lay, slot, t)
        # What making this slot may hold at once besides the source: a fused copy and sliced copies (meta: by view
        # ancestry, which meta tensors keep like real ones). The direct path above holds neither.
        est = 0
        if meta:
            roots = {id(_root(x)) for x in parts}
            made = {id(_root(x)): _nbytes(x) for x in [t, *pieces] if x is not None and id(_root(x)) not in roots}
            est = sum(made.values()) + sum(self.src.nbytes(n) for n in src.names
                                           if self.ckpt.dtype(n) != dtype)
        del t, parts
        # Pieces that are still views of the source (vocab chunks, replicated norms, a tp=1 weight) keep their pages
        # until written or quantized; for the others the source pages go now.
        views = [] if meta else [x for x in pieces if self.src.owns(x)]
        if not meta and not views:
            self.src.release(src.names)
        # Copies stay until written; views of the source are touched (and dropped) a slice at a time by the writer.
        copies = {x.data_ptr(): _nbytes(x) for x in pieces
                  if x is not None and not meta and not any(x is v for v in views)}
        cost = sum(copies.values()) + min(sum(_nbytes(x) for x in views), 2 * ShardWriter.SLICE)
        if not quantized:
            return _Item([(r, name, x) for r, x in enumerate(pieces) if x is not None], cost=cost, check=src,
                         est=est)
        g, sd = p.groups[slot], self.scale_dtype
        outs, pend = [], []
        for r, piece in enumerate(pieces):
            N, K = piece.shape
            if meta:
                outs += [(r, name, torch.empty(N, K, dtype=torch.int8, device="meta")),
                         (r, name + "_scale", torch.empty(N, K // g, dtype=sd, device="meta"))]
                continue
            q, s = self.buffers.get((N, K), torch.int8), self.buffers.get((N, K // g), sd)
            futs = [self.pool.submit(_quantize_block, piece, lo, min(lo + BLOCK_ROWS, N), g, sd, q, s)
                    for lo in range(0, N, BLOCK_ROWS)]
            pend.append(_Pending(futs, q, s))
            outs += [(r, name, q), (r, name + "_scale", s)]
            cost += _nbytes(q) + _nbytes(s)
        return _Item(outs, cost=cost, release=views, quant=(name, src, g, pend), est=est)

    def _trace(self, src: SlotSource):
        """Where each rank piece of a quantized slot comes from in the source, found by running the policy's fuse and
        the slicer's shard on small id tensors (so the index math stays in those two places): for row-selecting
        slots (column- and vocab-parallel) the source rows of every piece row, for row-parallel ones the column range.
        Quantization is row-wise with groups along K, so the pieces can then be quantized straight from views of the
        source: no fused copy, no sliced copy. None when a piece must be materialized (padded columns, a dtype
        cast)."""
        p, slot = self.plan, src.slot
        shapes = [tuple(self.ckpt.shape(n)) for n in src.names]
        key = (slot, tuple(shapes), tuple(self.ckpt.dtype(n) for n in src.names), p.spec.global_layer(src.layer))
        if key in self._traces:
            return self._traces[key]
        self._traces[key] = None
        if any(dtype != p.dtype for dtype in key[2]):     # the reference casts first: keep that route
            return None
        if slot in sl.COLUMN or slot in sl.VOCAB:
            axis = 0
        elif slot in sl.ROW:
            axis = 1
        else:
            return None
        transposed = slot in p.policy.transposed
        ids, bases, total = [], [], 0
        for shape in shapes:
            d = axis if not transposed else 1 - axis          # the source dim that holds the canonical axis
            n = shape[d]
            v = torch.arange(total + 1, total + n + 1)        # 0 is the padding the slicer adds
            ids.append(v.view(n, 1) if d == 0 else v.view(1, n))
            bases.append(total)
            total += n
        try:
            spec, lay = sl.at(p.spec, p.layout, src.layer)
            fused = p.policy.fuse(spec, slot, ids)
            if fused.shape != ((total, 1) if axis == 0 else (1, total)):
                return None
            pieces = sl.shard(spec, lay, slot, fused)
        except (RuntimeError, ValueError, IndexError):
            return None
        which = [self._locate(x.reshape(-1).tolist(), bases) for x in pieces]
        if axis == 1 and not all(len(w) == 1 and w[0][0] is not None for w in which):
            return None                                       # padded or scattered columns: materialize
        self._traces[key] = (axis, which)
        return self._traces[key]

    def _width(self, src: SlotSource, axis: int) -> int:
        """The canonical size along `axis` (0: rows, 1: columns) of a slot whose parts share the other dim."""
        shape = self.ckpt.shape(src.names[0])
        return shape[axis] if src.slot not in self.plan.policy.transposed else shape[1 - axis]

    def declare(self, writer: ShardWriter) -> list[int]:
        """Every output to the writer, in plan order, from a dry run on meta tensors (once per distinct slot
        shape: the layers repeat). Returns, per step, the bytes its making may hold besides its outputs."""
        memo, ests = {}, []
        for kind, name, src, _ in self.steps():
            if kind != "slot":
                for r, n, t in self.item(kind, name, src, meta=True).outs:
                    writer.declare(r, n, t.dtype, t.shape)
                ests.append(0)
                continue
            key = (src.slot, tuple((tuple(self.ckpt.shape(n)), self.ckpt.dtype(n)) for n in src.names))
            if key not in memo:
                item = self._slot(name, src, meta=True)
                memo[key] = ([(r, n[len(name):], t.dtype, tuple(t.shape)) for r, n, t in item.outs], item.est)
            outs, est = memo[key]
            for r, suffix, dtype, shape in outs:
                writer.declare(r, name + suffix, dtype, shape)
            ests.append(est)
        return ests

    @staticmethod
    def _locate(ids: list[int], bases: list[int]) -> list[tuple]:
        """Piece ids -> runs (part, first, count) of consecutive source rows/columns, (None, 0, count) for padding."""
        runs: list[list] = []
        for i in ids:
            part = None if i == 0 else bisect.bisect_right(bases, i - 1) - 1
            j = 0 if i == 0 else i - 1 - bases[part]
            if runs and runs[-1][0] == part and (part is None or runs[-1][1] + runs[-1][2] == j):
                runs[-1][2] += 1
            else:
                runs.append([part, j, 1])
        return [tuple(r) for r in runs]

    def _quantize_in_place(self, name: str, src: SlotSource, axis: int, which) -> _Item:
        p, slot = self.plan, src.slot
        g, sd = p.groups[slot], self.scale_dtype
        parts = [self.src.get(n) for n in src.names]
        transposed = slot in p.policy.transposed

        def rows(k, a, b):           # canonical rows [a, b) of part k, as a view
            x = parts[k]
            return x[a:b] if not transposed else x[:, a:b].t()

        outs, pend = [], []
        cost = sum(_nbytes(x) for x in parts)
        for r, runs in enumerate(which):
            if axis == 1:                                     # row-parallel: one column range of the source
                k, a, n = runs[0]
                x = parts[k]
                piece = x[:, a:a + n] if not transposed else x[a:a + n].t()
                jobs = [[(lo, min(lo + BLOCK_ROWS, piece.shape[0]), piece[lo:lo + BLOCK_ROWS])]
                        for lo in range(0, piece.shape[0], BLOCK_ROWS)]
                N, K = piece.shape
            else:                                             # rows gathered from runs of source rows
                K = parts[0].shape[1] if not transposed else parts[0].shape[0]
                jobs, block, at = [], [], 0
                for k, a, n in runs:
                    while n:
                        take = min(n, BLOCK_ROWS - sum(hi - lo for lo, hi, _ in block))
                        block.append((at, at + take, None if k is None else rows(k, a, a + take)))
                        at, a, n = at + take, a + take, n - take
                        if sum(hi - lo for lo, hi, _ in block) == BLOCK_ROWS:
                            jobs.append(block)
                            block = []
                if block:
                    jobs.append(block)
                N = at
            q, s = self.buffers.get((N, K), torch.int8), self.buffers.get((N, K // g), sd)
            futs = [self.pool.submit(_quantize_rows, job, g, sd, q, s) for job in jobs]
            pend.append(_Pending(futs, q, s))
            outs += [(r, name, q), (r, name + "_scale", s)]
            cost += _nbytes(q) + _nbytes(s)
        # The source pages (and their share of the budget) go as soon as the last block is quantized, not when the
        # writer gets to this slot: the quantizers can run ahead of the writer.
        futs = [f for x in pend for f in x.futures]
        src_bytes = sum(_nbytes(x) for x in parts)
        done = _Countdown(len(futs), lambda: (self.src.release(src.names), self.budget.give(src_bytes)))
        for f in futs:
            f.add_done_callback(done.tick)
        return _Item(outs, cost=cost, early=src_bytes, quant=(name, src, g, pend))

    def check_scales(self, src: SlotSource, pend: list[_Pending]):
        """NaN/Inf in a weight shows as a non-finite scale: then name the source tensor exactly as before."""
        if all(bool(torch.isfinite(x.s).all()) for x in pend):
            return
        self._blame(src)
        raise FmError(f"tensor {', '.join(src.names)}: values too large for {dtype_name(self.scale_dtype)} int8 "
                      "scales; convert with --dtype fp32")

    def check_piece(self, src: SlotSource, t: torch.Tensor):
        """A float piece about to be written: NaN/Inf anywhere in it is the source tensor's, named as such."""
        if t.is_floating_point() and t.numel():
            lo, hi = torch.aminmax(t)
            if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
                self._blame(src)

    def _blame(self, src: SlotSource):
        for n in src.names:
            _check_finite(n, self.src.get(n))


class _Writer(threading.Thread):
    """Takes items in plan order, waits for their quantized pieces, writes them; frees their budget and pages."""

    def __init__(self, run: _Run, writer: ShardWriter, budget: _Budget, failed: threading.Event, advance):
        super().__init__(daemon=True, name="fmconvert-write")
        self.run_, self.writer, self.budget, self.failed, self.advance = run, writer, budget, failed, advance
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.qstats: dict[str, dict] = {}
        self.error: BaseException | None = None
        self.cancel = threading.Event()

    def run(self):
        try:
            while (item := self.q.get()) is not None:
                if self.cancel.is_set():
                    self.budget.give(item.cost - item.early)
                    continue
                if item.quant is not None:
                    name, src, g, pend = item.quant
                    stats = ErrorStats()
                    for x in pend:
                        for s in x.wait():
                            stats.merge(s)
                    self.run_.check_scales(src, pend)
                    self.qstats[name] = {"group_size": g, **stats.to_dict()}
                for x in item.release:
                    self.run_.src.drop(x)
                for r, name, t in item.outs:
                    self.writer.add(r, name, t, self._progress(item, t))
                if item.layer_done:
                    self.advance()
                if item.quant is not None:      # written: the next layer's same slot reuses the memory
                    for x in item.quant[3]:
                        self.run_.buffers.put(x.q)
                        self.run_.buffers.put(x.s)
                self.budget.give(item.cost - item.early)
                item = None
        except BaseException as e:   # handed to the main thread, which raises it
            self.error = e
            self.failed.set()
            self.budget.give(1 << 62)

    def _progress(self, item: _Item, t: torch.Tensor):
        """Per written slice of t: NaN/Inf check (float slots), then the source pages under it go (views)."""
        run, check = self.run_, item.check
        view = run.src.owns(t)
        if check is None and not view:
            return None
        flat = t.reshape(-1)
        size, done = t.element_size(), [0]

        def progress(nbytes: int):
            lo, hi = done[0], nbytes // size
            if check is not None:
                run.check_piece(check, flat[lo:hi])
            if view:
                run.src.drop(flat[lo:hi])
            done[0] = hi
        return progress


def _emit_all(run: _Run, writer: ShardWriter, advance) -> dict:
    """Declare every output, then stream them: main thread reads/fuses/slices, pool quantizes, writer writes."""
    ests = run.declare(writer)
    failed = threading.Event()
    budget = run.budget = _Budget(INFLIGHT_BYTES, failed)
    wt = _Writer(run, writer, budget, failed, advance)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run.pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="fmconvert-quant")
    wt.start()
    try:
        for (kind, name, src, last), est in zip(run.steps(), ests):
            if failed.is_set():
                break
            budget.take(est)
            try:
                item = run.item(kind, name, src, meta=False)
            finally:
                budget.give(est)
            item.layer_done = last
            budget.take(item.cost)
            wt.q.put(item)
            del item
        wt.q.put(None)
        wt.join()
        if wt.error is not None:
            raise wt.error
    except FmError:
        # Report the earliest failure in plan order: let the writer finish what came before this one.
        wt.q.put(None)
        wt.join()
        if wt.error is not None:
            raise wt.error from None
        raise
    except BaseException:
        wt.cancel.set()
        wt.q.put(None)
        wt.join()
        raise
    finally:
        run.pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)
        if wt.error is not None or wt.is_alive():
            writer.abort()
    writer.close()
    return wt.qstats


@contextlib.contextmanager
def no_gc():
    """For imports (torch, transformers): they make ~10^6 objects that all stay, so the collections they trigger find
    nothing, at ~0.4 s of CPU. Frozen afterwards, later collections skip them too."""
    on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if on:
            gc.enable()


def convert(model_dir, out_dir, opts: Options | None = None, progress: bool = True, console=None) -> dict:
    """Convert MODEL_DIR into OUT_DIR. Returns a summary dict (also printed by the CLI)."""
    opts = opts or Options()
    t0 = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    max_bytes = parse_size(opts.max_shard_size)
    # With --source-sha256, hashing the whole source is the longest single job: it starts before config.json is
    # parsed (which imports transformers), or earlier still from the CLI, whenever the weight files can be told already.
    hashing = opts.source_sha256 and not opts.dry_run
    if hashing:
        srchash.start(model_dir)
    try:
        with no_gc():
            config, config_sha = load_config(model_dir)
        ckpt = Checkpoint(model_dir, allow_pickle=opts.allow_pickle, mxfp4=quant_method(config) == "mxfp4",
                          fp8=fp8_block(config), int4=int4_format(config))
    except BaseException:
        if hashing:
            srchash.discard(model_dir)
        raise
    if opts.dry_run:
        with ckpt:
            return _dry_run(model_dir, opts, config, ckpt, t0)
    hasher = srchash.take(model_dir, ckpt.files) if hashing else None
    try:
        return _convert(model_dir, out_dir, opts, progress, console, t0, max_bytes, config, config_sha, ckpt, hasher)
    except BaseException:
        if hasher is not None:
            hasher.cancel()
        raise


def _dry_run(model_dir, opts, config, ckpt, t0) -> dict:
    """What convert would write with these options, from config.json and the safetensors headers alone: the same
    plan (every check a conversion makes before reading a weight), every output tensor declared on meta tensors, and
    the files laid out. No weight is read and nothing is written."""
    halves = _halves(model_dir, opts, ckpt, config)
    plan = halves[-1][1]
    files = []
    for cfg, pl, _ in halves:
        writer = ShardWriter(Path(os.devnull), opts.tp, parse_size(opts.max_shard_size))
        run = _Run(pl, opts, ckpt, _Source(ckpt, model_dir),
                   derived_tensors(cfg, pl.spec, pl.layout.heads_per_rank, opts.tp, pl.dtype))
        run.declare(writer)
        planned = writer.planned()
        files = planned if not files else [a + b for a, b in zip(files, planned)]
    return {"dry_run": True, "architecture": plan.spec.architecture, "family": plan.spec.family, "tp": opts.tp,
            "encoder": halves[0][1].spec.architecture if len(halves) > 1 else None,
            "int8": opts.int8, "dtype": dtype_name(plan.dtype),
            "groups": sorted({g for _, pl, _ in halves for g in pl.groups.values()}),
            "params": sum(pl.params for _, pl, _ in halves),
            "bytes_in": sum(pl.bytes_in for _, pl, _ in halves), "bytes_out": sum(n for f in files for _, n in f),
            "rank_bytes": [sum(n for _, n in f) for f in files], "files": sum(len(f) for f in files),
            "planned": files, "seconds": time.perf_counter() - t0, "dropped": plan.dropped,
            "kv_cache": mf.kv_cache_bytes(plan.spec.to_dict(), plan.layout.to_dict(), plan.dtype.itemsize)
            if plan.spec.kind == "decoder" else None,         # an encoder runs whole texts: no cache
            "source_kv": mf.source_kv_bytes(plan.spec.to_dict(), plan.layout.to_dict(), plan.dtype.itemsize)}


def _halves(model_dir: Path, opts: Options, ckpt, config) -> list[tuple]:
    """(config, plan, subdirectory) of each conversion to write, the decoder's last: one, or an encoder-decoder's
    encoder (its own conversion, in ENCODER_DIR) and decoder."""
    plan = make_plan(model_dir, opts, ckpt, config)
    if not plan.policy.seq2seq:
        return [(config, plan, "")]
    half = encoder_half(config, plan.policy, plan.spec.architecture)
    return [(half, make_plan(model_dir, opts, ckpt, half), ENCODER_DIR), (config, plan, "")]


def _write_half(config, plan: Plan, opts: Options, ckpt, src, model_dir: Path, tmp: Path, max_bytes: int, progress,
                console, sidecars, config_sha: str, prints: dict):
    """Write one conversion's shards and sidecars into tmp -> (its manifest, less the source's full hashes; the
    writer; the quantization statistics)."""
    spec = plan.spec
    rope = rope_tensors(config, spec)
    writer = ShardWriter(tmp, opts.tp, max_bytes)
    run = _Run(plan, opts, ckpt, src, derived_tensors(config, spec, plan.layout.heads_per_rank, opts.tp, plan.dtype))

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    cols = (TextColumn("[bold]converting"), BarColumn(), MofNCompleteColumn(),
            TextColumn("encoder layers" if tmp.name == ENCODER_DIR else "layers"),
            TimeRemainingColumn())
    # transient: a failed run must end on its one `error:` line, not on a half-drawn bar (the CLI
    # prints a summary on success).
    with Progress(*cols, console=console, disable=not progress, transient=True) as bar:
        task = bar.add_task("layers", total=spec.num_layers)
        qstats = _emit_all(run, writer, lambda: bar.advance(task))

    copied = []
    for f in sidecars:
        (tmp / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_dir / f, tmp / f)
        copied.append(f)
    pos = dict(spec.position)
    if rope:
        pos["attention_scaling"] = rope["rope.inv_freq"][1]
    if "rope_local.inv_freq" in rope:
        pos["local"] = {**pos["local"], "attention_scaling": rope["rope_local.inv_freq"][1]}
    spec.position = pos
    manifest = {
        "format": mf.FORMAT, "format_version": mf.FORMAT_VERSION, "tool_version": __version__,
        "source": {"architecture": spec.architecture, "family": spec.family, "prefix": plan.prefix,
                   "config_sha256": config_sha, "fingerprints": prints, "sidecar_files": copied,
                   # the flags that picked the tensors' names, so that they can be named back (reassemble)
                   "flags": {k: v for k, v in sorted(plan.policy.flags(config, spec.architecture).items())
                             if type(v) is bool},
                   **({"aliases": plan.aliases} if plan.aliases else {}),
                   **({"flipped": plan.flipped} if plan.flipped else {}),
                   **({"dropped": plan.dropped} if plan.dropped is not None else {}),
                   **({"mxfp4": sorted(ckpt.mxfp4)} if ckpt.mxfp4 else {}),     # decoded to bf16 on read
                   **({"fp8": {"block": list(ckpt.fp8_block), "tensors": len(ckpt.fp8),
                               **({"fp4_tensors": len(ckpt.fp4)} if ckpt.fp4 else {})}} if ckpt.fp8
                      else {}),                   # DeepSeek-V4: its E2M1 experts beside the FP8 blocks
                   **({"int4": {"method": ckpt.int4_format["method"], "tensors": len(ckpt.int4)}}
                      if ckpt.int4 else {}),                    # GPTQ / AWQ, decoded on read
                   },
        "model": spec.to_dict(),
        "parallel": plan.layout.to_dict(),
        "dtype": dtype_name(plan.dtype),
        "quantization": None if not opts.int8 else {
            "scheme": "int8_symmetric_group", "group_size": plan.group_size,
            "scale_dtype": dtype_name(run.scale_dtype), "embeddings": opts.int8_embeddings,
            "lm_head": "lm_head.weight" in plan.quant_slots and not plan.spec.headless and (
                opts.int8_embeddings or not plan.spec.tied_embeddings),
            "tensors": qstats},
        "extras": plan.extras,
        "ranks": [{"rank": r, "files": writer.files[r], "tensors": dict(sorted(writer.tensors[r].items()))}
                  for r in range(opts.tp)],
    }
    return manifest, writer, qstats


def _convert(model_dir, out_dir, opts, progress, console, t0, max_bytes, config, config_sha, ckpt, hasher) -> dict:
    with ckpt:
        try:
            prints = {f: srchash.fingerprint(model_dir / f) for f in sorted(ckpt.files)}
        except OSError as e:
            raise FmError(f"cannot read the source files of {model_dir}: {e.strerror or e}", EXIT_IO) from None
        halves = _halves(model_dir, opts, ckpt, config)
        plan = halves[-1][1]
        spec = plan.spec
        sidecars = [*(f for f in SIDECAR_FILES if (model_dir / f).is_file()), *sentence_files(model_dir)]
        src = _Source(ckpt, model_dir)
        atomic = AtomicDir(out_dir, opts.force, keep=model_dir)
        with atomic as tmp:
            written = []
            for cfg, pl, sub in halves:
                (tmp / sub).mkdir(exist_ok=True)
                written.append(_write_half(cfg, pl, opts, ckpt, src, model_dir, tmp / sub, max_bytes, progress, console,
                                           sidecars, config_sha, prints))
            src_hashes = hasher.join() if hasher is not None else None
            for (_, _, sub), (manifest, _, _) in zip(halves, written):
                if src_hashes is not None:
                    manifest["source"]["files"] = dict(sorted(src_hashes.items()))
                (tmp / sub / mf.MANIFEST).write_text(mf.dumps(manifest))
            atomic.commit()
        bytes_in, params = plan.bytes_in, plan.params
        if len(halves) > 1:           # the halves' shared embedding counted once
            read = plan.consumed | halves[0][1].consumed
            bytes_in, params = sum(ckpt.stored_bytes(n) for n in read), sum(math.prod(ckpt.shape(n)) for n in read)
    bytes_out = sum(w.bytes_written for _, w, _ in written)
    files = sum(len(f) for _, w, _ in written for f in w.files)
    qstats = {f"{sub}/{k}" if sub else k: v for (_, _, sub), (_, _, q) in zip(halves, written) for k, v in q.items()}
    secs = time.perf_counter() - t0
    return {"architecture": spec.architecture, "tp": opts.tp, "int8": opts.int8, "dtype": dtype_name(plan.dtype),
            "encoder": halves[0][1].spec.architecture if len(halves) > 1 else None,
            "params": params, "bytes_in": bytes_in, "bytes_out": bytes_out,
            "files": files, "seconds": secs, "dropped": plan.dropped,
            "mxfp4": len(ckpt.mxfp4), "fp8": len(ckpt.fp8), "fp4": len(ckpt.fp4), "int4": len(ckpt.int4),
            "mb_per_s": bytes_in / 1e6 / secs if secs > 0 else 0.0,
            "worst_sqnr_db": min((v["sqnr_db"] for v in qstats.values() if v["sqnr_db"] is not None),
                                 default=None)}
