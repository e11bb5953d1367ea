"""The Mamba (version 1) selective scan: the mixer of MambaForCausalLM, FalconMamba and Jamba's mamba layers.

Unlike Mamba2 (kernels/selective_scan.py), every channel d of the inner dim Dc has its own decay row A[d, :] over the
N states and its own step dt[d]; B_t and C_t [N] are shared by all channels of a token. Per token t and channel d,
with the state S [Dc, N] in fp32 and dt_raw already holding dt_proj's bias:

    dt      = softplus(dt_raw[t, d])   (or dt_raw itself with softplus=False)
    S[d, :] = exp(dt * A[d, :]) * S[d, :] + dt * x[t, d] * B_t      decay (A < 0), then write x along B_t
    y[t, d] = S[d, :] . C_t + D[d] * x[t, d]                         read along C_t, plus the skip term (if D)
    y[t, d] = y[t, d] * silu(z[t, d])                                the gate (if z)

This is transformers' MambaMixer recurrence (mamba_selective_scan / mamba_selective_state_update), but all in fp32
with y rounded once to x's dtype. The state is updated in place, so a prompt and the decode steps after it continue
one recurrence.

Two forms here, same signature and results:
- mamba_scan_reference: the recurrence token by token, in torch.
- mamba_scan: a fused Triton kernel. One program per (batch, block of BD channels) holds its [BD, BN] state tile and
  the matching rows of A in fp32 registers across a sequential loop over T: decode (T = 1) and prompts alike.

The module is not named mamba_scan: a submodule named like its function would shadow the function on the package
once imported, and the lazy `kernels.__getattr__` would never run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import float_dtype_check, interpreting, sigmoid

MAX_STATE = 256  # the [BD, BN] tiles live in registers: BN = next_pow2(N) <= 256


@triton.jit
def _softplus(v):
    # max(v, 0) + log1p(exp(-|v|)): exp never overflows. 1 + u rounds away most of a small u; scaling log(w) by
    # u / (w - 1) restores it (Goldberg's log1p), so dt ~ 1e-5 from v ~ -11 keeps its digits as in torch.
    u = tl.exp(-tl.abs(v))
    w = 1.0 + u
    den = w - 1.0
    lp = tl.where(den == 0.0, u, tl.log(w) * (u / tl.where(den == 0.0, 1.0, den)))
    return tl.where(v > 20.0, v, tl.maximum(v, 0.0) + lp)               # torch's default threshold


@triton.jit
def _mamba_scan_kernel(x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, s_ptr, y_ptr,
                       T, DC, N,
                       sxb, sxt, sdb, sdt, sa, sbb, sbt, scb, sct, szb, szt, ssb, ssd, syb, syt,
                       HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
                       BD: tl.constexpr, BN: tl.constexpr):
    # grid: (cdiv(DC, BD), B). The last dims of every tensor are contiguous; all other strides are arguments, so
    # slices of the fused in_proj / x_proj outputs and a state inside a bigger pool need no copy.
    pd = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pd * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    d_mask = offs_d < DC
    n_mask = offs_n < N
    tile_mask = d_mask[:, None] & n_mask[None, :]
    # Padded lanes load 0: A = 0 decays by exp(0) = 1 a zero state that B = 0 never writes, so they add nothing.
    A = tl.load(a_ptr + offs_d[:, None] * sa + offs_n[None, :], mask=tile_mask, other=0.0)           # [BD, BN]
    s_ptrs = s_ptr + b * ssb + offs_d[:, None] * ssd + offs_n[None, :]
    S = tl.load(s_ptrs, mask=tile_mask, other=0.0)
    if HAS_D:
        skip = tl.load(d_ptr + offs_d, mask=d_mask, other=0.0)
    x_row = x_ptr + b * sxb
    dt_row = dt_ptr + b * sdb
    b_row = b_ptr + b * sbb
    c_row = c_ptr + b * scb
    z_row = z_ptr + b * szb
    y_row = y_ptr + b * syb
    for _ in range(T):
        x = tl.load(x_row + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        dt = tl.load(dt_row + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        if SOFTPLUS:
            dt = _softplus(dt)
        bt = tl.load(b_row + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        ct = tl.load(c_row + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        S = tl.exp(dt[:, None] * A) * S + (dt * x)[:, None] * bt[None, :]
        y = tl.sum(S * ct[None, :], axis=1)                                                         # [BD]
        if HAS_D:
            y += skip * x
        if HAS_Z:
            zt = tl.load(z_row + offs_d, mask=d_mask, other=0.0).to(tl.float32)
            y = y * (zt * sigmoid(zt))
        tl.store(y_row + offs_d, y.to(y_ptr.dtype.element_ty), mask=d_mask)
        # Advance the 64-bit row pointers: t * stride in int32 could overflow on long prompts.
        x_row += sxt
        dt_row += sdt
        b_row += sbt
        c_row += sct
        z_row += szt
        y_row += syt
    tl.store(s_ptrs, S, mask=tile_mask)


def _check(x, dt, A, Bm, Cm, D, z, state):
    """(B, T, Dc, N) after validating the inputs against each other."""
    float_dtype_check("x", x)
    float_dtype_check("dt", dt)
    if x.dim() != 3 or Bm.dim() != 3 or Cm.dim() != 3:
        raise ValueError(f"x must be [B, T, Dc] and Bm, Cm [B, T, N], got {tuple(x.shape)}, {tuple(Bm.shape)}, "
                         f"{tuple(Cm.shape)}")
    B, T, Dc = x.shape
    N = Bm.shape[2]
    if Cm.shape != Bm.shape or Bm.shape[:2] != x.shape[:2]:
        raise ValueError(f"x {tuple(x.shape)}, Bm {tuple(Bm.shape)}, Cm {tuple(Cm.shape)} do not match")
    if Bm.dtype != x.dtype or Cm.dtype != x.dtype:
        raise ValueError(f"x, Bm, Cm dtypes differ: {x.dtype}, {Bm.dtype}, {Cm.dtype}")
    if dt.shape != x.shape:
        raise ValueError(f"dt must be {tuple(x.shape)} like x, got {tuple(dt.shape)}")
    if z is not None and (z.shape != x.shape or z.dtype != x.dtype):
        raise ValueError(f"z must be {x.dtype} {tuple(x.shape)} like x, got {z.dtype} {tuple(z.shape)}")
    if tuple(A.shape) != (Dc, N) or A.dtype != torch.float32:
        raise ValueError(f"A must be fp32 {(Dc, N)}, got {A.dtype} {tuple(A.shape)}")
    if D is not None and (tuple(D.shape) != (Dc,) or D.dtype != torch.float32):
        raise ValueError(f"D must be fp32 {(Dc,)}, got {D.dtype} {tuple(D.shape)}")
    if tuple(state.shape) != (B, Dc, N) or state.dtype != torch.float32:
        raise ValueError(f"state must be fp32 {(B, Dc, N)}, got {state.dtype} {tuple(state.shape)}")
    if any(t is not None and t.device != x.device for t in (dt, A, Bm, Cm, D, z, state)):
        raise ValueError(f"x, dt, A, Bm, Cm, D, z, state must share one device, x is on {x.device}")
    return B, T, Dc, N


def _block_d(n):
    # A [BD, BN] state tile of <= 2048 values: N = 16 (every Mamba1 model) gives BD = 64, so FalconMamba-7B's 8192
    # channels make 128 programs a sequence, about one per SM of an H100. N = 256 still gets 8 rows.
    return min(64, 2048 // triton.next_power_of_2(max(n, 1)))


def _num_warps(bd, bn):
    # ~32 tile values a thread, counting A's tile beside the state's (ssm_scan holds only the state at 32): the
    # decayed tile and its product with C stay in registers. [64, 16] -> 2 warps, [8, 256] -> 4.
    return max(1, min(8, bd * bn // 512))


def mamba_scan(x, dt, A, Bm, Cm, D, z, state, softplus=True) -> torch.Tensor:
    """y [B, T, Dc] in x.dtype, contiguous. x, z [B, T, Dc] and Bm, Cm [B, T, N] share one float dtype
    (fp32/fp16/bf16); dt [B, T, Dc] any float dtype, the raw step with dt_proj's bias (softplus applied here unless
    softplus=False); A [Dc, N] fp32 (-exp(A_log)); D [Dc] fp32; z and D may be None; state [B, Dc, N] fp32, the
    initial state, updated in place to the final one. Every tensor needs a contiguous last dim; other strides are
    free (views of fused projections, a state inside a pool). N <= 256. No host syncs: safe in a CUDA graph."""
    B, T, Dc, N = _check(x, dt, A, Bm, Cm, D, z, state)
    if N > MAX_STATE:
        raise ValueError(f"state size N must be <= {MAX_STATE} (the state tile lives in registers), got {N}")
    for name, t in (("x", x), ("dt", dt), ("z", z), ("Bm", Bm), ("Cm", Cm), ("A", A), ("state", state)):
        # a size-1 dim's stride is never used
        if t is not None and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dim, got strides {t.stride()}")
    y = torch.empty(B, T, Dc, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y                                     # no token or no channel: the state stays as it is
    bd = _block_d(N)
    bn = triton.next_power_of_2(max(N, 1))           # N = 0: one masked lane, S C = 0 and y = D x
    warps = 1 if interpreting() else _num_warps(bd, bn)
    has_d, has_z = D is not None, z is not None
    _mamba_scan_kernel[(triton.cdiv(Dc, bd), B)](
        x, dt, A, Bm, Cm, D if has_d else A, z if has_z else x, state, y,
        T, Dc, N,
        x.stride(0), x.stride(1), dt.stride(0), dt.stride(1), A.stride(0), Bm.stride(0), Bm.stride(1),
        Cm.stride(0), Cm.stride(1), z.stride(0) if has_z else 0, z.stride(1) if has_z else 0,
        state.stride(0), state.stride(1), y.stride(0), y.stride(1),
        HAS_D=has_d, HAS_Z=has_z, SOFTPLUS=bool(softplus), BD=bd, BN=bn, num_warps=warps,
    )
    return y


def mamba_scan_reference(x, dt, A, Bm, Cm, D, z, state, softplus=True) -> torch.Tensor:
    """The recurrence token by token in fp32; same contract as mamba_scan (state updated in place)."""
    B, T, Dc, N = _check(x, dt, A, Bm, Cm, D, z, state)
    xf, Bf, Cf = x.float(), Bm.float(), Cm.float()
    dtf = F.softplus(dt.float()) if softplus else dt.float()          # torch's default threshold of 20
    S = state.float()                                                 # [B, Dc, N]
    y = torch.empty(B, T, Dc, dtype=torch.float32, device=x.device)
    for t in range(T):
        d = dtf[:, t]                                                 # [B, Dc]
        S = torch.exp(d[..., None] * A) * S + (d * xf[:, t])[..., None] * Bf[:, t, None, :]
        y[:, t] = torch.einsum("bdn,bn->bd", S, Cf[:, t])
    if D is not None:
        y = y + D * xf
    if z is not None:
        y = y * F.silu(z.float())
    state.copy_(S)
    return y.to(x.dtype)


__all__ = ["mamba_scan", "mamba_scan_reference"]
