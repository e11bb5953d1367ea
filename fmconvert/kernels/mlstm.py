"""The mLSTM recurrence of xLSTM (its matrix memory with exponential gating), per batch row and head, in fp32:

    m' = max(logsigmoid(f) + m, i)          a = exp(logsigmoid(f) + m - m')          b = exp(i - m')
    C  = a C + b k v^T       n = a n + b k       m = m'
    y  = (q' C) / (max(|q' . n|, exp(-m)) + eps)          with q' = q / sqrt(dk)

q, k [.., dk], v [.., dv], the gates i and f one number each (already soft-capped: runtime/model.py, Block.mlstm). The
state packs C, n and m in one fp32 tensor [B, H, dk + 1, dv + 1]: C its [:dk, :dv], n its column dv, m its [dk, 0]; a
zero state is the start of a sequence (m = 0, as transformers starts it). It is updated in place, so a prompt and
the decode steps after it continue one recurrence.

Two forms here, same signature and results:
- mlstm_scan_reference: the recurrence token by token, in torch.
- mlstm_scan: a Triton kernel. One program per (batch row and head, block of BV value channels) keeps its columns of C,
  and the whole n and m (each program of a head computes them alike), in fp32 registers across a sequential loop
  over T: decode (T = 1) and prompts alike, one launch instead of T.

The module is not named mlstm_scan: a submodule named like its function would shadow the function on the package
once imported.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import float_dtype_check, interpreting

BLOCK_V = 32


@triton.jit
def _mlstm_kernel(q_ptr, k_ptr, v_ptr, i_ptr, f_ptr, s_ptr, nm_ptr, y_ptr, T, H, DK, DV, scale, eps,
                  sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sgb, sgt, sgh, ssb, ssh, ssk, syb, syt, syh,
                  BK: tl.constexpr, BV: tl.constexpr):
    # grid: (cdiv(DV, BV), B * H); every tensor's last dim contiguous, the rest strided. Masked lanes load 0.
    pv = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    ok = tl.arange(0, BK)
    ov = pv * BV + tl.arange(0, BV)
    mk, mv = ok < DK, ov < DV
    s_row = s_ptr + b * ssb + h * ssh
    c = tl.load(s_row + ok[:, None] * ssk + ov[None, :], mask=mk[:, None] & mv[None, :], other=0.0)   # [BK, BV]
    # n and m as they were before the launch (a copy: the head's first program writes the state's own)
    nm_row = nm_ptr + bh.to(tl.int64) * (DK + 1)
    n = tl.load(nm_row + ok, mask=mk, other=0.0)
    m = tl.load(nm_row + DK)
    q_row = q_ptr + b * sqb + h * sqh
    k_row = k_ptr + b * skb + h * skh
    v_row = v_ptr + b * svb + h * svh
    g_off = b * sgb + h * sgh
    y_row = y_ptr + b * syb + h * syh
    for _ in range(T):
        q = tl.load(q_row + ok, mask=mk, other=0.0).to(tl.float32) * scale
        k = tl.load(k_row + ok, mask=mk, other=0.0).to(tl.float32)
        v = tl.load(v_row + ov, mask=mv, other=0.0).to(tl.float32)
        ig = tl.load(i_ptr + g_off).to(tl.float32)
        fg = tl.load(f_ptr + g_off).to(tl.float32)
        flog = tl.minimum(fg, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(fg)))        # logsigmoid(f), stable
        m_new = tl.maximum(flog + m, ig)
        a = tl.exp(flog + m - m_new)
        bi = tl.exp(ig - m_new)
        c = a * c + bi * (k[:, None] * v[None, :])
        n = a * n + bi * k
        num = tl.sum(q[:, None] * c, axis=0)                                  # [BV]
        den = tl.maximum(tl.abs(tl.sum(q * n, axis=0)), tl.exp(-m_new)) + eps
        tl.store(y_row + ov, (num / den).to(y_ptr.dtype.element_ty), mask=mv)
        m = m_new
        # 64-bit row pointers advance by a stride each token
        q_row += sqt
        k_row += skt
        v_row += svt
        g_off += sgt
        y_row += syt
    tl.store(s_row + ok[:, None] * ssk + ov[None, :], c, mask=mk[:, None] & mv[None, :])
    if pv == 0:                       # n and m: one copy, from the head's first block
        tl.store(s_row + ok * ssk + DV, n, mask=mk)
        tl.store(s_row + DK * ssk, m)


def _check(q, k, v, i, f, state):
    """(B, T, H, DK, DV) after validating the inputs against each other."""
    for name, t in (("q", q), ("k", k), ("v", v), ("i", i), ("f", f)):
        float_dtype_check(name, t)
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q and k must be [B, T, H, dk] and v [B, T, H, dv], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    B, T, H, DK = q.shape
    DV = v.shape[-1]
    if i.shape != (B, T, H) or f.shape != (B, T, H):
        raise ValueError(f"the gates i and f must be [B, T, H] = {(B, T, H)}, got {tuple(i.shape)} and "
                         f"{tuple(f.shape)}")
    if tuple(state.shape) != (B, H, DK + 1, DV + 1) or state.dtype != torch.float32:
        raise ValueError(f"state must be fp32 {(B, H, DK + 1, DV + 1)}, got {state.dtype} {tuple(state.shape)}")
    if any(t.device != q.device for t in (k, v, i, f, state)):
        raise ValueError(f"every input must be on q's device, {q.device}")
    return B, T, H, DK, DV


def mlstm_scan(q, k, v, i, f, state, eps: float = 1e-6) -> torch.Tensor:
    """y [B, T, H, dv] in v.dtype: the mLSTM's output after each token. q, k [B, T, H, dk], v [B, T, H, dv], the
    gates i, f [B, T, H] (their pre-activations; any float dtypes), state [B, H, dk + 1, dv + 1] fp32 (see the module
    docstring), updated in place. Every tensor needs a contiguous last dim (the gates: unit strides are not needed).
    No host syncs: safe in a CUDA graph."""
    B, T, H, DK, DV = _check(q, k, v, i, f, state)
    for name, t in (("q", q), ("k", k), ("v", v), ("state", state)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dim, got strides {t.stride()}")
    if i.stride() != f.stride():
        i, f = i.contiguous(), f.contiguous()
    y = torch.empty(B, T, H, DV, dtype=v.dtype, device=v.device)
    if y.numel() == 0:
        return y                                     # no token: the state stays as it is
    bk = triton.next_power_of_2(DK)
    bv = min(BLOCK_V, triton.next_power_of_2(DV))
    # every program of a head reads n and m from here: [B * H, DK + 1], n then m
    nm = torch.cat([state[..., :DK, DV], state[..., DK, :1]], -1).contiguous()
    _mlstm_kernel[(triton.cdiv(DV, bv), B * H)](
        q, k, v, i, f, state, nm, y, T, H, DK, DV, DK ** -0.5, eps,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), i.stride(0), i.stride(1), i.stride(2), state.stride(0), state.stride(1), state.stride(2),
        y.stride(0), y.stride(1), y.stride(2), BK=bk, BV=bv,
        num_warps=1 if interpreting() else max(1, min(8, bk * bv // 1024)))
    return y


def mlstm_scan_reference(q, k, v, i, f, state, eps: float = 1e-6) -> torch.Tensor:
    """The recurrence token by token in fp32; same contract as mlstm_scan (state updated in place)."""
    B, T, H, DK, DV = _check(q, k, v, i, f, state)
    C, n, m = state[..., :DK, :DV].clone(), state[..., :DK, DV].clone(), state[..., DK, 0].clone()
    y = torch.empty(B, T, H, DV, dtype=v.dtype, device=v.device)
    for t in range(T):
        qt, kt, vt = q[:, t].float() * DK ** -0.5, k[:, t].float(), v[:, t].float()        # [B, H, d]
        flog = torch.nn.functional.logsigmoid(f[:, t].float())
        m_new = torch.maximum(flog + m, i[:, t].float())
        a, b = torch.exp(flog + m - m_new), torch.exp(i[:, t].float() - m_new)
        C = a[..., None, None] * C + b[..., None, None] * kt[..., :, None] * vt[..., None, :]
        n = a[..., None] * n + b[..., None] * kt
        den = torch.maximum((qt * n).sum(-1).abs(), torch.exp(-m_new)) + eps
        y[:, t] = (torch.einsum("bhk,bhkv->bhv", qt, C) / den[..., None]).to(v.dtype)
        m = m_new
    state[..., :DK, :DV] = C
    state[..., :DK, DV] = n
    state[..., DK, 0] = m
    return y


__all__ = ["mlstm_scan", "mlstm_scan_reference"]
