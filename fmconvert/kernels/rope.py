"""Rotary position embedding for q and k in one launch.

style "neox": pairs (i, i + R/2) (HF LLaMA rotate_half); style "gptj": pairs (2i, 2i + 1).
cos/sin are fp32 [max_pos, R/2] tables built by the runtime (RoPE scaling variants live there).
Dims beyond rotary_dim R pass through. Inputs may be strided views (e.g. of a fused qkv).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import float_dtype_check


@triton.jit
def _rope_heads(src, dst, b, t, heads, H, c, s, sb, st, sh, sd, ob, ot, oh,
                D, R, HALF, GPTJ: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr):
    # heads: [BH]; c, s: [BLOCK_HALF] fp32. Output is contiguous in its last dim.
    hmask = heads < H
    i = tl.arange(0, BLOCK_HALF)
    imask = hmask[:, None] & (i < HALF)[None, :]
    if GPTJ:
        d1 = 2 * i
        d2 = 2 * i + 1
    else:
        d1 = i
        d2 = i + HALF
    src_h = src + b * sb + t * st + heads[:, None].to(tl.int64) * sh         # [BH, 1]
    dst_h = dst + b * ob + t * ot + heads[:, None].to(tl.int64) * oh
    if R < D:
        d = tl.arange(0, BLOCK_D)
        pmask = hmask[:, None] & ((d >= R) & (d < D))[None, :]
        tl.store(dst_h + d[None, :], tl.load(src_h + d[None, :] * sd, mask=pmask), mask=pmask)
    x1 = tl.load(src_h + d1[None, :] * sd, mask=imask, other=0.0).to(tl.float32)
    x2 = tl.load(src_h + d2[None, :] * sd, mask=imask, other=0.0).to(tl.float32)
    y1 = x1 * c[None, :] - x2 * s[None, :]
    y2 = x2 * c[None, :] + x1 * s[None, :]
    ty = dst.dtype.element_ty
    tl.store(dst_h + d1[None, :], y1.to(ty), mask=imask)
    tl.store(dst_h + d2[None, :], y2.to(ty), mask=imask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, pos_ptr,
                 T, HQ, HKV, D, R, HALF,
                 sqb, sqt, sqh, sqd, skb, skt, skh, skd,
                 oqb, oqt, oqh, okb, okt, okh,
                 spb, spt, scp,
                 GPTJ: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    # grid: (B * T, cdiv(HQ, BLOCK_H) + cdiv(HKV, BLOCK_H)); a program rotates BLOCK_H heads of
    # one token, of q for the first head blocks and of k for the rest.
    pid = tl.program_id(0)
    hb = tl.program_id(1)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    pos = tl.load(pos_ptr + b * spb + t * spt).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    c = tl.load(cos_ptr + pos * scp + i, mask=i < HALF, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + pos * scp + i, mask=i < HALF, other=0.0).to(tl.float32)
    nq = tl.cdiv(HQ, BLOCK_H)
    if hb < nq:
        heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        _rope_heads(q_ptr, qo_ptr, b, t, heads, HQ, c, s, sqb, sqt, sqh, sqd, oqb, oqt, oqh,
                    D, R, HALF, GPTJ, BLOCK_HALF, BLOCK_D)
    else:
        heads = (hb - nq) * BLOCK_H + tl.arange(0, BLOCK_H)
        _rope_heads(k_ptr, ko_ptr, b, t, heads, HKV, c, s, skb, skt, skh, skd, okb, okt, okh,
                    D, R, HALF, GPTJ, BLOCK_HALF, BLOCK_D)


def _check(q, k, cos, sin, positions, style, rotary_dim):
    float_dtype_check("q", q)
    if k.dtype != q.dtype:
        raise ValueError(f"q and k dtypes differ: {q.dtype} vs {k.dtype}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q, k must be [B, T, H, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k shape {tuple(k.shape)} does not match q {tuple(q.shape)}")
    if style not in ("neox", "gptj"):
        raise ValueError(f"style must be 'neox' or 'gptj', got {style!r}")
    R = D if rotary_dim is None else rotary_dim
    if R <= 0 or R % 2 or R > D:
        raise ValueError(f"rotary_dim must be even and in (0, {D}], got {R}")
    for name, tab in (("cos", cos), ("sin", sin)):
        if tab.dim() != 2 or tab.shape[1] != R // 2:
            raise ValueError(f"{name} must be [max_pos, {R // 2}], got {tuple(tab.shape)}")
    if tuple(positions.shape) != (B, T) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32/int64 [{B}, {T}], got {positions.dtype} {tuple(positions.shape)}")
    return R


def apply_rope(q, k, cos, sin, positions, style="neox", rotary_dim=None):
    """Rotated copies (q_out, k_out), contiguous, in the input dtype. q [B, T, Hq, D],
    k [B, T, Hkv, D] with any strides; cos/sin fp32 [max_pos, R/2]; positions [B, T]."""
    R = _check(q, k, cos, sin, positions, style, rotary_dim)
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if B * T == 0:
        return qo, ko
    if cos.stride(1) != 1 or sin.stride(1) != 1 or cos.stride(0) != sin.stride(0):
        cos, sin = cos.contiguous(), sin.contiguous()
    block_h = min(triton.next_power_of_2(max(HQ, HKV)), 16)
    grid = (B * T, triton.cdiv(HQ, block_h) + triton.cdiv(HKV, block_h))
    _rope_kernel[grid](
        q, k, qo, ko, cos, sin, positions, T, HQ, HKV, D, R, R // 2,
        *q.stride(), *k.stride(), *qo.stride()[:3], *ko.stride()[:3],
        *positions.stride(), cos.stride(0),
        GPTJ=style == "gptj", BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(R // 2),
        BLOCK_D=triton.next_power_of_2(D), num_warps=4,
    )
    return qo, ko


def apply_rope_reference(q, k, cos, sin, positions, style="neox", rotary_dim=None):
    R = _check(q, k, cos, sin, positions, style, rotary_dim)
    c = cos[positions].float()[:, :, None, :]        # [B, T, 1, R/2]
    s = sin[positions].float()[:, :, None, :]

    def rot(x):
        xf = x.float()
        xr, rest = xf[..., :R], xf[..., R:]
        if style == "neox":
            x1, x2 = xr[..., : R // 2], xr[..., R // 2:]
            y = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
        else:
            x1, x2 = xr[..., 0::2], xr[..., 1::2]
            y = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)
        return torch.cat([y, rest], dim=-1).to(x.dtype)

    return rot(q), rot(k)
