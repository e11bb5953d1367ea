"""Attention: flash-style prefill and split-K flash-decoding.

Scores run in the log2 domain (exp2) with fp32 statistics and accumulation. GQA maps query head
h to kv head h // (Hq // Hkv). ALiBi adds slope_h * (key_pos - query_pos). A row that sees no
key (full padding) yields zeros.

window W > 0 (Mistral, Gemma 2, Phi-3 sliding window; causal only): the query at absolute
position p sees keys j with p - W < j <= p, as transformers' kv_idx > q_idx - sliding_window.
Kernels skip the key blocks before the window rather than masking them. softcap c > 0 (Gemma 2)
replaces the score s = q.k * sm_scale by c * tanh(s / c), before ALiBi and masking.

chunk C > 0 (Llama 4's chunked attention; causal only, not with a window): positions are cut into
aligned blocks of C, and the query at p sees keys j <= p with j // C == p // C, i.e. keys
[p // C * C, p], as transformers' create_chunked_causal_mask. The kernels reuse the window argument
as C and skip the key blocks before the chunk start as they do for a window.

sinks [Hq] (GPT-OSS): one learned logit per query head joins every row's softmax as an extra column whose
value is then dropped: o = sum_j e^(s_j - m) v_j / (sum_j e^(s_j - m) + e^(sink_h - m)), m the max over scores
and sink. It is not capped. A row that sees no key still yields zeros.
"""
from __future__ import annotations

import math
import operator

import torch
import triton
import triton.language as tl

from ._common import device_sms, float_dtype_check, interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _tanh(x):
    # libdevice tanh does not run under TRITON_INTERPRET. exp2 of a non-positive argument cannot
    # overflow, so large |x| gives exactly +-1 and never NaN. The divide need not be IEEE-exact
    # (a few ulp), which saves instructions per score on GPU.
    e = tl.exp2(-2.8853900817779268 * tl.abs(x))                              # exp(-2|x|) in (0, 1]
    t = tl.fdiv(1.0 - e, 1.0 + e, ieee_rounding=False)
    return tl.where(x < 0, -t, t)


@triton.jit
def _online_softmax(s, v, m_i, l_i, acc, PREC: tl.constexpr):
    """One key tile of a decode split (log2 domain): fold scores s [rows, keys] and values v [keys, D] into the
    running max m_i, sum l_i and unnormalised acc [rows, D]. Every tile that runs holds >= 1 valid key, so the new
    max is finite. Shared by the split-K decode kernels (here and kernels/mla.py)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _softcap(s, cap):
    # s and cap in log2 units (both natural units * LOG2E): cap * tanh(s / cap) there equals
    # LOG2E * c * tanh(s_nat / c), the natural-units cap, without converting back and forth.
    return cap * _tanh(s * (1.0 / cap))


def _check_window_softcap(window, softcap, causal=True):
    """(window, softcap) as int, float after validation; 0 turns either off."""
    window = operator.index(window)
    softcap = float(softcap)
    if window < 0:
        raise ValueError(f"window must be >= 0 (0 = no sliding window), got {window}")
    if window and not causal:
        raise ValueError(f"window={window} needs causal=True: sliding-window attention is only "
                         "defined for causal attention")
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be finite and >= 0 (0 = off), got {softcap}")
    return window, softcap


def _check_chunk(chunk, window, causal=True):
    """chunk as int after validation (0 = no chunked attention); window already validated."""
    chunk = operator.index(chunk)
    if chunk < 0:
        raise ValueError(f"chunk must be >= 0 (0 = no chunked attention), got {chunk}")
    if chunk and not causal:
        raise ValueError(f"chunk={chunk} needs causal=True: chunked attention is only defined for causal attention")
    if chunk and window:
        raise ValueError(f"chunk={chunk} and window={window} exclude each other: pass one of them")
    return chunk


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, slopes_ptr, kpm_ptr, sinks_ptr,
                    T, S, HQ, GQA, D, qk_scale, WINDOW, cap,
                    sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                    sob, soh, sot, skpb,
                    CAUSAL: tl.constexpr, ALIBI: tl.constexpr, HAS_KPM: tl.constexpr,
                    WINDOWED: tl.constexpr, CHUNKED: tl.constexpr, SOFTCAP: tl.constexpr, SINKS: tl.constexpr,
                    DOT_F32: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # grid: (cdiv(T, BLOCK_M), B * HQ). Query i sits at absolute position S - T + i.
    # WINDOWED (implies CAUSAL): query p sees keys (p - WINDOW, p]. CHUNKED (implies CAUSAL, excludes
    # WINDOWED): WINDOW is the chunk size C and query p sees keys [p // C * C, p]. cap: softcap in log2 units.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = bh % HQ
    hk = (h // GQA).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < T
    d_mask = offs_d < D
    q = tl.load(q_ptr + b * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)      # [BM, BD]
    if DOT_F32:
        q = q.to(tl.float32)
    qpos = S - T + offs_m
    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh
    if ALIBI:
        slope = tl.load(slopes_ptr + h).to(tl.float32) * 1.4426950408889634

    if SINKS:
        # The sink is the column the softmax starts from: running max = sink, sum = e^0, no value.
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo = 0
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, S - T + (pid_m + 1) * BLOCK_M)
    if WINDOWED:
        # Start at the block holding the first key of the top row's window (lower rows' windows
        # start later); keys in it before a row's window are masked below.
        lo = tl.maximum(S - T + pid_m * BLOCK_M - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
        lo = tl.multiple_of(lo, BLOCK_N)
    if CHUNKED:
        # Each row's first visible key. The rows' visible ranges [first, qpos] cover [first of the top row, hi)
        # without a gap, so starting at the block of the top row's chunk start skips every key block no row
        # sees. Rows of a block can straddle a chunk edge: the mask below keeps them apart.
        first = qpos // WINDOW * WINDOW
        lo = (S - T + pid_m * BLOCK_M) // WINDOW * WINDOW // BLOCK_N * BLOCK_N
        lo = tl.multiple_of(lo, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < S
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * sks + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale          # [BM, BN], log2 units
        if SOFTCAP:
            s = _softcap(s, cap)
        if ALIBI:
            s += slope * (offs_n[None, :] - qpos[:, None]).to(tl.float32)
        valid = n_mask[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= qpos[:, None])
        if WINDOWED:
            valid = valid & (offs_n[None, :] > qpos[:, None] - WINDOW)
        if CHUNKED:
            valid = valid & (offs_n[None, :] >= first[:, None])
        if HAS_KPM:
            keep = tl.load(kpm_ptr + b * skpb + offs_n, mask=n_mask, other=0)
            valid = valid & (keep != 0)[None, :]
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows with nothing visible yet keep m = -inf; use 0 as the base so exp2 gives 0, not NaN.
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_base[:, None])
        alpha = tl.exp2(m_i - m_base)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + b * sob + h.to(tl.int64) * soh + offs_m[:, None] * sot + offs_d[None, :],
             o.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _dot_mode(dtype):
    dot_f32 = dtype == torch.float32 or (interpreting() and dtype == torch.bfloat16)
    return dot_f32, "ieee" if dot_f32 else "tf32"


def _check_slopes(alibi_slopes, hq, device):
    if alibi_slopes is None:
        return None
    if tuple(alibi_slopes.shape) != (hq,) or alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes must be [{hq}] on {device}, got {tuple(alibi_slopes.shape)}")
    return alibi_slopes.to(torch.float32).contiguous()


def _check_sinks(sinks, hq, device):
    # Read as fp32 by the kernels whatever the float dtype: no conversion per call.
    if sinks is None:
        return None
    if tuple(sinks.shape) != (hq,) or sinks.device != device or not sinks.is_floating_point():
        raise ValueError(f"sinks must be a float tensor [{hq}] (one logit per query head) on {device}, got "
                         f"{sinks.dtype} {tuple(sinks.shape)} on {sinks.device}")
    return sinks.contiguous()


def _prefill_config(dtype, block_d):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of a prefill launch."""
    if interpreting():
        return 32, 32, 4, 1
    if dtype == torch.float32:
        return 32, 32, 4, 2
    if block_d > 256:      # Gemma 4: 512-wide heads at 128 query rows spill 1.9 KB a thread on sm_90 (sass_report)
        return 32, 64, 8, 2
    return (128, 64, 4, 3) if block_d <= 64 else (128, 64, 8, 3)


def prefill_attention(q, k, v, sm_scale, causal=True, alibi_slopes=None, key_padding_mask=None, *,
                      window: int = 0, softcap: float = 0.0, sinks=None, chunk: int = 0):
    """o [B, Hq, T, D] (q.dtype). q [B, Hq, T, D]; k, v [B, Hkv, S, D], S >= T, any strides.
    key_padding_mask: bool [B, S], True = attend. window: sliding window (0 = none, needs causal);
    softcap: logit cap c, s -> c * tanh(s / c) (0 = none); sinks: float [Hq], attention sink logits;
    chunk: chunked attention C, query p (= S - T + row) sees keys [p // C * C, p] (0 = none, needs
    causal, not with window)."""
    float_dtype_check("q", q)
    window, softcap = _check_window_softcap(window, softcap, causal)
    chunk = _check_chunk(chunk, window, causal)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D [B, H, T|S, D]")
    B, HQ, T, D = q.shape
    _, HKV, S, _ = k.shape
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[0] != B or k.shape[3] != D or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"k/v shapes {tuple(k.shape)}, {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if HKV == 0 or HQ % HKV:
        raise ValueError(f"Hq={HQ} must be a multiple of Hkv={HKV}")
    if S < T:
        raise ValueError(f"key length S={S} must be >= query length T={T}")
    slopes = _check_slopes(alibi_slopes, HQ, q.device)
    sinks = _check_sinks(sinks, HQ, q.device)
    kpm = None
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (B, S) or key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be bool [{B}, {S}], got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        kpm = key_padding_mask.contiguous().view(torch.uint8)
    o = torch.empty(B, HQ, T, D, dtype=q.dtype, device=q.device)
    if o.numel() == 0:
        return o
    dot_f32, prec = _dot_mode(q.dtype)
    block_d = max(16, triton.next_power_of_2(D))
    bm, bn, warps, stages = _prefill_config(q.dtype, block_d)
    grid = (triton.cdiv(T, bm), B * HQ)
    # A window of S or more keys hides nothing: take the unwindowed kernel.
    windowed = 0 < window < S
    # Likewise a chunk of S or more keys: every position is in chunk 0.
    chunked = 0 < chunk < S
    _prefill_kernel[grid](
        q, k, v, o, slopes if slopes is not None else q, kpm if kpm is not None else q,
        sinks if sinks is not None else q,
        T, S, HQ, HQ // HKV, D, float(sm_scale) * LOG2E, window if windowed else chunk if chunked else 0,
        softcap * LOG2E, *q.stride(), *k.stride(), *v.stride(), *o.stride()[:3],
        kpm.stride(0) if kpm is not None else 0,
        CAUSAL=bool(causal), ALIBI=slopes is not None, HAS_KPM=kpm is not None,
        WINDOWED=windowed, CHUNKED=chunked, SOFTCAP=softcap > 0, SINKS=sinks is not None,
        DOT_F32=dot_f32, PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
        num_warps=warps, num_stages=stages,
    )
    return o


def prefill_attention_reference(q, k, v, sm_scale, causal=True, alibi_slopes=None, key_padding_mask=None, *,
                                window: int = 0, softcap: float = 0.0, sinks=None, chunk: int = 0):
    window, softcap = _check_window_softcap(window, softcap, causal)
    chunk = _check_chunk(chunk, window, causal)
    B, HQ, T, D = q.shape
    sinks = _check_sinks(sinks, HQ, q.device)
    HKV, S = k.shape[1], k.shape[2]
    rep = HQ // HKV
    kf = k.float().repeat_interleave(rep, dim=1)
    vf = v.float().repeat_interleave(rep, dim=1)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * sm_scale          # [B, HQ, T, S]
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    qpos = torch.arange(T, device=q.device) + (S - T)
    kpos = torch.arange(S, device=q.device)
    if alibi_slopes is not None:
        rel = (kpos[None, :] - qpos[:, None]).float()
        scores = scores + alibi_slopes.float()[None, :, None, None] * rel
    valid = torch.ones(T, S, dtype=torch.bool, device=q.device)[None, None]
    if causal:
        valid = valid & (kpos[None, :] <= qpos[:, None])
    if window:
        valid = valid & (kpos[None, :] > qpos[:, None] - window)
    if chunk:
        valid = valid & (kpos[None, :] // chunk == qpos[:, None] // chunk)
    if key_padding_mask is not None:
        valid = valid & key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~valid, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.float()[None, :, None, None].expand(B, HQ, T, 1)], dim=-1)
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)[..., :S]
    return torch.matmul(p, vf).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# decode: split-K flash-decoding
# ---------------------------------------------------------------------------------------------


@triton.jit
def _decode_partial_kernel(q_ptr, k_ptr, v_ptr, slopes_ptr, sinks_ptr, lens_ptr, ws_ptr, o_ptr, keep_ptr,
                           HQ, HKV, GQA, D, CHUNK, NSPLIT, qk_scale, WINDOW, cap, KEEP_BLOCK,
                           sqb, sqh, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sxb, sxh,
                           ALIBI: tl.constexpr, WINDOWED: tl.constexpr, CHUNKED: tl.constexpr,
                           SOFTCAP: tl.constexpr, SINKS: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
                           DIRECT: tl.constexpr, KEEP: tl.constexpr,
                           BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # grid: (B * HKV, NSPLIT). A program takes the GQA query heads of one kv head over keys
    # [split * CHUNK, (split + 1) * CHUNK) ∩ [0, seq_len) and writes unnormalised partials to
    # ws [B, HQ, NSPLIT, D + 2] (acc, then running max m and sum l, log2 domain). DIRECT (one
    # split holds every key, as at large batch) writes the normalised output instead: no merge.
    # WINDOWED: keys before seq_len - WINDOW are out of the window. Clamping the start to it leaves
    # every loaded key visible (no mask needed) and splits wholly before it run no iteration.
    # CHUNKED: likewise with the chunk start of the query (seq_len - 1) // WINDOW * WINDOW (WINDOW = chunk size).
    # SINKS: with DIRECT the sink starts the softmax here, as in prefill; else the reduce adds it once per head.
    # KEEP (MiniMax-M3's block-sparse layers): keep[b, hk, key // KEEP_BLOCK] != 0 says which keys this kv head's
    # queries see; a tile with none of them is skipped whole (its keys never loaded), so the softmax below guards
    # against a tile whose every score is -inf.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // HKV).to(tl.int64)
    hk = (pid % HKV).to(tl.int64)
    seq_len = tl.load(lens_ptr + b).to(tl.int32)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, seq_len)
    if WINDOWED:
        start = tl.maximum(start, seq_len - WINDOW)
    if CHUNKED:
        # seq_len = 0 (no query): the start stays >= 0 and end = 0 runs nothing.
        start = tl.maximum(start, tl.maximum(seq_len - 1, 0) // WINDOW * WINDOW)
    g = tl.arange(0, BLOCK_G)
    heads = hk * GQA + g
    g_mask = g < GQA
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(q_ptr + b * sqb + heads[:, None] * sqh + offs_d[None, :] * sqd,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)        # [BG, BD]
    if DOT_F32:
        q = q.to(tl.float32)
    if ALIBI:
        slope = tl.load(slopes_ptr + heads, mask=g_mask, other=0.0).to(tl.float32) * 1.4426950408889634
    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh

    if SINKS and DIRECT:
        m_i = tl.load(sinks_ptr + heads, mask=g_mask, other=0.0).to(tl.float32) * 1.4426950408889634
        l_i = tl.full([BLOCK_G], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        run = 1
        if KEEP:
            kept = tl.load(keep_ptr + b * sxb + hk * sxh + offs_n // KEEP_BLOCK, mask=n_mask, other=0) != 0
            n_mask = n_mask & kept
            run = tl.max(n_mask.to(tl.int32), axis=0)
        if run > 0:
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_base + offs_n[:, None].to(tl.int64) * sks + offs_d[None, :] * skd, mask=kv_mask,
                        other=0.0)
            v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svs + offs_d[None, :] * svd, mask=kv_mask,
                        other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale       # [BG, BN]
            if SOFTCAP:
                s = _softcap(s, cap)
            if ALIBI:
                s += slope[:, None] * (offs_n - (seq_len - 1)).to(tl.float32)[None, :]
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_i, l_i, acc = _online_softmax(s, v, m_i, l_i, acc, PREC)
    # A split that ran no iteration (empty sequence, or wholly before the window or chunk) leaves m = -inf,
    # l = 0, acc = 0: DIRECT stores zeros, the reduce gives it weight 0.
    if DIRECT:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]                        # no key: zeros
        tl.store(o_ptr + b * sob + heads[:, None] * soh + offs_d[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=g_mask[:, None] & d_mask[None, :])
    else:
        row = ws_ptr + ((b * HQ + heads) * NSPLIT + split) * (D + 2)          # [BG]
        tl.store(row[:, None] + offs_d[None, :], acc, mask=g_mask[:, None] & d_mask[None, :])
        tl.store(row + D, m_i, mask=g_mask)
        tl.store(row + D + 1, l_i, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(ws_ptr, lens_ptr, sinks_ptr, o_ptr, HQ, D, CHUNK, NSPLIT, WINDOW, sob, soh,
                          WINDOWED: tl.constexpr, CHUNKED: tl.constexpr, SINKS: tl.constexpr, BLOCK_S: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    # grid: (B * HQ,). Merges the partials of the splits that hold keys (split * CHUNK < seq_len).
    pid = tl.program_id(0)
    b = (pid // HQ).to(tl.int64)
    h = (pid % HQ).to(tl.int64)
    seq_len = tl.load(lens_ptr + b).to(tl.int32)
    n_valid = tl.cdiv(seq_len, CHUNK)
    sp = tl.arange(0, BLOCK_S)
    s_mask = (sp < n_valid) & (sp < NSPLIT)
    if WINDOWED:
        # Splits wholly before the window hold m = -inf, l = 0 (weight 0 below); skip their reads.
        s_mask = s_mask & (sp >= tl.maximum(seq_len - WINDOW, 0) // CHUNK)
    if CHUNKED:
        # and those wholly before the query's attention chunk (WINDOW = its size; CHUNK is the split's).
        s_mask = s_mask & (sp >= tl.maximum(seq_len - 1, 0) // WINDOW * WINDOW // CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    rows = ws_ptr + (pid.to(tl.int64) * NSPLIT + sp) * (D + 2)                # [BS]
    m = tl.load(rows + D, mask=s_mask, other=float("-inf"))
    l = tl.load(rows + D + 1, mask=s_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    if SINKS:
        sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
        m_max = tl.maximum(m_max, sink)
    # Every split empty (seq_len = 0): base 0 gives weights exp2(-inf) = 0, not NaN.
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(s_mask, tl.exp2(m - m_max), 0.0)
    denom = tl.sum(l * w, axis=0)
    if SINKS:
        denom += tl.exp2(sink - m_max)
    acc = tl.load(rows[:, None] + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    o = tl.sum(acc * w[:, None], axis=0) / tl.where(denom > 0, denom, 1.0)
    tl.store(o_ptr + b * sob + h * soh + offs_d, o.to(o_ptr.dtype.element_ty), mask=d_mask)


_DECODE_BLOCK_N = 64
_DECODE_WARPS = 4
_DECODE_STAGES = 2


def _decode_chunk(batch, hkv, s_max, device):
    # Depends on shapes only (never on seq_lens), so the grid is fixed for CUDA graphs.
    if interpreting() or device.type != "cuda":
        return 32
    target_splits = triton.cdiv(2 * device_sms(device), max(1, batch * hkv))
    chunk = triton.next_power_of_2(triton.cdiv(s_max, target_splits))
    return max(_DECODE_BLOCK_N, min(chunk, 1024))


def decode_attention_workspace(q, k_cache):
    """fp32 scratch [B, Hq, n_splits, D + 2] for decode_attention (allocate once, reuse; needed
    for CUDA-graph capture only to keep allocations out of the graph)."""
    B, HQ, D = q.shape
    chunk = _decode_chunk(B, k_cache.shape[1], k_cache.shape[2], q.device)
    nsplit = triton.cdiv(k_cache.shape[2], chunk)
    return torch.empty(B, HQ, nsplit, D + 2, dtype=torch.float32, device=q.device)


def decode_attention(q, k_cache, v_cache, seq_lens, sm_scale, alibi_slopes=None, *, workspace=None,
                     window: int = 0, softcap: float = 0.0, sinks=None, chunk: int = 0, keep=None,
                     keep_block: int = 0):
    """o [B, Hq, D] (q.dtype) for one new token per sequence. q [B, Hq, D]; k_cache, v_cache
    [B, Hkv, S_max, D] (any strides), first seq_lens[b] positions valid. No host syncs.
    window: the query (position seq_lens[b] - 1) sees keys [seq_lens[b] - window, seq_lens[b])
    (0 = all); softcap: logit cap c, s -> c * tanh(s / c) (0 = none); sinks: float [Hq], attention
    sink logits; chunk: chunked attention C, the query sees keys [(seq_lens[b] - 1) // C * C, seq_lens[b])
    (0 = none, not with window); keep [B, Hkv, n_blocks] (bool or int8, n_blocks * keep_block >= S_max): which
    blocks of keep_block keys each kv head's queries may see (MiniMax-M3's block-sparse layers); a tile of keys
    none of them sees is skipped, not loaded."""
    float_dtype_check("q", q)
    window, softcap = _check_window_softcap(window, softcap)
    chunk = _check_chunk(chunk, window)
    if q.dim() != 3 or k_cache.dim() != 4 or tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"q must be [B, Hq, D] and caches [B, Hkv, S_max, D], got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, HQ, D = q.shape
    _, HKV, S_MAX, _ = k_cache.shape
    if k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q, k_cache, v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if HKV == 0 or HQ % HKV:
        raise ValueError(f"Hq={HQ} must be a multiple of Hkv={HKV}")
    if tuple(seq_lens.shape) != (B,) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"seq_lens must be int32/int64 [{B}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    slopes = _check_slopes(alibi_slopes, HQ, q.device)
    sinks = _check_sinks(sinks, HQ, q.device)
    keep = _check_keep(keep, keep_block, B, HKV, S_MAX, q.device)
    split_len = _decode_chunk(B, HKV, S_MAX, q.device)       # keys per split (the kernels' CHUNK)
    nsplit = triton.cdiv(S_MAX, split_len)
    if workspace is None:
        workspace = torch.empty(B, HQ, nsplit, D + 2, dtype=torch.float32, device=q.device)
    elif (tuple(workspace.shape) != (B, HQ, nsplit, D + 2) or workspace.dtype != torch.float32
          or not workspace.is_contiguous()):
        raise ValueError(f"workspace must be contiguous fp32 {(B, HQ, nsplit, D + 2)}; "
                         "use decode_attention_workspace()")
    o = torch.empty(B, HQ, D, dtype=q.dtype, device=q.device)
    if o.numel() == 0 or S_MAX == 0:
        return o.zero_()
    seq_lens = seq_lens.contiguous()
    gqa = HQ // HKV
    dot_f32, prec = _dot_mode(q.dtype)
    block_d = max(16, triton.next_power_of_2(D))
    direct = nsplit == 1
    # Decided from shapes only (seq_lens <= S_max), as the grid: no sync, fixed under CUDA graphs.
    windowed = 0 < window < S_MAX
    chunked = 0 < chunk < S_MAX                   # a chunk of S_max or more keys holds every position
    window = window if windowed else chunk if chunked else 0
    _decode_partial_kernel[(B * HKV, nsplit)](
        q, k_cache, v_cache, slopes if slopes is not None else q, sinks if sinks is not None else q, seq_lens,
        workspace, o, keep if keep is not None else seq_lens,
        HQ, HKV, gqa, D, split_len, nsplit, float(sm_scale) * LOG2E, window, softcap * LOG2E, max(keep_block, 1),
        *q.stride(), *k_cache.stride(), *v_cache.stride(), o.stride(0), o.stride(1),
        *(keep.stride()[:2] if keep is not None else (0, 0)),
        ALIBI=slopes is not None, WINDOWED=windowed, CHUNKED=chunked, SOFTCAP=softcap > 0, SINKS=sinks is not None,
        DOT_F32=dot_f32, PREC=prec, DIRECT=direct, KEEP=keep is not None,
        BLOCK_G=max(16, triton.next_power_of_2(gqa)), BLOCK_N=_DECODE_BLOCK_N, BLOCK_D=block_d,
        num_warps=_DECODE_WARPS, num_stages=_DECODE_STAGES,
    )
    if direct:
        return o
    _decode_reduce_kernel[(B * HQ,)](
        workspace, seq_lens, sinks if sinks is not None else o, o, HQ, D, split_len, nsplit, window,
        o.stride(0), o.stride(1), WINDOWED=windowed, CHUNKED=chunked, SINKS=sinks is not None,
        BLOCK_S=triton.next_power_of_2(nsplit), BLOCK_D=triton.next_power_of_2(D), num_warps=4,
    )
    return o


def _check_keep(keep, keep_block, B, HKV, S_MAX, device):
    if keep is None:
        return None
    if (keep.dim() != 3 or tuple(keep.shape[:2]) != (B, HKV) or type(keep_block) is not int or keep_block < 1
            or keep.shape[2] * keep_block < S_MAX or keep.device != device
            or keep.dtype not in (torch.bool, torch.int8, torch.uint8) or keep.stride(2) != 1):
        raise ValueError(f"keep must be bool/int8 [{B}, {HKV}, >= S_max / keep_block] (last dim contiguous) on "
                         f"{device} with keep_block >= 1, got {keep.dtype} {tuple(keep.shape)}, {keep_block!r}")
    return keep.view(torch.int8) if keep.dtype == torch.bool else keep


def decode_attention_reference(q, k_cache, v_cache, seq_lens, sm_scale, alibi_slopes=None, *,
                               window: int = 0, softcap: float = 0.0, sinks=None, chunk: int = 0, keep=None,
                               keep_block: int = 0):
    window, softcap = _check_window_softcap(window, softcap)
    chunk = _check_chunk(chunk, window)
    B, HQ, D = q.shape
    sinks = _check_sinks(sinks, HQ, q.device)
    HKV, S_MAX = k_cache.shape[1], k_cache.shape[2]
    keep = _check_keep(keep, keep_block, B, HKV, S_MAX, q.device)
    rep = HQ // HKV
    kf = k_cache.float().repeat_interleave(rep, dim=1)                        # [B, HQ, S, D]
    vf = v_cache.float().repeat_interleave(rep, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", q.float(), kf) * sm_scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    kpos = torch.arange(S_MAX, device=q.device)
    lens = seq_lens.to(torch.int64)
    if alibi_slopes is not None:
        rel = (kpos[None, :] - (lens[:, None] - 1)).float()                   # [B, S]
        scores = scores + alibi_slopes.float()[None, :, None] * rel[:, None, :]
    valid = kpos[None, :] < lens[:, None]
    if window:
        valid = valid & (kpos[None, :] >= lens[:, None] - window)
    if chunk:
        valid = valid & (kpos[None, :] // chunk == (lens[:, None] - 1) // chunk)     # the query is at len - 1
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    if keep is not None:          # each kv head's blocks, for its query heads
        seen = (keep != 0).repeat_interleave(keep_block, dim=-1)[..., :S_MAX].repeat_interleave(rep, dim=1)
        scores = scores.masked_fill(~seen, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.float()[None, :, None].expand(B, HQ, 1)], dim=-1)
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)[..., :S_MAX]
    return torch.einsum("bhs,bhsd->bhd", p, vf).to(q.dtype)


__all__ = [
    "prefill_attention", "prefill_attention_reference", "decode_attention",
    "decode_attention_reference", "decode_attention_workspace",
]
