"""Gated RMSNorm: Gated DeltaNet's output norm (Qwen3-Next, Qwen3.5), per head, gated by silu(z).

With x, z [..., D] and the weight [D] every head shares, rounded as HF's Qwen3_5RMSNormGated rounds:

    n = x * rsqrt(mean(x^2 over D) + eps)      fp32, then rounded to x.dtype
    p = weight * n                             in torch's promotion of (weight.dtype, x.dtype): rounded to x.dtype
                                               only when the two dtypes are equal, else fp32
    y = p * silu(z)                            z in fp32, y rounded to x.dtype

- gated_rms_norm_reference: those steps in torch.
- gated_rms_norm: a Triton kernel, one program per row of D.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import float_dtype_check, sigmoid


@triton.jit
def _gated_rms_norm_kernel(x_ptr, z_ptr, w_ptr, y_ptr, H, D, eps, sxo, sxh, sxd, szo, szh, szd,
                           ROUND_PROD: tl.constexpr, BLOCK: tl.constexpr):
    # grid: (rows,). x and z are [outer, H, D] views (H: the heads), any strides: z is a slice of the fused input
    # projection. y is a contiguous [rows, D]; BLOCK = next_pow2(D).
    row = tl.program_id(0).to(tl.int64)
    o = row // H
    h = row % H
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + o * sxo + h * sxh + offs * sxd, mask=mask, other=0.0).to(tl.float32)
    n = x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    n = n.to(y_ptr.dtype.element_ty).to(tl.float32)
    p = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32) * n
    if ROUND_PROD:
        p = p.to(y_ptr.dtype.element_ty).to(tl.float32)
    z = tl.load(z_ptr + o * szo + h * szh + offs * szd, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + offs, (p * (z * sigmoid(z))).to(y_ptr.dtype.element_ty), mask=mask)


def _check(x, z, weight):
    float_dtype_check("x", x)
    float_dtype_check("z", z)
    float_dtype_check("weight", weight)
    if x.dim() < 1 or z.shape != x.shape:
        raise ValueError(f"z must have x's shape [..., D], got x {tuple(x.shape)}, z {tuple(z.shape)}")
    if tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"weight must have shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    if z.device != x.device or weight.device != x.device:
        raise ValueError(f"x, z, weight must share one device, x is on {x.device}")


def gated_rms_norm(x, z, weight, eps) -> torch.Tensor:
    """y like x (contiguous, x.dtype). x [..., D] fp32/fp16/bf16; z like x, any float dtype, any strides (a
    [B, T, H, D] view of a wider projection is read in place); weight [D]. No host syncs."""
    _check(x, z, weight)
    D = x.shape[-1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = y.numel() // max(D, 1)
    if rows == 0 or D == 0:
        return y
    # [outer, H, D] views: heads keep their own stride, and the dims before them merge (a view whenever the
    # leading dims of a projection slice are, else reshape copies).
    H = x.shape[-2] if x.dim() >= 2 else 1
    x3, z3 = x.reshape(-1, H, D), z.reshape(-1, H, D)
    _gated_rms_norm_kernel[(rows,)](
        x3, z3, weight.contiguous(), y, H, D, float(eps), *x3.stride(), *z3.stride(),
        ROUND_PROD=weight.dtype == x.dtype and x.dtype != torch.float32, BLOCK=triton.next_power_of_2(D),
        num_warps=max(1, min(8, triton.next_power_of_2(D) // 256)),
    )
    return y


def gated_rms_norm_reference(x, z, weight, eps) -> torch.Tensor:
    """Same contract as gated_rms_norm; bit for bit HF's Qwen3_5RMSNormGated."""
    _check(x, z, weight)
    xf = x.float()
    n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight * n * F.silu(z.float())).to(x.dtype)


__all__ = ["gated_rms_norm", "gated_rms_norm_reference"]
