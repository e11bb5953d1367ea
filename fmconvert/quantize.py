"""Symmetric int8 weight quantization, one scale per group of `group_size` consecutive input columns.

    w[n, k] ~= q[n, k] * scale[n, k // group_size],  q in [-127, 127]

Each scale is rounded *up* to its stored dtype, so |w / scale| <= 127 always holds and the per-element error is at
most scale / 2. Quantization happens after slicing, so a rank's groups never straddle another rank's columns.
"""

from __future__ import annotations

import math

import torch

from .errors import FmError

QMAX = 127
SCALE_DTYPES = {torch.float32: torch.float32, torch.float16: torch.float16, torch.bfloat16: torch.float16}
# Rows per step: bounds the float32 working copy to a few MB whatever the tensor size.
_ROWS_PER_STEP = 1024


def scale_dtype_for(dtype: torch.dtype) -> torch.dtype:
    return SCALE_DTYPES.get(dtype, torch.float32)


def quantize(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q int8 [N, K], scale [N, K // group_size])."""
    if w.dim() != 2:
        raise FmError(f"int8 quantization expects a 2-D weight, got shape {list(w.shape)}")
    N, K = w.shape
    if K % group_size:
        raise FmError(f"group size {group_size} does not divide K={K}")
    q = torch.empty(N, K, dtype=torch.int8)
    scale = torch.empty(N, K // group_size, dtype=scale_dtype)
    for lo in range(0, N, _ROWS_PER_STEP):
        hi = min(lo + _ROWS_PER_STEP, N)
        g = w[lo:hi].float().reshape(hi - lo, K // group_size, group_size)   # (rows, groups, group_size)
        s = g.abs().amax(dim=-1) / QMAX
        st = s.to(scale_dtype)
        low = st.float() < s
        if low.any():
            st = torch.where(low, torch.nextafter(st, torch.full_like(st, math.inf)), st)
        safe = torch.where(st == 0, torch.ones_like(st), st).float()
        q[lo:hi] = torch.round(g / safe.unsqueeze(-1)).clamp_(-QMAX, QMAX).reshape(hi - lo, K).to(torch.int8)
        scale[lo:hi] = st
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
        for lo in range(0, w.shape[0], _ROWS_PER_STEP):
            wf = w[lo:lo + _ROWS_PER_STEP].float()
            d = dequantize(q[lo:lo + _ROWS_PER_STEP], scale[lo:lo + _ROWS_PER_STEP], group_size) - wf
            self.sig += float(wf.double().square().sum())
            self.err += float(d.double().square().sum())
            self.max_abs = max(self.max_abs, float(d.abs().max()) if d.numel() else 0.0)

    def to_dict(self) -> dict:
        rel = math.sqrt(self.err / self.sig) if self.sig > 0 else 0.0
        sqnr = 10 * math.log10(self.sig / self.err) if self.err > 0 else math.inf
        # Rounded so reruns on other thread counts still write identical manifests.
        return {"rel_rms": float(f"{rel:.4g}"), "sqnr_db": float(f"{sqnr:.4g}") if math.isfinite(sqnr) else None,
                "max_abs": float(f"{self.max_abs:.4g}")}
