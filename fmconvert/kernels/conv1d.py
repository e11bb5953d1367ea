"""Causal depthwise conv1d over time with a rolling state, SiLU fused: Gated DeltaNet's short conv on q|k|v
(Qwen3-Next, Qwen3.5).

x [B, T, C] is preceded by the K - 1 inputs the state holds (oldest first); with xin = concat(state, x) along time
(length K - 1 + T) and weight [C, K] (tap K - 1 multiplies the newest input):

    out[b, t, c] = act(bias[c] + sum_{j < K} weight[c, j] * xin[b, t + j, c])       act = SiLU or identity

in fp32, stored in x's dtype. The state is then set, in place, to the last K - 1 inputs of xin (for T < K - 1 a
shift by T), so a prompt and the decode steps after it are one convolution. No state: zeros before x, nothing kept.

- causal_conv1d_reference: F.conv1d over the concatenation, in torch.
- causal_conv1d: one Triton launch, any T. One program per (batch, block of BT steps, block of BC channels).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import float_dtype_check, sigmoid


@triton.jit
def _causal_conv1d_kernel(x_ptr, w_ptr, b_ptr, s_ptr, o_ptr, T, C,
                          sxb, sxt, sxc, swc, swk, ssb, ssc, ssk, sob, sot,
                          K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, SILU: tl.constexpr,
                          BT: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr):
    # grid: (B * cdiv(T, BT), cdiv(C, BC)). Every stride is an argument: x may be a slice of a fused projection,
    # the state a slot of a cache pool. o is a contiguous [B, T, C].
    # No race on the state: only the programs of the first time block (tb == 0) read the old state (a row
    # t + j - (K - 1) < 0 needs t < K - 1 <= BT), and the same program writes the new one, after its reads.
    pid = tl.program_id(0)
    cb = tl.program_id(1)
    n_tb = tl.cdiv(T, BT)
    b = (pid // n_tb).to(tl.int64)
    tb = pid % n_tb
    offs_t = tb.to(tl.int64) * BT + tl.arange(0, BT)
    offs_c = cb * BC + tl.arange(0, BC)
    c_mask = offs_c < C
    tile_mask = (offs_t < T)[:, None] & c_mask[None, :]                                  # [BT, BC]
    x_base = x_ptr + b * sxb + offs_c[None, :] * sxc
    s_base = s_ptr + b * ssb + offs_c[None, :] * ssc
    acc = tl.zeros((BT, BC), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(K):
        w = tl.load(w_ptr + offs_c * swc + j * swk, mask=c_mask, other=0.0).to(tl.float32)
        src = offs_t + (j - (K - 1))                   # [BT]: time in x of tap j; < 0 is state column K - 1 + src
        v = tl.load(x_base + src[:, None] * sxt, mask=tile_mask & (src >= 0)[:, None], other=0.0).to(tl.float32)
        if HAS_STATE:
            v += tl.load(s_base + (src + (K - 1))[:, None] * ssk, mask=tile_mask & (src < 0)[:, None],
                         other=0.0).to(tl.float32)
        acc += w[None, :] * v
    if SILU:
        acc = acc * sigmoid(acc)
    tl.store(o_ptr + b * sob + offs_t[:, None] * sot + offs_c[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=tile_mask)
    if HAS_STATE:
        if tb == 0:
            # New state column i is xin[T + i]: x row T + i - (K - 1), or old state column T + i when T < K - 1.
            # (its own name: the compiler refuses a loop variable re-typed in a branch, the interpreter does not)
            offs_k = tl.arange(0, BS)
            col = T - (K - 1) + offs_k
            m = (offs_k < K - 1)[:, None] & c_mask[None, :]                              # [BS, BC]
            xv = tl.load(x_base + col[:, None] * sxt, mask=m & (col >= 0)[:, None], other=0.0)
            sv = tl.load(s_base + (col + (K - 1))[:, None] * ssk, mask=m & (col < 0)[:, None], other=0.0)
            new = tl.where((col >= 0)[:, None], xv.to(tl.float32), sv.to(tl.float32))
            # Threads of this program may own other columns than the ones they read: all reads land first.
            tl.debug_barrier()
            tl.store(s_base + offs_k[:, None] * ssk, new.to(s_ptr.dtype.element_ty), mask=m)


def _check(x, weight, bias, state):
    """(B, T, C, K) after validating the inputs against each other."""
    float_dtype_check("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, C], got {tuple(x.shape)}")
    B, T, C = x.shape
    if weight.dim() != 2 or weight.shape[0] != C or weight.shape[1] < 1:
        raise ValueError(f"weight must be [C={C}, K] with K >= 1, got {tuple(weight.shape)}")
    K = weight.shape[1]
    float_dtype_check("weight", weight)
    if bias is not None and (tuple(bias.shape) != (C,) or not bias.is_floating_point()):
        raise ValueError(f"bias must be a float ({C},), got {bias.dtype} {tuple(bias.shape)}")
    if state is not None:
        float_dtype_check("state", state)
        if tuple(state.shape) != (B, C, K - 1):
            raise ValueError(f"state must be [B, C, K - 1] = {(B, C, K - 1)}, got {tuple(state.shape)}")
    if any(t is not None and t.device != x.device for t in (weight, bias, state)):
        raise ValueError(f"x, weight, bias, state must share one device, x is on {x.device}")
    return B, T, C, K


def causal_conv1d(x, weight, bias, state, silu=True) -> torch.Tensor:
    """out [B, T, C] contiguous in x's dtype. x [B, T, C] fp32/fp16/bf16, any strides (a slice of a wider projection
    is read in place); weight [C, K]; bias [C] or None; state [B, C, K - 1] (any float dtype, any strides) or None,
    updated in place. One launch, no host syncs: safe to capture in a CUDA graph. x must not overlap state."""
    B, T, C, K = _check(x, weight, bias, state)
    out = torch.empty(B, T, C, dtype=x.dtype, device=x.device)
    if B == 0 or T == 0 or C == 0:
        return out
    # The old state is read by rows t < min(T, K - 1): all in the first time block while BT >= that (the kernel's
    # race-free argument). Decode (T = 1) gets BT = 1.
    bt = min(triton.next_power_of_2(T), max(16, triton.next_power_of_2(K - 1)))
    bc = min(triton.next_power_of_2(C), 64)
    bs = triton.next_power_of_2(max(K - 1, 1))
    s = state if state is not None else out
    _causal_conv1d_kernel[(B * triton.cdiv(T, bt), triton.cdiv(C, bc))](
        x, weight, bias.contiguous() if bias is not None else weight, s, out, T, C,
        x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1),
        s.stride(0), s.stride(1), s.stride(2), out.stride(0), out.stride(1),
        K=K, HAS_BIAS=bias is not None, HAS_STATE=state is not None, SILU=bool(silu), BT=bt, BC=bc, BS=bs,
        num_warps=max(1, min(4, bt * bc // 256)),
    )
    return out


def causal_conv1d_reference(x, weight, bias, state, silu=True) -> torch.Tensor:
    """Same contract as causal_conv1d: F.conv1d (no padding) over concat(state, x) in fp32."""
    B, T, C, K = _check(x, weight, bias, state)
    if C == 0:
        return x.new_empty(B, T, 0)
    prev = state.float() if state is not None else x.new_zeros(B, C, K - 1, dtype=torch.float32)
    xin = torch.cat([prev, x.float().transpose(1, 2)], dim=-1)                       # (B, C, K - 1 + T)
    y = F.conv1d(xin, weight.float().unsqueeze(1), None if bias is None else bias.float(), groups=C)  # (B, C, T)
    if silu:
        y = F.silu(y)
    if state is not None:
        state.copy_(xin[..., T:])
    return y.transpose(1, 2).contiguous().to(x.dtype)


__all__ = ["causal_conv1d", "causal_conv1d_reference"]
