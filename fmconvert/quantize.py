"""Symmetric int8 weight quantization, one scale per group of `group_size` consecutive input columns.

    w[n, k] ~= q[n, k] * scale[n, k // group_size],  q in [-127, 127]

Each scale is rounded *up* to its stored dtype, so |w / scale| <= 127 always holds and the per-element error is at
most scale / 2. Quantization happens after slicing, so a rank's groups never straddle another rank's columns.

The work goes a few hundred rows at a time through two float32 scratch buffers of 2 MB each, so the passes stay in
the CPU's L2/L3 and no float32 copy of a whole tensor is ever made. The error statistics the manifest records are
gathered in the same pass (`stats=`), from the same float32 rows.
"""

from __future__ import annotations

import math

import torch

from .errors import FmError

QMAX = 127
SCALE_DTYPES = {torch.float32: torch.float32, torch.float16: torch.float16, torch.bfloat16: torch.float16}
# Elements per step. Smaller steps fit L2 better but mean more, shorter torch calls: when threads quantize side by
# side (convert does), their GIL hand-offs then cost more than the cache saves. Measured on a 2-core Xeon.
_STEP_ELEMS = 1 << 19
# Rows per step of the (rarely used) standalone ErrorStats.add.
_ROWS_PER_STEP = 1024


def scale_dtype_for(dtype: torch.dtype) -> torch.dtype:
    return SCALE_DTYPES.get(dtype, torch.float32)


def quantize(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype, stats: "ErrorStats | None" = None,
             out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q int8 [N, K], scale [N, K // group_size]).

    With `stats`, the quantization error of these rows is added to it in the same pass. With `out`, the results go
    into those two tensors (e.g. row ranges of a bigger weight's outputs, quantized in parallel)."""
    if w.dim() != 2:
        raise FmError(f"int8 quantization expects a 2-D weight, got shape {list(w.shape)}")
    N, K = w.shape
    if K % group_size:
        raise FmError(f"group size {group_size} does not divide K={K}")
    G = K // group_size
    if out is None:
        q = torch.empty(N, K, dtype=torch.int8)
        scale = torch.empty(N, G, dtype=scale_dtype)
    else:
        q, scale = out
        if q.shape != (N, K) or q.dtype != torch.int8 or scale.shape != (N, G) or scale.dtype != scale_dtype:
            raise ValueError(f"quantize: out= must be int8 {[N, K]} and {scale_dtype} {[N, G]}")
    if N == 0 or K == 0:
        return q, scale
    rows = max(1, min(N, _STEP_ELEMS // K))
    direct = w.dtype == torch.float32 and w.is_contiguous()   # float32 rows can be read in place
    buf = None if direct else torch.empty(rows, K, dtype=torch.float32)
    tmp = torch.empty(rows, K, dtype=torch.float32)
    rounded = scale_dtype != torch.float32
    sig = err = max_abs = 0.0
    for lo in range(0, N, rows):
        hi = min(lo + rows, N)
        n = hi - lo
        wf = w[lo:hi] if direct else buf[:n].copy_(w[lo:hi])
        g = wf.view(n, G, group_size)                                   # (rows, groups, group_size)
        x = tmp[:n].view(n, G, group_size)
        # max |w| as max(max w, -min w): two reads of g instead of writing |g| out and reading it back. The + 0 turns
        # the -0.0 an all-zero group may give into the +0.0 that |w| gives.
        s = torch.maximum(g.amax(dim=-1), g.amin(dim=-1).neg_()).div_(QMAX).add_(0.0)
        st = scale[lo:hi]
        st.copy_(s)                                                     # rounded to nearest...
        if rounded:     # ...then up where that went down: s >= 0, so the next value up is the next bit pattern
            st.view(torch.int16).add_(st.float() < s)
        safe = torch.where(st == 0, 1.0, st.float()).unsqueeze(-1)
        torch.div(g, safe, out=x).round_()       # no clamp needed: scales round up, so |x| <= 127 (NaN fails later)
        q[lo:hi].view(n, G, group_size).copy_(x)
        if stats is not None:
            f = wf.view(-1)
            sig += float(torch.dot(f, f))
            d = x.mul_(safe).sub_(g)                                    # dequantized - w, as dequantize() gives it
            f = d.view(-1)
            err += float(torch.dot(f, f))
            max_abs = max(max_abs, float(d.amax()), -float(d.amin()))   # two reads, no |d| written out
    if stats is not None:
        stats.sig += sig
        stats.err += err
        stats.max_abs = max(stats.max_abs, max_abs)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, group_size: int, dtype=torch.float32) -> torch.Tensor:
    N, K = q.shape
    g = q.float().reshape(N, K // group_size, group_size) * scale.float().unsqueeze(-1)
    return g.reshape(N, K).to(dtype)


class ErrorStats:
    """Accumulates quantization error over the pieces (ranks) of one tensor."""

    def __init__(self):
        self.sig = 0.0
        self.err = 0.0
        self.max_abs = 0.0

    def add(self, w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group_size: int):
        """The error of an already quantized weight (`quantize(..., stats=)` gathers it on the way instead)."""
        for lo in range(0, w.shape[0], _ROWS_PER_STEP):
            wf = w[lo:lo + _ROWS_PER_STEP].float()
            d = dequantize(q[lo:lo + _ROWS_PER_STEP], scale[lo:lo + _ROWS_PER_STEP], group_size) - wf
            self.sig += float(wf.double().square().sum())
            self.err += float(d.double().square().sum())
            self.max_abs = max(self.max_abs, float(d.abs().max()) if d.numel() else 0.0)

    def merge(self, other: "ErrorStats"):
        self.sig += other.sig
        self.err += other.err
        self.max_abs = max(self.max_abs, other.max_abs)

    def to_dict(self) -> dict:
        rel = math.sqrt(self.err / self.sig) if self.sig > 0 else 0.0
        sqnr = 10 * math.log10(self.sig / self.err) if self.err > 0 else math.inf
        # Rounded so reruns on other thread counts still write identical manifests.
        return {"rel_rms": float(f"{rel:.4g}"), "sqnr_db": float(f"{sqnr:.4g}") if math.isfinite(sqnr) else None,
                "max_abs": float(f"{self.max_abs:.4g}")}
