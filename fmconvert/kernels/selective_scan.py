"""The Mamba2 selective state-space scan (SSD): the mixer of Granite 4.0 hybrid, Bamba, Nemotron-H, Falcon-H1.

Each head h keeps a state S [P, N] (fp32). Heads share B and C within a group: head h reads group h // (H / G).
Per token t, with the step dt_t > 0 (softplus and clamp already applied) and A_h < 0:

    S   = exp(dt_t * A_h) * S + dt_t * x_t B_t^T        decay (the exponent is <= 0), then write x_t along B_t
    y_t = S C_t + D_h * x_t                             read along C_t, plus the skip term

x_t [P] is the head's slice of the token; B_t, C_t [N] its group's. The math is fp32 and y is rounded once to
x's dtype. The state is updated in place, so a prompt and the decode steps after it continue one recurrence.

Two forms here, same signature and results (the torch backend's chunked form, for prompts, is
`fmconvert.runtime.ops.ssm_scan_chunked`):
- ssm_scan_reference: the recurrence token by token, in torch.
- ssm_scan: a fused Triton kernel. One program per (batch, head, block of BP rows of P) holds its [BP, N] state
  tile in fp32 registers across a sequential loop over T: decode (T = 1) and prompts alike.

The module is not named ssm_scan: a submodule named like its function would shadow the function on the package
once imported (`kernels.ssm_scan` would be the module), and the lazy `kernels.__getattr__` would never run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import float_dtype_check, interpreting

MAX_STATE = 256           # the kernel's [BP, BN] tile lives in registers: BN = next_pow2(N) <= 256


@triton.jit
def _ssm_scan_kernel(x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, s_ptr, y_ptr,
                     T, H, GROUP, P, N,
                     sxb, sxt, sxh, sdb, sdt, sdh, sa, sd, sbb, sbt, sbg, scb, sct, scg,
                     ssb, ssh, ssp, syb, syt, syh,
                     HAS_D: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    # grid: (B * H, cdiv(P, BP)). The last dims of x, B, C, state and y are contiguous; every other stride is an
    # argument, so slices of the fused projection and a state inside a bigger pool need no copy.
    pid = tl.program_id(0)
    pb = tl.program_id(1)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    g = h // GROUP
    offs_p = pb * BP + tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    p_mask = offs_p < P
    n_mask = offs_n < N
    s_mask = p_mask[:, None] & n_mask[None, :]
    s_ptrs = s_ptr + b * ssb + h * ssh + offs_p[:, None] * ssp + offs_n[None, :]           # [BP, BN]
    S = tl.load(s_ptrs, mask=s_mask, other=0.0)
    a = tl.load(a_ptr + h * sa)
    if HAS_D:
        skip = tl.load(d_ptr + h * sd)
    else:
        skip = 0.0
    x_row = x_ptr + b * sxb + h * sxh
    dt_row = dt_ptr + b * sdb + h * sdh
    b_row = b_ptr + b * sbb + g * sbg
    c_row = c_ptr + b * scb + g * scg
    y_row = y_ptr + b * syb + h * syh
    for _ in range(T):
        # Padded lanes load 0: padded columns of S stay 0 and add nothing to y.
        x = tl.load(x_row + offs_p, mask=p_mask, other=0.0).to(tl.float32)
        bt = tl.load(b_row + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        ct = tl.load(c_row + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        dt = tl.load(dt_row)
        S = S * tl.exp(dt * a) + (dt * x)[:, None] * bt[None, :]
        y = tl.sum(S * ct[None, :], axis=1) + skip * x                                       # [BP]
        tl.store(y_row + offs_p, y.to(y_ptr.dtype.element_ty), mask=p_mask)
        # Advance the 64-bit row pointers: t * stride in int32 could overflow on long prompts.
        x_row += sxt
        dt_row += sdt
        b_row += sbt
        c_row += sct
        y_row += syt
    tl.store(s_ptrs, S, mask=s_mask)


def _check(x, dt, A, Bm, Cm, D, state):
    """(B, T, H, P, G, N) after validating the inputs against each other."""
    float_dtype_check("x", x)
    if x.dim() != 4 or Bm.dim() != 4 or Cm.dim() != 4:
        raise ValueError(f"x must be [B, T, H, P] and Bm, Cm [B, T, G, N], got {tuple(x.shape)}, "
                         f"{tuple(Bm.shape)}, {tuple(Cm.shape)}")
    B, T, H, P = x.shape
    G, N = Bm.shape[2], Bm.shape[3]
    if Cm.shape != Bm.shape or Bm.shape[:2] != x.shape[:2]:
        raise ValueError(f"x {tuple(x.shape)}, Bm {tuple(Bm.shape)}, Cm {tuple(Cm.shape)} do not match")
    if Bm.dtype != x.dtype or Cm.dtype != x.dtype:
        raise ValueError(f"x, Bm, Cm dtypes differ: {x.dtype}, {Bm.dtype}, {Cm.dtype}")
    if G == 0 or H % G != 0:
        raise ValueError(f"heads ({H}) must be a multiple of the groups of Bm and Cm ({G})")
    if tuple(dt.shape) != (B, T, H) or dt.dtype != torch.float32:
        raise ValueError(f"dt must be fp32 {(B, T, H)}, got {dt.dtype} {tuple(dt.shape)}")
    for name, t in (("A", A), ("D", D)):
        if t is not None and (tuple(t.shape) != (H,) or t.dtype != torch.float32):
            raise ValueError(f"{name} must be fp32 {(H,)}, got {t.dtype} {tuple(t.shape)}")
    if tuple(state.shape) != (B, H, P, N) or state.dtype != torch.float32:
        raise ValueError(f"state must be fp32 {(B, H, P, N)}, got {state.dtype} {tuple(state.shape)}")
    if any(t is not None and t.device != x.device for t in (dt, A, Bm, Cm, D, state)):
        raise ValueError(f"x, dt, A, Bm, Cm, D, state must share one device, x is on {x.device}")
    return B, T, H, P, G, N


def _block_p(p):
    # Small tiles: a decode step is memory bound on reading and writing the state once, and more programs
    # (B * H * P / BP) fill more SMs: Granite 4 (H = 48..128, P = 64) has 192+ per sequence with BP = 16.
    # The 16 also splits P = 24..40 across programs in the tests, so a masked last block is covered.
    return min(triton.next_power_of_2(p), 16)


def ssm_scan(x, dt, A, Bm, Cm, D, state) -> torch.Tensor:
    """y [B, T, H, P] in x.dtype. x [B, T, H, P], Bm and Cm [B, T, G, N] (fp32/fp16/bf16, one dtype; any strides,
    read in place when the last dim is contiguous, else copied); dt [B, T, H] fp32, the final step (any strides);
    A, D [H] fp32 (D may be None); state [B, H, P, N] fp32 with a contiguous last dim, the initial state, updated
    in place to the final one. N <= 256, any P. No host syncs: safe to capture in a CUDA graph."""
    B, T, H, P, G, N = _check(x, dt, A, Bm, Cm, D, state)
    if N > MAX_STATE:
        raise ValueError(f"state size N must be <= {MAX_STATE} (the state tile lives in registers), got {N}")
    if state.stride(-1) != 1 and state.numel() > 0:
        raise ValueError(f"state needs a contiguous last dim (it is updated in place), got strides {state.stride()}")
    y = torch.empty(B, T, H, P, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y                                     # no token or an empty head: the state stays as it is
    # Views of a fused projection keep a contiguous last dim; anything else is rare enough for a copy.
    x, Bm, Cm = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, Bm, Cm))
    bp = _block_p(P)
    bn = triton.next_power_of_2(max(N, 1))           # N = 0: one masked lane, S C = 0 and y = D x
    # ~32 state values a thread: [16, 128] fp32 (P = 64 in 4 blocks, N = 128) is 2048 values over 2 warps, and
    # the decayed tile plus its product with C stay in registers without spilling. N = 256: 4 warps.
    warps = 1 if interpreting() else max(1, min(8, bp * bn // 1024))
    has_d = D is not None
    _ssm_scan_kernel[(B * H, triton.cdiv(P, bp))](
        x, dt, A, Bm, Cm, D if has_d else A, state, y,
        T, H, H // G, P, N,
        x.stride(0), x.stride(1), x.stride(2), dt.stride(0), dt.stride(1), dt.stride(2),
        A.stride(0), D.stride(0) if has_d else 0,
        Bm.stride(0), Bm.stride(1), Bm.stride(2), Cm.stride(0), Cm.stride(1), Cm.stride(2),
        state.stride(0), state.stride(1), state.stride(2), y.stride(0), y.stride(1), y.stride(2),
        HAS_D=has_d, BP=bp, BN=bn, num_warps=warps,
    )
    return y


def ssm_scan_reference(x, dt, A, Bm, Cm, D, state) -> torch.Tensor:
    """The recurrence token by token in fp32; same contract as ssm_scan (state updated in place)."""
    B, T, H, P, G, N = _check(x, dt, A, Bm, Cm, D, state)
    xf = x.float()
    # Head h reads group h // (H / G).
    Bf, Cf = (t.float().repeat_interleave(H // G, dim=2) for t in (Bm, Cm))              # [B, T, H, N]
    S = state.float()                                                                     # [B, H, P, N]
    y = torch.empty(B, T, H, P, dtype=torch.float32, device=x.device)
    for t in range(T):
        dtt = dt[:, t].float()                                                            # [B, H]
        S = S * torch.exp(dtt * A)[..., None, None] + (dtt[..., None] * xf[:, t])[..., None] * Bf[:, t, :, None]
        y[:, t] = torch.einsum("bhpn,bhn->bhp", S, Cf[:, t])
    if D is not None:
        y = y + D[:, None] * xf
    state.copy_(S)
    return y.to(x.dtype)


__all__ = ["ssm_scan", "ssm_scan_reference"]
