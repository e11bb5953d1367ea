"""The diagonal linear recurrence of RecurrentGemma's RG-LRU: per batch row and channel d, with the state s in fp32,

    s[d] = a[t, d] * s[d] + x[t, d]        y[t, d] = s[d]  (rounded to x's dtype)

a and x already hold the gates, the decay and the sqrt(1 - a^2) input scale (runtime/model.py, Block.rglru). The state
is updated in place, so a prompt and the decode steps after it continue one recurrence.

Two forms here, same signature and results:
- linear_scan_reference: the recurrence token by token, in torch.
- linear_scan: a Triton kernel. One program per (batch, block of BD channels) keeps its states in fp32 registers
  across a sequential loop over T: decode (T = 1) and prompts alike, one launch instead of T.

The module is not named linear_scan: a submodule named like its function would shadow the function on the package
once imported.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import float_dtype_check, interpreting

BLOCK = 256


@triton.jit
def _linear_scan_kernel(a_ptr, x_ptr, s_ptr, y_ptr, T, W, sab, sat, sxb, sxt, ssb, syb, syt, BD: tl.constexpr):
    # grid: (cdiv(W, BD), B); every tensor's last dim contiguous, the rest strided (views of fused outputs need no
    # copy). Masked lanes load 0 and store nothing.
    pd = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pd * BD + tl.arange(0, BD)
    mask = offs < W
    s_ptrs = s_ptr + b * ssb + offs
    s = tl.load(s_ptrs, mask=mask, other=0.0)
    a_row = a_ptr + b * sab
    x_row = x_ptr + b * sxb
    y_row = y_ptr + b * syb
    for _ in range(T):
        a = tl.load(a_row + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        s = a * s + x
        tl.store(y_row + offs, s.to(y_ptr.dtype.element_ty), mask=mask)
        # 64-bit row pointers advance by a stride each token: t * stride in int32 could overflow on long prompts
        a_row += sat
        x_row += sxt
        y_row += syt
    tl.store(s_ptrs, s, mask=mask)


def _check(a, x, state):
    """(B, T, W) after validating the inputs against each other."""
    float_dtype_check("a", a)
    float_dtype_check("x", x)
    if x.dim() != 3 or a.shape != x.shape:
        raise ValueError(f"a and x must both be [B, T, W], got {tuple(a.shape)} and {tuple(x.shape)}")
    B, T, W = x.shape
    if tuple(state.shape) != (B, W) or state.dtype != torch.float32:
        raise ValueError(f"state must be fp32 {(B, W)}, got {state.dtype} {tuple(state.shape)}")
    if a.device != x.device or state.device != x.device:
        raise ValueError(f"a, x and state must share one device, x is on {x.device}")
    return B, T, W


def linear_scan(a, x, state) -> torch.Tensor:
    """y [B, T, W] in x.dtype, contiguous: the states after each token. a, x [B, T, W] float (any dtypes), state
    [B, W] fp32, the initial state, updated in place to the final one. Every tensor needs a contiguous last dim. No
    host syncs: safe in a CUDA graph."""
    B, T, W = _check(a, x, state)
    for name, t in (("a", a), ("x", x), ("state", state)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dim, got strides {t.stride()}")
    y = torch.empty(B, T, W, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y                                     # no token or no channel: the state stays as it is
    bd = min(BLOCK, triton.next_power_of_2(W))
    _linear_scan_kernel[(triton.cdiv(W, bd), B)](
        a, x, state, y, T, W, a.stride(0), a.stride(1), x.stride(0), x.stride(1), state.stride(0), y.stride(0),
        y.stride(1), BD=bd, num_warps=1 if interpreting() else max(1, min(4, bd // 64)))
    return y


def linear_scan_reference(a, x, state) -> torch.Tensor:
    """The recurrence token by token in fp32; same contract as linear_scan (state updated in place)."""
    B, T, W = _check(a, x, state)
    s = state.clone()
    y = torch.empty(B, T, W, dtype=x.dtype, device=x.device)
    for t in range(T):
        s = a[:, t].float() * s + x[:, t].float()
        y[:, t] = s.to(x.dtype)
    state.copy_(s)
    return y


__all__ = ["linear_scan", "linear_scan_reference"]
