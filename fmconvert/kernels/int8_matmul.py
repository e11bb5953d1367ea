"""Weight-only int8 linear layer: y = act(x @ dequant(qweight).T + bias).

Weights are symmetric per-group int8: w[n, k] = qweight[n, k] * scale[n, k // group_size],
qweight int8 [N, K] (torch Linear layout), scale [N, K // group_size].

Two paths, picked by M = rows of x:
  * decode (M <= DECODE_MAX_M): a GEMV that streams the int8 bytes once. Each program owns
    BLOCK_N output rows and walks K in long BLOCK_K runs of 16-byte int8 vectors, converts
    int8 -> fp32 with an exponent trick (no I2F), reduces each scale group in registers and
    applies the group scale once per group; bias/activation/SwiGLU are fused in the same
    kernel (a program owns matching gate and up rows). When N is too small to fill the GPU
    with row blocks, K is split across programs that atomically add into an fp32 buffer and a
    small epilogue kernel finishes. Measured on H200 at M=1 (CUDA graph, cold L2): 2.0-2.9
    TB/s of int8 bytes, 1.35-1.6x bf16 cuBLAS on the LLaMA-7B/8B shapes, before two changes
    read off the SASS (benchmarks/sass_report.py) and not yet timed: each step now issues its
    weight, scale and x loads together (EARLY), and SwiGLU may walk K once for gate and up
    rows together (PAIR). The autotuner keeps the old order as a candidate. Two more from the SASS, untimed: CHAIN
    sums each 16-byte vector inside its thread as a chain of fused multiply-adds and reduces across threads once,
    and MAGIC 4 converts to 1 + (q + 128) / 2^15 with no subtraction (bf16/fp16 activations only); together they
    cut the loop's instructions per weight byte by a quarter.
  * GEMM (larger M): tiles with tl.dot; the int8 tile is converted to the activation dtype
    (exact: |q| <= 127) and the group scale is applied to the tile's partial product.
  * dense (M >= DENSE_MIN_M, CUDA): prefill of a long prompt is compute-bound, where cuBLAS beats
    the Triton GEMM (0.63-1.25x of cuBLAS at batch 8 on an H200, and int8 prefill of 2048 tokens
    ran at 0.50x of HF bf16). So one pass writes the dense weight in the activation dtype
    (q * scale in fp32, rounded once) and cuBLAS does the matmul. The extra bytes (read 1, write
    2, read 2 per weight) are small next to the 2*M flops per weight at this M.

Mixtures of experts (int8_expert_linear): one GEMV launch over (token, expert) pairs, each pair's expert id read
from device memory. expert_linear is the same kernel over bf16/fp16/fp32 experts: the weight's element type picks
a walk without scales at compile time, and the int8 kernel's machine code is unchanged by it.
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
    candidate_wins,
    configs,
    device_sms,
    epilogue,
    float_dtype_check,
    gated_product,
    interpreting,
    linear_epilogue,
    lowbit,
    tuner_bench,
)
from .float_linear import float_rows
from .glu import gated

DECODE_MAX_M = 4
DENSE_MIN_M = 256   # from byte and flop counts; on an H200 at M=2048 dense ran 2.1-2.3x faster than the GEMM
                    # (benchmarks/results/gpu_check_h200_7b32layers.json); the crossover itself is untimed


# ---------------------------------------------------------------------------------------------
# decode path: GEMV / split-K
# ---------------------------------------------------------------------------------------------


@triton.jit
def _w_tile(w_rows, kk, row_mask, k_hi, EVEN_K: tl.constexpr):
    # [BN, NG, GS] int8. Without a K mask when K is whole: the loads stay 16-byte vectors whatever the
    # analysis proves.
    if EVEN_K:
        return tl.load(w_rows + kk[None, :, :], mask=row_mask[:, None, None], other=0)
    return tl.load(w_rows + kk[None, :, :], mask=row_mask[:, None, None] & (kk < k_hi)[None, :, :], other=0)


@triton.jit
def _s_tile(s_rows, kg, row_mask, k_hi, GROUP: tl.constexpr):
    # [BN, NG] fp32: the scale of each sub-group's columns.
    return tl.load(s_rows + (kg // GROUP)[None, :], mask=row_mask[:, None] & (kg < k_hi)[None, :],
                   other=0.0).to(tl.float32)


def _prmt_asm(base: int, byte_at: int, subtract: str | None) -> str:
    """PTX for 4 packed int8 -> 4 fp32 words: u = q + 128 (one xor for the word), then per byte one prmt that puts u
    into byte `byte_at` of the word `base` (prmt selectors: 0-3 pick the xored word's bytes, 4-7 base's), then
    optionally a float subtraction."""
    lines = [".reg .b32 t;", "xor.b32 t, $4, 0x80808080;"]
    for i in range(4):
        sel = [4 + j for j in range(4)]
        sel[byte_at] = i
        lines.append(f"prmt.b32 ${i}, t, 0x{base:08X}, 0x{sel[3]}{sel[2]}{sel[1]}{sel[0]};")
    lines += [f"sub.f32 ${i}, ${i}, {subtract};" for i in range(4)] if subtract else []
    return "{\n" + "\n".join(lines) + "\n}"


_PRMT_EXPONENT = tl.constexpr(_prmt_asm(0x4B000000, 0, "0f4B000080"))    # 2^23 + u, minus 2^23 + 128: q
_PRMT_ONE_PLUS = tl.constexpr(_prmt_asm(0x3F800000, 1, None))            # 1 + u / 2^15


@triton.jit
def _int8_to_f32(w, MAGIC: tl.constexpr):
    # int8 tile -> fp32. MAGIC 0-3 give q itself; 4 and 5 give 1 + (q + 128) / 2^15, see _gemv_rows.
    if MAGIC == 1:
        # The exponent trick (2^23 + 128 + q) - (2^23 + 128): integer add + float sub instead of the I2F
        # conversion (a quarter-rate unit).
        return (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
    elif MAGIC == 2:
        # Same trick from the unsigned byte: zero-extend, then one xor sets the exponent and flips the sign bit of
        # the byte (q ^ 0x80 == q + 128).
        u = w.to(tl.uint8, bitcast=True).to(tl.int32)
        return (u ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
    elif MAGIC == 3:
        # The same in PTX, 4 packed bytes at a time: one xor per word, then one prmt per byte builds 0x4B0000uu
        # directly. GPU only (the interpreter has no inline asm).
        return tl.inline_asm_elementwise(asm=_PRMT_EXPONENT, constraints="=r,=r,=r,=r,r", args=[w],
                                         dtype=tl.float32, is_pure=True, pack=4)
    elif MAGIC == 4:
        # 1 + u / 2^15 with u = q + 128: one xor per word, one prmt per byte puts u in mantissa bits 15..8 of 1.0
        # (0x3F80uu00), and no subtraction. GPU only.
        return tl.inline_asm_elementwise(asm=_PRMT_ONE_PLUS, constraints="=r,=r,=r,=r,r", args=[w],
                                         dtype=tl.float32, is_pure=True, pack=4)
    elif MAGIC == 5:
        # MAGIC 4 in Triton operations: the interpreter's stand-in for it in the tests (on a GPU it takes three
        # integer operations per weight where the PTX takes one).
        u = w.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x80
        return ((u << 8) | 0x3F800000).to(tl.float32, bitcast=True)
    else:
        return w.to(tl.float32)


@triton.jit
def _chain2(acc, w, x):
    # acc [BN, NG] + w[..., 0] * x[..., 0] + w[..., 1] * x[..., 1], in that order (two fused multiply-adds).
    w0, w1 = tl.split(w)
    x0, x1 = tl.split(x)
    acc = acc + w0 * x0
    return acc + w1 * x1


@triton.jit
def _chain4(acc, w, x, BN: tl.constexpr, NG: tl.constexpr):
    w0, w1 = tl.split(tl.reshape(w, (BN, NG, 2, 2)))
    x0, x1 = tl.split(tl.reshape(x, (BN, NG, 2, 2)))
    return _chain2(_chain2(acc, w0, x0), w1, x1)


@triton.jit
def _chain8(acc, w, x, BN: tl.constexpr, NG: tl.constexpr):
    w0, w1 = tl.split(tl.reshape(w, (BN, NG, 4, 2)))
    x0, x1 = tl.split(tl.reshape(x, (BN, NG, 4, 2)))
    return _chain4(_chain4(acc, w0, x0, BN, NG), w1, x1, BN, NG)


@triton.jit
def _chain(acc, w, x, BN: tl.constexpr, NG: tl.constexpr, W: tl.constexpr):
    # acc [BN, NG] + the sum over the last axis of w * x ([BN, NG, W], W a power of two up to 16), as one chain of
    # W fused multiply-adds. tl.sum adds in a tree (a multiply, a fused multiply-add and an add per two elements);
    # halving the last axis with tl.split down to single columns leaves the chain, with no data movement when a
    # thread holds the whole axis. (One function per width: no jit function calls itself.)
    if W == 1:
        return acc + tl.reshape(w, (BN, NG)) * tl.reshape(x, (BN, NG))
    elif W == 2:
        return _chain2(acc, w, x)
    elif W == 4:
        return _chain4(acc, w, x, BN, NG)
    elif W == 8:
        return _chain8(acc, w, x, BN, NG)
    else:
        w0, w1 = tl.split(tl.reshape(w, (BN, NG, 8, 2)))
        x0, x1 = tl.split(tl.reshape(x, (BN, NG, 8, 2)))
        return _chain8(_chain8(acc, w0, x0, BN, NG), w1, x1, BN, NG)


@triton.jit
def _gemv_rows(x_row, w_ptr, s_ptr, rows, row_mask, k_lo, k_hi, stride_wn, stride_sn,
               GROUP: tl.constexpr, GS: tl.constexpr, NG: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MAGIC: tl.constexpr,
               EVEN_K: tl.constexpr, EARLY: tl.constexpr, CHAIN: tl.constexpr = False):
    # A BLOCK_K run is NG sub-groups of GS columns; GS divides both BLOCK_K and GROUP, so a sub-group never
    # straddles a scale group and needs exactly one scale. (Prefetching the next run by hand measured slower on
    # H200: the second tile costs occupancy.)
    #
    # CHAIN (GS <= 16, one thread's 16-byte vector): each sub-group is summed inside the thread as one chain of
    # fused multiply-adds, and the cross-thread reduction waits until the end of K.
    #
    # MAGIC 4/5 convert q to m = 1 + (q + 128) / 2^15 exactly, which saves the subtraction of the exponent trick:
    # sum(q x) = 2^15 (sum(m x) - (1 + 2^-8) sum(x)), so a sub-group needs the sum of its x (shared by the rows a
    # thread holds) and the scale takes the 2^15. The products m x carry x itself, so the sub-group sum loses about
    # 9 bits of fp32: errors of 3e-5 to 3e-4 of the largest output (1e-7 with exact conversions), under the rounding
    # of a bf16 or fp16 output; _prune_gemv keeps it away from fp32 activations.
    offs_g = tl.arange(0, NG)
    offs_i = tl.arange(0, GS)
    w_rows = w_ptr + rows[:, None, None].to(tl.int64) * stride_wn    # [BN, 1, 1]
    s_rows = s_ptr + rows[:, None].to(tl.int64) * stride_sn          # [BN, 1]
    acc = tl.zeros([BLOCK_N, NG], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_g[:, None] * GS + offs_i[None, :]              # [NG, GS]
        kg = k0 + offs_g * GS                                         # [NG]
        if EARLY:
            # Weights and scales are asked for before x: x goes through shared memory to change layout,
            # and its barrier would otherwise hold the HBM loads back (SASS: three serial round trips
            # per step in the other order, one in this).
            w = _w_tile(w_rows, kk, row_mask, k_hi, EVEN_K)
            s = _s_tile(s_rows, kg, row_mask, k_hi, GROUP)
        if EVEN_K:
            xv = tl.load(x_row + kk).to(tl.float32)
        else:
            xv = tl.load(x_row + kk, mask=kk < k_hi, other=0.0).to(tl.float32)
        if not EARLY:
            w = _w_tile(w_rows, kk, row_mask, k_hi, EVEN_K)
        wf = _int8_to_f32(w, MAGIC)
        if CHAIN:
            part = _chain(tl.zeros([BLOCK_N, NG], dtype=tl.float32), wf,
                          tl.broadcast_to(xv[None, :, :], (BLOCK_N, NG, GS)), BLOCK_N, NG, GS)
        else:
            part = tl.sum(wf * xv[None, :, :], axis=2)                # [BN, NG]
        if not EARLY:
            s = _s_tile(s_rows, kg, row_mask, k_hi, GROUP)
        if MAGIC >= 4:
            part = part - 1.00390625 * tl.sum(xv, axis=1)[None, :]
            s = s * 32768.0
        acc += part * s
    return tl.sum(acc, axis=1)                                        # [BN]


@triton.jit
def _int8_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr,
                      M, N_OUT, K, K_CHUNK,
                      stride_xm, stride_wn, stride_sn, stride_om,
                      GROUP: tl.constexpr, GS: tl.constexpr, NG: tl.constexpr,
                      HAS_BIAS: tl.constexpr, ACT: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr,
                      SWIGLU: tl.constexpr, SPLIT: tl.constexpr, MAGIC: tl.constexpr, EVEN_K: tl.constexpr,
                      PAIR: tl.constexpr, EARLY: tl.constexpr, CHAIN: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    # grid: (cdiv(N_OUT, BLOCK_N), n_splits). With SWIGLU a program owns gate rows `rows` and
    # the matching up rows `N_OUT + rows`, so the pairing needs no second pass. PAIR walks K once
    # for both, as one tile of 2 * BLOCK_N rows: x is loaded once per step instead of twice, and
    # twice the weight bytes are in flight per step.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N_OUT
    if SPLIT:
        k_lo = pid_k * K_CHUNK
        k_hi = tl.minimum(k_lo + K_CHUNK, K)
    else:
        k_lo = 0
        k_hi = K
    for m in range(M):
        x_row = x_ptr + m * stride_xm
        if SWIGLU and PAIR:
            i2 = tl.arange(0, 2 * BLOCK_N)
            half = i2 // BLOCK_N                                          # 0: gate, 1: up
            rows2 = pid_n * BLOCK_N + i2 % BLOCK_N
            acc2 = _gemv_rows(x_row, w_ptr, s_ptr, rows2 + half * N_OUT, rows2 < N_OUT, k_lo, k_hi,
                              stride_wn, stride_sn, GROUP, GS, NG, 2 * BLOCK_N, BLOCK_K, MAGIC, EVEN_K, EARLY,
                              CHAIN)
            acc2 = tl.reshape(acc2, (2, BLOCK_N))
            which = tl.arange(0, 2)[:, None]
            acc = tl.sum(tl.where(which == 0, acc2, 0.0), axis=0)
            up = tl.sum(tl.where(which == 1, acc2, 0.0), axis=0)
        else:
            acc = _gemv_rows(x_row, w_ptr, s_ptr, rows, row_mask, k_lo, k_hi, stride_wn, stride_sn,
                             GROUP, GS, NG, BLOCK_N, BLOCK_K, MAGIC, EVEN_K, EARLY, CHAIN)
            if SWIGLU:
                up = _gemv_rows(x_row, w_ptr, s_ptr, rows + N_OUT, row_mask, k_lo, k_hi, stride_wn,
                                stride_sn, GROUP, GS, NG, BLOCK_N, BLOCK_K, MAGIC, EVEN_K, EARLY, CHAIN)
        o_row = out_ptr + m * stride_om
        if SPLIT:
            # out is the fp32 [M, N] accumulation buffer, zeroed by the launcher.
            tl.atomic_add(o_row + rows, acc, mask=row_mask)
            if SWIGLU:
                tl.atomic_add(o_row + N_OUT + rows, up, mask=row_mask)
        else:
            if HAS_BIAS:
                acc += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
                if SWIGLU:
                    up += tl.load(b_ptr + N_OUT + rows, mask=row_mask, other=0.0).to(tl.float32)
            if SWIGLU:
                y = gated_product(acc, up, ACT, ALPHA, LIMIT)
            else:
                y = activate(acc, ACT)
            tl.store(o_row + rows, y.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _splitk_epilogue_kernel(acc_ptr, b_ptr, out_ptr, N_OUT, stride_am, stride_om,
                            HAS_BIAS: tl.constexpr, ACT: tl.constexpr, ALPHA: tl.constexpr,
                            LIMIT: tl.constexpr, SWIGLU: tl.constexpr, BLOCK: tl.constexpr):
    # grid: (M, cdiv(N_OUT, BLOCK)); acc is fp32 [M, N] (N = 2 * N_OUT with SWIGLU).
    m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N_OUT
    v = tl.load(acc_ptr + m * stride_am + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        v += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if SWIGLU:
        up = tl.load(acc_ptr + m * stride_am + N_OUT + cols, mask=mask, other=0.0)
        if HAS_BIAS:
            up += tl.load(b_ptr + N_OUT + cols, mask=mask, other=0.0).to(tl.float32)
        y = gated_product(v, up, ACT, ALPHA, LIMIT)
    else:
        y = activate(v, ACT)
    tl.store(out_ptr + m * stride_om + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _sub_group(args):
    # Largest power of two dividing both BLOCK_K and GROUP (GROUP need not be a power of two); at most one thread's
    # 16-byte vector with CHAIN.
    gs = min(args["BLOCK_K"], lowbit(args["GROUP"]))
    return min(gs, 16) if args.get("CHAIN") else gs


_gemv_heuristics = triton.heuristics({
    "GS": _sub_group,
    "NG": lambda args: args["BLOCK_K"] // _sub_group(args),
    "EVEN_K": lambda args: (not args["SPLIT"]) and args["K"] % args["BLOCK_K"] == 0,
})
_gemv_fixed = _gemv_heuristics(_int8_gemv_kernel)


def _gemv_cfg(bn, bk, warps, magic=0, stages=1, pair=False, early=True, chain=False):
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "MAGIC": magic, "PAIR": pair, "EARLY": early,
                          "CHAIN": chain}, num_warps=warps, num_stages=stages)


# First entry = the default when autotuning is off (FMCONVERT_AUTOTUNE=0).
# Measured on H200 (CUDA-graph timing, cold L2), with the loads in the old order (EARLY=False):
# 2x2048 with the PTX conversion was best or within a few percent on all four LLaMA-7B/8B
# shapes; the rest cover other N, K and M. EARLY (every load of a step issued together) is
# read off the SASS, not yet timed: the old order's best stays a candidate, so the tuner keeps
# whichever is faster on the card it runs on.
_GEMV_CONFIGS = [
    _gemv_cfg(2, 2048, 4, magic=3),
    _gemv_cfg(4, 1024, 4, magic=3),
    _gemv_cfg(8, 2048, 8, magic=3),     # H200 sweep, 2026-11-27: fastest at 4096x4096, 11008x4096, 4096x11008
    _gemv_cfg(4, 2048, 8, magic=3),
    _gemv_cfg(8, 1024, 8, magic=3),
    _gemv_cfg(4, 512, 4, magic=3),
    _gemv_cfg(2, 1024, 2, magic=3),
    _gemv_cfg(2, 2048, 4),
    _gemv_cfg(2, 2048, 4, magic=3, early=False),
    # SwiGLU only (pruned otherwise): gate and up rows in one pass over K. Not yet timed on a GPU.
    _gemv_cfg(2, 2048, 4, magic=3, pair=True),
    _gemv_cfg(1, 2048, 4, magic=3, pair=True),
    _gemv_cfg(2, 1024, 4, magic=3, pair=True),
    _gemv_cfg(2, 2048, 8, pair=True),
    # CHAIN, read off the SASS (benchmarks/sass_report.py), not yet timed: per-thread chains of fused multiply-adds
    # and one cross-thread reduction at the end; with MAGIC 4, no subtraction per weight either. On the Llama-2-7B
    # shapes, instructions per weight byte in the K loop: 5.27 for 8x2048 w8 above, 4.47 chained, 3.84 chained with
    # MAGIC 4. Chaining pays only with 4 or more rows a thread (with fewer, Triton moves the split halves through
    # shared memory).
    _gemv_cfg(8, 2048, 8, magic=4, chain=True),
    _gemv_cfg(8, 2048, 4, magic=4, chain=True),
    _gemv_cfg(16, 2048, 8, magic=4, chain=True),
    _gemv_cfg(16, 1024, 8, magic=4, chain=True),
    _gemv_cfg(8, 2048, 8, magic=3, chain=True),
    _gemv_cfg(4, 2048, 8, magic=4, pair=True, chain=True),
    _gemv_cfg(4, 2048, 4, magic=4, pair=True, chain=True),
]


def _prune_gemv(configs, named_args, **kwargs):
    x = named_args.get("x_ptr")
    if x is not None and x.dtype == torch.float32:
        # MAGIC 4's conversion costs about 9 bits of the fp32 sum (see _gemv_rows): an fp32 model keeps exact sums.
        configs = [c for c in configs if c.kwargs.get("MAGIC", 0) < 4] or configs[:1]
    if kwargs.get("SWIGLU", named_args.get("SWIGLU")):
        return configs
    return [c for c in configs if not c.kwargs.get("PAIR")] or configs[:1]     # PAIR pairs SwiGLU rows only


_gemv_tuned = triton.autotune(
    # the interpreter's: 32 rows a program (its cost is per program, not per element); the kernel tests' odd shapes
    # still span several row blocks, the last one partial
    configs=configs(_GEMV_CONFIGS, _gemv_cfg(32, 256, 4)),
    key=["M", "N_OUT", "K", "SWIGLU"],
    prune_configs_by={"early_config_prune": _prune_gemv},
    do_bench=tuner_bench,
)(_gemv_fixed)

# Config of the split-K launch (N too small to fill the GPU with row blocks alone).
_SPLIT_BLOCK_N = 4
_SPLIT_BLOCK_K = 512
_SPLIT_WARPS = 4


def _pick_split(n_out: int, k: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    sms = device_sms(device)
    row_blocks = triton.cdiv(n_out, _SPLIT_BLOCK_N)
    if row_blocks >= 2 * sms:
        return 1
    return max(1, min(triton.cdiv(4 * sms, row_blocks), k // 1024))


def _decode(x2, qweight, scale, group_size, bias, act, out, split_k=None, config=None, alpha=0.0, limit=0.0):
    # act, alpha, limit: the epilogue() of the activation.
    M, K = x2.shape
    n_out = out.shape[1]
    swiglu = act in GATED_CODES        # SWIGLU: any gated activation (gate rows, then up rows)
    split = _pick_split(n_out, K, x2.device) if split_k is None else int(split_k)
    bias_arg = bias if bias is not None else qweight
    if split <= 1:
        kernel, meta = _gemv_tuned, {}
        if config is not None:  # one explicit config (benchmark sweeps, tests)
            kernel = _gemv_fixed
            meta = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        grid = lambda m: (triton.cdiv(n_out, m["BLOCK_N"]), 1)
        kernel[grid](
            x2, qweight, scale, bias_arg, out, M, n_out, K, K,
            x2.stride(0), qweight.stride(0), scale.stride(0), out.stride(0),
            GROUP=group_size, HAS_BIAS=bias is not None, ACT=act, ALPHA=alpha, LIMIT=limit, SWIGLU=swiglu,
            SPLIT=False, **meta,
        )
        return out
    align = min(lowbit(group_size), _SPLIT_BLOCK_K)
    chunk = triton.cdiv(triton.cdiv(K, split), align) * align
    n_splits = triton.cdiv(K, chunk)
    acc = torch.zeros(M, qweight.shape[0], dtype=torch.float32, device=x2.device)
    _gemv_fixed[(triton.cdiv(n_out, _SPLIT_BLOCK_N), n_splits)](
        x2, qweight, scale, bias_arg, acc, M, n_out, K, chunk,
        x2.stride(0), qweight.stride(0), scale.stride(0), acc.stride(0),
        GROUP=group_size, HAS_BIAS=bias is not None, ACT=act, ALPHA=alpha, LIMIT=limit, SWIGLU=swiglu, SPLIT=True,
        MAGIC=0, PAIR=False, EARLY=True, CHAIN=False, BLOCK_N=_SPLIT_BLOCK_N, BLOCK_K=_SPLIT_BLOCK_K,
        num_warps=_SPLIT_WARPS,
    )
    block = min(1024, triton.next_power_of_2(n_out))
    _splitk_epilogue_kernel[(M, triton.cdiv(n_out, block))](
        acc, bias_arg, out, n_out, acc.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, ACT=act, ALPHA=alpha, LIMIT=limit, SWIGLU=swiglu, BLOCK=block,
    )
    return out


# ---------------------------------------------------------------------------------------------
# GEMM path (prefill)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _gemm_tile(acc, a, w_ptr, s_ptr, rows, row_mask, kk, kmask, s_tile, stride_wn, stride_sn,
               GROUP: tl.constexpr, SCALE_AFTER: tl.constexpr, DOT_F32: tl.constexpr,
               PREC: tl.constexpr):
    # a: [BM, BK] activations, rows: [BN] weight rows, kk: [BK] columns. Returns acc [BM, BN].
    # s_tile: [BN] fp32, this K tile's scales when SCALE_AFTER (loaded a step ahead by the caller).
    w = tl.load(w_ptr + rows[None, :].to(tl.int64) * stride_wn + kk[:, None],
                mask=row_mask[None, :] & kmask[:, None], other=0)       # [BK, BN] int8
    if SCALE_AFTER:
        # The whole K tile lies in one scale group: dot the raw integers (exact in fp16/bf16)
        # and scale the partial product per output column.
        s = s_tile
        if DOT_F32:
            wq = w.to(tl.float32)
        else:
            wq = w.to(a.dtype)
        acc += tl.dot(a, wq, input_precision=PREC) * s[None, :]
    else:
        s = tl.load(s_ptr + rows[None, :].to(tl.int64) * stride_sn + (kk // GROUP)[:, None],
                    mask=row_mask[None, :] & kmask[:, None], other=0.0).to(tl.float32)
        wd = w.to(tl.float32) * s
        if not DOT_F32:
            wd = wd.to(a.dtype)
        acc = tl.dot(a, wd, acc, input_precision=PREC)
    return acc


@triton.jit
def _int8_gemm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr,
                      M, N_OUT, K, M_BUCKET,
                      stride_xm, stride_wn, stride_sn, stride_om,
                      GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, ALPHA: tl.constexpr,
                      LIMIT: tl.constexpr, SWIGLU: tl.constexpr, SCALE_AFTER: tl.constexpr, DOT_F32: tl.constexpr,
                      PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    # grid: (cdiv(M, BLOCK_M) * cdiv(N_OUT, BLOCK_N),), grouped along M for L2 reuse of weights.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N_OUT, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    row_mask = rows < N_OUT
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # With SCALE_AFTER each K tile's scales are loaded one step ahead: the pipeliner stages the tiles the
    # dot reads but not these, and loaded in their own step their latency was exposed every step (the
    # sm_90 SASS issued them between the MMAs and waited for them at the end of the step).
    s_gate = s_ptr + rows.to(tl.int64) * stride_sn
    s_up = s_ptr + (rows + N_OUT).to(tl.int64) * stride_sn
    sc = tl.zeros([BLOCK_N], dtype=tl.float32)
    sc_up = tl.zeros([BLOCK_N], dtype=tl.float32)
    if SCALE_AFTER:
        sc = tl.load(s_gate, mask=row_mask, other=0.0).to(tl.float32)
        if SWIGLU:
            sc_up = tl.load(s_up, mask=row_mask, other=0.0).to(tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        kmask = kk < K
        if SCALE_AFTER:
            g_next = tl.minimum(k0 + BLOCK_K, K - 1) // GROUP       # past the last tile: a valid, unused group
            sc_next = tl.load(s_gate + g_next, mask=row_mask, other=0.0).to(tl.float32)
            if SWIGLU:
                sc_up_next = tl.load(s_up + g_next, mask=row_mask, other=0.0).to(tl.float32)
        a = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & kmask[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
        acc = _gemm_tile(acc, a, w_ptr, s_ptr, rows, row_mask, kk, kmask, sc, stride_wn,
                         stride_sn, GROUP, SCALE_AFTER, DOT_F32, PREC)
        if SWIGLU:
            acc_up = _gemm_tile(acc_up, a, w_ptr, s_ptr, rows + N_OUT, row_mask, kk, kmask, sc_up,
                                stride_wn, stride_sn, GROUP, SCALE_AFTER, DOT_F32, PREC)
        if SCALE_AFTER:
            sc = sc_next
            if SWIGLU:
                sc_up = sc_up_next

    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
        if SWIGLU:
            acc_up += tl.load(b_ptr + N_OUT + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:
        y = gated_product(acc, acc_up, ACT, ALPHA, LIMIT)
    else:
        y = activate(acc, ACT)
    o_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + rows[None, :]
    tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & row_mask[None, :])


def _gemm_cfg(bm, bn, bk, warps, stages, gm=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm},
                         num_warps=warps, num_stages=stages)


# None of these spills registers on sm_90 where it can be chosen (benchmarks/sass_report.py, checked by a test).
# 128x128 and 128x256 tiles spill at every BLOCK_K from 32 to 128 now that the scales are fetched a step ahead
# (80 to 264 bytes a thread; 48 and 256 before): the largest tiles are 128x64 and 64x128 on 8 warps.
_GEMM_CONFIGS = [
    _gemm_cfg(16, 32, 128, 4, 4),
    # deeper pipelines for a decode step's few rows (the GEMV's rival there; not yet timed one by one on a GPU)
    _gemm_cfg(16, 32, 128, 4, 6),
    _gemm_cfg(16, 64, 128, 4, 5),
    _gemm_cfg(16, 16, 128, 2, 6),
    _gemm_cfg(16, 16, 256, 4, 3),
    _gemm_cfg(16, 32, 256, 4, 3),
    _gemm_cfg(16, 64, 128, 4, 4),
    _gemm_cfg(32, 64, 128, 4, 4),
    _gemm_cfg(64, 64, 64, 4, 4),
    _gemm_cfg(64, 64, 64, 8, 3),
    _gemm_cfg(64, 128, 64, 4, 4),
    _gemm_cfg(128, 64, 64, 8, 3),
    _gemm_cfg(64, 128, 128, 8, 3),
]


def _swiglu_fits(cfg) -> bool:
    # Gate and up accumulate apart, doubling the registers: a tile over 64x64, or 64x64 on 4 warps, spills.
    area = cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"]
    return area < 64 * 64 or (area == 64 * 64 and cfg.num_warps >= 8)


def _prune_gemm(configs, named_args, **kwargs):
    if kwargs.get("M_BUCKET", named_args.get("M_BUCKET", 512)) <= 16:    # a decode step: taller tiles are padding
        configs = [c for c in configs if c.kwargs["BLOCK_M"] == 16] or configs[:1]
    if kwargs.get("SWIGLU", named_args.get("SWIGLU")):
        return [c for c in configs if _swiglu_fits(c)] or configs[:1]
    return configs


_gemm_tuned = triton.autotune(
    configs=configs(_GEMM_CONFIGS, _gemm_cfg(32, 32, 32, 4, 1)),
    key=["M_BUCKET", "N_OUT", "K", "SWIGLU", "GROUP"],
    prune_configs_by={"early_config_prune": _prune_gemm},
    do_bench=tuner_bench,
)(triton.heuristics({
    "SCALE_AFTER": lambda args: args["GROUP"] % args["BLOCK_K"] == 0,
})(_int8_gemm_kernel))


def _gemm(x2, qweight, scale, group_size, bias, act, out, alpha=0.0, limit=0.0):
    M, K = x2.shape
    n_out = out.shape[1]
    dot_f32 = x2.dtype == torch.float32 or (interpreting() and x2.dtype == torch.bfloat16)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)
    _gemm_tuned[grid](
        x2, qweight, scale, bias if bias is not None else qweight, out,
        M, n_out, K, min(triton.next_power_of_2(M), 512),
        x2.stride(0), qweight.stride(0), scale.stride(0), out.stride(0),
        GROUP=group_size, HAS_BIAS=bias is not None, ACT=act, ALPHA=alpha, LIMIT=limit, SWIGLU=act in GATED_CODES,
        DOT_F32=dot_f32, PREC="ieee" if dot_f32 else "tf32",
    )
    return out


# ---------------------------------------------------------------------------------------------
# dense path: dequantize once into the activation dtype, then cuBLAS
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_on,
                    GROUP: tl.constexpr, GS: tl.constexpr, NG: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # A BLOCK_K run is NG sub-groups of GS columns that share one scale (GS divides GROUP), so each
    # thread loads a scale per sub-group it covers, not one per element (64 2-byte loads a thread
    # at 32x256 before; benchmarks/sass_report.py).
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kg = tl.program_id(1) * BLOCK_K + tl.arange(0, NG) * GS                  # [NG]
    cols = kg[:, None] + tl.arange(0, GS)[None, :]                           # [NG, GS]
    rmask = rows < N
    mask = rmask[:, None, None] & (cols < K)[None, :, :]
    r64 = rows.to(tl.int64)
    q = tl.load(w_ptr + r64[:, None, None] * stride_wn + cols[None, :, :], mask=mask, other=0)
    sc = tl.load(s_ptr + r64[:, None] * stride_sn + (kg // GROUP)[None, :], mask=rmask[:, None] & (kg < K)[None, :],
                 other=0.0)                                                  # [BN, NG]
    w = q.to(tl.float32) * sc.to(tl.float32)[:, :, None]
    tl.store(out_ptr + r64[:, None, None] * stride_on + cols[None, :, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_dense(qweight, scale, group_size, dtype, tile=None):
    """The dense [N, K] weight in `dtype`, one kernel pass: q * scale in fp32, rounded once to dtype.
    tile: (BLOCK_N, BLOCK_K, num_warps) instead of the default (benchmarks)."""
    N, K = qweight.shape
    out = torch.empty(N, K, dtype=dtype, device=qweight.device)
    bn, bk, warps = tile or ((8, 32, 4) if interpreting() else (32, 256, 4))
    gs = min(bk, lowbit(int(group_size)))
    _dequant_kernel[(triton.cdiv(N, bn), triton.cdiv(K, bk))](
        qweight, scale, out, N, K, qweight.stride(0), scale.stride(0), out.stride(0),
        GROUP=group_size, GS=gs, NG=bk // gs, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return out


def _dense(x2, qweight, scale, group_size, bias, activation, out):
    """The product straight from cuBLAS, a gated activation in one more pass (kernels/glu.py): at a 2048-token
    prompt LLaMA-7B's gate|up output is 90 MB a layer, which a float32 round trip and a copy would move several
    times over. Returns the output (not always `out`)."""
    w = dequantize_dense(qweight, scale, group_size, x2.dtype)
    y = F.linear(x2, w, bias)
    if activation is None:
        return y
    if epilogue(activation)[0] in GATED_CODES:
        return gated(y, activation)
    return out.copy_(activate_reference(y.float(), activation))


# ---------------------------------------------------------------------------------------------
# launcher + reference
# ---------------------------------------------------------------------------------------------


def _check(x, qweight, scale, group_size, bias, activation):
    """The activation's epilogue() after validating every input."""
    float_dtype_check("x", x)
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(f"qweight must be a 2-D int8 tensor [N, K], got {qweight.dtype} {tuple(qweight.shape)}")
    N, K = qweight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x last dim {x.shape[-1]} != qweight in_features {K}")
    if int(group_size) != group_size or group_size <= 0 or K % int(group_size) != 0:
        raise ValueError(f"group_size {group_size} must be a positive divisor of K={K}")
    float_dtype_check("scale", scale)
    if tuple(scale.shape) != (N, K // group_size):
        raise ValueError(f"scale must have shape {(N, K // group_size)}, got {tuple(scale.shape)}")
    return linear_epilogue(N, bias, activation, (x, qweight, scale))


# A decode step's few rows on CUDA: the GEMV or the tensor-core GEMM (16-row tiles, x padded), whichever ran faster
# for this shape when both were timed (cold L2, no launch overhead) and agreed. Keyed by everything that picks a
# kernel specialization; a shape first met inside a CUDA graph capture takes the GEMV and is timed at a later call.
_DECODE_CHOICE: dict = {}


def _time_ms(fn) -> float:
    return float(tuner_bench(fn, None))


def _decode_path(x2, qweight, scale, group_size, bias, activation, act, alpha, limit, n_out) -> str:
    M, K = x2.shape
    key = (M, qweight.shape[0], K, group_size, act, alpha, limit, bias is not None, x2.dtype, scale.dtype,
           x2.device)
    path = _DECODE_CHOICE.get(key)
    if path is not None:
        return path
    if n_out == 0 or (x2.is_cuda and torch.cuda.is_current_stream_capturing()):
        return "decode"
    out_gemv, out_gemm = (torch.empty(M, n_out, dtype=x2.dtype, device=x2.device) for _ in range(2))
    gemm_wins = candidate_wins(
        lambda: _decode(x2, qweight, scale, group_size, bias, act, out_gemv, alpha=alpha, limit=limit),
        lambda: _gemm(x2, qweight, scale, group_size, bias, act, out_gemm, alpha=alpha, limit=limit), _time_ms)
    path = _DECODE_CHOICE[key] = "gemm" if gemm_wins else "decode"
    return path


def int8_linear(x, qweight, scale, group_size, bias=None, activation=None, *, _split_k=None,
                _path=None):
    """y = act(x @ (qweight * scale).T + bias) with fp32 accumulation; y has x.dtype.

    x [..., K]; qweight int8 [N, K]; scale [N, K // group_size]; bias [N] or None. With
    activation="swiglu", "geglu" or ("swiglu_oai", alpha, limit) rows are [gate; up] (bias too) and y is
    [..., N // 2]. `_split_k` / `_path` ("decode" | "gemm" | "dense") override the heuristics (tests, benchmarks).
    """
    act, alpha, limit = _check(x, qweight, scale, group_size, bias, activation)
    group_size = int(group_size)
    N, K = qweight.shape
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    qweight = qweight if qweight.stride(-1) == 1 else qweight.contiguous()
    scale = scale if scale.stride(-1) == 1 else scale.contiguous()
    bias = bias.contiguous() if bias is not None else None
    M = x2.shape[0]
    n_out = N // 2 if act in GATED_CODES else N
    out = torch.empty(M, n_out, dtype=x.dtype, device=x.device)
    if M > 0:
        path = _path or ("decode" if M <= DECODE_MAX_M else
                         "dense" if M >= DENSE_MIN_M and x.is_cuda else "gemm")
        if path == "decode" and _path is None and x.is_cuda:
            path = _decode_path(x2, qweight, scale, group_size, bias, activation, act, alpha, limit, n_out)
        if path == "decode":
            _decode(x2, qweight, scale, group_size, bias, act, out, _split_k, alpha=alpha, limit=limit)
        elif path == "dense":
            out = _dense(x2, qweight, scale, group_size, bias, activation, out)
        else:
            _gemm(x2, qweight, scale, group_size, bias, act, out, alpha=alpha, limit=limit)
    return out.reshape(*x.shape[:-1], n_out)


# ---------------------------------------------------------------------------------------------
# mixture of experts: one GEMV launch over (token, expert) pairs, the expert read from device memory
# ---------------------------------------------------------------------------------------------


@triton.jit
def _expert_rows(x_row, w_e, s_e, rows, row_mask, K, stride_wn, stride_sn,
                 GROUP: tl.constexpr, GS: tl.constexpr, NG: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, MAGIC: tl.constexpr, EVEN_K: tl.constexpr):
    # One expert's rows `rows` times x_row, fp32 [BN]. The weight's element type picks the walk at compile time: int8
    # with group scales (the GEMV's), or float weights (expert_linear: s_e, the scale strides, GROUP, GS, NG and
    # MAGIC unused).
    if w_e.dtype.element_ty == tl.int8:
        acc = _gemv_rows(x_row, w_e, s_e, rows, row_mask, 0, K, stride_wn, stride_sn,
                         GROUP, GS, NG, BLOCK_N, BLOCK_K, MAGIC, EVEN_K, True)
    else:
        acc = float_rows(x_row, w_e, rows, row_mask, K, stride_wn, BLOCK_N, BLOCK_K, EVEN_K)
    return acc


@triton.jit
def _int8_expert_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, e_ptr, out_ptr, N_OUT, K, X_EVERY,
                             stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_be, stride_om,
                             GROUP: tl.constexpr, GS: tl.constexpr, NG: tl.constexpr, HAS_BIAS: tl.constexpr,
                             ACT: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr, SWIGLU: tl.constexpr,
                             MAGIC: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # grid: (cdiv(N_OUT, BLOCK_N), pairs). Pair p multiplies x row p // X_EVERY by expert e_ptr[p]'s weight, so the
    # routing never leaves the device (a decode step with experts stays CUDA-graph capturable). w_ptr int8 with
    # scales s_ptr (int8_expert_linear), or bf16/fp16/fp32 with s_ptr unused (expert_linear): see _expert_rows.
    pid_n = tl.program_id(0)
    p = tl.program_id(1)
    e = tl.load(e_ptr + p).to(tl.int64)
    w_e = w_ptr + e * stride_we
    s_e = s_ptr + e * stride_se
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N_OUT
    x_row = x_ptr + (p // X_EVERY).to(tl.int64) * stride_xm
    acc = _expert_rows(x_row, w_e, s_e, rows, row_mask, K, stride_wn, stride_sn,
                       GROUP, GS, NG, BLOCK_N, BLOCK_K, MAGIC, EVEN_K)
    if HAS_BIAS:
        b_e = b_ptr + e * stride_be
        acc += tl.load(b_e + rows, mask=row_mask, other=0.0).to(tl.float32)
    if SWIGLU:
        up = _expert_rows(x_row, w_e, s_e, rows + N_OUT, row_mask, K, stride_wn, stride_sn,
                          GROUP, GS, NG, BLOCK_N, BLOCK_K, MAGIC, EVEN_K)
        if HAS_BIAS:
            up += tl.load(b_e + N_OUT + rows, mask=row_mask, other=0.0).to(tl.float32)
        y = gated_product(acc, up, ACT, ALPHA, LIMIT)
    else:
        y = activate(acc, ACT)
    tl.store(out_ptr + p.to(tl.int64) * stride_om + rows, y.to(out_ptr.dtype.element_ty), mask=row_mask)


def int8_expert_linear(x, qweight, scale, group_size, experts, x_every=1, activation=None, bias=None):
    """One row per (token, expert) pair: y[p] = act(x[p // x_every] @ W[e].T + bias[e]) with e = experts[p], y in
    x.dtype.

    x [R, K]; qweight int8 [E, N, K] and scale [E, N, K // group_size] (each expert's [N, K] contiguous);
    experts int [P] on the device, with P = R * x_every; bias [E, N] or None. With a gated activation each
    expert's rows (and bias) are [gate; up] and y is [P, N // 2]."""
    float_dtype_check("x", x)
    if qweight.dtype != torch.int8 or qweight.dim() != 3 or x.dim() != 2 or x.shape[1] != qweight.shape[2]:
        raise ValueError(f"need x [R, K] and int8 qweight [E, N, K], got {tuple(x.shape)} and "
                         f"{qweight.dtype} {tuple(qweight.shape)}")
    E, N, K = qweight.shape
    if int(group_size) != group_size or group_size <= 0 or K % int(group_size):
        raise ValueError(f"group_size {group_size} must be a positive divisor of K={K}")
    group_size = int(group_size)
    if tuple(scale.shape) != (E, N, K // group_size):
        raise ValueError(f"scale must have shape {(E, N, K // group_size)}, got {tuple(scale.shape)}")
    if scale.stride(2) != 1 or scale.stride(1) != scale.shape[2]:
        raise ValueError("scale: each expert's rows must be contiguous")
    return _experts(x, qweight, "qweight", scale, group_size, experts, x_every, activation, bias)


def expert_linear(x, weight, experts, x_every=1, activation=None, bias=None):
    """int8_expert_linear for float experts: y[p] = act(x[p // x_every] @ weight[e].T + bias[e]) with
    e = experts[p], accumulated in fp32, y in x.dtype. The expert ids stay on the device (no host sync), so a
    mixture-of-experts decode step with bf16 experts can be captured in a CUDA graph.

    x [R, K]; weight [E, N, K] bf16, fp16 or fp32 (each expert's [N, K] contiguous), any of the three whatever
    x's dtype: the kernel converts x and each weight tile to fp32 as it loads them, so a mixed pair costs
    nothing extra; experts int [P] on the device, with P = R * x_every; bias [E, N] or None. With a gated
    activation each expert's rows (and bias) are [gate; up] and y is [P, N // 2]."""
    float_dtype_check("x", x)
    if weight.dim() != 3 or x.dim() != 2 or x.shape[1] != weight.shape[2]:
        raise ValueError(f"need x [R, K] and weight [E, N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    float_dtype_check("weight", weight)
    return _experts(x, weight, "weight", None, None, experts, x_every, activation, bias)


def _experts(x, w, w_name, scale, group_size, experts, x_every, activation, bias):
    # The checks both expert launchers share, then the launch: w int8 with its scale (in groups of group_size), or
    # float w with scale None.
    E, N, K = w.shape
    act, alpha, limit = epilogue(activation)
    gated = act in GATED_CODES
    if gated and N % 2:
        raise ValueError(f"{activation} needs an even number of weight rows (gate; up), got {N}")
    if isinstance(x_every, bool) or int(x_every) != x_every or x_every < 1:
        raise ValueError(f"x_every must be a positive int, got {x_every!r}")
    x_every = int(x_every)
    if experts.dim() != 1 or experts.numel() != x.shape[0] * x_every or experts.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"experts must be int [{x.shape[0] * x_every}] (x rows * x_every), got "
                         f"{experts.dtype} {tuple(experts.shape)}")
    if w.stride(2) != 1 or w.stride(1) != K:
        raise ValueError(f"{w_name}: each expert's rows must be contiguous")
    if bias is not None:
        float_dtype_check("bias", bias)
        if tuple(bias.shape) != (E, N):
            raise ValueError(f"bias must have shape {(E, N)}, got {tuple(bias.shape)}")
        bias = bias if bias.stride(-1) == 1 else bias.contiguous()
    tensors = (x, w, experts) + ((scale,) if scale is not None else ()) + ((bias,) if bias is not None else ())
    devs = {t.device for t in tensors}
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devs))}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    n_out = N // 2 if gated else N
    P = experts.numel()
    out = torch.empty(P, n_out, dtype=x.dtype, device=x.device)
    if P == 0:
        return out
    bn = 16 if interpreting() else 2     # the int8 GEMV's measured 2 rows a program on a GPU; fewer interpreted
    if scale is None:
        # Float weights: 8 KB of weights a step (2x2048 bf16/fp16, 2x1024 fp32), twice the int8 tile's bytes, at
        # 55-70 registers on sm_90 and no spill (benchmarks/sass_report.py; not yet timed on a GPU). No scales:
        # GROUP, GS, NG and MAGIC are unused, s_ptr a dummy.
        bk = min(2048 if w.element_size() <= 2 else 1024, triton.next_power_of_2(K))
        scale, group_size, gs, magic, s_strides = w, 1, 1, 0, (0, 0)
    else:
        bk = min(2048, triton.next_power_of_2(K))
        gs = min(bk, lowbit(group_size))
        magic = 0 if interpreting() else 3      # the PTX int8 -> fp32 conversion: GPU only
        s_strides = (scale.stride(0), scale.stride(1))
    _int8_expert_gemv_kernel[(triton.cdiv(n_out, bn), P)](
        x, w, scale, bias if bias is not None else scale, experts.contiguous(), out, n_out, K, x_every,
        x.stride(0), w.stride(0), w.stride(1), *s_strides, bias.stride(0) if bias is not None else 0, out.stride(0),
        GROUP=group_size, GS=gs, NG=bk // gs, HAS_BIAS=bias is not None, ACT=act, ALPHA=alpha, LIMIT=limit,
        SWIGLU=gated, MAGIC=magic, EVEN_K=K % bk == 0, BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
    )
    return out


def int8_expert_linear_reference(x, qweight, scale, group_size, experts, x_every=1, activation=None, bias=None):
    rows = x.repeat_interleave(x_every, dim=0) if x_every > 1 else x
    out = [int8_linear_reference(rows[p:p + 1], qweight[e], scale[e], group_size,
                                 bias=bias[e] if bias is not None else None, activation=activation)
           for p, e in enumerate(experts.tolist())]
    n_out = qweight.shape[1] // 2 if epilogue(activation)[0] in GATED_CODES else qweight.shape[1]
    return torch.cat(out) if out else x.new_empty(0, n_out)


def expert_linear_reference(x, weight, experts, x_every=1, activation=None, bias=None):
    """expert_linear in plain torch, pair by pair: F.linear in fp32, then the runtime's activation."""
    rows = x.repeat_interleave(x_every, dim=0) if x_every > 1 else x
    out = [activate_reference(F.linear(rows[p:p + 1].float(), weight[e].float(),
                                       bias[e].float() if bias is not None else None), activation).to(x.dtype)
           for p, e in enumerate(experts.tolist())]
    n_out = weight.shape[1] // 2 if epilogue(activation)[0] in GATED_CODES else weight.shape[1]
    return torch.cat(out) if out else x.new_empty(0, n_out)


def dequantize(qweight, scale, group_size, dtype=torch.float32):
    """Dense [N, K] weight in `dtype` from int8 qweight [N, K] and scale [N, K // group_size]."""
    N, K = qweight.shape
    w = qweight.to(torch.float32).reshape(N, K // group_size, group_size)
    return (w * scale.to(torch.float32)[:, :, None]).reshape(N, K).to(dtype)


def int8_linear_reference(x, qweight, scale, group_size, bias=None, activation=None):
    w = dequantize(qweight, scale, group_size, torch.float32)
    y = F.linear(x.to(torch.float32), w, bias.to(torch.float32) if bias is not None else None)
    return activate_reference(y, activation).to(x.dtype)
