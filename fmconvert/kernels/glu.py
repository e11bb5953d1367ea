"""Gated activations over a fused gate|up output: y[..., :N] -> act(gate) * up, [..., 2N] -> [..., N].

SwiGLU (LLaMA family: act = SiLU), GeGLU (Gemma: act = tanh-approximated GELU) and GPT-OSS's clamped SwiGLU
(("swiglu_oai", alpha, limit): gate and up clamped, out = gate * sigmoid(alpha * gate) * (up + 1)). For float
checkpoints the MLP-in matmul stays on cuBLAS (faster than any Triton GEMM for float weights), and this one kernel
replaces torch's two (the activation, then the product) after it: at batch 1 each moves a few KB, so the launch is
the cost. fp32 math, rounded once to the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import GATED, GATED_CODES, activate_reference, epilogue, float_dtype_check, gated_product


@triton.jit
def _glu_kernel(y_ptr, o_ptr, N, stride_y, stride_o, ACT: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr,
                BLOCK: tl.constexpr):
    # grid: (rows, cdiv(N, BLOCK)); row r reads y[r, :N] (gate) and y[r, N:2N] (up).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(y_ptr + row * stride_y + N + cols, mask=mask, other=0.0).to(tl.float32)
    y = gated_product(gate, up, ACT, ALPHA, LIMIT)
    tl.store(o_ptr + row * stride_o + cols, y.to(o_ptr.dtype.element_ty), mask=mask)


def gated(y: torch.Tensor, activation="swiglu") -> torch.Tensor:
    """act(y[..., :N]) * y[..., N:] for y [..., 2N]; same dtype as y. activation: "swiglu", "geglu",
    ("swiglu_oai", alpha, limit) or ("swiglu_limit", limit)."""
    act, alpha, limit = epilogue(activation)
    if act not in GATED_CODES:
        raise ValueError(f"activation must be one of {list(GATED)}, ('swiglu_oai', alpha, limit) or "
                         f"('swiglu_limit', limit), got {activation!r}")
    float_dtype_check("y", y)
    if y.dim() == 0 or y.shape[-1] % 2:
        raise ValueError(f"{activation} needs an even last dim (gate | up), got {tuple(y.shape)}")
    n = y.shape[-1] // 2
    y2 = y.reshape(-1, 2 * n)
    if y2.stride(-1) != 1:
        y2 = y2.contiguous()
    out = torch.empty(y2.shape[0], n, dtype=y.dtype, device=y.device)
    if out.numel():
        block = min(1024, triton.next_power_of_2(n))
        _glu_kernel[(y2.shape[0], triton.cdiv(n, block))](y2, out, n, y2.stride(0), out.stride(0),
                                                           ACT=act, ALPHA=alpha, LIMIT=limit, BLOCK=block,
                                                           num_warps=4)
    return out.reshape(*y.shape[:-1], n)


def gated_reference(y: torch.Tensor, activation="swiglu") -> torch.Tensor:
    return activate_reference(y.float(), activation).to(y.dtype)


def swiglu(y: torch.Tensor) -> torch.Tensor:
    return gated(y, "swiglu")


def swiglu_reference(y: torch.Tensor) -> torch.Tensor:
    return gated_reference(y, "swiglu")
