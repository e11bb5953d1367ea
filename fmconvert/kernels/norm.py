"""Fused residual add + RMSNorm / LayerNorm.

h = x + residual (fp32 add, stored in x.dtype); y = norm(h) * weight (+ bias), statistics in fp32.
The normalization reads h rounded to x.dtype, as the next layer will see it (HF semantics).
kind: "rms", "layer", "rms_plus_one" (Gemma: RMSNorm scaled by 1 + weight, the weight stored as an offset),
"layer_plus_one" (Nemotron: the same for LayerNorm) or "rms_fp32" (Gemma 4). This kernel always scales by the
weight in fp32 and rounds once; the torch backend's "rms" rounds before the weight, as LLaMA's RMSNorm does.
x_scale: x is multiplied by it before the add (Granite's residual_multiplier scales each half's output).
pre_weight (RMS kinds): x is itself normalised by it first, rounded to x.dtype: Gemma 2/3 norm each half's output
before it joins the residual stream, and this folds that norm into the add+norm that follows (one launch, not two).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import float_dtype_check

KINDS = ("rms", "layer", "rms_plus_one", "layer_plus_one", "rms_fp32")


@triton.jit
def _add_norm_kernel(x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, h_ptr, p_ptr, g_ptr, N, eps, xs,
                     HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr,
                     IS_RMS: tl.constexpr, PLUS_ONE: tl.constexpr, PRE: tl.constexpr, HAS_GAIN: tl.constexpr,
                     BLOCK: tl.constexpr):
    # grid: (rows,); every tensor is a contiguous [rows, N]; BLOCK = next_pow2(N).
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    h = tl.load(x_ptr + row * N + offs, mask=mask, other=0.0).to(tl.float32)
    # Every load is issued before the first reduction: a reduction's barrier would otherwise hold the weight's load
    # back by a whole memory round trip (the kernel runs once per layer half, at batch 1 on one multiprocessor).
    if HAS_RES:
        r = tl.load(r_ptr + row * N + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GAIN:
        gain = tl.load(g_ptr).to(tl.float32)
    if PRE:
        pw = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if PLUS_ONE:
            pw += 1.0
        h = h * tl.rsqrt(tl.sum(h * h, axis=0) / N + eps) * pw
        h = h.to(h_ptr.dtype.element_ty).to(tl.float32)       # as the norm's own output would be stored
    if HAS_RES:
        h = h * xs + r
    if HAS_RES or PRE:
        h_lo = h.to(h_ptr.dtype.element_ty)
        if HAS_GAIN:     # Gemma 4's layer scalar on the whole stream, rounded after the add as its own step
            h_lo = (h_lo.to(tl.float32) * gain).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * N + offs, h_lo, mask=mask)
        h = h_lo.to(tl.float32)
    if IS_RMS:
        var = tl.sum(h * h, axis=0) / N
        hn = h * tl.rsqrt(var + eps)
    else:
        mean = tl.sum(h, axis=0) / N
        d = tl.where(mask, h - mean, 0.0)
        var = tl.sum(d * d, axis=0) / N
        hn = d * tl.rsqrt(var + eps)
    if HAS_W:
        if PLUS_ONE:
            w += 1.0
        hn = hn * w
    if HAS_BIAS:
        hn += b
    tl.store(y_ptr + row * N + offs, hn.to(y_ptr.dtype.element_ty), mask=mask)


def add_norm(x, residual, weight, bias, eps, kind, out_dtype=None, pre_weight=None, x_scale=1.0, gain=None):
    """Returns (y, h). x [..., N]; residual like x or None (then h is x itself, or x normed by pre_weight);
    x_scale: h = x * x_scale + residual (with a residual only); gain: a [1] tensor, h = (x * x_scale + residual)
    * gain, each step rounded to x's dtype (with a residual only);
    weight/bias/pre_weight [N] or None; kind one of KINDS; y in out_dtype (default x.dtype)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if pre_weight is not None and kind.startswith("layer"):
        raise ValueError("pre_weight is for RMS norms (Gemma 2/3's output norms); kind is 'layer'")
    float_dtype_check("x", x)
    N = x.shape[-1]
    if residual is not None and (residual.shape != x.shape or residual.device != x.device):
        raise ValueError(f"residual must match x: {tuple(residual.shape)} vs {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("pre_weight", pre_weight)):
        if t is not None and (tuple(t.shape) != (N,) or t.device != x.device):
            raise ValueError(f"{name} must have shape ({N},) on {x.device}, got {tuple(t.shape)} on {t.device}")
    if gain is not None and (residual is None or gain.numel() != 1 or gain.device != x.device):
        raise ValueError("gain must be one value on x's device, and needs a residual")
    out_dtype = out_dtype or x.dtype
    x = x.contiguous()
    rows = x.numel() // max(N, 1)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if residual is not None:
        residual = residual.contiguous()
    h = x if residual is None and pre_weight is None else torch.empty_like(x)
    if rows == 0 or N == 0:
        return y, h
    block = triton.next_power_of_2(N)
    warps = min(16, max(1, block // 512))
    _add_norm_kernel[(rows,)](
        x, residual if residual is not None else x,
        weight.contiguous() if weight is not None else x, bias.contiguous() if bias is not None else x,
        y, h, pre_weight.contiguous() if pre_weight is not None else x, gain if gain is not None else x, N,
        float(eps), float(x_scale),
        HAS_RES=residual is not None, HAS_W=weight is not None, HAS_BIAS=bias is not None,
        IS_RMS=kind.startswith("rms"), PLUS_ONE=kind.endswith("plus_one"), PRE=pre_weight is not None,
        HAS_GAIN=gain is not None, BLOCK=block,
        num_warps=warps,
    )
    return y, h


def add_norm_reference(x, residual, weight, bias, eps, kind, out_dtype=None, pre_weight=None, x_scale=1.0,
                       gain=None):
    if pre_weight is not None:
        if kind.startswith("layer"):
            raise ValueError("pre_weight is for RMS norms (Gemma 2/3's output norms); kind is 'layer'")
        x = add_norm_reference(x, None, pre_weight, None, eps, kind)[0]
    h = x if residual is None else (x.float() * x_scale + residual.float()).to(x.dtype)
    if gain is not None:
        h = (h.float() * gain.float()).to(x.dtype)
    hf = h.float()
    if kind in ("rms", "rms_plus_one", "rms_fp32"):
        yn = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    elif kind in ("layer", "layer_plus_one"):
        mean = hf.mean(-1, keepdim=True)
        yn = (hf - mean) * torch.rsqrt((hf - mean).pow(2).mean(-1, keepdim=True) + eps)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if weight is not None:
        yn = yn * (weight.float() + 1.0 if kind.endswith("plus_one") else weight.float())
    if bias is not None:
        yn = yn + bias.float()
    return yn.to(out_dtype or x.dtype), h
