"""Float GEMV for decode: y = act(x @ weight.T + bias) for one to DECODE_MAX_M rows of x, weight bf16/fp16/fp32
[N, K] in the torch Linear layout, fp32 accumulation.

cuBLAS is the float matmul of choice, and at large shapes it reads the weight near the card's bandwidth. At one
token and a narrow output it does not: on an H200 (gpu_check, 2026-11-27) bf16 `F.linear` ran at 2.5 TB/s for
4096x4096 and 3.2 TB/s for 4096x11008 (split-K and a reduce kernel) against 3.9 TB/s for 14336x4096, and a gated
MLP pays a second launch for its activation. This kernel streams the weight once in 16-byte vectors: a program owns
BLOCK_N output rows, keeps a [BLOCK_N, BLOCK_K] fp32 tile of products in registers across the whole K walk and
reduces it once at the end, so the inner loop is a load, a convert and a multiply-add per element. With a gated
activation a program walks the matching gate and up rows together (one tile of 2 * BLOCK_N rows) and writes
act(gate) * up directly.

Which of the two wins depends on the shape and the card, so the runtime measures both once per shape
(runtime/ops.py, TritonOps.linear) and keeps the faster.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (
    GATED_CODES,
    activate,
    activate_reference,
    configs,
    float_dtype_check,
    gated_product,
    linear_epilogue,
    tuner_bench,
)

DECODE_MAX_M = 4


@triton.jit
def float_rows(x_row, w_ptr, rows, row_mask, K, stride_wn,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    # [BLOCK_N] fp32 dot products of x_row with the float weight rows `rows`. No scales, so each thread keeps its own
    # fp32 products over the whole walk of K and the tile is reduced once at the end (the int8 walk reduces every
    # step, to apply each group's scale). Also the float walk of the expert GEMV (int8_matmul.py).
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wn                 # [BN, 1]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        if EVEN_K:
            # the row mask is constant along K, so the loads stay 16-byte vectors
            w = tl.load(w_rows + kk[None, :], mask=row_mask[:, None], other=0.0)
            xv = tl.load(x_row + kk)
        else:
            w = tl.load(w_rows + kk[None, :], mask=row_mask[:, None] & (kk < K)[None, :], other=0.0)
            xv = tl.load(x_row + kk, mask=kk < K, other=0.0)
        acc += w.to(tl.float32) * xv.to(tl.float32)[None, :]
    return tl.sum(acc, axis=1)                                             # [BN]


@triton.jit
def _float_gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N_OUT, K, stride_xm, stride_wn, stride_om,
                       HAS_BIAS: tl.constexpr, ACT: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr,
                       GATED: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # grid: (cdiv(N_OUT, BLOCK_N),). GATED: weight rows are [gate; up], each N_OUT long; the program owns gate rows
    # `rows` and up rows `N_OUT + rows` and walks K once for both.
    pid = tl.program_id(0)
    for m in range(M):
        x_row = x_ptr + m * stride_xm
        o_row = out_ptr + m * stride_om
        if GATED:
            i2 = tl.arange(0, 2 * BLOCK_N)
            half = i2 // BLOCK_N                                          # 0: gate, 1: up
            rows2 = pid * BLOCK_N + i2 % BLOCK_N
            mask2 = rows2 < N_OUT
            both = float_rows(x_row, w_ptr, rows2 + half * N_OUT, mask2, K, stride_wn, 2 * BLOCK_N, BLOCK_K,
                              EVEN_K)
            if HAS_BIAS:
                both += tl.load(b_ptr + rows2 + half * N_OUT, mask=mask2, other=0.0).to(tl.float32)
            both = tl.reshape(both, (2, BLOCK_N))
            which = tl.arange(0, 2)[:, None]
            gate = tl.sum(tl.where(which == 0, both, 0.0), axis=0)
            up = tl.sum(tl.where(which == 1, both, 0.0), axis=0)
            rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
            y = gated_product(gate, up, ACT, ALPHA, LIMIT)
        else:
            rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
            y = float_rows(x_row, w_ptr, rows, rows < N_OUT, K, stride_wn, BLOCK_N, BLOCK_K, EVEN_K)
            if HAS_BIAS:
                y += tl.load(b_ptr + rows, mask=rows < N_OUT, other=0.0).to(tl.float32)
            y = activate(y, ACT)
        tl.store(o_row + rows, y.to(out_ptr.dtype.element_ty), mask=rows < N_OUT)


def _cfg(bn, bk, warps):
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=1)


# Candidates in elements (a 16-byte vector is 8 bf16/fp16 or 4 fp32): 16 to 64 products per thread in flight.
# First entry = the default with autotuning off (FMCONVERT_AUTOTUNE=0). Not yet timed one by one on a GPU.
_FLOAT_GEMV_CONFIGS = [
    _cfg(4, 512, 4),
    _cfg(2, 1024, 4),
    _cfg(8, 512, 4),
    _cfg(4, 1024, 8),
    _cfg(8, 1024, 8),
    _cfg(16, 256, 4),
    _cfg(2, 2048, 8),
    _cfg(1, 1024, 2),
]

def _gated_fits(cfg) -> bool:
    # A gated tile holds gate and up rows: over 32 products a thread it needs a stack frame on sm_90
    # (8x1024 on 8 warps: 128 registers and 8 bytes of stack; benchmarks/sass_report.py checks the rest).
    return 2 * cfg.kwargs["BLOCK_N"] * cfg.kwargs["BLOCK_K"] <= 32 * 32 * cfg.num_warps


def _prune(configs, named_args, **kwargs):
    if kwargs.get("GATED", named_args.get("GATED")):
        return [c for c in configs if _gated_fits(c)] or configs[:1]
    return configs


_heuristics = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
_gemv_fixed = _heuristics(_float_gemv_kernel)
# The interpreter's config takes 32 rows a program: its cost is per program, not per element.
_gemv_tuned = triton.autotune(configs=configs(_FLOAT_GEMV_CONFIGS, _cfg(32, 64, 4)),
                              key=["M", "N_OUT", "K", "GATED"], prune_configs_by={"early_config_prune": _prune},
                              do_bench=tuner_bench)(_gemv_fixed)


def _check(x, weight, bias, activation):
    float_dtype_check("x", x)
    float_dtype_check("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got {tuple(weight.shape)}")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x last dim {x.shape[-1]} != weight in_features {K}")
    ep = linear_epilogue(N, bias, activation, (x, weight))
    rows = x.numel() // K if K else 0
    if rows > DECODE_MAX_M:
        raise ValueError(f"float_gemv takes at most {DECODE_MAX_M} rows of x, got {rows}: use F.linear")
    return ep


def float_gemv(x, weight, bias=None, activation=None, *, config=None):
    """act(x @ weight.T + bias), x [..., K] with at most DECODE_MAX_M rows, weight [N, K]; y has x.dtype. With a
    gated activation ("swiglu", "geglu", ("swiglu_oai", alpha, limit)) weight rows are [gate; up] and y is
    [..., N // 2]. `config`: one explicit triton.Config instead of the autotuner (benchmarks, tests)."""
    act, alpha, limit = _check(x, weight, bias, activation)
    N, K = weight.shape
    gated = act in GATED_CODES
    n_out = N // 2 if gated else N
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    M = x2.shape[0]
    out = torch.empty(M, n_out, dtype=x.dtype, device=x.device)
    if M == 0 or n_out == 0:
        return out.reshape(*x.shape[:-1], n_out)
    kernel, meta = _gemv_tuned, {}
    if config is not None:
        kernel = _gemv_fixed
        meta = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    kernel[lambda m: (triton.cdiv(n_out, m["BLOCK_N"]),)](
        x2, weight, bias if bias is not None else weight, out, M, n_out, K,
        x2.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, ACT=act, ALPHA=alpha, LIMIT=limit, GATED=gated, **meta,
    )
    return out.reshape(*x.shape[:-1], n_out)


def float_gemv_reference(x, weight, bias=None, activation=None):
    """Same contract as float_gemv, in plain torch (fp32 math)."""
    _check(x, weight, bias, activation)
    y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return activate_reference(y, activation).to(x.dtype)


def gpu_ms(fn) -> float:
    """GPU time of one call of fn with a cold L2, as the autotuners measure it (no host launch overhead)."""
    return float(tuner_bench(fn, None))
