"""Split-K flash-decoding for Multi-head Latent Attention (DeepSeek-V2/V3, Kimi K2, GLM-4.7-Flash).

In MLA's absorbed decode form every query head attends over one shared latent cache. A cache row has
kv_rank + rope columns: the normalised latent c_kv, then the rotated shared key k_pe. The key is the whole
row and the value its first kv_rank columns, so this is multi-query attention with Dk = kv_rank + rope and
Dv = kv_rank where V is a prefix of K. A query is [q_lat | q_pe] (q_lat already absorbed W_UK).

The kernel loads each cache row once per program and uses it for BLOCK_H query heads, as key and as value:
the bandwidth a naive runtime spends on broadcasting the latent to every head is the point. Scores run in
the log2 domain (exp2) with fp32 statistics and accumulation, as in attention.py. A sequence of length 0
yields zeros. sinks (HY-V4): a logit per head that joins each softmax's denominator and nothing else, added where
the partials meet (the single split's normalisation, or the reduce).
"""
from __future__ import annotations

import operator

import torch
import triton
import triton.language as tl

from ._common import device_sms, float_dtype_check, interpreting
from .attention import LOG2E, _dot_mode, _online_softmax


@triton.jit
def _mla_decode_partial_kernel(q_ptr, c_ptr, lens_ptr, ws_ptr, o_ptr, sink_ptr,
                               H, NHB, R, ROPE, S_MAX, CHUNK, NSPLIT, qk_scale,
                               sqb, sqh, scb, scs, sob, soh,
                               DOT_F32: tl.constexpr, PREC: tl.constexpr, DIRECT: tl.constexpr,
                               HAS_SINKS: tl.constexpr,
                               BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                               BLOCK_R: tl.constexpr):
    # grid: (B * NHB, NSPLIT), NHB = cdiv(H, BLOCK_H). A program takes heads [hb * BLOCK_H, +BLOCK_H) of one
    # sequence over rows [split * CHUNK, (split + 1) * CHUNK) ∩ [0, seq_len) and writes unnormalised partials
    # to ws [B, H, NSPLIT, R + 2] (acc, then running max m and sum l, log2 domain); DIRECT (one split) writes
    # the normalised output instead. R = kv_rank, ROPE = rope width; last dims of q and cache are contiguous.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // NHB).to(tl.int64)
    hb = pid % NHB
    # Lengths past S_max read as S_max: no row outside the cache is ever loaded.
    seq_len = tl.minimum(tl.load(lens_ptr + b).to(tl.int32), S_MAX)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, seq_len)
    heads = (hb * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    h_mask = heads < H
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < R
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < ROPE
    q_row = q_ptr + b * sqb + heads * sqh                                      # [BH]
    q_lat = tl.load(q_row[:, None] + offs_c[None, :], mask=h_mask[:, None] & c_mask[None, :], other=0.0)
    q_pe = tl.load(q_row[:, None] + R + offs_r[None, :], mask=h_mask[:, None] & r_mask[None, :], other=0.0)
    if DOT_F32:
        q_lat = q_lat.to(tl.float32)
        q_pe = q_pe.to(tl.float32)
    c_base = c_ptr + b * scb

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        rows = c_base + offs_n.to(tl.int64) * scs                              # [BN]
        # The one read of these rows: lat serves as key (with pe) and then as value.
        lat = tl.load(rows[:, None] + offs_c[None, :], mask=n_mask[:, None] & c_mask[None, :], other=0.0)
        pe = tl.load(rows[:, None] + R + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        if DOT_F32:
            lat = lat.to(tl.float32)
            pe = pe.to(tl.float32)
        s = tl.dot(q_lat, tl.trans(lat), input_precision=PREC)                 # [BH, BN], fp32
        s = tl.dot(q_pe, tl.trans(pe), acc=s, input_precision=PREC) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_softmax(s, lat, m_i, l_i, acc, PREC)         # lat again, now as the values
    # A split that ran no iteration (empty sequence, or past seq_len) leaves m = -inf, l = 0, acc = 0:
    # DIRECT stores zeros, the reduce gives it weight 0.
    out_mask = h_mask[:, None] & c_mask[None, :]
    if DIRECT:
        if HAS_SINKS:        # the sink's term in the denominator, in the same log2 domain (LOG2E * logit)
            sink = tl.load(sink_ptr + heads, mask=h_mask, other=0.0).to(tl.float32) * 1.4426950408889634
            base = tl.where(m_i == float("-inf"), sink, m_i)
            acc = acc * tl.exp2(m_i - base)[:, None]
            l_i = l_i * tl.exp2(m_i - base) + tl.exp2(sink - base)
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + b * sob + heads[:, None] * soh + offs_c[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=out_mask)
    else:
        row = ws_ptr + ((b * H + heads) * NSPLIT + split) * (R + 2)            # [BH]
        tl.store(row[:, None] + offs_c[None, :], acc, mask=out_mask)
        tl.store(row + R, m_i, mask=h_mask)
        tl.store(row + R + 1, l_i, mask=h_mask)


@triton.jit
def _mla_decode_reduce_kernel(ws_ptr, lens_ptr, o_ptr, sink_ptr, H, R, CHUNK, NSPLIT, sob, soh,
                              HAS_SINKS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr):
    # grid: (B * H, cdiv(R, BLOCK_V)). Merges one head's partials of the splits that hold rows
    # (split * CHUNK < seq_len) over BLOCK_V output columns. Every column block recomputes the split weights
    # (2 * NSPLIT floats): cheaper than a second pass, and a [BLOCK_S, 512] tile would not fit registers.
    pid = tl.program_id(0)
    vb = tl.program_id(1)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    seq_len = tl.minimum(tl.load(lens_ptr + b).to(tl.int32), NSPLIT * CHUNK)
    n_valid = tl.cdiv(seq_len, CHUNK)
    sp = tl.arange(0, BLOCK_S)
    s_mask = (sp < n_valid) & (sp < NSPLIT)
    rows = ws_ptr + (pid.to(tl.int64) * NSPLIT + sp) * (R + 2)                # [BS]
    m = tl.load(rows + R, mask=s_mask, other=float("-inf"))
    l = tl.load(rows + R + 1, mask=s_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    # Every split empty (seq_len = 0): base 0 gives weights exp2(-inf) = 0, not NaN.
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    if HAS_SINKS:            # the sink joins the max, then the denominator (LOG2E * its logit)
        sink = tl.load(sink_ptr + h).to(tl.float32) * 1.4426950408889634
        m_max = tl.maximum(tl.max(m, axis=0), sink)
    w = tl.where(s_mask, tl.exp2(m - m_max), 0.0)
    denom = tl.sum(l * w, axis=0)
    if HAS_SINKS:
        denom += tl.exp2(sink - m_max)
    offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = offs_v < R
    acc = tl.load(rows[:, None] + offs_v[None, :], mask=s_mask[:, None] & v_mask[None, :], other=0.0)
    o = tl.sum(acc * w[:, None], axis=0) / tl.where(denom > 0, denom, 1.0)
    tl.store(o_ptr + b * sob + h * soh + offs_v, o.to(o_ptr.dtype.element_ty), mask=v_mask)


_MLA_BLOCK_H = 16          # query heads per program: tl.dot's minimum M, and the acc a program can hold
_MLA_MIN_CHUNK = 64        # rows per split at least: a split's partial (H * (kv_rank + 2) fp32) is not free
_MLA_REDUCE_ELEMS = 4096   # partial values a reduce program loads at once ([BLOCK_S, BLOCK_V])


def _mla_config(block_c, dtype):
    """(BLOCK_N, num_warps, num_stages) of the partial kernel."""
    if interpreting():
        return 16, 4, 1       # two tiles per 32-row chunk: the online softmax runs across tiles in tests
    if block_c >= 256:
        # DeepSeek-V3 (BLOCK_C 512, BLOCK_R 64, 16 heads): acc [16, 512] fp32 is 8192 values, 32 registers
        # a thread on 8 warps (64 on 4), leaving room for q_lat's [16, 512] dot operand and the [16, 32]
        # scores without spilling. A [32, 512] latent tile is 32 KB of shared memory in bf16 (64 KB fp32),
        # so 2 stages (1 for fp32) fit beside the rope tiles; 32 rows also keep p's [16, 32] small.
        return 32, 8, 1 if dtype == torch.float32 else 2
    return 64, 4, 2


def _mla_chunk(batch, n_hblocks, s_max, device):
    # Depends on shapes only (never on seq_lens), so the grid is fixed for CUDA graphs. Aims at about
    # two programs per SM; the floor bounds the partials' traffic against the rows a split reads.
    if interpreting() or device.type != "cuda":
        return 32
    target_splits = triton.cdiv(2 * device_sms(device), max(1, batch * n_hblocks))
    chunk = triton.next_power_of_2(triton.cdiv(max(s_max, 1), target_splits))
    return max(_MLA_MIN_CHUNK, min(chunk, 1024))


def _reduce_block_v(nsplit, kv_rank):
    # Under the interpreter a small budget splits even kv_rank 24..40 in column blocks, so tests cover them.
    elems = 128 if interpreting() else _MLA_REDUCE_ELEMS
    return max(16, min(triton.next_power_of_2(kv_rank), elems // triton.next_power_of_2(nsplit)))


def _nsplit(q, cache):
    B, H, _ = q.shape
    chunk = _mla_chunk(B, triton.cdiv(H, _MLA_BLOCK_H), cache.shape[2], q.device)
    return chunk, triton.cdiv(cache.shape[2], chunk)


def _check(q, cache, kv_rank):
    """kv_rank as int after validating q and cache against each other."""
    float_dtype_check("q", q)
    if q.dim() != 3 or cache.dim() != 4 or cache.shape[1] != 1:
        raise ValueError(f"q must be [B, H, kv_rank + rope] and cache [B, 1, S_max, kv_rank + rope], got "
                         f"{tuple(q.shape)}, {tuple(cache.shape)}")
    B, _, D = q.shape
    if cache.shape[0] != B or cache.shape[3] != D:
        raise ValueError(f"cache {tuple(cache.shape)} does not match q {tuple(q.shape)}")
    if cache.dtype != q.dtype:
        raise ValueError(f"q and cache dtypes differ: {q.dtype}, {cache.dtype}")
    if cache.device != q.device:
        raise ValueError(f"q and cache devices differ: {q.device}, {cache.device}")
    kv_rank = operator.index(kv_rank)
    if not 0 < kv_rank < D:
        raise ValueError(f"kv_rank must be in (0, {D}) (the row is kv_rank latent + rope columns), got {kv_rank}")
    if (q.stride(-1) != 1 and q.numel() > 0) or (cache.stride(-1) != 1 and cache.numel() > 0):
        raise ValueError(f"q and cache need a contiguous last dim, got strides {q.stride()}, {cache.stride()}")
    return kv_rank


def mla_decode_workspace(q, cache, kv_rank) -> torch.Tensor:
    """fp32 scratch [B, H, n_splits, kv_rank + 2] for mla_decode (allocate once, reuse; needed for CUDA-graph
    capture only to keep allocations out of the graph)."""
    kv_rank = _check(q, cache, kv_rank)
    B, H, _ = q.shape
    _, nsplit = _nsplit(q, cache)
    return torch.empty(B, H, nsplit, kv_rank + 2, dtype=torch.float32, device=q.device)


def mla_decode(q, cache, seq_lens, sm_scale, kv_rank, *, workspace=None, sinks=None) -> torch.Tensor:
    """o [B, H, kv_rank] (q.dtype). q [B, H, kv_rank + rope] (last dim contiguous); cache [B, 1, S_max, kv_rank + rope]
    (the runtime's per-layer cache with one latent head; any strides with last dim contiguous), the first seq_lens[b]
    rows valid (int32/int64 [B]); softmax(q . row * sm_scale) over those rows, times row[:kv_rank]. sinks [H]: a
    logit per head in each softmax's denominator only. No host syncs."""
    kv_rank = _check(q, cache, kv_rank)
    B, H, D = q.shape
    if sinks is not None and (tuple(sinks.shape) != (H,) or sinks.device != q.device):
        raise ValueError(f"sinks must be [{H}] on {q.device}, got {tuple(sinks.shape)} on {sinks.device}")
    sinks_arg = q if sinks is None else sinks.contiguous()
    S_MAX = cache.shape[2]
    if (tuple(seq_lens.shape) != (B,) or seq_lens.dtype not in (torch.int32, torch.int64)
            or seq_lens.device != q.device):
        raise ValueError(f"seq_lens must be int32/int64 [{B}] on {q.device}, got {seq_lens.dtype} "
                         f"{tuple(seq_lens.shape)} on {seq_lens.device}")
    chunk, nsplit = _nsplit(q, cache)
    shape = (B, H, nsplit, kv_rank + 2)
    if workspace is None:
        workspace = torch.empty(shape, dtype=torch.float32, device=q.device)
    elif (tuple(workspace.shape) != shape or workspace.dtype != torch.float32 or not workspace.is_contiguous()
          or workspace.device != q.device):
        raise ValueError(f"workspace must be contiguous fp32 {shape} on {q.device}, got {workspace.dtype} "
                         f"{tuple(workspace.shape)}; use mla_decode_workspace()")
    o = torch.empty(B, H, kv_rank, dtype=q.dtype, device=q.device)
    if o.numel() == 0 or S_MAX == 0:
        return o.zero_()
    seq_lens = seq_lens.contiguous()
    dot_f32, prec = _dot_mode(q.dtype)
    n_hblocks = triton.cdiv(H, _MLA_BLOCK_H)
    block_c = max(16, triton.next_power_of_2(kv_rank))
    block_n, warps, stages = _mla_config(block_c, q.dtype)
    direct = nsplit == 1
    _mla_decode_partial_kernel[(B * n_hblocks, nsplit)](
        q, cache, seq_lens, workspace, o, sinks_arg,
        H, n_hblocks, kv_rank, D - kv_rank, S_MAX, chunk, nsplit, float(sm_scale) * LOG2E,
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(2), o.stride(0), o.stride(1),
        DOT_F32=dot_f32, PREC=prec, DIRECT=direct, HAS_SINKS=sinks is not None,
        BLOCK_H=_MLA_BLOCK_H, BLOCK_N=block_n, BLOCK_C=block_c,
        BLOCK_R=max(16, triton.next_power_of_2(D - kv_rank)),
        num_warps=warps, num_stages=stages,
    )
    if direct:
        return o
    block_v = _reduce_block_v(nsplit, kv_rank)
    _mla_decode_reduce_kernel[(B * H, triton.cdiv(kv_rank, block_v))](
        workspace, seq_lens, o, sinks_arg, H, kv_rank, chunk, nsplit, o.stride(0), o.stride(1),
        HAS_SINKS=sinks is not None, BLOCK_S=triton.next_power_of_2(nsplit), BLOCK_V=block_v, num_warps=4,
    )
    return o


def mla_decode_reference(q, cache, seq_lens, sm_scale, kv_rank, sinks=None) -> torch.Tensor:
    kv_rank = operator.index(kv_rank)
    S_MAX = cache.shape[2]
    rows = cache[:, 0].float()                                                 # [B, S, kv_rank + rope]
    scores = torch.einsum("bhd,bsd->bhs", q.float(), rows) * sm_scale
    valid = torch.arange(S_MAX, device=q.device)[None, :] < seq_lens.to(torch.int64)[:, None]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    if sinks is not None:        # a column per head that joins the softmax, then is dropped
        sink = sinks.float().view(1, -1, 1).expand(*scores.shape[:-1], 1)
        p = torch.cat([scores, sink], -1).softmax(-1)[..., :-1]
        return torch.einsum("bhs,bsc->bhc", p, rows[..., :kv_rank]).to(q.dtype)
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhs,bsc->bhc", p, rows[..., :kv_rank]).to(q.dtype)


__all__ = ["mla_decode", "mla_decode_reference", "mla_decode_workspace"]
