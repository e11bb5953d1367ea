"""manifest.json: the contract between the converter and everything that reads its output.

Schema (format "fmconvert", FORMAT_VERSION below; documented in docs/manifest.md):
  format, format_version, tool_version
  source        architecture, family, prefix (of the HF tensor names), config_sha256, files {name: sha256},
                sidecar_files
  model         the ModelSpec (sizes, norm, activation, positions, residual, tying, ...)
  parallel      the slice Layout (tp, heads and kv heads per rank, kv replication, padding, slot kinds)
  dtype         float dtype of unquantized tensors
  quantization  null, or {scheme, group_size, scale_dtype, embeddings, tensors {name: {group_size, rel_rms,
                sqnr_db, max_abs}}}
  extras        passthrough tensors (task heads) stored replicated under "extra.<hf name>"
  ranks         [{rank, files [{path, size, sha256}], tensors {name: {file, dtype, shape}}}]

Readers check the format version and confine every path to the output directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import FmError

FORMAT = "fmconvert"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_REQUIRED = ("format", "format_version", "tool_version", "source", "model", "parallel", "dtype", "quantization",
             "ranks")
_MODEL_INTS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
               "vocab_size")
_DTYPES = ("float32", "float16", "bfloat16", "int8")
MAX_MANIFEST_BYTES = 64 << 20


def dumps(manifest: dict) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"


def safe_path(root: Path, rel) -> Path:
    """A manifest path, confined to root: no absolute paths, no '..', no symlink escaping it."""
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) or "\x00" in rel:
        raise FmError(f"manifest: file path {rel!r} is not a relative path")
    parts = Path(rel).parts
    if ".." in parts or os.path.isabs(rel):
        raise FmError(f"manifest: file path {rel!r} escapes the output directory")
    p = root / rel
    try:
        real, base = p.resolve(), root.resolve()
    except (OSError, RuntimeError):
        raise FmError(f"manifest: file path {rel!r} cannot be resolved") from None
    if base != real and base not in real.parents:
        raise FmError(f"manifest: file path {rel!r} resolves outside the output directory")
    return p


def _need(cond: bool, msg: str):
    if not cond:
        raise FmError(f"manifest: {msg}")


def validate(m) -> dict:
    """Structural checks, so nothing downstream meets a KeyError or a lying shape."""
    _need(isinstance(m, dict), "expected a JSON object")
    _need(m.get("format") == FORMAT, f"format is {m.get('format')!r}, expected {FORMAT!r}")
    v = m.get("format_version")
    _need(isinstance(v, int) and not isinstance(v, bool), "format_version must be an integer")
    if v > FORMAT_VERSION:
        raise FmError(f"manifest: format_version {v} is newer than this fmconvert understands ({FORMAT_VERSION}); "
                      "upgrade fmconvert")
    _need(v == FORMAT_VERSION, f"format_version {v} is not supported")
    for k in _REQUIRED:
        _need(k in m, f"missing key {k!r}")
    model, par = m["model"], m["parallel"]
    _need(isinstance(model, dict) and isinstance(par, dict), "model and parallel must be objects")
    for k in _MODEL_INTS:
        x = model.get(k)
        _need(isinstance(x, int) and not isinstance(x, bool) and 0 < x < 1 << 24, f"model.{k} must be a positive int")
    tp = par.get("tp")
    _need(isinstance(tp, int) and not isinstance(tp, bool) and 1 <= tp <= 4096, "parallel.tp must be a positive int")
    _need(m["dtype"] in _DTYPES[:3], f"dtype {m['dtype']!r} is not a float dtype")
    ranks = m["ranks"]
    _need(isinstance(ranks, list) and len(ranks) == tp, f"expected {tp} rank entries")
    for i, r in enumerate(ranks):
        _need(isinstance(r, dict) and r.get("rank") == i, f"rank entry {i} is malformed")
        files, tensors = r.get("files"), r.get("tensors")
        _need(isinstance(files, list) and isinstance(tensors, dict), f"rank {i}: files/tensors malformed")
        names = set()
        for f in files:
            _need(isinstance(f, dict) and isinstance(f.get("path"), str), f"rank {i}: file entry malformed")
            _need(isinstance(f.get("size"), int) and f["size"] >= 0, f"rank {i}: {f['path']}: bad size")
            _need(isinstance(f.get("sha256"), str) and len(f["sha256"]) == 64, f"rank {i}: {f['path']}: bad sha256")
            names.add(f["path"])
        for name, t in tensors.items():
            _need(isinstance(t, dict) and t.get("file") in names, f"rank {i}: tensor {name} names an unknown file")
            _need(t.get("dtype") in _DTYPES, f"rank {i}: tensor {name} has bad dtype {t.get('dtype')!r}")
            shape = t.get("shape")
            _need(isinstance(shape, list) and len(shape) <= 4 and
                  all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 31 for d in shape),
                  f"rank {i}: tensor {name} has a bad shape")
    q = m["quantization"]
    _need(q is None or (isinstance(q, dict) and isinstance(q.get("group_size"), int) and q["group_size"] > 0),
          "quantization must be null or an object with a positive group_size")
    return m


def read(out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FmError(f"{out_dir} does not exist or is not a directory")
    path = out_dir / MANIFEST
    if not path.is_file():
        raise FmError(f"{out_dir} has no {MANIFEST}; is it an fmconvert output?")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise FmError(f"{path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise FmError(f"{path}: not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return validate(m)
