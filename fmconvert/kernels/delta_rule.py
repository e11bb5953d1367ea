"""The gated delta rule: Gated DeltaNet's linear attention (Qwen3-Next, Qwen3.5) and Kimi Delta Attention (KDA,
Kimi Linear), which only decays finer.

Each value head keeps a state S [Dk, Dv] (fp32) that maps keys to values. q and k are L2-normalised over Dk
(x * rsqrt(sum x^2 + 1e-6), in fp32) and q is multiplied by scale. Per token t, with log decay g_t <= 0 and
write strength beta_t in (0, 1):

    S   = exp(g_t) * S                    forget
    u   = beta_t * (v_t - k_t^T S)        the part of v_t that S does not yet predict for k_t (the delta)
    S   = S + k_t u^T                     write it
    o_t = q_t^T S                         read

With Hv = G * Hk value heads, value head j reads q/k head j // G. The state is updated in place, so a prompt
and the decode steps that follow it continue one recurrence.

KDA's g_t is a vector over the key channels [Dk] instead of one value per head: row i of S (key channel i)
forgets with its own exp(g_t[i]), i.e. S = diag(exp(g_t)) S. The rest is unchanged.

Two forms here, same signature and results (the torch backend's chunked form, for prompts, is
`fmconvert.runtime.ops.gated_delta_chunked`, per-head g only):
- gated_delta_reference: the recurrence token by token, in torch.
- gated_delta: a fused Triton kernel. One program per (batch, value head, block of BV value columns) holds its
  [Dk, BV] state tile in fp32 registers across a sequential loop over T: decode (T = 1) and prompts alike.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import float_dtype_check, interpreting

L2_EPS = 1e-6
MAX_HEAD_DIM = 256        # the kernel's [BK, BV] tile lives in registers: BK = next_pow2(Dk) <= 256


@triton.jit
def _gated_delta_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, s_ptr, o_ptr,
                        T, HV, GROUP, DK, DV, scale, eps,
                        sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
                        sgb, sgt, sgh, sgk, sbb, sbt, sbh, ssb, ssh, ssk, sob, sot, soh,
                        G_PER_K: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    # grid: (B * HV, cdiv(DV, BV)). The last dims of q, k, v, state and o are contiguous; all other strides are
    # arguments, so slices of a fused projection and a state inside a bigger pool need no copy. G_PER_K: g holds
    # a decay per key channel (KDA), sgk apart; the launcher checks sgk == 1, which the JIT then specializes.
    pid = tl.program_id(0)
    vb = tl.program_id(1)
    b = (pid // HV).to(tl.int64)
    hv = (pid % HV).to(tl.int64)
    hk = hv // GROUP
    offs_k = tl.arange(0, BK)
    offs_v = vb * BV + tl.arange(0, BV)
    k_mask = offs_k < DK
    v_mask = offs_v < DV
    s_mask = k_mask[:, None] & v_mask[None, :]
    s_ptrs = s_ptr + b * ssb + hv * ssh + offs_k[:, None] * ssk + offs_v[None, :]          # [BK, BV]
    S = tl.load(s_ptrs, mask=s_mask, other=0.0)
    q_row = q_ptr + b * sqb + hk * sqh
    k_row = k_ptr + b * skb + hk * skh
    v_row = v_ptr + b * svb + hv * svh
    g_row = g_ptr + b * sgb + hv * sgh
    beta_row = beta_ptr + b * sbb + hv * sbh
    o_row = o_ptr + b * sob + hv * soh
    for _ in range(T):
        # Padded lanes load 0: they add nothing to the norms, and S stays 0 in padded rows.
        k = tl.load(k_row + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        q = tl.load(q_row + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        v = tl.load(v_row + offs_v, mask=v_mask, other=0.0).to(tl.float32)
        if G_PER_K:
            # Padded key rows decay by exp(0) = 1: they hold 0 and stay 0.
            g = tl.load(g_row + offs_k * sgk, mask=k_mask, other=0.0)                      # [BK]
        else:
            g = tl.load(g_row)
        beta = tl.load(beta_row)
        k = k * tl.rsqrt(tl.sum(k * k, axis=0) + eps)
        q = q * (tl.rsqrt(tl.sum(q * q, axis=0) + eps) * scale)
        if G_PER_K:
            S = S * tl.exp(g)[:, None]
        else:
            S = S * tl.exp(g)
        u = beta * (v - tl.sum(S * k[:, None], axis=0))                                      # [BV]
        S = S + k[:, None] * u[None, :]
        o = tl.sum(S * q[:, None], axis=0)
        tl.store(o_row + offs_v, o.to(o_ptr.dtype.element_ty), mask=v_mask)
        # Advance the 64-bit row pointers: t * stride in int32 could overflow on long prompts.
        q_row += sqt
        k_row += skt
        v_row += svt
        g_row += sgt
        beta_row += sbt
        o_row += sot
    tl.store(s_ptrs, S, mask=s_mask)


def _check(q, k, v, g, beta, state):
    """(B, T, Hk, Hv, Dk, Dv) after validating the inputs against each other."""
    float_dtype_check("q", q)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k must be [B, T, Hk, Dk] and v [B, T, Hv, Dv], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2], v.shape[3]
    if k.shape != q.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if Hk == 0 or Hv % Hk != 0:
        raise ValueError(f"value heads ({Hv}) must be a multiple of key heads ({Hk})")
    if tuple(g.shape) not in ((B, T, Hv), (B, T, Hv, Dk)) or g.dtype != torch.float32:
        raise ValueError(f"g must be fp32 {(B, T, Hv)} (per head) or {(B, T, Hv, Dk)} (per key channel), got "
                         f"{g.dtype} {tuple(g.shape)}")
    # Dk <= 1 or no element: any stride reads the same elements.
    if g.dim() == 4 and g.stride(-1) != 1 and Dk > 1 and g.numel() > 0:
        raise ValueError(f"a per-key-channel g needs a contiguous last dim (Dk), got strides {g.stride()}")
    if tuple(beta.shape) != (B, T, Hv) or beta.dtype != torch.float32:
        raise ValueError(f"beta must be fp32 {(B, T, Hv)}, got {beta.dtype} {tuple(beta.shape)}")
    if tuple(state.shape) != (B, Hv, Dk, Dv) or state.dtype != torch.float32:
        raise ValueError(f"state must be fp32 {(B, Hv, Dk, Dv)}, got {state.dtype} {tuple(state.shape)}")
    if any(t.device != q.device for t in (k, v, g, beta, state)):
        raise ValueError(f"q, k, v, g, beta, state must share one device, q is on {q.device}")
    return B, T, Hk, Hv, Dk, Dv


def _block_v(dv):
    # Small tiles: a decode step is memory bound on reading and writing the state once, and more programs
    # (B * Hv * Dv / BV) fill more SMs. [BK, 16] with BK <= 128 is at most 2048 fp32 over one or two warps.
    # The interpreter's 16 also splits Dv = 24..40 across programs, so the tests cover a masked last block.
    return min(triton.next_power_of_2(dv), 16)


def gated_delta(q, k, v, g, beta, state, scale) -> torch.Tensor:
    """o [B, T, Hv, Dv] in v.dtype. q, k [B, T, Hk, Dk], v [B, T, Hv, Dv] (fp32/fp16/bf16; any strides, read in
    place when the last dim is contiguous, else copied); beta [B, T, Hv] fp32 (any strides); g fp32, the log
    decay, [B, T, Hv] per head (Gated DeltaNet, any strides) or [B, T, Hv, Dk] per key channel (KDA, a contiguous
    last dim); state [B, Hv, Dk, Dv] fp32 with a contiguous last dim, the initial state, updated in place to the
    final one. Dk, Dv <= 256. No host syncs: safe to capture in a CUDA graph."""
    B, T, Hk, Hv, Dk, Dv = _check(q, k, v, g, beta, state)
    if Dk > MAX_HEAD_DIM or Dv > MAX_HEAD_DIM:
        raise ValueError(f"head dims must be <= {MAX_HEAD_DIM} (the state tile lives in registers), got Dk={Dk}, "
                         f"Dv={Dv}")
    if state.stride(-1) != 1 and state.numel() > 0:
        raise ValueError(f"state needs a contiguous last dim (it is updated in place), got strides {state.stride()}")
    o = torch.empty(B, T, Hv, Dv, dtype=v.dtype, device=v.device)
    if B == 0 or Hv == 0 or Dk == 0 or Dv == 0 or T == 0:
        # No token (or an empty head): the state stays as it is; Dk = 0 reads nothing, so o is 0.
        return o.zero_()
    # Views of a fused projection keep a contiguous last dim; anything else is rare enough for a copy.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    bk = triton.next_power_of_2(Dk)
    bv = _block_v(Dv)
    per_k = g.dim() == 4
    # ~32 state values a thread: the state tile plus its two products stay in registers without spilling.
    warps = 1 if interpreting() else max(1, min(8, bk * bv // 1024))
    _gated_delta_kernel[(B * Hv, triton.cdiv(Dv, bv))](
        q, k, v, g, beta, state, o,
        T, Hv, Hv // Hk, Dk, Dv, float(scale), L2_EPS,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), g.stride(0), g.stride(1), g.stride(2), g.stride(3) if per_k else 1,
        beta.stride(0), beta.stride(1), beta.stride(2), state.stride(0), state.stride(1), state.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        G_PER_K=per_k, BK=bk, BV=bv, num_warps=warps,
    )
    return o


def _normed_qk(q, k, scale):
    # fp32 [B, T, Hk, Dk] each, L2-normalised over Dk; q also scaled.
    qf, kf = q.float(), k.float()
    qf = qf * torch.rsqrt(qf.pow(2).sum(-1, keepdim=True) + L2_EPS) * scale
    kf = kf * torch.rsqrt(kf.pow(2).sum(-1, keepdim=True) + L2_EPS)
    return qf, kf


def gated_delta_reference(q, k, v, g, beta, state, scale) -> torch.Tensor:
    """The recurrence token by token in fp32; same contract as gated_delta (state updated in place)."""
    B, T, Hk, Hv, Dk, Dv = _check(q, k, v, g, beta, state)
    qf, kf = _normed_qk(q, k, scale)
    # Value head j reads key head j // G.
    qf, kf = (t.repeat_interleave(Hv // Hk, dim=2) for t in (qf, kf))                    # [B, T, Hv, Dk]
    vf, g, beta = v.float(), g.float(), beta.float()
    # exp(g_t) as [B, Hv, 1, 1] per head or [B, Hv, Dk, 1] per key row of S
    g = g[..., None] if g.dim() == 4 else g[..., None, None]
    S = state.float()                                                                     # [B, Hv, Dk, Dv]
    o = torch.empty(B, T, Hv, Dv, dtype=torch.float32, device=v.device)
    for t in range(T):
        S = S * g[:, t].exp()
        u = beta[:, t, :, None] * (vf[:, t] - torch.einsum("bhk,bhkv->bhv", kf[:, t], S))
        S = S + kf[:, t, :, :, None] * u[:, :, None, :]
        o[:, t] = torch.einsum("bhk,bhkv->bhv", qf[:, t], S)
    state.copy_(S)
    return o.to(v.dtype)


__all__ = ["gated_delta", "gated_delta_reference"]
