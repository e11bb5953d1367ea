"""Load one rank of a converted checkpoint: manifest, sha256 of this rank's files, tensors, FusedModel."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .. import manifest as mf
from ..errors import FmError
from .comm import SingleComm, init_distributed
from .model import FusedModel
from .ops import Int8Weight, make_ops

_DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def read_rank(out_dir: Path, manifest: dict, rank: int, check_hashes: bool = True) -> dict[str, torch.Tensor]:
    """This rank's tensors, read only from this rank's files, each checked against the manifest."""
    entry = manifest["ranks"][rank]
    paths = {}
    for f in entry["files"]:
        p = mf.safe_path(out_dir, f["path"])
        if not p.is_file():
            raise FmError(f"{f['path']} is missing from {out_dir}")
        if p.stat().st_size != f["size"]:
            raise FmError(f"{f['path']}: size {p.stat().st_size} differs from the manifest's {f['size']}")
        if check_hashes and sha256_file(p) != f["sha256"]:
            raise FmError(f"{f['path']}: sha256 does not match the manifest (file changed or corrupt)")
        paths[f["path"]] = p
    out = {}
    handles = {}
    try:
        for name, t in entry["tensors"].items():
            fname = t["file"]
            if fname not in handles:
                handles[fname] = safe_open(paths[fname], framework="pt")
            h = handles[fname]
            sl = h.get_slice(name)
            if list(sl.get_shape()) != t["shape"]:
                raise FmError(f"tensor {name}: shape {sl.get_shape()} in {fname} differs from the manifest")
            x = h.get_tensor(name)
            if x.dtype != _DT[t["dtype"]]:
                raise FmError(f"tensor {name}: dtype {x.dtype} in {fname} differs from the manifest")
            out[name] = x
    except SafetensorError as e:
        raise FmError(f"cannot read rank {rank} shards: {e}") from None
    except KeyError as e:
        raise FmError(f"tensor {e} listed in the manifest is not in its file") from None
    return out


def _assemble(manifest: dict, raw: dict, device, dequantize: bool, dtype) -> dict:
    """Pair int8 weights with their scales; move to the device."""
    out = {}
    for name, t in raw.items():
        if name.endswith("_scale"):
            continue
        if t.dtype == torch.int8:
            scale = raw.get(name + "_scale")
            if scale is None:
                raise FmError(f"int8 tensor {name} has no {name}_scale")
            g = t.shape[1] // scale.shape[1] if scale.dim() == 2 and scale.shape[1] else 0
            if not g or g * scale.shape[1] != t.shape[1] or scale.shape[0] != t.shape[0]:
                raise FmError(f"{name}_scale has shape {list(scale.shape)}, which does not fit {list(t.shape)}")
            w = Int8Weight(t.to(device), scale.to(device), g)
            out[name] = w.dequantize(dtype) if dequantize else w
        elif name.startswith("extra."):
            continue
        elif t.is_floating_point() and name not in ("rope.inv_freq", "alibi.slopes"):
            out[name] = t.to(device=device, dtype=dtype)
        else:
            out[name] = t.to(device)
    return out


def load(out_dir, rank: int | None = None, device=None, backend: str = "auto", check_hashes: bool = True,
         comm=None, dtype=None, dequantize: bool | None = None, verbose: bool = False) -> FusedModel:
    """Load this process's rank of OUT_DIR and build its FusedModel.

    Under torchrun the rank and the collective group come from torch.distributed (world size must equal the
    manifest's tp). `dequantize=None` keeps int8 weights on CUDA and dequantizes once at load on CPU, where no int8
    matmul beats a float one.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    m = mf.read(out_dir)
    tp = m["parallel"]["tp"]
    if comm is None:
        comm = init_distributed() if tp > 1 else SingleComm()
    if comm.world != tp:
        hint = f"run it under `torchrun --nproc-per-node {tp}`" if comm.world == 1 else "relaunch with that many ranks"
        raise FmError(f"{out_dir} was converted for tp={tp} but this job has {comm.world} rank(s); {hint}")
    rank = comm.rank if rank is None else rank
    if device is None:
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    ops = make_ops(backend, device)
    if dequantize is None:
        dequantize = ops.name == "torch"
    dtype = dtype or _DT[m["dtype"]]
    raw = read_rank(out_dir, m, rank, check_hashes)
    nbytes = sum(t.numel() * t.element_size() for t in raw.values())
    tensors = _assemble(m, raw, device, dequantize, dtype)
    if dtype != _DT[m["dtype"]]:
        m = {**m, "dtype": {v: k for k, v in _DT.items()}[dtype]}
    model = FusedModel(m, tensors, rank, comm=comm, ops=ops, device=device)
    model.load_stats = {"gib": nbytes / 2**30, "seconds": time.perf_counter() - t0, "bytes": nbytes}
    if verbose and rank == 0:
        s = model.load_stats
        print(f"loaded rank {rank}/{tp} of {out_dir}: {s['gib']:.3f} GiB in {s['seconds']:.2f} s "
              f"({ops.name} backend, {device})", flush=True)
    return model
