"""The conversion pipeline: read -> policy (fuse) -> slice -> quantize -> write shards + manifest.

Streams one layer at a time: peak memory follows the largest layer, not the model.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from . import manifest as mf
from . import slice as sl
from .errors import FmError
from .policy import GLOBAL_SLOTS, ModelSpec, Policy, SlotSource, policy_for
from .quantize import ErrorStats, quantize, scale_dtype_for
from .read import SIDECAR_FILES, Checkpoint, hash_files_async, load_config
from .write import AtomicDir, ShardWriter, dtype_name, parse_size

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
QUANT_SLOTS = ("qkv.weight", "attn_out.weight", "mlp_in.weight", "mlp_out.weight")
EMBED_SLOTS = ("embed.weight", "lm_head.weight")


@dataclass
class Options:
    tp: int = 1
    int8: bool = False
    group_size: int = 128
    dtype: str = "auto"
    max_shard_size: str = "2GB"
    force: bool = False
    allow_pickle: bool = False
    int8_embeddings: bool = False


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
    quant_slots: tuple[str, ...]
    bytes_in: int
    params: int
    prefix: str = ""                  # prepended to the policy's tensor names in this checkpoint


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
    policy, arch = policy_for(config.architectures)
    spec = policy.spec(config, arch)
    flags = policy.flags(config, arch)
    prefix = next((p for p in policy.prefixes
                   if p + policy.sources(spec, flags, "", None)[0].names[0] in ckpt), None)
    if prefix is None:
        want = policy.sources(spec, flags, "", None)[0].names[0]
        raise FmError(f"missing tensor {want} (tried prefixes {policy.prefixes}); is this really {arch}?")
    globals_ = policy.sources(spec, flags, prefix, None)
    layers = [policy.sources(spec, flags, prefix, i) for i in range(spec.num_layers)]

    consumed: set[str] = set()
    bytes_in = params = 0
    for src in globals_ + [s for layer in layers for s in layer]:
        present = [n in ckpt for n in src.names]
        if src.optional and not any(present):
            src.names = []
            continue
        for n, shape, ok in zip(src.names, src.shapes, present):
            if not ok:
                raise FmError(f"missing tensor {n} (needed for {src.slot} of {arch})")
            got = ckpt.shape(n)
            if got != tuple(shape):
                raise FmError(f"tensor {n} has shape {list(got)}, but config.json implies {list(shape)}")
            if not ckpt.dtype(n).is_floating_point:
                raise FmError(f"tensor {n} has dtype {ckpt.dtype(n)}, expected a float dtype")
            consumed.add(n)
            numel = math.prod(got)
            params += numel
            bytes_in += numel * ckpt.dtype(n).itemsize
    globals_ = [s for s in globals_ if s.names]
    spec.pooler = any(s.slot == "pooler.weight" for s in globals_)
    spec.slots = [s.slot for s in globals_] + ([f"layers.{s.slot}" for s in layers[0]] if layers else [])

    tied_lm_head = None
    if spec.tied_embeddings and "lm_head.weight" in ckpt:
        tied_lm_head = "lm_head.weight"
        consumed.add(tied_lm_head)
    ignore = policy.ignored(prefix, spec.num_layers)
    extras = []
    for n in ckpt.names():
        if n in consumed or any(p.fullmatch(n) for p in ignore):
            continue
        if any(n.startswith(p) for p in policy.passthrough()):
            extras.append(n)
            continue
        raise FmError(f"unexpected tensor {n}: the {policy.family} policy has no slot for it")

    dtype = _resolve_dtype(opts.dtype, config, ckpt, globals_)
    group = opts.group_size
    if opts.int8 and (group < 1 or group & (group - 1)):
        raise FmError(f"--group-size must be a power of two, got {group}")
    layout = sl.plan(spec, opts.tp, group if opts.int8 else None)
    quant_slots: tuple[str, ...] = ()
    groups: dict[str, int] = {}
    if opts.int8:
        quant_slots = QUANT_SLOTS + (EMBED_SLOTS if opts.int8_embeddings else ())
        for slot in quant_slots:
            k = sl.k_per_rank(spec, layout, slot)
            g = sl.group_for(k, group)
            if k % g:
                raise FmError(f"--group-size {group} does not divide K={k} of {slot} on each rank "
                              f"(tp={opts.tp}); pick a group size that divides {k}")
            groups[slot] = g
    return Plan(policy, spec, layout, dtype, globals_, layers, extras, tied_lm_head, groups, quant_slots,
                bytes_in, params, prefix)


def _rope_inv_freq(config, spec: ModelSpec) -> tuple[torch.Tensor, float]:
    pos = spec.position
    dim = pos["rotary_dim"]
    if pos["rope_type"] == "default":
        inv = 1.0 / (pos["theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        return inv.float(), 1.0
    if pos["rope_type"] in ("dynamic", "longrope"):
        raise FmError(f"RoPE type {pos['rope_type']!r} depends on the sequence length at run time; "
                      "not supported")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    if pos["rope_type"] not in ROPE_INIT_FUNCTIONS:
        raise FmError(f"RoPE type {pos['rope_type']!r} is not supported")
    try:
        inv, scaling = ROPE_INIT_FUNCTIONS[pos["rope_type"]](config, torch.device("cpu"))
    except Exception as e:
        raise FmError(f"RoPE parameters are invalid ({type(e).__name__}: {e})") from None
    return inv.float().contiguous(), float(scaling)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """BLOOM's ALiBi slopes: a geometric sequence for the nearest power of two, then interleaved extras."""
    p = 2 ** math.floor(math.log2(n_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(p) - 3)))
    slopes = [base ** (i + 1) for i in range(p)]
    if p != n_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * p) - 3)))
        slopes += [extra ** (2 * i + 1) for i in range(n_heads - p)]
    return torch.tensor(slopes, dtype=torch.float32)


def _check_finite(name: str, t: torch.Tensor):
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise FmError(f"tensor {name} contains {bad} NaN/Inf values; refusing to convert it")


class _Emitter:
    """Turns canonical tensors into rank pieces (quantized or not) and hands them to the writer."""

    def __init__(self, plan: Plan, writer: ShardWriter):
        self.plan, self.writer = plan, writer
        self.qstats: dict[str, dict] = {}
        self.scale_dtype = scale_dtype_for(plan.dtype)

    def emit(self, name: str, slot: str, t: torch.Tensor):
        p = self.plan
        pieces = sl.shard(p.spec, p.layout, slot, t)
        if slot in p.quant_slots:
            g = p.groups[slot]
            stats = ErrorStats()
            for r, piece in enumerate(pieces):
                q, s = quantize(piece, g, self.scale_dtype)
                stats.add(piece, q, s, g)
                self.writer.add(r, name, q)
                self.writer.add(r, name + "_scale", s)
            self.qstats[name] = {"group_size": g, **stats.to_dict()}
            return
        for r, piece in enumerate(pieces):
            if piece is not None:
                self.writer.add(r, name, piece)


def convert(model_dir, out_dir, opts: Options | None = None, progress: bool = True, console=None) -> dict:
    """Convert MODEL_DIR into OUT_DIR. Returns a summary dict (also printed by the CLI)."""
    opts = opts or Options()
    t0 = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    max_bytes = parse_size(opts.max_shard_size)
    config, config_sha = load_config(model_dir)
    with Checkpoint(model_dir, allow_pickle=opts.allow_pickle) as ckpt:
        plan = make_plan(model_dir, opts, ckpt, config)
        spec = plan.spec
        rope = _rope_inv_freq(config, spec) if spec.position["type"] == "rope" else None
        hasher, src_hashes = hash_files_async([model_dir / f for f in ckpt.files])
        atomic = AtomicDir(out_dir, opts.force)
        with atomic as tmp:
            writer = ShardWriter(tmp, opts.tp, max_bytes)
            em = _Emitter(plan, writer)

            def load(src: SlotSource) -> torch.Tensor:
                parts = []
                for n in src.names:
                    t = ckpt.get(n)
                    _check_finite(n, t)
                    parts.append(t.to(plan.dtype))
                return plan.policy.fuse(spec, src.slot, parts)

            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            cols = (TextColumn("[bold]converting"), BarColumn(), MofNCompleteColumn(), TextColumn("layers"),
                    TimeRemainingColumn())
            # transient: a failed run must end on its one `error:` line, not on a half-drawn bar (the CLI
            # prints a summary on success).
            with Progress(*cols, console=console, disable=not progress, transient=True) as bar:
                task = bar.add_task("layers", total=spec.num_layers)
                if plan.tied_lm_head:
                    head = ckpt.get(plan.tied_lm_head)
                    emb = next(s for s in plan.globals_ if s.slot == "embed.weight")
                    if not torch.equal(head, ckpt.get(emb.names[0])):
                        raise FmError("tie_word_embeddings is true but lm_head.weight differs from the embeddings")
                for src in plan.globals_:
                    em.emit(src.slot, src.slot, load(src))
                if rope is not None:
                    for r in range(opts.tp):
                        writer.add(r, "rope.inv_freq", rope[0])
                if spec.position["type"] == "alibi":
                    slopes = alibi_slopes(spec.num_heads)
                    for r in range(opts.tp):
                        h = plan.layout.heads_per_rank
                        writer.add(r, "alibi.slopes", slopes[r * h:(r + 1) * h].clone())
                for i, layer in enumerate(plan.layers):
                    for src in layer:
                        em.emit(f"layers.{i}.{src.slot}", src.slot, load(src))
                    bar.advance(task)
                for n in plan.extras:
                    for r in range(opts.tp):
                        writer.add(r, f"extra.{n}", ckpt.get(n))
                writer.close()

            copied = []
            for f in SIDECAR_FILES:
                if (model_dir / f).is_file():
                    shutil.copyfile(model_dir / f, tmp / f)
                    copied.append(f)
            hasher.join()
            pos = dict(spec.position)
            if rope is not None:
                pos["attention_scaling"] = rope[1]
            spec.position = pos
            manifest = {
                "format": mf.FORMAT, "format_version": mf.FORMAT_VERSION, "tool_version": __version__,
                "source": {"architecture": spec.architecture, "family": spec.family, "prefix": plan.prefix,
                           "config_sha256": config_sha,
                           "files": dict(sorted(src_hashes.items())), "sidecar_files": copied},
                "model": spec.to_dict(),
                "parallel": plan.layout.to_dict(),
                "dtype": dtype_name(plan.dtype),
                "quantization": None if not opts.int8 else {
                    "scheme": "int8_symmetric_group", "group_size": opts.group_size,
                    "scale_dtype": dtype_name(em.scale_dtype), "embeddings": opts.int8_embeddings,
                    "tensors": em.qstats},
                "extras": plan.extras,
                "ranks": [{"rank": r, "files": writer.files[r], "tensors": dict(sorted(writer.tensors[r].items()))}
                          for r in range(opts.tp)],
            }
            (tmp / mf.MANIFEST).write_text(mf.dumps(manifest))
            atomic.commit()
    secs = time.perf_counter() - t0
    return {"architecture": spec.architecture, "tp": opts.tp, "int8": opts.int8, "dtype": dtype_name(plan.dtype),
            "params": plan.params, "bytes_in": plan.bytes_in, "bytes_out": writer.bytes_written,
            "files": sum(len(f) for f in writer.files), "seconds": secs,
            "mb_per_s": plan.bytes_in / 1e6 / secs if secs > 0 else 0.0,
            "worst_sqnr_db": min((v["sqnr_db"] for v in em.qstats.values() if v["sqnr_db"] is not None),
                                 default=None)}
