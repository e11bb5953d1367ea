"""Gated RMSNorm, three families, gated by silu(z) (or sigmoid(z)) and normalised over groups of G consecutive
channels (G = D, the whole last dim, by default). With x, z [..., D] and weight [D]:

gate_first=False: Gated DeltaNet's output norm (Qwen3-Next, Qwen3.5), per head, rounded as Qwen3_5RMSNormGated:

    n = x * rsqrt(mean(x^2 over the group) + eps)   fp32, then rounded to x.dtype
    p = weight * n                                  in torch's promotion of (weight.dtype, x.dtype): rounded to
                                                    x.dtype only when the two dtypes are equal, else fp32
    y = p * silu(z)                                 z in fp32, y rounded to x.dtype

gate="sigmoid" (gate_first=False only): KDA's output norm (Kimi Linear), all in fp32 and rounded once, as
KimiLinearRMSNormGated:

    y = weight * (x * rsqrt(mean(x^2 over the group) + eps)) * sigmoid(z)    fp32, y rounded to x.dtype

gate_first=True: Mamba2's norm (norm_before_gate=False: Granite 4.0 hybrid, Bamba, Nemotron-H, Falcon-H1) over the
whole mixer width D with G = D / n_groups, rounded as GraniteMoeHybridRMSNormGated:

    h = x * silu(z)                                 fp32
    n = h * rsqrt(mean(h^2 over the group) + eps)   fp32, then rounded to x.dtype
    y = weight * n                                  in torch's promotion of (weight.dtype, x.dtype), also y's dtype

- gated_rms_norm_reference: those steps in torch.
- gated_rms_norm: a Triton kernel, one program per (row, group). A group wider than MAX_BLOCK is read twice in
  blocks: once for the sum of squares, once to write.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import float_dtype_check, sigmoid

GATES = ("silu", "sigmoid")
MAX_BLOCK = 4096          # channels a program holds at once: 8 warps x 16 fp32 each for x, z and the result


@triton.jit
def _gated_input(x_row, z_row, offs, mask, sxd, szd, GATE_FIRST: tl.constexpr):
    # (v, z) in fp32: v is what the RMS is taken of, x or x * silu(z).
    x = tl.load(x_row + offs * sxd, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_row + offs * szd, mask=mask, other=0.0).to(tl.float32)
    if GATE_FIRST:
        x = x * (z * sigmoid(z))
    return x, z


@triton.jit
def _gated_output(v, z, r, x_ptr, w_ptr, y_row, offs, mask, GATE_FIRST: tl.constexpr, ROUND_PROD: tl.constexpr,
                  SIGMOID: tl.constexpr):
    # offs index channels of D: weight and the contiguous y row alike. Rounds where the torch expression rounds
    # (KDA's sigmoid form: only at the store).
    if SIGMOID:
        n = v * r
    else:
        n = (v * r).to(x_ptr.dtype.element_ty).to(tl.float32)
    p = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32) * n
    if ROUND_PROD:
        p = p.to(x_ptr.dtype.element_ty).to(tl.float32)
    if SIGMOID:
        p = p * sigmoid(z)
    elif not GATE_FIRST:
        p = p * (z * sigmoid(z))
    tl.store(y_row + offs, p.to(y_row.dtype.element_ty), mask=mask)


@triton.jit
def _gated_rms_norm_kernel(x_ptr, z_ptr, w_ptr, y_ptr, H, NG, D, GS, eps, sxo, sxh, sxd, szo, szh, szd,
                           GATE_FIRST: tl.constexpr, ROUND_PROD: tl.constexpr, SIGMOID: tl.constexpr,
                           BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    # grid: (rows * NG,), NG groups of GS channels a row. x and z are [outer, H, D] views (H: the heads, or the
    # tokens of a mixer output), any strides: z is a slice of the fused input projection. y is a contiguous
    # [rows, D]. ONE_BLOCK: BLOCK = next_pow2(GS) holds the group in registers, read once. SIGMOID: KDA's gate
    # (the launcher sets it only with GATE_FIRST and ROUND_PROD off).
    pid = tl.program_id(0).to(tl.int64)
    row = pid // NG
    base = (pid % NG) * GS
    o = row // H
    h = row % H
    x_row = x_ptr + o * sxo + h * sxh
    z_row = z_ptr + o * szo + h * szh
    y_row = y_ptr + row * D
    if ONE_BLOCK:
        offs = base + tl.arange(0, BLOCK)
        mask = offs < base + GS
        v, z = _gated_input(x_row, z_row, offs, mask, sxd, szd, GATE_FIRST)
        r = tl.rsqrt(tl.sum(v * v, axis=0) / GS + eps)
        _gated_output(v, z, r, x_ptr, w_ptr, y_row, offs, mask, GATE_FIRST, ROUND_PROD, SIGMOID)
    else:
        # Per-lane partial sums, one reduction at the end.
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, GS, BLOCK):
            offs = base + start + tl.arange(0, BLOCK)
            mask = offs < base + GS
            v, z = _gated_input(x_row, z_row, offs, mask, sxd, szd, GATE_FIRST)
            acc += v * v
        r = tl.rsqrt(tl.sum(acc, axis=0) / GS + eps)
        for start in range(0, GS, BLOCK):
            offs = base + start + tl.arange(0, BLOCK)
            mask = offs < base + GS
            v, z = _gated_input(x_row, z_row, offs, mask, sxd, szd, GATE_FIRST)
            _gated_output(v, z, r, x_ptr, w_ptr, y_row, offs, mask, GATE_FIRST, ROUND_PROD, SIGMOID)


def _check(x, z, weight, group_size, gate="silu", gate_first=False):
    """The group size, D when None."""
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    if gate == "sigmoid" and gate_first:
        raise ValueError("gate='sigmoid' (KDA's norm) normalises before gating: it needs gate_first=False")
    float_dtype_check("x", x)
    float_dtype_check("z", z)
    float_dtype_check("weight", weight)
    if x.dim() < 1 or z.shape != x.shape:
        raise ValueError(f"z must have x's shape [..., D], got x {tuple(x.shape)}, z {tuple(z.shape)}")
    D = x.shape[-1]
    if tuple(weight.shape) != (D,):
        raise ValueError(f"weight must have shape ({D},), got {tuple(weight.shape)}")
    if z.device != x.device or weight.device != x.device:
        raise ValueError(f"x, z, weight must share one device, x is on {x.device}")
    gs = D if group_size is None else int(group_size)
    if D > 0 and (gs < 1 or D % gs != 0):
        raise ValueError(f"group_size must divide the last dim {D}, got {group_size}")
    return max(gs, 1)


def _out_dtype(x, weight, gate_first):
    # Mamba2's norm returns weight * n as torch promotes it (bf16 x with an fp32 weight gives fp32).
    return torch.promote_types(weight.dtype, x.dtype) if gate_first else x.dtype


def gated_rms_norm(x, z, weight, eps, group_size=None, gate_first=False, gate="silu") -> torch.Tensor:
    """y [..., D] contiguous. x [..., D] fp32/fp16/bf16; z like x, any float dtype, any strides (a [B, T, H, D]
    view of a wider projection is read in place); weight [D]; the RMS over groups of group_size channels (None:
    all D). y is in x.dtype, or with gate_first in the promotion of (weight.dtype, x.dtype). gate: "silu", or
    "sigmoid" for KDA's norm (not with gate_first). No host syncs."""
    gs = _check(x, z, weight, group_size, gate, gate_first)
    sig = gate == "sigmoid"
    D = x.shape[-1]
    y = torch.empty(x.shape, dtype=_out_dtype(x, weight, gate_first), device=x.device)
    rows = y.numel() // max(D, 1)
    if rows == 0 or D == 0:
        return y
    # [outer, H, D] views: heads keep their own stride, and the dims before them merge (a view whenever the
    # leading dims of a projection slice are, else reshape copies).
    H = x.shape[-2] if x.dim() >= 2 else 1
    x3, z3 = x.reshape(-1, H, D), z.reshape(-1, H, D)
    block = min(triton.next_power_of_2(gs), MAX_BLOCK)
    _gated_rms_norm_kernel[(rows * (D // gs),)](
        x3, z3, weight.contiguous(), y, H, D // gs, D, gs, float(eps), *x3.stride(), *z3.stride(),
        GATE_FIRST=bool(gate_first), ROUND_PROD=weight.dtype == x.dtype and x.dtype != torch.float32 and not sig,
        SIGMOID=sig, BLOCK=block, ONE_BLOCK=block >= gs, num_warps=max(1, min(8, block // 256)),
    )
    return y


def gated_rms_norm_reference(x, z, weight, eps, group_size=None, gate_first=False, gate="silu") -> torch.Tensor:
    """Same contract as gated_rms_norm; bit for bit HF's Qwen3_5RMSNormGated (gate_first=False),
    GraniteMoeHybridRMSNormGated (gate_first=True) and KimiLinearRMSNormGated (gate="sigmoid")."""
    gs = _check(x, z, weight, group_size, gate, gate_first)
    D = x.shape[-1]
    h = x.float()
    if gate_first:
        h = h * F.silu(z.float())
    hg = h.reshape(*x.shape[:-1], D // gs if D else 0, gs)
    n = (hg * torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + eps)).reshape(x.shape)
    if gate == "sigmoid":
        return (weight.float() * n * torch.sigmoid(z.float())).to(x.dtype)
    n = n.to(x.dtype)
    if gate_first:
        return weight * n
    return (weight * n * F.silu(z.float())).to(x.dtype)


__all__ = ["gated_rms_norm", "gated_rms_norm_reference"]
