"""SwiGLU over a fused gate|up output: y[..., :N] -> silu(gate) * up, [..., 2N] -> [..., N].

For float checkpoints the MLP-in matmul stays on cuBLAS (faster than any Triton GEMM for float weights), and this
one kernel replaces torch's two (silu, then the product) after it: at batch 1 each moves a few KB, so the launch is
the cost. fp32 math, rounded once to the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import activate, float_dtype_check


@triton.jit
def _swiglu_kernel(y_ptr, o_ptr, N, stride_y, stride_o, BLOCK: tl.constexpr):
    # grid: (rows, cdiv(N, BLOCK)); row r reads y[r, :N] (gate) and y[r, N:2N] (up).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(y_ptr + row * stride_y + N + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptr + row * stride_o + cols, (activate(gate, 4) * up).to(o_ptr.dtype.element_ty), mask=mask)


def swiglu(y: torch.Tensor) -> torch.Tensor:
    """silu(y[..., :N]) * y[..., N:] for y [..., 2N]; same dtype as y."""
    float_dtype_check("y", y)
    if y.dim() == 0 or y.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dim (gate | up), got {tuple(y.shape)}")
    n = y.shape[-1] // 2
    y2 = y.reshape(-1, 2 * n)
    if y2.stride(-1) != 1:
        y2 = y2.contiguous()
    out = torch.empty(y2.shape[0], n, dtype=y.dtype, device=y.device)
    if out.numel():
        block = min(1024, triton.next_power_of_2(n))
        _swiglu_kernel[(y2.shape[0], triton.cdiv(n, block))](y2, out, n, y2.stride(0), out.stride(0), BLOCK=block,
                                                              num_warps=4)
    return out.reshape(*y.shape[:-1], n)


def swiglu_reference(y: torch.Tensor) -> torch.Tensor:
    gate, up = y.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(y.dtype)
