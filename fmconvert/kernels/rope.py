"""Rotary position embedding for q and k in one launch, and its decode-step form that also appends to the KV cache.

style "neox": pairs (i, i + R/2) (HF LLaMA rotate_half); style "gptj": pairs (2i, 2i + 1).
cos/sin are fp32 [max_pos, R/2] tables built by the runtime (RoPE scaling variants live there).
Dims beyond rotary_dim R pass through. Inputs may be strided views (e.g. of a fused qkv).

`rope_append` is what a decode step runs between the QKV matmul and attention: it rotates q and k of
the one new token and writes k and v into the static KV cache at the step's position, read from a
device tensor (graph-safe). One launch replaces a rope kernel and two cache-write copies: at batch 1
each of those moves a few KB, so their cost is the launch, not the bytes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import float_dtype_check


@triton.jit
def _rope_heads(src_h, dst_h, heads, H, c, s, sh, sd, oh, D, R, HALF,
                ROTATE: tl.constexpr, GPTJ: tl.constexpr, BLOCK_HALF: tl.constexpr,
                BLOCK_D: tl.constexpr, w_ptr, eps, NORM: tl.constexpr, PLUS_ONE: tl.constexpr = False):
    # src_h / dst_h: one token's head 0; heads: [BH]; c, s: [BLOCK_HALF] fp32. Destination heads are
    # contiguous in their last dim. ROTATE=False copies the heads unchanged (v, or k without RoPE).
    # NORM: each head is first RMS-normalised over its D dims and scaled by w [D] (Qwen3's q_norm / k_norm; by
    # 1 + w with PLUS_ONE, Gemma 3's), then rotated; without ROTATE, normalised and copied (Gemma 4's v).
    hmask = heads < H
    src_h = src_h + heads[:, None].to(tl.int64) * sh                   # [BH, 1]
    dst_h = dst_h + heads[:, None].to(tl.int64) * oh
    if not ROTATE:
        d = tl.arange(0, BLOCK_D)
        m = hmask[:, None] & (d < D)[None, :]
        x = tl.load(src_h + d[None, :] * sd, mask=m, other=0.0)
        if NORM:
            xf = x.to(tl.float32)
            inv = tl.rsqrt(tl.sum(xf * xf, axis=1) / D + eps)
            w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
            if PLUS_ONE:
                w = w + 1.0
            x = (xf * inv[:, None] * w[None, :]).to(dst_h.dtype.element_ty)
        tl.store(dst_h + d[None, :], x, mask=m)
    else:
        i = tl.arange(0, BLOCK_HALF)
        imask = hmask[:, None] & (i < HALF)[None, :]
        if GPTJ:
            d1 = 2 * i
            d2 = 2 * i + 1
        else:
            d1 = i
            d2 = i + HALF
        x1 = tl.load(src_h + d1[None, :] * sd, mask=imask, other=0.0).to(tl.float32)
        x2 = tl.load(src_h + d2[None, :] * sd, mask=imask, other=0.0).to(tl.float32)
        if R < D:
            d = tl.arange(0, BLOCK_D)
            pmask = hmask[:, None] & ((d >= R) & (d < D))[None, :]
            rest = tl.load(src_h + d[None, :] * sd, mask=pmask, other=0.0)
            if NORM:
                ss = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)
                rf = rest.to(tl.float32)
                inv = tl.rsqrt((ss + tl.sum(rf * rf, axis=1)) / D + eps)
                rw = tl.load(w_ptr + d, mask=(d >= R) & (d < D), other=0.0).to(tl.float32)
                if PLUS_ONE:
                    rw = rw + 1.0
                rest = rf * inv[:, None] * rw[None, :]
            tl.store(dst_h + d[None, :], rest.to(dst_h.dtype.element_ty), mask=pmask)
        elif NORM:
            inv = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)
        if NORM:
            w1 = tl.load(w_ptr + d1, mask=i < HALF, other=0.0).to(tl.float32)
            w2 = tl.load(w_ptr + d2, mask=i < HALF, other=0.0).to(tl.float32)
            if PLUS_ONE:
                w1 = w1 + 1.0
                w2 = w2 + 1.0
            x1 = x1 * inv[:, None] * w1[None, :]
            x2 = x2 * inv[:, None] * w2[None, :]
        y1 = x1 * c[None, :] - x2 * s[None, :]
        y2 = x2 * c[None, :] + x1 * s[None, :]
        ty = dst_h.dtype.element_ty
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
        _rope_heads(q_ptr + b * sqb + t * sqt, qo_ptr + b * oqb + t * oqt, heads, HQ, c, s, sqh, sqd, oqh,
                    D, R, HALF, True, GPTJ, BLOCK_HALF, BLOCK_D, q_ptr, 0.0, False)
    else:
        heads = (hb - nq) * BLOCK_H + tl.arange(0, BLOCK_H)
        _rope_heads(k_ptr + b * skb + t * skt, ko_ptr + b * okb + t * okt, heads, HKV, c, s, skh, skd, okh,
                    D, R, HALF, True, GPTJ, BLOCK_HALF, BLOCK_D, k_ptr, 0.0, False)


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


@triton.jit
def _rope_append_kernel(q_ptr, k_ptr, v_ptr, qo_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr, qn_ptr, kn_ptr,
                        vn_ptr, eps, HQ, HKV, D, R, HALF, S_MAX, N_POS,
                        sqb, sqh, sqd, skb, skh, skd, svb, svh, svd, oqb, oqh,
                        skcb, skch, skcs, svcb, svch, svcs, scp,
                        ROPE: tl.constexpr, GPTJ: tl.constexpr, QK_NORM: tl.constexpr, PLUS_ONE: tl.constexpr,
                        V_NORM: tl.constexpr, RING: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    # grid: (B, nq + 2 * nkv) head blocks of BLOCK_H: q heads -> qo, then k heads -> k cache,
    # then v heads -> v cache, all at the position pos_ptr[0] (RING: at cache row pos % S_MAX, a
    # sliding window's ring buffer).
    b = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    pos = tl.load(pos_ptr).to(tl.int64)
    crow = pos
    if RING:
        crow = pos % S_MAX
    i = tl.arange(0, BLOCK_HALF)
    c = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    s = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    if ROPE:
        # The runtime sizes the tables to the cache before capture; the clamp only keeps reads in bounds.
        row = tl.minimum(pos, N_POS - 1) * scp
        c = tl.load(cos_ptr + row + i, mask=i < HALF, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + row + i, mask=i < HALF, other=0.0).to(tl.float32)
    nq = tl.cdiv(HQ, BLOCK_H)
    nkv = tl.cdiv(HKV, BLOCK_H)
    if hb < nq:
        heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        _rope_heads(q_ptr + b * sqb, qo_ptr + b * oqb, heads, HQ, c, s, sqh, sqd, oqh,
                    D, R, HALF, ROPE, GPTJ, BLOCK_HALF, BLOCK_D, qn_ptr, eps, QK_NORM, PLUS_ONE)
    elif hb < nq + nkv:
        # A position past the cache is dropped rather than written out of bounds (the host
        # checks capacity before each step; this keeps a bad pos from corrupting memory).
        heads = (hb - nq) * BLOCK_H + tl.arange(0, BLOCK_H)
        heads = tl.where(crow < S_MAX, heads, HKV)
        _rope_heads(k_ptr + b * skb, kc_ptr + b * skcb + crow * skcs, heads, HKV, c, s, skh, skd, skch,
                    D, R, HALF, ROPE, GPTJ, BLOCK_HALF, BLOCK_D, kn_ptr, eps, QK_NORM, PLUS_ONE)
    else:
        heads = (hb - nq - nkv) * BLOCK_H + tl.arange(0, BLOCK_H)
        heads = tl.where(crow < S_MAX, heads, HKV)
        _rope_heads(v_ptr + b * svb, vc_ptr + b * svcb + crow * svcs, heads, HKV, c, s, svh, svd, svch,
                    D, R, HALF, False, GPTJ, BLOCK_HALF, BLOCK_D, vn_ptr, eps, V_NORM, False)


def _check_append(q, k, v, k_cache, v_cache, pos, cos, sin, style, rotary_dim, q_norm=None, k_norm=None,
                  v_norm=None):
    float_dtype_check("q", q)
    if v_norm is not None and (tuple(v_norm.shape) != (q.shape[-1],) or v_norm.device != q.device):
        raise ValueError(f"v_norm must be [{q.shape[-1]}] on {q.device}, got {tuple(v_norm.shape)}")
    if (q_norm is None) != (k_norm is None):
        raise ValueError("give both q_norm and k_norm, or neither")
    if q_norm is not None:
        if cos is None:
            raise ValueError("q_norm / k_norm need RoPE (cos and sin): no family normalises q and k without it")
        for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
            if tuple(w.shape) != (q.shape[-1],) or w.device != q.device:
                raise ValueError(f"{name} must be [{q.shape[-1]}] on {q.device}, got {tuple(w.shape)} on {w.device}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4 or t.shape[1] != 1:
            raise ValueError(f"{name} must be [B, 1, H, D], got {tuple(t.shape)}")
    if q.dim() != 4 or q.shape[1] != 1:
        raise ValueError(f"q must be [B, 1, Hq, D] (one new token), got {tuple(q.shape)}")
    B, _, HQ, D = q.shape
    if tuple(k.shape) != tuple(v.shape) or k.shape[0] != B or k.shape[3] != D or k.shape[2] == 0:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must match q {tuple(q.shape)}")
    HKV = k.shape[2]
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4 or tuple(c.shape[:2]) != (B, HKV) or c.shape[3] != D or c.stride(3) != 1:
            raise ValueError(f"{name} must be [{B}, {HKV}, S_max, {D}] with unit last stride, got {tuple(c.shape)}")
    if k_cache.shape[2] != v_cache.shape[2]:
        raise ValueError(f"k_cache and v_cache lengths differ: {k_cache.shape[2]} vs {v_cache.shape[2]}")
    dtypes = {t.dtype for t in (q, k, v, k_cache, v_cache)}
    if len(dtypes) != 1:
        raise ValueError(f"q, k, v and the caches must share one dtype, got {sorted(map(str, dtypes))}")
    if pos.numel() != 1 or pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"pos must be a one-element int32/int64 tensor, got {pos.dtype} {tuple(pos.shape)}")
    if (cos is None) != (sin is None):
        raise ValueError("give both cos and sin, or neither (no RoPE)")
    if cos is None:
        return None
    return _check(q, k, cos, sin, pos.reshape(1, 1).expand(B, 1), style, rotary_dim)


def rope_append(q, k, v, k_cache, v_cache, pos, cos=None, sin=None, style="neox", rotary_dim=None,
                q_norm=None, k_norm=None, eps=1e-6, plus_one=False, ring=False, v_norm=None):
    """One decode step's q [B, Hq, D] (rotated, contiguous). Writes k (rotated) and v into k_cache /
    v_cache [B, Hkv, S_max, D] at position pos[0] (ring: at row pos[0] % S_max, the caches being a sliding
    window's ring buffer); q, k, v are [B, 1, H, D] views with any strides;
    cos/sin fp32 [max_pos, R/2], or None for no RoPE. No host syncs: pos stays on the device.
    q_norm / k_norm [D]: RMS-normalise each q / k head and scale by them before rotating (Qwen3), or by 1 + them
    with plus_one (Gemma 3). v_norm [D]: RMS-normalise each v head and scale by it (never plus one; Gemma 4's,
    a weight of ones)."""
    R = _check_append(q, k, v, k_cache, v_cache, pos, cos, sin, style, rotary_dim, q_norm, k_norm, v_norm)
    B, _, HQ, D = q.shape
    HKV = k.shape[2]
    qo = torch.empty(B, HQ, D, dtype=q.dtype, device=q.device)
    if B == 0:
        return qo
    rope = R is not None
    if rope and (cos.stride(1) != 1 or sin.stride(1) != 1 or cos.stride(0) != sin.stride(0)):
        cos, sin = cos.contiguous(), sin.contiguous()
    R = R if rope else D
    block_h = min(triton.next_power_of_2(max(HQ, HKV)), 16)
    nq, nkv = triton.cdiv(HQ, block_h), triton.cdiv(HKV, block_h)
    _rope_append_kernel[(B, nq + 2 * nkv)](
        q, k, v, qo, k_cache, v_cache, cos if rope else q, sin if rope else q, pos,
        q_norm if q_norm is not None else q, k_norm if k_norm is not None else q,
        v_norm if v_norm is not None else q, float(eps),
        HQ, HKV, D, R, R // 2, k_cache.shape[2], cos.shape[0] if rope else 0,
        q.stride(0), q.stride(2), q.stride(3), k.stride(0), k.stride(2), k.stride(3),
        v.stride(0), v.stride(2), v.stride(3), qo.stride(0), qo.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), cos.stride(0) if rope else 0,
        ROPE=rope, GPTJ=style == "gptj", QK_NORM=q_norm is not None, PLUS_ONE=bool(plus_one),
        V_NORM=v_norm is not None, RING=bool(ring), BLOCK_H=block_h,
        BLOCK_HALF=triton.next_power_of_2(max(R // 2, 1)), BLOCK_D=triton.next_power_of_2(D), num_warps=4,
    )
    return qo


def rope_append_reference(q, k, v, k_cache, v_cache, pos, cos=None, sin=None, style="neox", rotary_dim=None,
                          q_norm=None, k_norm=None, eps=1e-6, plus_one=False, ring=False, v_norm=None):
    """Same contract as rope_append, in plain torch (writes the caches in place, returns q)."""
    R = _check_append(q, k, v, k_cache, v_cache, pos, cos, sin, style, rotary_dim, q_norm, k_norm, v_norm)
    B = q.shape[0]

    def rms(x, w, one):
        xf = x.float()
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * (w.float() + one)).to(x.dtype)
    if q_norm is not None:
        q, k = rms(q, q_norm, plus_one), rms(k, k_norm, plus_one)
    if v_norm is not None:
        v = rms(v, v_norm, 0)
    if R is not None:
        q, k = apply_rope_reference(q, k, cos, sin, pos.reshape(1, 1).expand(B, 1), style, rotary_dim)
    at = pos.reshape(1).to(torch.int64)
    if ring:
        at = at % k_cache.shape[2]
    if int(at) < k_cache.shape[2]:
        k_cache.index_copy_(2, at, k.transpose(1, 2))
        v_cache.index_copy_(2, at, v.transpose(1, 2))
    return q[:, 0].contiguous()


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
