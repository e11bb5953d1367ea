"""Put a converted OUT_DIR back together: the inverse of `convert`, for tests and `fmconvert verify`.

Every rank's pieces are dequantized with their own scales, joined with `slice.unshard` (canonical tensors), and
split back into the source's HF tensors with `Policy.unfuse`. Only files the manifest lists are opened.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import manifest as mf
from . import slice as sl
from .errors import FmError
from .policy import ModelSpec, policy_for
from .quantize import dequantize as _dequantize
from .read import check_safetensors

SCALE = "_scale"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8,
           "int64": torch.int64}
_LAYER = re.compile(r"layers\.(\d+)\.")


class _AllFlags(dict):
    """Every `when` condition holds: which optional slots exist is read off the written tensors instead. A flag a
    layout key names (T5's gated, its layout's gated_mlp) has the value the manifest's spec gives that key, so a
    [flag, if_true, if_false] pick of tensor names picks as the conversion did."""

    def __init__(self, known: dict | None = None, defined=()):
        super().__init__(known or {})
        self.defined = set(defined)

    def __contains__(self, key):          # a pick names one of the table's flags; three tensor names do not
        return key in self.defined

    def __getitem__(self, key):
        return self.get(key)

    def get(self, key, default=None):
        return dict.get(self, key, True)


def _flags(pol, spec: ModelSpec, recorded: dict) -> _AllFlags:
    """The flags the conversion recorded (source.flags); for an older manifest, those a layout key names, read off
    the spec, and every other one true."""
    defined = pol.table.get("flags", {})
    known = recorded or {v: getattr(spec, k) for k, v in pol.layout.items()
                         if isinstance(v, str) and v in defined and isinstance(getattr(spec, k, None), bool)}
    return _AllFlags(known, set(defined) | set(recorded))


def _spec_layout(m: dict) -> tuple[ModelSpec, sl.Layout]:
    try:
        spec = ModelSpec(**m["model"])
        lay = sl.Layout(**{k: v for k, v in m["parallel"].items() if k not in ("slots", "row_parallel_bias")},
                        per_layer_embeddings=bool(spec.per_layer_input))
    except TypeError as e:
        raise FmError(f"manifest: model/parallel sections do not match this fmconvert ({e})") from None
    return spec, lay


def _read_ranks(out_dir: Path, m: dict) -> list[dict[str, torch.Tensor]]:
    ranks = []
    for r in m["ranks"]:
        tensors: dict[str, torch.Tensor] = {}
        for f in r["files"]:
            path = mf.safe_path(out_dir, f["path"])
            want = {n: t for n, t in r["tensors"].items() if t["file"] == f["path"]}
            header = check_safetensors(path, f["path"])
            for name in want:
                if name not in header:
                    raise FmError(f"{f['path']}: tensor {name} listed in the manifest is not in the file")
            try:
                with safe_open(path, framework="pt") as h:
                    for name, info in want.items():
                        t = h.get_tensor(name)
                        if _DTYPES.get(info["dtype"]) != t.dtype or list(t.shape) != info["shape"]:
                            raise FmError(f"{f['path']}: tensor {name} is {t.dtype} {list(t.shape)}, the manifest "
                                          f"says {info['dtype']} {info['shape']}")
                        tensors[name] = t
            except (SafetensorError, OSError) as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise FmError(f"{f['path']}: cannot read ({msg})") from None
        ranks.append(tensors)
    return ranks


def _unshard(spec: ModelSpec, lay: sl.Layout, name: str, pieces: list) -> torch.Tensor:
    slot = _LAYER.sub("", name, count=1) if name.startswith("layers.") else name
    missing = [r for r, p in enumerate(pieces) if p is None]
    if missing and not (slot in sl.ROW_BIAS and missing == list(range(1, lay.tp))):
        raise FmError(f"tensor {name} is missing from rank {missing[0]}")
    layer = _LAYER.match(name)
    if layer:                            # a Gemma 4 global layer's own geometry
        spec, lay = sl.at(spec, lay, int(layer.group(1)))
    try:
        if name == "alibi.slopes":  # split by heads, not replicated
            return torch.cat(pieces)
        return sl.unshard(spec, lay, slot, pieces)
    except RuntimeError as e:  # shapes that do not fit the layout
        raise FmError(f"tensor {name}: rank pieces do not fit the layout ({str(e).splitlines()[0]})") from None


def canonical(out_dir, dequantize: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, canonical un-sharded tensors): "embed.weight", "layers.0.qkv.weight", "rope.inv_freq", "extra.*".

    int8 weights come back dequantized in the manifest dtype. With dequantize=False they stay int8 and each gets
    a float32 "<name>_scale" of the same shape holding every element's own group scale (w ~= q * scale), so both
    go through the same unsharding.
    """
    out_dir = Path(out_dir)
    m = mf.read(out_dir)
    spec, lay = _spec_layout(m)
    dtype = _DTYPES[m["dtype"]]
    ranks = _read_ranks(out_dir, m)
    qinfo = (m["quantization"] or {}).get("tensors", {})
    names = {n for r in ranks for n in r}
    out: dict[str, torch.Tensor] = {}
    for name in sorted(names):
        if name.endswith(SCALE) and name[:-len(SCALE)] in names:
            continue
        pieces = [r.get(name) for r in ranks]
        scales = [r.get(name + SCALE) for r in ranks]
        if any(s is not None for s in scales):
            if any((q is None) != (s is None) for q, s in zip(pieces, scales)):
                raise FmError(f"tensor {name}: int8 values and scales are not on the same ranks")
            groups = set()
            for q, s in zip(pieces, scales):
                if q is not None:
                    if (q.dtype != torch.int8 or q.dim() != 2 or s.dim() != 2 or s.shape[0] != q.shape[0]
                            or not s.shape[1] or q.shape[1] % s.shape[1]):
                        raise FmError(f"tensor {name}: shape {list(q.shape)} does not fit scales {list(s.shape)}")
                    groups.add(q.shape[1] // s.shape[1])
            want = qinfo.get(name, {}).get("group_size")
            if len(groups) != 1 or (want is not None and groups != {want}):
                raise FmError(f"tensor {name}: scales imply group sizes {sorted(groups)}, the manifest says {want}")
            g = groups.pop()
            if dequantize:
                pieces = [None if q is None else _dequantize(q, s, g, dtype) for q, s in zip(pieces, scales)]
            else:
                out[name + SCALE] = _unshard(spec, lay, name, [
                    None if s is None else s.float().repeat_interleave(g, dim=1) for s in scales])
        out[name] = _unshard(spec, lay, name, pieces)
    return m, out


def reassemble(out_dir, dequantize: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, tensors keyed by the source checkpoint's HF names, in its layout and the manifest dtype).

    A tied lm_head is not re-created (the source did not hold it); passthrough extras come back under their own
    names; derived tensors (RoPE frequencies, ALiBi slopes) are dropped. dequantize=False: see `canonical`.
    """
    m, canon = canonical(out_dir, dequantize)
    spec, _ = _spec_layout(m)
    pol, _ = policy_for([spec.architecture], spec.family)
    flipped = m["source"].get("flipped") or []
    if flipped:
        pol = pol.flipped(k.removeprefix("layers.") for k in flipped)
    prefix = m["source"].get("prefix")
    if not isinstance(prefix, str):
        raise FmError("manifest: source.prefix is missing (written by an older fmconvert); cannot name HF tensors")
    out: dict[str, torch.Tensor] = {}
    flags = _flags(pol, spec, m["source"].get("flags") or {})
    sources = [(s.slot, s) for s in pol.sources(spec, flags, prefix, None)]
    for i in range(spec.num_layers):
        sources += [(f"layers.{i}.{s.slot}", s) for s in pol.sources(spec, flags, prefix, i)]
    spelled = m["source"].get("aliases") or {}     # slots the source spelled another way than the table's first
    for key, src in sources:
        which = spelled.get(src.slot if key == src.slot else f"layers.{src.slot}")
        if which is not None:
            if which >= len(src.aliases):
                raise FmError(f"manifest: source.aliases names spelling {which} of {src.slot}, which has "
                              f"{len(src.aliases)}")
            src.names = src.aliases[which]
        for suffix in ("", SCALE):
            t = canon.pop(key + suffix, None)
            if t is not None:
                for n, part in zip(src.names, pol.unfuse(spec.at(src.layer), src.slot, t, len(src.names))):
                    out[n + suffix] = part
    if pol.layout.get("tied") == "unless_head_differs" and "lm_head.weight" in canon:     # T5's own head
        out[pol.head_prefix(prefix) + "lm_head.weight"] = canon.pop("lm_head.weight")
        if "lm_head.weight" + SCALE in canon:
            out[pol.head_prefix(prefix) + "lm_head.weight" + SCALE] = canon.pop("lm_head.weight" + SCALE)
    for name in m.get("extras") or []:
        if "extra." + name not in canon:
            raise FmError(f"manifest lists extra tensor {name}, but no rank holds extra.{name}")
        out[name] = canon.pop("extra." + name)
    canon.pop("rope.inv_freq", None)
    canon.pop("rope_local.inv_freq", None)
    canon.pop("rope_long.inv_freq", None)
    canon.pop("alibi.slopes", None)
    if m["model"]["position"]["type"] == "sinusoidal":
        canon.pop("pos_embed.weight", None)         # XGLM's table is computed, not a checkpoint tensor
    if canon:
        raise FmError(f"{out_dir}: no {spec.architecture} tensor name for {', '.join(sorted(canon))}")
    if spec.encoder:        # an encoder-decoder: its encoder's tensors too (the embeddings both halves read, once)
        for n, t in reassemble(Path(out_dir) / spec.encoder, dequantize)[1].items():
            out.setdefault(n, t)
    return m, out
