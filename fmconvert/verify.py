"""`fmconvert verify`: is OUT_DIR a faithful conversion of MODEL_DIR?

Three stages, each naming what it finds:
  integrity   the manifest, every shard's size and sha256, every tensor's dtype and shape in the file headers.
  tensors     every rank's pieces dequantized, un-sliced and un-fused back into HF tensors and compared with the
              source; float tensors must be bit-identical to the source cast to the output dtype, int8 ones within
              the per-element bound scale/2. Failures are localized to a rank, a file and a q/k/v (gate/up) section.
  end to end  the HF model (fp32) and the fmconvert runtime (all ranks, fp32 compute) on the same token batches:
              logits, KL, top-1/top-5 agreement, perplexity, and hidden states layer by layer (encoders: hidden
              states and the pooled output; a sequence classifier's head, as `classify` runs it, against the task
              model's own logits). A waveform encoder (Wav2Vec2, HuBERT) reads seeded synthetic speech-like clips
              through the conversion's feature extractor in place of text, compared over their real frames (CTC
              logits frame by frame).

tp > 1 runs every rank in one process (threads joined by ThreadComm, which combines partial results exactly like
the all-reduce and all-gather) or, with tp_mode="distributed", one process per rank under torchrun.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import SafetensorError, safe_open

from . import manifest as mf
from . import slice as sl
from .errors import FmError, ParityError
from .policy import audio_front, stored_dtype
from .quantize import dequantize, quantize
from .runtime.load import sha256_file
from .srchash import fingerprint

DEFAULT_TEXT = Path(__file__).resolve().parent / "data" / "verify_text.txt"
_DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8,
       "int64": torch.int64}
_ST_DT = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I8": "int8", "I64": "int64"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json")


@dataclass
class Thresholds:
    """End-to-end limits. The tensor stage needs none: its expectations are exact (see module doc)."""

    atol: float        # max |converted - reference| of the output: logits (decoders) or last hidden state
    max_rel: float     # relative RMS error of the output and of every layer's hidden state
    max_kl: float      # mean KL(reference || converted) per token, nats
    min_top1: float    # fraction of positions where both models pick the same next token
    min_cosine: float  # encoders: worst cosine similarity of the pooled output (or the first token's state)


# Measured on stories260K (tp 1/2/4) and the tiny random models of every family; see docs/verify.md.
DEFAULTS = {
    "float32": Thresholds(atol=1e-3, max_rel=1e-4, max_kl=1e-6, min_top1=0.99, min_cosine=0.99999),
    "half": Thresholds(atol=1.0, max_rel=0.03, max_kl=2e-3, min_top1=0.95, min_cosine=0.999),
    "int8": Thresholds(atol=2.0, max_rel=0.08, max_kl=0.01, min_top1=0.90, min_cosine=0.99),
}


def profile_of(m: dict) -> str:
    if m.get("quantization"):
        return "int8"
    return "float32" if m["dtype"] == "float32" else "half"


def _num(x):
    """JSON-safe float: None for inf/nan."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# ---------------------------------------------------------------------------------------------------------------
# 1. integrity
# ---------------------------------------------------------------------------------------------------------------
def check_integrity(out_dir: Path, m: dict) -> dict:
    """Files present with the recorded size and sha256; every listed tensor in its file with the listed dtype/shape.

    `readable` is False when a later stage cannot read the tensors at all (a missing file or tensor, a bad header).
    A sha256 mismatch alone leaves it True: the tensor stage then tells which tensor changed.
    """
    fails, readable, n_files, n_tensors = [], True, 0, 0
    for r in m["ranks"]:
        rank = r["rank"]
        listed: dict[str, dict] = {}
        for name, t in r["tensors"].items():
            listed.setdefault(t["file"], {})[name] = t
        for f in r["files"]:
            n_files += 1
            rel = f["path"]
            try:
                p = mf.safe_path(out_dir, rel)
            except FmError as e:
                fails.append(f"integrity: rank {rank}: {e}")
                readable = False
                continue
            if not p.is_file():
                fails.append(f"integrity: {rel} (rank {rank}) is missing")
                readable = False
                continue
            size = p.stat().st_size
            if size != f["size"]:
                fails.append(f"integrity: {rel} (rank {rank}) is {size} bytes, the manifest says {f['size']}")
            if sha256_file(p) != f["sha256"]:
                fails.append(f"integrity: {rel} (rank {rank}) sha256 mismatch")
            try:
                with safe_open(p, framework="pt") as h:
                    keys = set(h.keys())
                    for name, t in listed.get(rel, {}).items():
                        n_tensors += 1
                        if name not in keys:
                            fails.append(f"integrity: tensor {name} (rank {rank}) is not in {rel}")
                            readable = False
                            continue
                        s = h.get_slice(name)
                        dt, shape = _ST_DT.get(s.get_dtype(), s.get_dtype()), list(s.get_shape())
                        if dt != t["dtype"] or shape != t["shape"]:
                            fails.append(f"integrity: tensor {name} in {rel} is {dt} {shape}, the manifest says "
                                         f"{t['dtype']} {t['shape']}")
                            readable = False
                    for extra in sorted(keys - set(listed.get(rel, {}))):
                        fails.append(f"integrity: {rel} holds tensor {extra}, which the manifest does not list")
            except (SafetensorError, OSError) as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                fails.append(f"integrity: {rel} (rank {rank}) is not a readable safetensors file ({msg})")
                readable = False
    return {"passed": not fails, "readable": readable, "files": n_files, "tensors": n_tensors, "failures": fails}


# ---------------------------------------------------------------------------------------------------------------
# the source side: what OUT_DIR should hold, planned from MODEL_DIR with the manifest's options
# ---------------------------------------------------------------------------------------------------------------
_SPEC_KEYS = ("architecture", "family", "kind", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "intermediate_size", "vocab_size", "embed_dim", "norm", "activation", "residual", "tied_embeddings",
              "layer_heads")


def plan_source(model_dir: Path, m: dict, ckpt):
    """Re-plan the conversion from MODEL_DIR with the manifest's options; bad input if they do not belong together."""
    from .pipeline import Options, make_plan
    from .policy import policy_of
    from .read import load_config

    config, config_sha = load_config(model_dir)
    policy, arch = policy_of(config)
    if policy.seq2seq and m["model"].get("kind") == "encoder":      # an encoder-decoder's encoder/ half
        from .policy import encoder_half
        config = encoder_half(config, policy, arch)
        arch = config.architectures[0]
    if arch != m["model"].get("architecture"):
        raise FmError(f"{model_dir} holds a {arch} model, but the manifest was converted from "
                      f"{m['model'].get('architecture')}; pass the model directory it was converted from")
    q = m["quantization"] or {}
    opts = Options(tp=m["parallel"]["tp"], int8=bool(q), group_size=q.get("group_size", 128), dtype=m["dtype"],
                   int8_embeddings=bool(q.get("embeddings", False)),
                   int8_lm_head=bool(q.get("lm_head", False)))      # absent: written before the head was quantized
    plan = make_plan(model_dir, opts, ckpt, config)
    spec = plan.spec.to_dict()
    diff = [k for k in _SPEC_KEYS if spec.get(k) != m["model"].get(k)]
    if diff:
        k = diff[0]
        raise FmError(f"{model_dir} does not match the manifest: {k} is {spec.get(k)!r} in config.json but "
                      f"{m['model'].get(k)!r} in the manifest; pass the model directory it was converted from")
    lay = plan.layout.to_dict()
    bad = [k for k, v in lay.items() if m["parallel"].get(k) != v]
    if bad:
        raise FmError(f"manifest: parallel.{bad[0]} is {m['parallel'].get(bad[0])!r}, but tp={opts.tp} of this "
                      f"model gives {lay[bad[0]]!r}")
    return plan, config, config_sha


def _source_notes(model_dir: Path, m: dict, ckpt, config_sha: str) -> list[str]:
    notes = []
    src = m["source"]
    if src.get("config_sha256") and src["config_sha256"] != config_sha:
        notes.append(f"{model_dir}/config.json differs from the one converted (sha256)")
    hashes, prints = src.get("files") or {}, src.get("fingerprints") or {}   # either, both or (old) files only
    for f in ckpt.files:
        if f in hashes:
            if sha256_file(model_dir / f) != hashes[f]:
                notes.append(f"{f} changed since the conversion (sha256 differs from the manifest's source record)")
        elif f in prints:
            if fingerprint(model_dir / f) != prints[f]:
                notes.append(f"{f} changed since the conversion (size or header differs from the manifest's "
                             "source record)")
        else:
            notes.append(f"{f} was not part of the converted source")
    return notes


# ---------------------------------------------------------------------------------------------------------------
# 2. per tensor
# ---------------------------------------------------------------------------------------------------------------
def _read_ranks(out_dir: Path, m: dict) -> list[dict[str, torch.Tensor]]:
    ranks = []
    for r in m["ranks"]:
        out = {}
        by_file: dict[str, list[str]] = {}
        for name, t in r["tensors"].items():
            by_file.setdefault(t["file"], []).append(name)
        for rel, names in by_file.items():
            with safe_open(mf.safe_path(out_dir, rel), framework="pt") as h:
                for n in names:
                    out[n] = h.get_tensor(n)
        ranks.append(out)
    return ranks


def _sections(spec, lay, slot: str, rows: int) -> list[tuple[str, int, int]]:
    """Named row ranges of one rank's piece, so a failure can say which part of a fused tensor is wrong."""
    if slot.startswith("qkv."):
        hq, hk = lay.heads_per_rank * spec.head_dim, lay.kv_heads_per_rank * spec.head_dim
        hv = lay.kv_heads_per_rank * spec.v_dim
        return [("q", 0, hq), ("k", hq, hq + hk), ("v", hq + hk, hq + hk + hv)]
    if slot.startswith("mlp_in.") and spec.gated_mlp:
        half = rows // 2
        return [("gate", 0, half), ("up", half, rows)]
    return [("", 0, rows)]


def _rel(d: torch.Tensor, ref: torch.Tensor) -> float:
    den = float(ref.double().square().sum())
    num = float(d.double().square().sum())
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


class _Piece:
    """One rank's stored piece of a canonical tensor, as float32, with its per-element error bound (int8)."""

    def __init__(self, stored: torch.Tensor, scale: torch.Tensor | None, group: int | None):
        self.raw, self.scale, self.group = stored, scale, group
        if scale is not None:
            self.value = dequantize(stored, scale, group, torch.float32)
            self.bound = scale.float().repeat_interleave(group, dim=1) * 0.5
        else:
            self.value, self.bound = stored.float(), None

    def violations(self, expected: torch.Tensor) -> torch.Tensor:
        """Boolean mask of elements outside what the conversion allows (exact for float; scale/2 for int8)."""
        e = expected.float()
        if self.bound is None:
            return self.value != e
        # fp32 rounding of q/scale and of q*scale: a few ulps on top of the ideal half-step bound.
        return (self.value - e).abs() > self.bound * (1 + 1e-4) + e.abs() * 1e-6


def _diagnose(spec, lay, slot, names, r, piece: _Piece, exp: torch.Tensor, exp_all, q_scale_dtype, where):
    """Why rank r's piece is wrong, in words."""
    bad = piece.violations(exp)
    out = []
    if piece.value.dim() == 2 and piece.value.shape[0] == piece.value.shape[1] and piece.bound is None and \
            torch.equal(piece.value.t(), exp.float()):
        return [f"rank {r} ({where}) holds the weight transposed"]
    secs = _sections(spec, lay, slot, exp.shape[0]) if exp.dim() >= 1 else [("", 0, 1)]
    sec_names = {}
    if len(names) == len(secs) and len(secs) > 1:
        sec_names = {label: n for (label, _, _), n in zip(secs, names)}
    for label, lo, hi in secs:
        if exp.dim() >= 1 and not bool(bad[lo:hi].any()):
            continue
        part = f"{label} rows" if label else "values"
        hf = f" [{sec_names[label]}]" if label in sec_names else ""
        got, want = piece.value[lo:hi], exp[lo:hi].float()
        rel = _rel(got - want, want)
        other = None
        for r2, e2 in enumerate(exp_all):
            if r2 != r and e2 is not None and e2.shape == exp.shape:
                w2 = e2[lo:hi].float()
                if not bool(piece.violations(e2)[lo:hi].any()) and not torch.equal(w2, want):
                    other = r2
                    break
        if other is not None:
            what = f"hold rank {other}'s {part}"
        elif slot.startswith("qkv.") and label in ("k", "v") and lay.kv_replication > 1:
            what = f"differ from the source: this rank's replicated copy of kv head {r // lay.kv_replication}"
        else:
            what = "differ from the source"
        msg = f"rank {r} ({where}) {part}{hf} {what} (rel RMS {rel:.3g})"
        if piece.scale is not None:
            n_bad, n = int(bad[lo:hi].sum()), bad[lo:hi].numel()
            _, s_exp = quantize(exp[lo:hi], piece.group, q_scale_dtype)
            s_got = piece.scale[lo:hi]
            wrong = s_got.float() != s_exp.float()
            if bool(wrong.any()):
                i, j = (int(x) for x in wrong.nonzero()[0])
                msg += (f"; int8 error above the scale/2 bound in {n_bad} of {n} elements; {int(wrong.sum())} of "
                        f"{wrong.numel()} int8 scales differ from absmax/127 (first: row {lo + i} group {j} stores "
                        f"{float(s_got[i, j]):.4g}, the weights need {float(s_exp[i, j]):.4g})")
            else:
                msg += f"; int8 error above the scale/2 bound in {n_bad} of {n} elements (scales are right, values not)"
        out.append(msg)
    if exp.dim() >= 1 and not out and bool(bad.any()):
        out.append(f"rank {r} ({where}) differs from the source in {int(bad.sum())} elements")
    return out


def check_tensors(m: dict, ranks: list[dict], plan, ckpt, config) -> dict:
    from .pipeline import derived_tensors

    spec, lay, pol = plan.spec, plan.layout, plan.policy
    q = m["quantization"] or {}
    qinfo = q.get("tensors", {})
    q_scale_dtype = _DT.get(q.get("scale_dtype", "float32"), torch.float32)
    tp = lay.tp
    rows, fails = [], []
    seen = [set() for _ in range(tp)]

    def file_of(r, key):
        t = m["ranks"][r]["tensors"].get(key)
        return t["file"] if t else "-"

    def stat_row(key, names, kind, diffs, refs, bound_ratio=None, status="ok"):
        sig = sum(float(x.double().square().sum()) for x in refs)
        err = sum(float(d.double().square().sum()) for d in diffs)
        mx = max((float(d.abs().max()) for d in diffs if d.numel()), default=0.0)
        rows.append({"name": key, "hf": list(names), "kind": kind, "max_abs": mx,
                     "rel_rms": math.sqrt(err / sig) if sig > 0 else (0.0 if err == 0 else math.inf),
                     "sqnr_db": 10 * math.log10(sig / err) if err > 0 and sig > 0 else math.inf,
                     "bound_ratio": bound_ratio, "status": status})

    layer_srcs = [(f"layers.{i}.{s.slot}", s) for i, layer in enumerate(plan.layers) for s in layer]
    for key, src in [(s.slot, s) for s in plan.globals_] + layer_srcs:
        slot = src.slot
        source = [ckpt.get(n) for n in src.names]
        lspec, llay = sl.at(spec, lay, src.layer)      # a Gemma 4 global layer's own geometry
        dtype = stored_dtype(slot, plan.dtype)
        canon = pol.fuse(lspec, slot, [t.to(dtype) for t in source])
        expected = sl.shard(lspec, llay, slot, canon)
        is_q = slot in plan.quant_slots
        g = plan.groups.get(slot)
        problems, pieces, ratio = [], [], None
        for r in range(tp):
            stored = ranks[r].get(key)
            seen[r].add(key)
            if is_q:
                seen[r].add(key + "_scale")
            exp = expected[r]
            if exp is None:
                if stored is not None:
                    problems.append(f"rank {r} ({file_of(r, key)}) holds a copy; row-parallel biases live on rank 0 "
                                    f"only, or the all-reduce adds them more than once")
                pieces.append(None)
                continue
            if stored is None:
                why = " (row-parallel bias: it lives on rank 0 only)" if slot in sl.ROW_BIAS else ""
                problems.append(f"missing from rank {r}{why}")
                pieces.append(None)
                continue
            scale = ranks[r].get(key + "_scale") if is_q else None
            if is_q and (stored.dtype != torch.int8 or scale is None):
                problems.append(f"rank {r} ({file_of(r, key)}) should be int8 with {key}_scale, found "
                                f"{stored.dtype} {'without' if scale is None else 'with'} scales")
                pieces.append(None)
                continue
            if not is_q and stored.dtype == torch.int8:
                problems.append(f"rank {r} ({file_of(r, key)}) is int8, but {slot} is not quantized")
                pieces.append(None)
                continue
            if is_q:
                gg = qinfo.get(key, {}).get("group_size", g)
                if scale.dim() != 2 or scale.shape[0] != stored.shape[0] or scale.shape[1] * gg != stored.shape[1]:
                    problems.append(f"rank {r} ({file_of(r, key)}): scales {list(scale.shape)} do not fit "
                                    f"{list(stored.shape)} with group size {gg}")
                    pieces.append(None)
                    continue
                piece = _Piece(stored, scale, gg)
            else:
                piece = _Piece(stored, None, None)
            if tuple(piece.value.shape) != tuple(exp.shape):
                if piece.value.dim() == 2 and tuple(piece.value.shape) == tuple(exp.shape[::-1]):
                    problems.append(f"rank {r} ({file_of(r, key)}) holds the weight transposed "
                                    f"({list(piece.value.shape)}, expected {list(exp.shape)})")
                else:
                    problems.append(f"rank {r} ({file_of(r, key)}) has shape {list(piece.value.shape)}, expected "
                                    f"{list(exp.shape)}")
                pieces.append(None)
                continue
            if piece.bound is not None:  # error relative to the allowed scale/2, against the cast source
                r_max = float(((piece.value - exp.float()).abs() / piece.bound.clamp_min(1e-30)).max())
                ratio = r_max if ratio is None else max(ratio, r_max)
            if bool(piece.violations(exp).any()):
                problems += _diagnose(lspec, llay, slot, src.names, r, piece, exp, expected, q_scale_dtype,
                                      file_of(r, key))
            pieces.append(piece)

        # Put it back together from all ranks and compare in HF names with the untouched source.
        kind = "int8" if is_q else m["dtype"]
        diffs, refs = [], []
        usable = [p for p, e in zip(pieces, expected) if e is not None]
        if usable and all(p is not None for p in usable):
            vals = [None if p is None else p.value for p in pieces]
            try:
                back = pol.unfuse(lspec, slot, sl.unshard(lspec, llay, slot, vals), len(src.names))
                for part, s in zip(back, source):
                    if tuple(part.shape) != tuple(s.shape):
                        raise FmError(f"reassembled shape {list(part.shape)} differs from the source's "
                                      f"{list(s.shape)}")
                    if not is_q and not problems and not torch.equal(part, s.to(dtype)):
                        raise FmError("every rank's piece matches the source, but un-slicing and un-fusing them "
                                      "does not give it back")
                    diffs.append(part.float() - s.float())
                    refs.append(s.float())
            except FmError as e:
                problems.insert(0, f"cannot be reassembled: {e}")
        if not diffs:  # fall back to the per-rank view for the numbers
            for p, e in zip(pieces, expected):
                if p is not None and e is not None:
                    diffs.append(p.value - e.float())
                    refs.append(e.float())
        status = "FAIL" if problems else "ok"
        stat_row(key, src.names, kind, diffs, refs, ratio, status)
        if problems:
            rows[-1]["problems"] = problems
            fails.append(f"{key} ({', '.join(src.names)}): " + "; ".join(problems))

    # Derived tensors the converter computes, and passthrough extras.
    derived = derived_tensors(config, spec, lay.heads_per_rank, tp, plan.dtype)
    for n in plan.extras:
        derived[f"extra.{n}"] = [ckpt.get(n)] * tp
    for key, exp_all in derived.items():
        problems, diffs, refs = [], [], []
        for r, exp in enumerate(exp_all):
            seen[r].add(key)
            got = ranks[r].get(key)
            if got is None:
                problems.append(f"missing from rank {r}")
            elif tuple(got.shape) != tuple(exp.shape):
                problems.append(f"rank {r} has shape {list(got.shape)}, expected {list(exp.shape)}")
            else:
                d = got.float() - exp.float()
                diffs.append(d)
                refs.append(exp.float())
                if not torch.equal(got.float(), exp.float()):
                    problems.append(f"rank {r} ({file_of(r, key)}) differs from what the source implies "
                                    f"(max abs {float(d.abs().max()):.3g})")
        stat_row(key, [key[6:]] if key.startswith("extra.") else [], "derived" if not key.startswith("extra.")
                 else "extra", diffs, refs, None, "FAIL" if problems else "ok")
        if problems:
            rows[-1]["problems"] = problems
            fails.append(f"{key}: " + "; ".join(problems))
    for r in range(tp):
        for name in sorted(set(ranks[r]) - seen[r]):
            fails.append(f"{name}: rank {r} ({file_of(r, name)}) holds a tensor the source does not explain")
    worst = sorted(rows, key=lambda x: (x["status"] != "FAIL", -(x["rel_rms"] if math.isfinite(x["rel_rms"])
                                                                 else 1e300)))
    return {"passed": not fails, "count": len(rows), "failures": fails, "rows": rows,
            "worst": [x["name"] for x in worst[:8]]}


# ---------------------------------------------------------------------------------------------------------------
# 3. end to end
# ---------------------------------------------------------------------------------------------------------------
def _token_ids(text: str, model_dir: Path, out_dir: Path, vocab: int) -> tuple[list[int], str]:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    for d in (model_dir, out_dir):
        if any((d / f).is_file() for f in _TOKENIZER_FILES):
            try:
                tok = AutoTokenizer.from_pretrained(str(d), trust_remote_code=False, local_files_only=True)
            except Exception:
                continue
            ids = list(tok(text).input_ids)
            if ids and max(ids) < vocab:
                return ids, f"tokenizer from {d.name}"
    # No usable tokenizer (the tiny test models have none): bytes folded into the vocabulary, still deterministic.
    return [b % vocab for b in text.encode("utf-8")], "utf-8 bytes mod vocab (no tokenizer found)"


def make_batches(ids: list[int], tokens: int, max_positions: int) -> torch.Tensor:
    ids = ids[:tokens]
    T = min(len(ids), max_positions) if max_positions > 0 else len(ids)
    if T < 2:
        raise FmError(f"the text gives only {len(ids)} token(s); verify needs at least 2")
    B = len(ids) // T
    return torch.tensor(ids[:B * T], dtype=torch.long).view(B, T)


class _Ranks:
    """Runs a function on every rank's model and returns rank 0's result: threads (emulate) or this process only."""

    def __init__(self, models: list, group=None):
        self.models, self.group = models, group

    def run(self, fn):
        if len(self.models) == 1:
            with torch.inference_mode():
                return fn(self.models[0])
        results, errors = [None] * len(self.models), []

        def work(r):
            try:
                with torch.inference_mode():
                    results[r] = fn(self.models[r])
            except BaseException as e:  # unblock the other ranks waiting in a collective
                errors.append(e)
                self.group.barrier.abort()

        threads = [threading.Thread(target=work, args=(r,), daemon=True) for r in range(len(self.models))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        return results[0]


def _converted_forward(model, ids, kind):
    """(the hidden states as HF reports them, the logits or pooled output, a sequence classifier's logits or None)"""
    final, states = model.hidden(ids, output_hidden_states=True)
    out = (None if model.spec["headless"] else model.logits(final)) if kind == "decoder" else model.pooled(final)
    head = None
    if kind == "encoder" and model.spec.get("classifier"):
        from .runtime.classify import head_logits
        head = head_logits(model, final, out, torch.ones_like(ids)).cpu()
    if model.spec["project"]:  # HF reports the last hidden state after project_out
        final = model.ops.linear(final, model.g["project_out.weight"])
    return [s.float().cpu() for s in states] + [final.float().cpu()], \
        None if out is None else out.float().cpu(), head


def _source_quant(model_dir: Path) -> dict:
    """The Checkpoint arguments for a quantized source: {"mxfp4": True} or {"fp8": block}, {} for a float one (an
    unreadable or malformed config.json is reported when it is parsed)."""
    from .read import fp8_block, int4_format, quant_method
    try:
        raw = json.loads((Path(model_dir) / "config.json").read_text())
        block, int4 = fp8_block(raw), int4_format(raw)
        return {"mxfp4": True} if quant_method(raw) == "mxfp4" else {"fp8": block} if block else \
            {"int4": int4} if int4 else {}
    except (OSError, ValueError, RecursionError, AttributeError, FmError):
        return {}


def _renamed(model_dir: Path) -> bool:
    """Whether config.json names a model_type transformers does not know, which a family table maps to one it does
    (Kimi K2's kimi_k2): transformers would then miss its own checkpoint renaming rules."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    try:
        return json.loads((Path(model_dir) / "config.json").read_text()).get("model_type") not in CONFIG_MAPPING_NAMES
    except (OSError, ValueError, RecursionError, AttributeError):
        return False


def _rewritten_reference(cls, model_dir: Path, quant: dict):
    """The HF model of a checkpoint transformers cannot load as it stands, loaded from a rewritten copy: MXFP4 or FP8
    weights dequantized by transformers' own routines (its loaders need accelerate, and for MXFP4 a GPU kernel
    package), an independent check of the converter's decoding, FP8 rounded to bf16 as transformers holds it; a
    renamed model_type under its own name. Other weight files are linked, not copied."""
    from safetensors.torch import load_file, save_file

    from .read import INDEX, Checkpoint
    config = cls.config_class.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    if quant:
        del config.quantization_config
    with Checkpoint(model_dir, **quant) as ckpt:     # its shard discovery; the tensors are read as stored
        files, int4_parts = ckpt.files, {name: parts for name, (parts, _) in ckpt.int4.items()}
    # Loaded the way any float checkpoint is, so transformers' own renaming (per-expert tensors into stacks) applies
    with tempfile.TemporaryDirectory(prefix="fmconvert-reference-") as tmp:
        config.save_pretrained(tmp)                  # under the config class's own model_type
        if not quant:
            for f in files + ([INDEX] if (model_dir / INDEX).is_file() else []):
                os.symlink((model_dir / f).resolve(), Path(tmp) / f)
            return cls.from_pretrained(tmp, local_files_only=True, trust_remote_code=False, dtype=torch.float32)
        state = {}
        for f in files:
            state.update(load_file(model_dir / f))
        if quant.get("int4"):
            # GPTQ / AWQ: transformers decodes them only through optional packages, so the reference reads them as
            # the converter does (read.dequantize_int4, tested against packings built from their formats)
            from .read import dequantize_int4
            for name, parts in int4_parts.items():
                q = [state.pop(p) for p in parts]
                state[name] = dequantize_int4(*q[:3], q[3] if len(q) > 3 else None, quant["int4"]).float()
        elif quant.get("mxfp4"):
            from transformers.integrations.mxfp4 import convert_moe_packed_tensors
            for name in [n for n in state if n.endswith("_blocks")]:
                base = name[:-len("_blocks")]
                state[base] = convert_moe_packed_tensors(state.pop(name), state.pop(base + "_scales"),
                                                         dtype=torch.float32)
        else:
            from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight
            for name in [n for n in state if n.endswith("_scale_inv")]:
                base = name[:-len("_scale_inv")]
                state[base] = _dequantize_fp8_weight(state[base], state.pop(name), list(quant["fp8"]),
                                                     torch.float32).to(torch.bfloat16)
            # DeepSeek-V4: M.scale beside M.weight, FP8 blocks or E2M1 experts (two a byte), by transformers' own
            # loader's routine (it reads the block from the scales' grid)
            for name in [n for n in state if n.endswith(".scale") and n[:-len("scale")] + "weight" in state
                         and state[n[:-len("scale")] + "weight"].dtype in (torch.float8_e4m3fn, torch.int8)]:
                base = name[:-len("scale")] + "weight"
                state[base] = Fp8Dequantize(None)._dequantize_one(state[base], state.pop(name), torch.bfloat16)
        save_file(state, Path(tmp) / "model.safetensors", metadata={"format": "pt"})
        del state
        return cls.from_pretrained(tmp, local_files_only=True, trust_remote_code=False, dtype=torch.float32)


def _load_reference(model_dir: Path, arch: str, kind: str, device, head: bool = False):
    import transformers
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cls = getattr(transformers, arch, None)
    if cls is None and kind == "decoder" and arch.endswith("ForCausalLM"):
        cls = transformers.AutoModelForCausalLM     # a class transformers names by model_type only (EXAONE 3.x)
    if cls is None:
        raise FmError(f"transformers {transformers.__version__} has no class {arch}")
    try:
        quant = _source_quant(model_dir)
        if quant or _renamed(model_dir):
            model = _rewritten_reference(cls, model_dir, quant)
        else:
            model = cls.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise FmError(f"transformers cannot load {model_dir} as {arch} ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''})") from None
    model = model.float().eval().to(device)
    if kind == "encoder" and model.base_model is not model and not head and not hasattr(model, "text_projection"):
        model = model.base_model  # task heads (BertFor...) are passthrough extras; compare the encoder (CLIP's
        #                           projection is the runtime's own: keep it)
    inner = getattr(model, "language_model", None)
    if hasattr(inner, "lm_head"):
        # A wrapper that holds its language model whole (Llama 4): given text alone it is that model, and
        # transformers 5.24's Llama4ForConditionalGeneration.forward fails on a text-only call
        model = inner
    return model


def _layer_names(n_layers: int, final_label: str, reports: str | None = None) -> list[str]:
    """HF's hidden states: the embeddings, each block's output, and the last block's after the final norm. reports
    "blocks" (the Mamba families): every block's output, then the final norm's; "last_block" (Gemma 3n): the
    embeddings and every block's output, the last one without the final norm."""
    if reports == "blocks":
        return [f"layer {i}" for i in range(n_layers)] + [final_label or "output"]
    if reports == "last_block":
        return ["embeddings"] + [f"layer {i}" for i in range(n_layers)]
    last = f"layer {n_layers - 1}" + (f" + {final_label}" if final_label else "")
    return ["embeddings"] + [f"layer {i}" for i in range(n_layers - 1)] + [last]


def _hf_states(states: list, reports: str | None, every: int = 1) -> list:
    """The runtime's states (the embeddings, every block's output, the final output) as HF reports them (see
    `_layer_names`). every n: HF's layer is n of our blocks (LongCat-Flash's pairs), so only every n-th block's
    output is reported."""
    if every > 1:
        return states[:1] + states[every:-2:every] + states[-1:]
    if reports == "blocks":
        return states[1:]
    return states[:-1] if reports == "last_block" else states[:-2] + states[-1:]


def _split(batches: torch.Tensor, kind: str, width: int | None = None):
    """Rows in chunks: one row at a time for an encoder, else ~4096 tokens of `width` (the rows' own length)."""
    return batches.split(1 if kind == "encoder" else max(1, 4096 // (width or batches.shape[1])))


def _reports(architecture: str) -> tuple[str | None, int]:
    """Which hidden states transformers' model reports (table key `hf_hidden_states`: "blocks", from the first
    block's output on, the Mamba families; "last_block", the last block's output last, Gemma 3n; None: the
    embeddings, the blocks, the last one through the final norm), and how many of our layers each of its layers is
    (layout sublayers)."""
    from .policy import policy_for
    try:
        pol = policy_for([architecture])[0]
    except FmError:
        return None, 1
    return pol.table.get("hf_hidden_states"), pol.sublayers


def run_converted(runner: _Ranks, batches: torch.Tensor, kind: str, sources: torch.Tensor | None = None) -> list:
    """Every rank runs every batch; rank 0 keeps (hidden states, output) per batch. Done before the reference
    model is touched, so a failure there cannot leave other ranks waiting in a collective. sources: an
    encoder-decoder's, a row for each row of batches (its decoder's inputs)."""
    if sources is not None:
        return [runner.run(lambda model: _seq2seq_forward(model, src.to(model.device), ids.to(model.device)))
                for src, ids in zip(_split(sources, kind, batches.shape[1]), _split(batches, kind))]
    return [runner.run(lambda model: _converted_forward(model, ids.to(model.device), kind))
            for ids in _split(batches, kind)]


def _teacher_forced(batches: torch.Tensor, start: int, eos: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """An encoder-decoder's rows: the first half of each row as its source, and the decoder's inputs for the
    second half (the start token, then that half less its last token), so that logits predict the second half.
    eos: a classifier's end token, which then ends every source (BART's head reads the decoder there)."""
    half = batches.shape[1] // 2
    target, source = batches[:, half:], batches[:, :half].clone()
    if eos is not None:
        source[:, -1] = eos
    return source, torch.cat([torch.full_like(target[:, :1], start), target[:, :-1]], 1)


def _audio_sources(out_dir: Path, enc: dict, rows: int) -> torch.Tensor:
    """Whisper's sources for verification, one a row (enc: its encoder's model spec): seeded synthetic sound (a few
    tones gliding in pitch, over noise, from a thirtieth of the chunk to all of it: 1 to 30 s) through the
    conversion's feature extractor, so that the encoder sees the range of log-mel values speech gives; seeded
    log-mel-like noise where the conversion has no preprocessor_config.json."""
    shape = (enc["audio_mels"], 2 * enc["max_positions"])
    gen = torch.Generator().manual_seed(0)
    if not (out_dir / "preprocessor_config.json").is_file():
        return torch.randn(rows, *shape, generator=gen).clamp(-3, 3) * 0.4
    from .runtime.speech import SAMPLE_RATE, feature_extractor, features_of
    fe = feature_extractor(out_dir, enc)
    return features_of(fe, [_speech_like(int(fe.n_samples * float(torch.empty(1).uniform_(1 / 30, 1, generator=gen))),
                                         SAMPLE_RATE, gen) for _ in range(rows)])


def _speech_like(n: int, rate: int, gen: torch.Generator) -> torch.Tensor:
    """n samples at rate Hz of seeded synthetic sound with speech's range of pitch: three tones, each gliding by 30%
    twice a second, over noise."""
    t = torch.arange(n) / rate
    f0 = torch.rand(3, generator=gen) * 800 + 100
    glide = f0[:, None] * (1 + 0.3 * torch.sin(2 * torch.pi * 0.5 * t))            # [3, n]
    wave = torch.sin(2 * torch.pi * torch.cumsum(glide, 1) / rate).sum(0) / 3
    return (wave + 0.05 * torch.randn(n, generator=gen)) * 0.5


def _wave_sources(out_dir: Path, sp: dict, frames: int, rows: int = 4):
    """A waveform encoder's (Wav2Vec2's) inputs for verification: `rows` clips of seeded synthetic sound
    (`_speech_like`), the first `frames` frames long, the others from a third of that to all of it, through the
    conversion's feature extractor as `transcribe` takes it (`ctc.feature_extractor`: transformers' defaults for
    this front end where there is no preprocessor_config.json), so that the shorter clips are padded, and masked, as
    the extractor pads and masks them. -> (values [rows, samples], the sample mask or None, what they are; a feature
    encoder's (Wav2Vec2-BERT's) feature rows [rows, frames, dim] and their frame mask in place of the first two)"""
    from .policy import samples_for
    from .runtime.ctc import SAMPLE_RATE, feature_extractor, inputs_of
    w = audio_front(sp)
    fe = feature_extractor(out_dir, sp)
    gen, full = torch.Generator().manual_seed(0), samples_for(w, max(frames, 1))
    lengths = [full] + [int(torch.randint(samples_for(w, max(frames // 3, 1)), full + 1, (1,), generator=gen))
                        for _ in range(rows - 1)]
    values, mask = inputs_of(fe, [_speech_like(n, SAMPLE_RATE, gen) for n in lengths])
    where = "preprocessor_config.json" if (out_dir / "preprocessor_config.json").is_file() else \
        f"transformers' {type(fe).__name__} defaults (no preprocessor_config.json)"
    what = (f"synthetic speech-like audio (tones gliding in pitch over noise), {rows} clips of "
            f"{min(lengths) / SAMPLE_RATE:.2f}-{max(lengths) / SAMPLE_RATE:.2f} s at {SAMPLE_RATE} Hz through "
            f"{where}, " + ("padded, with its attention mask" if mask is not None else
                            "zero-padded without an attention mask, as the feature extractor gives none"))
    return values.float(), mask, what


def _seq2seq_forward(model, src, ids):
    """_converted_forward of an encoder-decoder's decoder, the encoder's last hidden state after it. A classifier's
    (BART's) logits in place of the language-model head's, which its checkpoint does not train."""
    enc = model.source_encoder.hidden(src)
    model.attach(enc)
    final, states = model.hidden(ids, output_hidden_states=True)
    head = None
    if model.spec["classifier"]:
        from .runtime.classify import head_logits
        head = head_logits(model, final, None, torch.ones_like(src), src).cpu()
    out = None if head is not None else model.logits(final).float().cpu()
    return [s.float().cpu() for s in states] + [final.float().cpu()], out, head, enc.float().cpu()


class _TeacherForced:
    """transformers' encoder-decoder called as `_compare` calls a decoder: the decoder's inputs for each batch in
    turn, its source the matching rows; its decoder's hidden states and logits, and its encoder's last state."""

    def __init__(self, model, sources: torch.Tensor, width: int):
        self.model, self.sources = model, iter(_split(sources, "decoder", width))

    def __call__(self, input_ids, attention_mask=None, output_hidden_states=True):
        src = next(self.sources).to(input_ids.device)
        source = {"input_features": src} if src.is_floating_point() else {"input_ids": src}     # Whisper: audio
        o = self.model(**source, decoder_input_ids=input_ids, output_hidden_states=True)
        cls = type(self.model).__name__.endswith("ForSequenceClassification")
        return SimpleNamespace(hidden_states=o.decoder_hidden_states, logits=None if cls else o.logits,
                               classifier_logits=o.logits if cls else None,
                               encoder_last_hidden_state=o.encoder_last_hidden_state)


def _check_half(model_dir: Path, out_dir: Path, ckpt) -> dict:
    """Stages 1 and 2 for an encoder-decoder's encoder/ conversion: its files, and its tensors against the source."""
    m = mf.read(out_dir)
    integ = check_integrity(out_dir, m)
    res = {"integrity": integ, "readable": integ["readable"], "failures": list(integ.get("failures", []))}
    if integ["readable"]:
        plan, config, _ = plan_source(model_dir, m, ckpt)
        res["tensors"] = check_tensors(m, _read_ranks(out_dir, m), plan, ckpt, config)
        res["failures"] += res["tensors"].get("failures", [])
    return res


@contextlib.contextmanager
def checkpoint_rope_width(model, rotary_dim: int, theta: float):
    """transformers' model `model` turning RoPE over the first rotary_dim dimensions of each head, as the checkpoint
    was trained, for a class that rotates the whole head whatever the config says (table key hf_rotates_whole_head:
    MiniMax-Text-01). Its rotary embeddings get the narrower frequency ladder and its module's
    apply_rotary_pos_emb turns only as many dimensions as cos holds; both are put back on leaving. Yields a note
    saying so, or None where the model already turns that width."""
    import importlib
    ropes = [r for n, r in model.named_modules() if type(r).__name__.endswith("RotaryEmbedding")
             and hasattr(r, "inv_freq") and "vision" not in n and "visual" not in n]     # the language model's
    if not ropes or all(r.inv_freq.numel() * 2 == rotary_dim for r in ropes):
        yield None
        return
    if any(getattr(r, "rope_type", "default") != "default" for r in ropes):
        raise FmError(f"transformers' {type(model).__name__} turns RoPE over the whole head and its RoPE type "
                      f"cannot be narrowed to the checkpoint's rotary_dim={rotary_dim}; no faithful reference")
    module = importlib.import_module(type(ropes[0]).__module__)
    whole = module.apply_rotary_pos_emb

    def narrow(q, k, cos, sin, *args, **kwargs):
        r = cos.shape[-1]
        qr, kr = whole(q[..., :r], k[..., :r], cos, sin, *args, **kwargs)
        return torch.cat((qr, q[..., r:]), -1), torch.cat((kr, k[..., r:]), -1)

    saved = [(r, r.inv_freq, getattr(r, "original_inv_freq", None)) for r in ropes]
    inv = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    try:
        module.apply_rotary_pos_emb = narrow
        for r, old, _ in saved:
            r.inv_freq = inv.to(old.device)
            if hasattr(r, "original_inv_freq"):
                r.original_inv_freq = inv.to(old.device)
        yield (f"transformers' {type(model).__name__} turns RoPE over the whole head; the reference turned the "
               f"first {rotary_dim} dimensions of each, as the checkpoint was trained")
    finally:
        module.apply_rotary_pos_emb = whole
        for r, old, orig in saved:
            r.inv_freq = old
            if orig is not None:
                r.original_inv_freq = orig


def _faithful_reference(architecture: str, family: str) -> bool:
    from .policy import policy_for
    try:
        return bool(policy_for([architecture], family)[0].table.get("hf_rotates_whole_head"))
    except FmError:
        return False


def check_end_to_end(model_dir: Path, m: dict, converted: list, batches: torch.Tensor, th: Thresholds, device,
                     token_source: str, sources: torch.Tensor | None = None) -> dict:
    sp = m["model"]
    pos = sp.get("position") or {}
    with contextlib.ExitStack() as stack:
        ref = _load_reference(model_dir, sp["architecture"], sp["kind"], device, head=bool(sp.get("classifier")))
        if sources is not None:
            ref = _TeacherForced(ref, sources, batches.shape[1])
        note = None
        if _faithful_reference(sp["architecture"], sp["family"]) and pos.get("type") == "rope":
            note = stack.enter_context(checkpoint_rope_width(ref, int(pos["rotary_dim"]), float(pos["theta"])))
        res = _compare(ref, sp, converted, batches, th, device, token_source)
    if note:
        res["reference_note"] = note
    return res


def _compare(ref, sp: dict, converted: list, batches: torch.Tensor, th: Thresholds, device, token_source: str):
    kind = sp["kind"]
    final_label = "project_out" if sp.get("project") else ("final norm" if sp.get("final_norm") else
                                                           "the copies' mix" if sp["residual"] == "gated_hyper" else "")
    reports, every = _reports(sp["architecture"])
    n_layers = sp["num_layers"] // every + 1
    layer_err = [[0.0, 0.0, 0.0] for _ in range(n_layers)]  # max abs, sum sq err, sum sq ref
    out_d = {"max_abs": 0.0, "err": 0.0, "sig": 0.0}
    kls, top1, top5, nll_ref, nll_conv, cos = [], [], [], [], [], []
    has_logits = None
    heads = []                                  # a sequence classifier's logits: (converted, reference)
    spans = (sp.get("classifier") or {}).get("pool") == "spans"
    enc_err = [0.0, 0.0]                        # an encoder-decoder's encoder output: sum sq err, sum sq ref
    for ids, (states, out, head, *enc_out) in zip(_split(batches, kind), converted):
        states = _hf_states(states, reports, every)
        with torch.inference_mode():
            teacher = isinstance(ref, _TeacherForced)       # an encoder-decoder: its own classifier logits too
            enc = ref.base_model if head is not None and not teacher else ref
            o = enc(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), output_hidden_states=True)
            if head is not None and teacher:
                heads.append((head.double(), o.classifier_logits.float().cpu().double()))
            elif head is not None:
                r = ref(input_ids=ids.to(device))
                # a QA head's start and end logits, stacked as the runtime gives them: [B, T, 2]
                want = torch.stack([r.start_logits, r.end_logits], -1) if spans else r.logits
                heads.append((head.double(), want.float().cpu().double()))
        hs = [h.float().cpu() for h in o.hidden_states]
        if enc_out:
            want = o.encoder_last_hidden_state.float().cpu().double()
            enc_err[0] += float((enc_out[0].double() - want).square().sum())
            enc_err[1] += float(want.square().sum())
        if len(hs) != len(states):
            raise FmError(f"the reference reports {len(hs)} hidden states, the runtime {len(states)}")
        for i, (a, b) in enumerate(zip(states, hs)):
            if sp.get("altup") and b.dim() == 4:       # Gemma 3n's copies: [n, B, T, hidden] there, [B, T, n, ...] here
                b = b.permute(1, 2, 0, 3)
            if sp["residual"] == "gated_hyper" and a.dim() == 4:      # Qwen4-Exp's copies: side by side there
                a = a.flatten(-2)
            d = a - b
            e = layer_err[i]
            e[0] = max(e[0], float(d.abs().max()))
            e[1] += float(d.double().square().sum())
            e[2] += float(b.double().square().sum())
        # a headless conversion has no logits to compare: transformers' class would make up a head it lacks
        ref_logits = getattr(o, "logits", None) if kind == "decoder" and not sp.get("headless") else None
        has_logits = ref_logits is not None
        if kind == "decoder" and has_logits:
            a, b = out.double(), ref_logits.float().cpu().double()
        else:
            a, b = states[-1].double(), hs[-1].double()
        d = a - b
        out_d["max_abs"] = max(out_d["max_abs"], float(d.abs().max()))
        out_d["err"] += float(d.square().sum())
        out_d["sig"] += float(b.square().sum())
        if kind == "decoder" and has_logits:
            lp_ref, lp_conv = torch.log_softmax(b, -1), torch.log_softmax(a, -1)
            kls.append((lp_ref.exp() * (lp_ref - lp_conv)).sum(-1).flatten())
            top1.append((a.argmax(-1) == b.argmax(-1)).flatten().float())
            k = min(5, a.shape[-1])
            ta, tb = a.topk(k, -1).indices, b.topk(k, -1).indices
            top5.append((ta.unsqueeze(-1) == tb.unsqueeze(-2)).any(-1).double().mean(-1).flatten())
            tgt = ids[:, 1:].unsqueeze(-1)
            scored = (tgt < a.shape[-1]).flatten()           # a tokenized text may hold ids a pruned head lacks
            tgt = tgt.clamp(max=a.shape[-1] - 1)
            nll_ref.append(-lp_ref[:, :-1].gather(-1, tgt).flatten()[scored])
            nll_conv.append(-lp_conv[:, :-1].gather(-1, tgt).flatten()[scored])
        if kind == "encoder":
            pr = getattr(o, "text_embeds", None)          # CLIP's projected pooled output
            pr = getattr(o, "pooler_output", None) if pr is None else pr
            if pr is not None and out is not None:
                cos.append(torch.cosine_similarity(out.double(), pr.float().cpu().double(), dim=-1))
            else:
                cos.append(torch.cosine_similarity(states[-1][:, 0].double(), hs[-1][:, 0].double(), dim=-1))

    layers, first_bad = _layer_rows(_layer_names(sp["num_layers"] // every, final_label, reports), layer_err, th)
    res = {"tokens": int(batches.numel()), "batches": list(batches.shape), "token_source": token_source,
           "output": "logits" if has_logits else "last hidden state",
           "max_abs": out_d["max_abs"],
           "rel_rms": math.sqrt(out_d["err"] / out_d["sig"]) if out_d["sig"] > 0 else 0.0,
           "layers": layers, "first_divergent_layer": first_bad}
    fails = []
    if enc_err[1]:
        res["encoder_rel_rms"] = math.sqrt(enc_err[0] / enc_err[1])
        if res["encoder_rel_rms"] > th.max_rel:
            fails.append(f"end to end: the encoder's last hidden state relative RMS error "
                         f"{res['encoder_rel_rms']:.3g} > {th.max_rel:g}")
    label = res["output"]
    if res["max_abs"] > th.atol:
        fails.append(f"end to end: {label} max abs error {res['max_abs']:.3g} > atol {th.atol:g}")
    if res["rel_rms"] > th.max_rel:
        fails.append(f"end to end: {label} relative RMS error {res['rel_rms']:.3g} > {th.max_rel:g}")
    if kls:
        kl = torch.cat(kls)
        res.update(kl_mean=float(kl.mean()), kl_max=float(kl.max()), top1=float(torch.cat(top1).mean()),
                   top5=float(torch.cat(top5).mean()),
                   ppl_ref=math.exp(float(torch.cat(nll_ref).mean())),
                   ppl_converted=math.exp(float(torch.cat(nll_conv).mean())))
        if res["kl_mean"] > th.max_kl:
            fails.append(f"end to end: mean KL divergence {res['kl_mean']:.3g} > {th.max_kl:g} "
                         f"(max {res['kl_max']:.3g})")
        if res["top1"] < th.min_top1:
            fails.append(f"end to end: top-1 agreement {res['top1']:.2%} < {th.min_top1:.2%}")
    if cos:
        c = torch.cat(cos)
        res["cosine_min"] = float(c.min())
        res["cosine_what"] = "pooled output" if sp.get("pooler") or sp.get("eos_pool") else \
            "first token's last hidden state"
        if res["cosine_min"] < th.min_cosine:
            fails.append(f"end to end: {res['cosine_what']} cosine {res['cosine_min']:.6f} < {th.min_cosine:g}")
    if heads:           # the task head fmconvert runs, against the task model's own logits
        res["classifier"] = _head_verdict(*(torch.cat(x) for x in zip(*heads)), th, fails, spans)
    _diverging(layers, first_bad, th, fails)
    res["passed"] = not fails
    res["failures"] = fails
    return res


def _layer_rows(names: list[str], layer_err: list, th: Thresholds) -> tuple[list[dict], str | None]:
    """The report's rows of hidden states by layer (layer_err: [max abs, sum sq err, sum sq ref] each) and the first
    one past max_rel."""
    layers = [{"name": n, "max_abs": e[0], "rel_rms": math.sqrt(e[1] / e[2]) if e[2] > 0 else 0.0}
              for n, e in zip(names, layer_err)]
    return layers, next((x["name"] for x in layers if x["rel_rms"] > th.max_rel), None)


def _diverging(layers: list[dict], first_bad: str | None, th: Thresholds, fails: list):
    if first_bad is not None:
        x = next(x for x in layers if x["name"] == first_bad)
        fails.append(f"end to end: hidden states diverge first at {first_bad} (rel RMS {x['rel_rms']:.3g} > "
                     f"{th.max_rel:g})")


def _head_verdict(a: torch.Tensor, b: torch.Tensor, th: Thresholds, fails: list, spans: bool = False,
                  name: str = "classifier") -> dict:
    """A task head's logits, converted (a) against the reference's (b), float64 [rows, labels] (QA: [rows, T, 2]);
    name: what the report calls them ("classifier", "CTC", "x-vector": an embedding, which has no top-1)."""
    rel = math.sqrt(float((a - b).square().sum()) / max(float(b.square().sum()), 1e-30))
    res = {"name": name, "max_abs": float((a - b).abs().max()), "rel_rms": rel,
           # QA: the best start and the best end token, not the larger of a token's two logits
           "top1": float((a.argmax(-2 if spans else -1) == b.argmax(-2 if spans else -1)).double().mean())
           if a.shape[-1] > 1 and name != "x-vector" else None}
    if rel > th.max_rel:
        fails.append(f"end to end: {name} logits relative RMS error {rel:.3g} > {th.max_rel:g}")
    if res["top1"] is not None and res["top1"] < th.min_top1:
        fails.append(f"end to end: {name} top-1 agreement {res['top1']:.2%} < {th.min_top1:.2%}")
    return res


def _wave_forward(model, values: torch.Tensor, mask: torch.Tensor | None):
    """_converted_forward of a waveform encoder (Wav2Vec2): (its hidden states as the runtime lists them, then the
    last one; its task head's logits, CTC's per frame, or None; the real frames [B, frames], None without a mask).
    A classifier with layer_sum (use_weighted_layer_sum) reads every layer's states."""
    final, states = model.hidden(values, attention_mask=mask, output_hidden_states=True)
    frames, head = model.frames, None
    if model.spec["classifier"]:
        from .runtime.classify import head_logits
        real = torch.ones(final.shape[:2], dtype=torch.bool, device=final.device) if frames is None else frames
        head = head_logits(model, final, None, real, states=states).cpu()
    return [s.float().cpu() for s in states] + [final.float().cpu()], head, None if frames is None else frames.cpu()


def check_waves(model_dir: Path, m: dict, converted, values: torch.Tensor, mask: torch.Tensor | None,
                th: Thresholds, device, source: str) -> dict:
    """check_end_to_end of a waveform encoder (Wav2Vec2, HuBERT, UniSpeech): the same clips through transformers'
    model, in one padded batch as the feature extractor made it; states and CTC logits compared over each clip's
    real frames only (a padded frame's state is whatever attention over the real ones makes of it, in both)."""
    sp = m["model"]
    ref = _load_reference(model_dir, sp["architecture"], sp["kind"], device, head=bool(sp["classifier"]))
    states, head, frames = converted
    base, v, msk = ref.base_model, values.to(device), None if mask is None else mask.to(device)
    with torch.inference_mode():
        o = base(**{base.main_input_name: v}, attention_mask=msk, output_hidden_states=True)
        # an x-vector's: embeddings
        got = None if head is None else ref(**{base.main_input_name: v}, attention_mask=msk)
        want = None if got is None else (got.embeddings if sp["classifier"]["pool"] == "xvector" else got.logits
                                         ).float().cpu().double()
        last = o.last_hidden_state.float().cpu()
        B, T = last.shape[:2]
        real = torch.ones(B, T, dtype=torch.bool) if msk is None else \
            base._get_feature_vector_attention_mask(T, msk).bool().cpu() if not sp.get("adapter") else \
            torch.arange(T) < base._get_feat_extract_output_lengths(msk.sum(-1)).cpu().unsqueeze(-1)
        # Wav2Vec2-BERT's adapter: the last state over its own frames (its attention's mask: transformers' mask
        # helper fails where its count passes the convs' frames), the blocks' over the frames before it
        Te = o.hidden_states[0].shape[1]
        block_real = real if not sp.get("adapter") else torch.ones(B, Te, dtype=torch.bool) if msk is None else \
            base._get_feature_vector_attention_mask(Te, msk, add_adapter=False).bool().cpu()
    # transformers 5 reports the stable (pre-LN) encoder's last block before the final LayerNorm, and the final
    # LayerNorm's output only as last_hidden_state: the runtime's every block, then its output. Post-LN and
    # transformers 4: the embeddings, the blocks but the last, then the output.
    hs = [h.float().cpu() for h in o.hidden_states]
    n, final = sp["num_layers"], states[-1]
    if sp.get("adapter"):       # the adapter's output is no layer's state
        states = states[:-1]
        names = _layer_names(n, "")
    elif sp["final_norm"] and not torch.equal(hs[-1], last):
        hs.append(last)
        names = _layer_names(n, "", "last_block") + ["final norm"]
    else:
        states = states[:-2] + states[-1:]
        names = _layer_names(n, "final norm" if sp["final_norm"] else "")
    if len(hs) != len(states):
        raise FmError(f"the reference reports {len(hs)} hidden states, the runtime {len(states)}")
    layer_err = []
    for a, b in zip(states, hs):
        d, b = a[block_real].double() - b[block_real].double(), b[block_real].double()
        layer_err.append([float(d.abs().max()), float(d.square().sum()), float(b.square().sum())])
    layers, first_bad = _layer_rows(names, layer_err, th)
    a, b = final[real].double(), last[real].double()
    res = {"tokens": int(real.sum()), "unit": "frames", "batches": [B, T], "token_source": source,
           "output": "last hidden state", "max_abs": float((a - b).abs().max()), "rel_rms": _rel(a - b, b),
           "layers": layers, "first_divergent_layer": first_bad}
    fails = []
    if mask is not None and (frames is None or not torch.equal(frames.bool(), real)):
        got = "no frame mask" if frames is None else f"{frames.sum(-1).tolist()} real frames"
        fails.append(f"end to end: from the clips' sample mask the runtime makes {got}, transformers "
                     f"{real.sum(-1).tolist()}")
    if res["max_abs"] > th.atol:
        fails.append(f"end to end: last hidden state max abs error {res['max_abs']:.3g} > atol {th.atol:g}")
    if res["rel_rms"] > th.max_rel:
        fails.append(f"end to end: last hidden state relative RMS error {res['rel_rms']:.3g} > {th.max_rel:g}")
    r = real.unsqueeze(-1).double()            # each clip's mean over its real frames: what the classifier pools

    def clip_mean(x):
        return (x.double() * r).sum(1) / r.sum(1).clamp(min=1)

    res["cosine_min"] = float(torch.cosine_similarity(clip_mean(final), clip_mean(last), dim=-1).min())
    res["cosine_what"] = "clip-mean last hidden state"
    if res["cosine_min"] < th.min_cosine:
        fails.append(f"end to end: {res['cosine_what']} cosine {res['cosine_min']:.6f} < {th.min_cosine:g}")
    if head is not None:        # CTC's (a frame classifier's) logits per real frame, or the classifier's a clip
        frames = sp["classifier"]["pool"] == "tokens"
        name = ("x-vector" if sp["classifier"]["pool"] == "xvector" else "classifier") if not frames else \
            "CTC" if sp["architecture"].endswith("ForCTC") else "frame labels"
        res["classifier"] = _head_verdict(head[real].double() if frames else head.double(),
                                          want[real] if frames else want, th, fails, name=name)
    _diverging(layers, first_bad, th, fails)
    res["passed"] = not fails
    res["failures"] = fails
    return res


# ---------------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------------
def _thresholds(profile: str, overrides: dict) -> Thresholds:
    base = asdict(DEFAULTS[profile])
    for f in fields(Thresholds):
        v = overrides.get(f.name)
        if v is not None:
            base[f.name] = float(v)
    return Thresholds(**base)


def _finish():
    """Leave the process group together, once rank 0 is done: a rank that exits while another still holds the
    group open can abort in gloo's teardown ("terminate called without an active exception")."""
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()


def _pick_device(device):
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError):
        raise FmError(f"--device: cannot use {device!r}") from None


def verify(model_dir, out_dir, text_file=None, tokens: int = 256, tp_mode: str = "emulate", device=None,
           allow_pickle: bool = False, **thresholds) -> dict:
    """Run all three stages and return the report (a JSON-ready dict). Raises FmError for bad input. tokens: how many
    of the text's tokens are read; a waveform encoder's longest clip's frames (256: 5 s at 320 samples a frame).

    In distributed mode every rank calls this; only rank 0 gets a full report (the others get {"rank": r}).
    """
    from .read import Checkpoint
    from .runtime.load import load

    t0 = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if tp_mode not in ("emulate", "distributed"):
        raise FmError(f"--tp-mode must be emulate or distributed, got {tp_mode!r}")
    if tokens < 2:
        raise FmError(f"--tokens must be at least 2, got {tokens}")
    if not model_dir.is_dir():
        raise FmError(f"model directory {model_dir} does not exist")
    m = mf.read(out_dir)
    parent = out_dir.resolve().parent
    if m["model"]["kind"] == "encoder" and (parent / mf.MANIFEST).is_file():
        pm = mf.read(parent)
        if pm["model"].get("encoder") and (parent / pm["model"]["encoder"]).resolve() == out_dir.resolve():
            raise FmError(f"{out_dir} is the encoder half of the encoder-decoder in {parent}; verify them together: "
                          f"fmconvert verify {model_dir} {parent}")
    tp = m["parallel"]["tp"]
    dist_comm = None
    if tp_mode == "distributed" and tp > 1:
        from .runtime.comm import init_distributed
        if int(os.environ.get("WORLD_SIZE", "1")) != tp:
            raise FmError(f"--tp-mode distributed needs one process per rank: run it under "
                          f"`torchrun --nproc-per-node {tp} -m fmconvert verify ...`")
        dist_comm = init_distributed()
    rank = dist_comm.rank if dist_comm else 0
    dev = _pick_device(device)
    if dist_comm and dev.type == "cuda":
        dev = torch.device(f"cuda:{torch.cuda.current_device()}")
    profile = profile_of(m)
    th = _thresholds(profile, thresholds)

    text = DEFAULT_TEXT.read_text(encoding="utf-8") if text_file is None else None
    if text_file is not None:
        try:
            text = Path(text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise FmError(f"--text {text_file}: cannot read it ({e})") from None
    if not text.strip():
        raise FmError("the verification text is empty")

    report = {"model_dir": str(model_dir), "out_dir": str(out_dir), "architecture": m["model"]["architecture"],
              "kind": m["model"]["kind"], "tp": tp, "tp_mode": tp_mode if tp > 1 else "single",
              "int8": bool(m["quantization"]), "dtype": m["dtype"], "profile": profile, "device": str(dev),
              "thresholds": asdict(th), "warnings": []}

    # Stages 1 and 2 run on rank 0 only; its verdict on whether the model can be loaded reaches every rank.
    go, err = 1, None
    if rank == 0:
        try:
            integ = check_integrity(out_dir, m)
            report["integrity"] = integ
            with Checkpoint(model_dir, allow_pickle=allow_pickle, **_source_quant(model_dir)) as ckpt:
                plan, config, config_sha = plan_source(model_dir, m, ckpt)
                report["warnings"] += _source_notes(model_dir, m, ckpt, config_sha)
                if integ["readable"]:
                    report["tensors"] = check_tensors(m, _read_ranks(out_dir, m), plan, ckpt, config)
                else:
                    report["tensors"] = {"skipped": "the integrity check found unreadable shards"}
                if m["model"]["encoder"]:       # an encoder-decoder: its encoder's conversion, checked alike
                    report["encoder"] = half = _check_half(model_dir, out_dir / m["model"]["encoder"], ckpt)
                    integ = {**integ, "readable": integ["readable"] and half["readable"]}
            go = 1 if integ["readable"] else 0
        except FmError as e:
            go, err = -e.exit_code, e
    if dist_comm is not None:
        flag = dist_comm.broadcast(torch.tensor([go], dtype=torch.int64, device=dev), 0)
        go = int(flag.item())
        if go < 0:
            _finish()
    if err is not None:
        raise err
    if go < 0:
        raise FmError("rank 0 found bad input; see its output", -go)

    if go:
        waves = None
        if audio_front(m["model"]):     # Wav2Vec2: clips of synthetic sound, the longest `tokens` frames
            waves = _wave_sources(out_dir, m["model"], tokens)
            source, batches = waves[2], None
        else:
            # a pruned lm_head (Apertus 1.5) scores the first head_vocab_size tokens only: the ids are drawn from
            # those
            ids, source = _token_ids(text, model_dir, out_dir,
                                     m["model"]["head_vocab_size"] or m["model"]["vocab_size"])
            batches = make_batches(ids, tokens, m["model"].get("max_positions") or 0)
        sources = None
        if m["model"]["encoder"]:       # each row's first half is the source, its second the decoder's target
            from .runtime.classify import end_token
            enc = mf.read(out_dir / m["model"]["encoder"])["model"]
            if enc["audio_mels"]:       # Whisper: the decoder reads the whole row, behind its start token
                sources, batches = _audio_sources(out_dir, enc, len(batches)), torch.cat(
                    [torch.full_like(batches[:, :1], m["model"]["decoder_start_token_id"]), batches[:, :-1]], 1)
            else:
                sources, batches = _teacher_forced(batches, m["model"]["decoder_start_token_id"],
                                                   end_token(m["model"]) if m["model"]["classifier"] else None)
        # On CPU, int8 weights stay int8 and every batch goes through the blocked int8 matmul: packing them for the
        # one-row decode kernel would cost load time and memory for nothing here.
        kw = dict(device=dev, backend="torch", check_hashes=False, dtype=torch.float32,
                  dequantize=False if torch.device(dev).type == "cpu" else None)
        load_err = None
        try:  # the runtime's own checks may refuse a defective checkpoint: a finding, not bad input
            if dist_comm is not None:
                runner = _Ranks([load(out_dir, comm=dist_comm, **kw)])
            else:
                from .runtime.comm import SingleComm, ThreadGroup
                group = ThreadGroup(tp) if tp > 1 else None
                runner = _Ranks([load(out_dir, comm=group.comm(r) if group else SingleComm(), rank=r, **kw)
                                 for r in range(tp)], group)
        except FmError as e:
            load_err = str(e)
        if dist_comm is not None:
            n_bad = dist_comm.all_reduce(torch.tensor([float(load_err is not None)], device=dev))
            if load_err is None and float(n_bad.item()) > 0:
                load_err = "another rank could not load its shards"
        try:
            if load_err is not None:
                if rank == 0:
                    report["end_to_end"] = {"skipped": "the runtime could not load the checkpoint", "passed": False,
                                            "failures": [f"end to end: the fmconvert runtime refuses to load "
                                                         f"{out_dir}: {load_err}"]}
            elif waves is not None:
                values, mask = waves[0], waves[1]
                converted = runner.run(lambda model: _wave_forward(
                    model, values.to(model.device), None if mask is None else mask.to(model.device)))
                if rank == 0:
                    report["end_to_end"] = check_waves(model_dir, m, converted, values, mask, th, dev, source)
            else:
                converted = run_converted(runner, batches, m["model"]["kind"], sources)
                if rank == 0:
                    report["end_to_end"] = check_end_to_end(model_dir, m, converted, batches, th, dev, source,
                                                            sources)
        finally:
            if dist_comm is not None:
                _finish()
    else:
        if dist_comm is not None:
            _finish()
        report["end_to_end"] = {"skipped": "the integrity check found unreadable shards"}
    if rank != 0:
        return {"rank": rank}
    fails = []
    for stage in ("integrity", "tensors", "end_to_end"):
        fails += report.get(stage, {}).get("failures", [])
    fails += [f"encoder: {f}" for f in report.get("encoder", {}).get("failures", [])]
    report["failures"] = fails
    report["passed"] = not fails and go == 1
    report["seconds"] = time.perf_counter() - t0
    return report


def _clean(x):
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float):
        return _num(x)
    return x


def to_json(report: dict) -> str:
    return json.dumps(_clean(report), indent=2, allow_nan=False) + "\n"


def _fmt(x, spec=".3g"):
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def print_report(report: dict, console=None):
    from rich.console import Console
    from rich.table import Table
    con = console
    if con is None:
        con = Console(highlight=False)
        if not con.is_terminal:  # logs and CI: room for full tensor names
            con.width = max(con.width, 120)
    ok = "[green]pass[/green]"
    bad = "[bold red]FAIL[/bold red]"
    th = report["thresholds"]
    head = Table(title=f"fmconvert verify: {report['architecture']} ({report['kind']}), tp={report['tp']} "
                       f"({report['tp_mode']}), {'int8' if report['int8'] else report['dtype']}, on {report['device']}",
                 show_header=True)
    head.add_column("stage", no_wrap=True)
    head.add_column("result")
    head.add_column("details", overflow="fold")
    integ = report.get("integrity", {})
    head.add_row("integrity", ok if integ.get("passed") else bad,
                 f"{integ.get('files', 0)} files, {integ.get('tensors', 0)} tensors: sizes, sha256, headers")
    ts = report.get("tensors", {})
    if "skipped" in ts:
        head.add_row("tensors", "[yellow]skipped[/yellow]", ts["skipped"])
    else:
        head.add_row("tensors", ok if ts.get("passed") else bad,
                     f"{ts.get('count', 0)} reassembled and compared with the source "
                     f"({len(ts.get('failures', []))} failing)")
    half = report.get("encoder")
    if half is not None:        # an encoder-decoder's encoder/ conversion
        hi, ht = half["integrity"], half.get("tensors", {})
        head.add_row("encoder", ok if not half["failures"] else bad,
                     f"{hi.get('files', 0)} files, {hi.get('tensors', 0)} tensors; {ht.get('count', 0)} compared with "
                     f"the source ({len(half['failures'])} failing)")
    e = report.get("end_to_end", {})
    if "skipped" in e:
        head.add_row("end to end", bad if e.get("passed") is False else "[yellow]skipped[/yellow]", e["skipped"])
    elif e:
        head.add_row("end to end", ok if e.get("passed") else bad,
                     f"{e['tokens']} {e.get('unit', 'tokens')} as {e['batches'][0]}x{e['batches'][1]} "
                     f"({e['token_source']})")
    con.print(head)

    if ts.get("rows"):
        by_name = {r["name"]: r for r in ts["rows"]}
        t = Table(title="worst tensors (reassembled from all ranks vs source)")
        for c in ("tensor", "kind", "max abs", "rel RMS", "SQNR dB", "err/bound", "status"):
            t.add_column(c, justify="left" if c in ("tensor", "kind") else "right", overflow="fold")
        for name in ts["worst"]:
            r = by_name[name]
            t.add_row(name, r["kind"], _fmt(r["max_abs"]), _fmt(r["rel_rms"]),
                      "exact" if r["sqnr_db"] is None or math.isinf(r["sqnr_db"]) else f"{r['sqnr_db']:.1f}",
                      _fmt(r["bound_ratio"], ".2f"), ok if r["status"] == "ok" else bad)
        con.print(t)

    if e and "skipped" not in e:
        t = Table(title=f"end to end vs transformers fp32 ({e['output']})")
        for c in ("metric", "value", "threshold", "result"):
            t.add_column(c, justify="left" if c == "metric" else "right")

        def row(name, v, limit, good, spec=".3g"):
            t.add_row(name, _fmt(v, spec), "" if limit is None else _fmt(limit, ".3g"),
                      "" if good is None else (ok if good else bad))

        row("max abs error", e["max_abs"], th["atol"], e["max_abs"] <= th["atol"])
        row("relative RMS error", e["rel_rms"], th["max_rel"], e["rel_rms"] <= th["max_rel"])
        if "encoder_rel_rms" in e:
            row("encoder's output, relative RMS", e["encoder_rel_rms"], th["max_rel"],
                e["encoder_rel_rms"] <= th["max_rel"])
        if "kl_mean" in e:
            row("KL divergence, mean", e["kl_mean"], th["max_kl"], e["kl_mean"] <= th["max_kl"])
            row("KL divergence, max", e["kl_max"], None, None)
            row("top-1 agreement", e["top1"], th["min_top1"], e["top1"] >= th["min_top1"], ".4f")
            row("top-5 overlap", e["top5"], None, None, ".4f")
            row("perplexity, reference", e["ppl_ref"], None, None, ".4f")
            row("perplexity, converted", e["ppl_converted"], None, None, ".4f")
        if "cosine_min" in e:
            row(f"{e['cosine_what']} cosine, min", e["cosine_min"], th["min_cosine"],
                e["cosine_min"] >= th["min_cosine"], ".6f")
        c = e.get("classifier")
        if c:
            name = c.get("name", "classifier")
            row(f"{name} logits, relative RMS", c["rel_rms"], th["max_rel"], c["rel_rms"] <= th["max_rel"])
            if c["top1"] is not None:
                row(f"{name} top-1 agreement", c["top1"], th["min_top1"], c["top1"] >= th["min_top1"], ".4f")
        first = e.get("first_divergent_layer")
        t.add_row("first diverging layer", first or "none", _fmt(th["max_rel"]), bad if first else ok)
        con.print(t)
        lt = Table(title="hidden states by layer (rel RMS vs reference)")
        lt.add_column("layer", no_wrap=True)
        lt.add_column("max abs", justify="right")
        lt.add_column("rel RMS", justify="right")
        for x in e["layers"]:
            flag = x["rel_rms"] > th["max_rel"]
            lt.add_row(x["name"], _fmt(x["max_abs"]), ("[red]" if flag else "") + _fmt(x["rel_rms"]))
        con.print(lt)

    if e.get("reference_note"):
        con.print(f"note: {e['reference_note']}", markup=False)
    for w in report.get("warnings", []):
        con.print(f"[yellow]warning:[/yellow] {w}")
    if report["failures"]:
        con.print(f"[bold red]FAILED[/bold red] ({len(report['failures'])}):")
        for f in report["failures"]:
            con.print("  - " + f, markup=False)
    else:
        con.print(f"[bold green]PASSED[/bold green] ({report['profile']} thresholds) in {report['seconds']:.1f} s")


def main(model_dir, out_dir, text=None, tokens=256, json_path=None, tp_mode="emulate", device=None,
         allow_pickle=False, console=None, **thresholds) -> dict:
    """The CLI entry: verify, print the report, write --json, raise ParityError (exit 1) on any failure."""
    report = verify(model_dir, out_dir, text, tokens, tp_mode, device, allow_pickle, **thresholds)
    if "rank" in report and len(report) == 1:
        return report
    print_report(report, console)
    if json_path is not None:
        try:
            Path(json_path).write_text(to_json(report), encoding="utf-8")
        except OSError as e:
            raise FmError(f"--json {json_path}: cannot write it ({e.strerror or e})") from None
    if not report["passed"]:
        raise ParityError(f"verify found {len(report['failures'])} problem(s); first: {report['failures'][0]}")
    return report
