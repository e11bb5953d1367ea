"""int8 weight-only GEMV for CPU decode, with the per-group dequantization inside the loop.

A CPU decode step reads every weight once per token, so like the GPU it is bound by memory bandwidth; int8 moves a
quarter of float32's bytes. torch has no group-wise int8 x float matmul on CPU (`_weight_int8pack_mm` takes one scale
per row), so the kernel is written as a torch expression and TorchInductor turns it into one fused, vectorized,
OpenMP-parallel C++ loop: int8 in, float32 accumulate, no dequantized copy of the weight anywhere.

The expression only vectorizes well when 64 output rows sit side by side in memory, so `pack` reorders the weight
once at load: [N, K] -> [N/64, K, 64] (rows padded to a multiple of 64 with zeros). Then each step of the inner loop
reads 64 consecutive bytes (one weight column of 64 rows) and multiplies them by one broadcast activation:

    y[n] = sum_j scale[n, j] * sum_{k in group j} q[n, k] * x[k]

Needs a C++ compiler at run time (what torch.compile needs on CPU); `available()` says whether it works here, and
callers fall back to dequantize-then-matmul when it does not. `int8_gemv_reference` is the pure-torch oracle.
"""

from __future__ import annotations

import os
import shutil
import threading
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LANES = 64          # output rows side by side in the packed layout: 4 AVX-512 float vectors per weight column
MAX_ROWS = 2        # rows of x up to which one GEMV per row beats the blocked dequantize + matmul (2-core Xeon)


@dataclass
class PackedInt8:
    """q [N, K] int8 as [ceil(N/64), K, 64]; scales [N, G] as float32 [ceil(N/64), G, 64]."""

    q: torch.Tensor
    scale: torch.Tensor
    n: int
    group_size: int


def pack(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> PackedInt8:
    N, K = q.shape
    G = scale.shape[1]
    if G * group_size != K or scale.shape[0] != N:
        raise ValueError(f"pack: scales {list(scale.shape)} do not fit an int8 weight {[N, K]} with groups of "
                         f"{group_size}")
    nb = -(-N // LANES)
    pad = nb * LANES - N
    if pad:
        q = torch.cat([q, q.new_zeros(pad, K)])
        scale = torch.cat([scale, scale.new_zeros(pad, G)])
    qp = q.view(nb, LANES, K).transpose(1, 2).contiguous()
    sp = scale.float().view(nb, LANES, G).transpose(1, 2).contiguous()
    return PackedInt8(qp, sp, N, group_size)


def _gemv(x: torch.Tensor, qp: torch.Tensor, sp: torch.Tensor, group_size: int) -> torch.Tensor:
    nb, k, lanes = qp.shape
    part = (qp.view(nb, k // group_size, group_size, lanes).float() * x.view(1, -1, group_size, 1)).sum(2)
    return (part * sp).sum(1).view(-1)


_compiled: dict = {}
_lock = threading.Lock()
_failed: str | None = None
_warm: set = set()        # shapes whose kernel has run (compiled) in this process


def _kernel(qp: torch.Tensor, group_size: int):
    """One compiled function per weight shape. Every layer of a model shares the few shapes there are; dynamo keys
    its cache (and its recompilation limit) on the code object, so each shape gets a code object of its own rather
    than all shapes piling onto one."""
    key = (tuple(qp.shape), group_size)
    fn = _compiled.get(key)
    if fn is None:
        with _lock:
            fn = _compiled.get(key)
            if fn is None:
                code = _gemv.__code__.replace(co_name=f"int8_gemv_{'x'.join(map(str, key[0]))}_g{group_size}")
                fn = torch.compile(types.FunctionType(code, _gemv.__globals__), dynamic=False)
                _compiled[key] = fn
    return fn


def cold(weights) -> list[PackedInt8]:
    """One packed weight per shape among `weights` that has not run yet in this process (its first call compiles)."""
    seen, out = set(), []
    for w in weights:
        key = (tuple(w.q.shape), w.group_size)
        if key not in _warm and key not in seen:
            seen.add(key)
            out.append(w)
    return out


def warm_up(weights) -> int:
    """Compile (or fetch from TorchInductor's disk cache) the kernel for each shape among `weights` now, so a
    caller's first real call, and any timing of it, does not pay for it. Returns how many shapes it built."""
    todo = cold(weights)
    for w in todo:
        int8_gemv(w.q.new_zeros(1, w.q.shape[1], dtype=torch.float32), w)
    return len(todo)


def usable() -> bool:
    """False once compiling the kernel has failed in this process (no C++ compiler, say); callers then dequantize."""
    return _failed is None


def int8_gemv(x: torch.Tensor, w: PackedInt8, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype, accumulated in float32: one kernel call per row of x (the runtime uses it up
    to MAX_ROWS rows).

    The first call for a weight shape compiles it (seconds: 13.5 s for a 1.1B model's four shapes with an empty
    cache, 3.5 s once TorchInductor's disk cache holds the C++). If that fails, the error is raised and `usable()`
    turns False."""
    global _failed
    lead, K = x.shape[:-1], x.shape[-1]
    if K != w.q.shape[1]:
        raise ValueError(f"int8_gemv: x has K={K}, the weight {w.q.shape[1]}")
    rows = x.reshape(-1, K).float()
    fn = _kernel(w.q, w.group_size)
    try:
        with torch.no_grad():       # one grad mode for every call: a change would recompile
            ys = [fn(r.contiguous(), w.q, w.scale, w.group_size)[:w.n] for r in rows]
    except Exception as e:
        _failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        raise
    _warm.add((tuple(w.q.shape), w.group_size))
    out = torch.stack(ys) if ys else rows.new_zeros(0, w.n)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).view(*lead, w.n)


def int8_gemv_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group_size: int,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    N, K = q.shape
    w = (q.float().view(N, K // group_size, group_size) * scale.float().unsqueeze(-1)).view(N, K)
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


def available() -> bool:
    """Whether the kernel can be built here: a C++ compiler for TorchInductor, and no earlier failure. Cheap: the
    real proof is the first compile, which `usable()` reports on."""
    return usable() and shutil.which(os.environ.get("CXX", "g++")) is not None
