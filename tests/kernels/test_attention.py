import math

import pytest
import torch

from fmconvert.kernels import (
    decode_attention,
    decode_attention_reference,
    decode_attention_workspace,
    prefill_attention,
    prefill_attention_reference,
)

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
FLOAT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_CUDA else [])


def rand(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def prefill_qkv(shape, dtype):
    """q [B, Hq, T, D], k and v [B, Hkv, S, D] for a (B, Hq, Hkv, T, S, D) shape."""
    B, HQ, HKV, T, S, D = shape
    return (rand(B, HQ, T, D, dtype=dtype, seed=1), rand(B, HKV, S, D, dtype=dtype, seed=2),
            rand(B, HKV, S, D, dtype=dtype, seed=3))


def alibi(h):
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)], device=DEVICE)


# (B, Hq, Hkv, T, S, D)
PREFILL_SHAPES = [(1, 1, 1, 1, 1, 8), (2, 4, 2, 17, 17, 16), (1, 4, 1, 33, 77, 64), (1, 2, 2, 20, 20, 80),
                  (1, 3, 3, 3, 129, 16)]
if ON_CUDA:
    PREFILL_SHAPES += [(2, 32, 8, 333, 333, 128), (1, 8, 8, 129, 1024, 64)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", PREFILL_SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_matches_reference(causal, shape, dtype, assert_close):
    D = shape[5]
    q, k, v = prefill_qkv(shape, dtype)
    o = prefill_attention(q, k, v, 1 / math.sqrt(D), causal=causal)
    assert_close(o, prefill_attention_reference(q, k, v, 1 / math.sqrt(D), causal=causal), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_alibi(causal, dtype, assert_close):
    q, k, v = (rand(2, 4, 19, 32, dtype=dtype, seed=i) for i in range(3))
    o = prefill_attention(q, k, v, 0.2, causal=causal, alibi_slopes=alibi(4))
    assert_close(o, prefill_attention_reference(q, k, v, 0.2, causal=causal, alibi_slopes=alibi(4)), dtype)


def test_prefill_alibi_matches_bloom_convention(assert_close):
    # HF BLOOM adds slope * key_pos (no query term); it differs by a per-row constant only.
    q, k, v = (rand(1, 2, 9, 16, dtype=torch.float32, seed=i) for i in range(3))
    slopes = alibi(2)
    scores = q @ k.transpose(-1, -2) * 0.25 + slopes[None, :, None, None] * torch.arange(9, device=DEVICE).float()
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool, device=DEVICE).triu(1), float("-inf"))
    bloom = scores.softmax(-1) @ v
    assert_close(prefill_attention(q, k, v, 0.25, alibi_slopes=slopes), bloom, torch.float32, tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_padding_mask_fully_padded_row_is_zero(dtype, assert_close):
    B, H, S, D = 3, 2, 21, 16
    q, k, v = (rand(B, H, S, D, dtype=dtype, seed=i) for i in range(3))
    kpm = torch.zeros(B, S, dtype=torch.bool, device=DEVICE)
    kpm[0, :21] = True
    kpm[1, :5] = True           # sequence 2 is fully padded
    o = prefill_attention(q, k, v, 0.25, causal=False, key_padding_mask=kpm)
    ref = prefill_attention_reference(q, k, v, 0.25, causal=False, key_padding_mask=kpm)
    assert_close(o, ref, dtype)
    assert torch.count_nonzero(o[2]) == 0


def test_prefill_strided_views_of_fused_qkv(assert_close):
    B, T, H, D = 2, 13, 4, 16
    qkv = rand(B, T, 3, H, D, dtype=torch.float16, seed=5)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))   # [B, H, T, D], strided
    o = prefill_attention(q, k, v, 0.25)
    assert_close(o, prefill_attention_reference(q, k, v, 0.25), torch.float16)


def test_prefill_rejects_bad_inputs():
    q = rand(1, 3, 4, 8, dtype=torch.float32, seed=0)
    k = rand(1, 2, 4, 8, dtype=torch.float32, seed=1)
    with pytest.raises(ValueError, match="multiple"):
        prefill_attention(q, k, k, 1.0)
    with pytest.raises(ValueError, match="S="):
        prefill_attention(q, q[:, :, :2], q[:, :, :2], 1.0)


# (B, Hq, Hkv, S_max, D); seq_lens include 1 and non-multiples of the chunk size.
# The interpreter splits the cache in chunks of 32 keys: S <= 32 takes the one-split path that writes o directly.
DECODE_SHAPES = [(3, 4, 4, 80, 16), (3, 4, 2, 80, 64), (2, 8, 2, 70, 80), (1, 1, 1, 1, 8), (4, 6, 2, 20, 24)]
if ON_CUDA:
    DECODE_SHAPES += [(4, 32, 8, 4099, 128), (2, 32, 32, 1000, 128), (1, 64, 8, 16384, 128)]


def lens_for(B, S):
    base = [1, S, max(1, S // 2 + 3), max(1, S - 7)]
    return torch.tensor(base[:B] if B <= 4 else [1 + (i * 37) % S for i in range(B)], device=DEVICE)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_decode_matches_reference(shape, dtype, assert_close):
    B, HQ, HKV, S, D = shape
    q = rand(B, HQ, D, dtype=dtype, seed=1)
    kc = rand(B, HKV, S, D, dtype=dtype, seed=2)
    vc = rand(B, HKV, S, D, dtype=dtype, seed=3)
    lens = lens_for(B, S)
    o = decode_attention(q, kc, vc, lens, 1 / math.sqrt(D))
    assert_close(o, decode_attention_reference(q, kc, vc, lens, 1 / math.sqrt(D)), dtype)


@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,block", [((3, 4, 2, 80, 16), 4), ((2, 6, 2, 70, 24), 16), ((2, 2, 1, 20, 8), 3),
                                         ((3, 4, 4, 100, 16), 64)])
def test_decode_with_block_keep_matches_reference(shape, block, dtype, sinks, assert_close):
    """MiniMax-M3's block-sparse layers: each kv head's queries see the keys of its kept blocks only; tiles with
    none kept are skipped, and a head that keeps nothing its length reaches gives zeros (or its sink's share)."""
    B, HQ, HKV, S, D = shape
    q = rand(B, HQ, D, dtype=dtype, seed=1)
    kc, vc = rand(B, HKV, S, D, dtype=dtype, seed=2), rand(B, HKV, S, D, dtype=dtype, seed=3)
    lens = lens_for(B, S)
    nb = -(-S // block)
    keep = torch.rand(B, HKV, nb, generator=torch.Generator().manual_seed(4)).to(DEVICE) < 0.4
    keep[0, 0] = False                                       # a head that sees nothing
    keep[-1, -1, (lens[-1] - 1) // block] = True
    sk = rand(HQ, dtype=torch.float32, seed=5) if sinks else None
    o = decode_attention(q, kc, vc, lens, 1 / math.sqrt(D), sinks=sk, keep=keep, keep_block=block)
    want = decode_attention_reference(q, kc, vc, lens, 1 / math.sqrt(D), sinks=sk, keep=keep, keep_block=block)
    assert_close(o, want, dtype)
    full = decode_attention_reference(q, kc, vc, lens, 1 / math.sqrt(D), sinks=sk)
    assert (want.float() - full.float()).abs().max() > 1e-2      # the blocks left out matter
    if not sinks:
        assert torch.count_nonzero(o[0, :HQ // HKV]) == 0


def test_decode_refuses_a_misshapen_keep():
    q, kc = rand(1, 2, 8, dtype=torch.float32, seed=1), rand(1, 1, 20, 8, dtype=torch.float32, seed=2)
    lens = torch.tensor([20], device=DEVICE)
    for keep, block in [(torch.ones(1, 1, 4, dtype=torch.bool, device=DEVICE), 4),
                        (torch.ones(1, 2, 5, dtype=torch.bool, device=DEVICE), 4),
                        (torch.ones(1, 1, 5, dtype=torch.float32, device=DEVICE), 4)]:
        with pytest.raises(ValueError, match="keep must be"):
            decode_attention(q, kc, kc, lens, 0.3, keep=keep, keep_block=block)


@pytest.mark.parametrize("gqa", [1, 2, 4])
def test_decode_alibi_strided_cache_and_workspace(gqa, assert_close):
    B, HKV, S, D = 3, 2, 45, 32
    HQ = HKV * gqa
    q = rand(B, HQ, D, dtype=torch.float16, seed=7)
    # cache stored [B, S_max, Hkv, D] and viewed as [B, Hkv, S_max, D]; a prefix of a longer cache
    kc = rand(B, S + 10, HKV, D, dtype=torch.float16, seed=8).transpose(1, 2)[:, :, :S]
    vc = rand(B, S + 10, HKV, D, dtype=torch.float16, seed=9).transpose(1, 2)[:, :, :S]
    lens = torch.tensor([1, 33, 45], dtype=torch.int32, device=DEVICE)
    ws = decode_attention_workspace(q, kc)
    o = decode_attention(q, kc, vc, lens, 0.17, alibi_slopes=alibi(HQ), workspace=ws)
    ref = decode_attention_reference(q, kc, vc, lens, 0.17, alibi_slopes=alibi(HQ))
    assert_close(o, ref, torch.float16)


@pytest.mark.parametrize("S", [24, 100])
def test_decode_empty_sequence_gives_zeros(S, assert_close):
    B, HQ, HKV, D = 3, 4, 2, 16
    q = rand(B, HQ, D, dtype=torch.float32, seed=4)
    kc, vc = rand(B, HKV, S, D, dtype=torch.float32, seed=5), rand(B, HKV, S, D, dtype=torch.float32, seed=6)
    lens = torch.tensor([0, S, 3], device=DEVICE)
    o = decode_attention(q, kc, vc, lens, 0.3)
    assert torch.equal(o[0], torch.zeros_like(o[0]))
    assert_close(o, decode_attention_reference(q, kc, vc, lens, 0.3), torch.float32)


def test_decode_equals_last_row_of_causal_prefill(assert_close):
    B, H, S, D = 2, 4, 37, 16
    q, k, v = (rand(B, H, S, D, dtype=torch.float32, seed=i) for i in range(3))
    full = prefill_attention(q, k, v, 0.25, causal=True)
    lens = torch.full((B,), S, device=DEVICE)
    o = decode_attention(q[:, :, -1].contiguous(), k, v, lens, 0.25)
    assert_close(o, full[:, :, -1], torch.float32, tol=1e-5)


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need CUDA")
def test_decode_cuda_graph_capture(assert_close):
    B, HQ, HKV, S, D = 2, 8, 2, 300, 64
    q = rand(B, HQ, D, dtype=torch.float16, seed=1)
    kc, vc = rand(B, HKV, S, D, dtype=torch.float16, seed=2), rand(B, HKV, S, D, dtype=torch.float16, seed=3)
    lens = torch.tensor([5, 100], device=DEVICE)
    ws = decode_attention_workspace(q, kc)
    decode_attention(q, kc, vc, lens, 0.125, workspace=ws)  # compile outside capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = decode_attention(q, kc, vc, lens, 0.125, workspace=ws)
    lens.copy_(torch.tensor([300, 17], device=DEVICE))
    g.replay()
    torch.cuda.synchronize()
    assert_close(out, decode_attention_reference(q, kc, vc, lens, 0.125), torch.float16)


# ---------------------------------------------------------------------------------------------
# sliding window and logit soft-capping
# ---------------------------------------------------------------------------------------------
# The interpreter runs 32 x 32 prefill blocks and 32-key decode chunks: windows of 1, 5 (inside a
# block), 37 (not a block multiple) and 100 (more than S: no window) skip whole key blocks at S = 70.


def window_mask(T, S, window):
    """bool [T, S], True = visible, spelt out one pair at a time from the rule p - W < j <= p."""
    mask = torch.zeros(T, S, dtype=torch.bool)
    for i in range(T):
        p = S - T + i
        for j in range(S):
            mask[i, j] = j <= p and (window == 0 or p - j < window)
    return mask.to(DEVICE)


@pytest.mark.parametrize("mask", [("window", 1), ("window", 3), ("window", 37), ("chunk", 1), ("chunk", 4),
                                  ("chunk", 10)])
def test_prefill_masked_reference_matches_sdpa_with_explicit_mask(mask, assert_close):
    # Checks the reference itself against torch SDPA fed a mask built independently of it (for chunks, as
    # transformers' create_chunked_causal_mask builds it).
    kind, size = mask
    B, HQ, HKV, T, S, D = 2, 4, 2, 13, 45, 16
    q = rand(B, HQ, T, D, dtype=torch.float32, seed=1)
    k = rand(B, HKV, S, D, dtype=torch.float32, seed=2)
    v = rand(B, HKV, S, D, dtype=torch.float32, seed=3)
    ref = prefill_attention_reference(q, k, v, 0.25, **{kind: size})
    kr, vr = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    explicit = window_mask(T, S, size) if kind == "window" else chunk_mask(T, S, size)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=explicit, scale=0.25)
    assert_close(ref, sdpa, torch.float32, tol=1e-5)
    # the mask bites (not plain causal attention), and past 1 a chunk is not a sliding window of its width
    assert (ref - prefill_attention_reference(q, k, v, 0.25)).abs().max() > 0.05
    if kind == "chunk" and size > 1:
        assert (ref - prefill_attention_reference(q, k, v, 0.25, window=size)).abs().max() > 0.05


# (B, Hq, Hkv, T, S, D): full prefill with GQA, and a continuation of a cache (T < S)
MASKED_PREFILL_SHAPES = [(1, 4, 2, 70, 70, 16), (2, 2, 1, 13, 70, 24)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mask", [("window", 1), ("window", 5), ("window", 37), ("window", 100), ("chunk", 1),
                                  ("chunk", 3), ("chunk", 5), ("chunk", 16), ("chunk", 70), ("chunk", 100)])
@pytest.mark.parametrize("shape", MASKED_PREFILL_SHAPES)
def test_prefill_window_and_chunk_match_reference(shape, mask, dtype, assert_close):
    """A sliding window (a query at p sees p - W < j <= p) or Llama 4's chunks (j in p's aligned chunk); either one
    reaching past every key is the plain kernel, bit for bit."""
    S, D = shape[4], shape[5]
    q, k, v = prefill_qkv(shape, dtype)
    kw = {mask[0]: mask[1]}
    o = prefill_attention(q, k, v, 1 / math.sqrt(D), **kw)
    assert_close(o, prefill_attention_reference(q, k, v, 1 / math.sqrt(D), **kw), dtype)
    if mask[1] >= S:
        assert torch.equal(o, prefill_attention(q, k, v, 1 / math.sqrt(D)))


@pytest.mark.parametrize("kind,T", [("window", 50), ("chunk", 40)])
def test_prefill_window_and_chunk_sweep_every_size(kind, T, assert_close):
    # Every window or chunk from 1 to past S, the queries offset into the cache: catches off-by-ones in the block
    # skip, the first key block and the per-row start.
    S, D = 70, 16
    q = rand(1, 1, T, D, dtype=torch.float32, seed=1)
    k, v = rand(1, 1, S, D, dtype=torch.float32, seed=2), rand(1, 1, S, D, dtype=torch.float32, seed=3)
    for size in range(1, S + 2):
        o = prefill_attention(q, k, v, 0.25, **{kind: size})
        assert_close(o, prefill_attention_reference(q, k, v, 0.25, **{kind: size}), torch.float32)


@pytest.mark.parametrize("mask", [("window", 5), ("chunk", 5), ("chunk", 64)])
def test_prefill_skips_key_blocks_before_the_window_or_chunk(mask, assert_close):
    # NaN keys/values that a loaded block would turn into NaN output (0 * NaN in p @ v). The 5 queries at 135..139
    # see keys from 131 (window 5), 135 (chunk 5) or 128 (chunk 64) on, so a key loop starting at the 32- or
    # 64-aligned block of that first key never touches keys [0, 128).
    B, H, T, S, D = 1, 2, 5, 140, 16
    q = rand(B, H, T, D, dtype=torch.float16, seed=1)
    k, v = rand(B, H, S, D, dtype=torch.float16, seed=2), rand(B, H, S, D, dtype=torch.float16, seed=3)
    kp, vp = k.clone(), v.clone()
    kp[:, :, :128] = float("nan")
    vp[:, :, :128] = float("nan")
    o = prefill_attention(q, kp, vp, 0.25, **{mask[0]: mask[1]})
    assert_close(o, prefill_attention_reference(q, k, v, 0.25, **{mask[0]: mask[1]}), torch.float16)


def test_prefill_window_with_alibi_and_padding(assert_close):
    B, H, S, D = 2, 2, 50, 16
    q, k, v = (rand(B, H, S, D, dtype=torch.float16, seed=i) for i in range(3))
    kpm = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
    kpm[1, :20] = False             # left padding: rows 0..19 of sequence 2 see nothing
    args = dict(alibi_slopes=alibi(H), key_padding_mask=kpm, window=9)
    o = prefill_attention(q, k, v, 0.25, **args)
    assert_close(o, prefill_attention_reference(q, k, v, 0.25, **args), torch.float16)
    assert torch.count_nonzero(o[1, :, :20]) == 0


# (B, Hq, Hkv, S_max, D), seq_lens: 32-key chunks, so S_max = 150 runs 5 splits and the long rows
# skip up to 4 of them; S_max = 30 takes the one-split (DIRECT) path. 0 = empty sequence.
WINDOW_DECODE_CASES = [((4, 4, 2, 150, 16), [150, 7, 97, 0]), ((3, 4, 2, 150, 32), [1, 64, 129]),
                       ((3, 4, 2, 30, 16), [30, 1, 17])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [1, 10, 33, 200])
@pytest.mark.parametrize("case", WINDOW_DECODE_CASES)
def test_decode_window_matches_reference(case, window, dtype, assert_close):
    (B, HQ, HKV, S, D), lens = case
    q = rand(B, HQ, D, dtype=dtype, seed=1)
    kc = rand(B, HKV, S, D, dtype=dtype, seed=2)
    vc = rand(B, HKV, S, D, dtype=dtype, seed=3)
    lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    # Stale NaNs in a reused workspace must not leak in through the skipped splits.
    ws = decode_attention_workspace(q, kc).fill_(float("nan"))
    o = decode_attention(q, kc, vc, lens, 1 / math.sqrt(D), window=window, workspace=ws)
    assert_close(o, decode_attention_reference(q, kc, vc, lens, 1 / math.sqrt(D), window=window), dtype)


def test_decode_window_sweep_chunk_edges(assert_close):
    B, HQ, HKV, S, D = 6, 2, 1, 70, 16
    q = rand(B, HQ, D, dtype=torch.float32, seed=1)
    kc, vc = rand(B, HKV, S, D, dtype=torch.float32, seed=2), rand(B, HKV, S, D, dtype=torch.float32, seed=3)
    lens = torch.tensor([70, 64, 63, 33, 32, 5], device=DEVICE)
    # windows that put some row's first key (len - W) on, just before and just after a 32-key chunk edge
    for window in [1, 2, 5, 6, 7, 30, 31, 32, 33, 37, 38, 39, 63, 64, 65, 71]:
        o = decode_attention(q, kc, vc, lens, 0.25, window=window)
        assert_close(o, decode_attention_reference(q, kc, vc, lens, 0.25, window=window), torch.float32)


def test_decode_window_reads_no_key_outside_it(assert_close):
    (B, HQ, HKV, S, D), lens = WINDOW_DECODE_CASES[0]
    W = 10
    q = rand(B, HQ, D, dtype=torch.float32, seed=1)
    kc, vc = rand(B, HKV, S, D, dtype=torch.float32, seed=2), rand(B, HKV, S, D, dtype=torch.float32, seed=3)
    kp, vp = kc.clone(), vc.clone()
    for b, n in enumerate(lens):    # NaN everywhere but the window [n - W, n): any read of it shows
        outside = (torch.arange(S, device=DEVICE) < n - W) | (torch.arange(S, device=DEVICE) >= n)
        kp[b, :, outside] = float("nan")
        vp[b, :, outside] = float("nan")
    lens = torch.tensor(lens, device=DEVICE)
    o = decode_attention(q, kp, vp, lens, 0.25, window=W)
    assert_close(o, decode_attention_reference(q, kc, vc, lens, 0.25, window=W), torch.float32)


def test_decode_window_reference_matches_rule(assert_close):
    # The decode reference is prefill's last row: one key window [len - W, len) per sequence.
    B, H, S, D, W = 3, 2, 40, 16, 11
    q = rand(B, H, D, dtype=torch.float32, seed=1)
    kc, vc = rand(B, H, S, D, dtype=torch.float32, seed=2), rand(B, H, S, D, dtype=torch.float32, seed=3)
    lens = [40, 5, 23]
    ref = decode_attention_reference(q, kc, vc, torch.tensor(lens, device=DEVICE), 0.3, window=W)
    for b, n in enumerate(lens):
        lo = max(0, n - W)
        p = (q[b, :, None] @ kc[b, :, lo:n].transpose(-1, -2) * 0.3).softmax(-1)      # [H, 1, n - lo]
        assert_close(ref[b], (p @ vc[b, :, lo:n])[:, 0], torch.float32, tol=1e-5)


def test_decode_window_equals_last_row_of_windowed_prefill(assert_close):
    B, HQ, HKV, S, D, W = 2, 4, 2, 75, 16, 20
    q = rand(B, HQ, S, D, dtype=torch.float32, seed=0)
    k, v = (rand(B, HKV, S, D, dtype=torch.float32, seed=i) for i in (1, 2))
    full = prefill_attention(q, k, v, 0.25, window=W)
    lens = torch.full((B,), S, device=DEVICE)
    o = decode_attention(q[:, :, -1].contiguous(), k, v, lens, 0.25, window=W)
    assert_close(o, full[:, :, -1], torch.float32, tol=1e-5)


def big_scores_qkv(shape_q, shape_kv, dtype):
    # q.k * sm_scale around +-20: a cap of 5 flattens most scores, so it changes the result.
    q = (rand(*shape_q, dtype=torch.float32, seed=11) * 4).to(dtype)
    k = (rand(*shape_kv, dtype=torch.float32, seed=12) * 4).to(dtype)
    v = rand(*shape_kv, dtype=dtype, seed=13)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal,window,slopes", [(True, 0, False), (False, 0, True), (True, 9, True)])
def test_prefill_softcap(causal, window, slopes, dtype, assert_close):
    B, HQ, HKV, T, S, D = 1, 4, 2, 21, 45, 16
    q, k, v = big_scores_qkv((B, HQ, T, D), (B, HKV, S, D), dtype)
    args = dict(causal=causal, window=window, alibi_slopes=alibi(HQ) if slopes else None)
    o = prefill_attention(q, k, v, 0.25, softcap=5.0, **args)
    ref = prefill_attention_reference(q, k, v, 0.25, softcap=5.0, **args)
    assert_close(o, ref, dtype)
    uncapped = prefill_attention_reference(q, k, v, 0.25, **args)
    assert (ref.float() - uncapped.float()).abs().max() > 0.3


def test_prefill_softcap_huge_scores_stay_finite(assert_close):
    # tanh saturates at +-1 for |s| >> c (scores ~ 1e4 here): no inf / NaN from the exp.
    q, k, v = (rand(1, 2, 33, 16, dtype=torch.float32, seed=i) * (100 if i < 2 else 1) for i in range(3))
    o = prefill_attention(q, k, v, 0.25, softcap=30.0)
    assert_close(o, prefill_attention_reference(q, k, v, 0.25, softcap=30.0), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [0, 13])
def test_decode_softcap(window, dtype, assert_close):
    B, HQ, HKV, S, D = 3, 4, 2, 80, 16
    q, kc, vc = big_scores_qkv((B, HQ, D), (B, HKV, S, D), dtype)
    lens = torch.tensor([80, 9, 50], device=DEVICE)
    o = decode_attention(q, kc, vc, lens, 0.25, alibi_slopes=alibi(HQ), window=window, softcap=5.0)
    ref = decode_attention_reference(q, kc, vc, lens, 0.25, alibi_slopes=alibi(HQ), window=window, softcap=5.0)
    assert_close(o, ref, dtype)
    uncapped = decode_attention_reference(q, kc, vc, lens, 0.25, alibi_slopes=alibi(HQ), window=window)
    assert (ref.float() - uncapped.float()).abs().max() > 0.3


def test_window_and_softcap_reject_bad_inputs():
    q = rand(1, 2, 4, 8, dtype=torch.float32, seed=0)
    lens = torch.tensor([4], device=DEVICE)
    for fn in (prefill_attention, prefill_attention_reference):
        with pytest.raises(ValueError, match="causal"):
            fn(q, q, q, 1.0, causal=False, window=2)
        with pytest.raises(ValueError, match="window"):
            fn(q, q, q, 1.0, window=-1)
        with pytest.raises(ValueError, match="softcap"):
            fn(q, q, q, 1.0, softcap=-1.0)
    for fn in (decode_attention, decode_attention_reference):
        with pytest.raises(ValueError, match="window"):
            fn(q[:, :, 0], q, q, lens, 1.0, window=-3)
        with pytest.raises(ValueError, match="softcap"):
            fn(q[:, :, 0], q, q, lens, 1.0, softcap=-0.5)


# ---------------------------------------------------------------------------------------------
# attention sinks (GPT-OSS): one logit per query head that joins the softmax, then is dropped
# ---------------------------------------------------------------------------------------------


def sinks_for(h, shift=0.0):
    return (rand(h, dtype=torch.float32, seed=21) * 2 + shift)


def explicit_sink_attention(q, k, v, scale, visible, sinks):
    """transformers' eager GPT-OSS attention one (batch, head) at a time: q [B, Hq, T, D], visible bool [B, T, S]."""
    rep = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            s = (q[b, h].float() @ k[b, h // rep].float().T * scale).masked_fill(~visible[b], float("-inf"))
            logits = torch.cat([s, sinks[h].float().expand(s.shape[0], 1)], dim=1)
            p = (logits - logits.max(dim=1, keepdim=True).values).softmax(dim=1)[:, :-1]
            out[b, h] = p @ v[b, h // rep].float()
    return out


@pytest.mark.parametrize("window", [0, 7])
def test_sinks_reference_matches_explicit_softmax(window, assert_close):
    # Checks both references against the sink spelt out: concatenate the column, softmax, drop it. Sequence 1 is
    # fully padded: its rows put all weight on the sink and give zeros.
    B, HQ, HKV, T, S, D = 2, 4, 2, 9, 23, 16
    q = rand(B, HQ, T, D, dtype=torch.float32, seed=1)
    k, v = rand(B, HKV, S, D, dtype=torch.float32, seed=2), rand(B, HKV, S, D, dtype=torch.float32, seed=3)
    kpm = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
    kpm[1] = False
    sinks = sinks_for(HQ).to(torch.float16)         # any float dtype, read as fp32
    ref = prefill_attention_reference(q, k, v, 0.3, key_padding_mask=kpm, window=window, sinks=sinks)
    visible = window_mask(T, S, window)[None] & kpm[:, None, :]
    assert_close(ref, explicit_sink_attention(q, k, v, 0.3, visible, sinks), torch.float32, tol=1e-5)
    assert torch.count_nonzero(ref[1]) == 0
    assert (ref - prefill_attention_reference(q, k, v, 0.3, key_padding_mask=kpm, window=window)).abs().max() > 0.05
    lens = [S, 5]
    dref = decode_attention_reference(q[:, :, -1], k, v, torch.tensor(lens, device=DEVICE), 0.3, window=window,
                                      sinks=sinks)
    visible = torch.zeros(B, 1, S, dtype=torch.bool, device=DEVICE)
    for b, n in enumerate(lens):
        visible[b, 0, :n] = window_mask(1, n, window)[0]          # the query at position n - 1
    explicit = explicit_sink_attention(q[:, :, -1:], k, v, 0.3, visible, sinks)[:, :, 0]
    assert_close(dref, explicit, torch.float32, tol=1e-5)


# (causal, window, alibi, softcap, key padding, sink shift): +8 makes the sink take most of the weight.
SINK_PREFILL_CASES = [(True, 0, False, 0.0, False, 0.0), (True, 9, False, 0.0, False, 8.0),
                      (False, 0, True, 5.0, True, 0.0), (True, 5, True, 5.0, True, 8.0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", SINK_PREFILL_CASES)
def test_prefill_sinks_match_reference(case, dtype, assert_close):
    causal, window, slopes, cap, padded, shift = case
    B, HQ, HKV, T, S, D = 2, 4, 2, 21, 45, 16
    q, k, v = big_scores_qkv((B, HQ, T, D), (B, HKV, S, D), dtype) if cap else prefill_qkv((B, HQ, HKV, T, S, D), dtype)
    kpm = None
    if padded:
        kpm = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
        kpm[1, :30] = False         # rows of sequence 2 before key 30 see nothing with a window
    args = dict(causal=causal, window=window, alibi_slopes=alibi(HQ) if slopes else None, softcap=cap,
                key_padding_mask=kpm, sinks=sinks_for(HQ, shift))
    o = prefill_attention(q, k, v, 0.25, **args)
    assert_close(o, prefill_attention_reference(q, k, v, 0.25, **args), dtype)


# (B, Hq, Hkv, S_max, D), seq_lens: 32-key chunks, so S_max = 80 merges 3 splits in the reduce; S_max = 20 is the
# one-split (DIRECT) path. 0 = empty sequence.
SINK_DECODE_CASES = [((4, 4, 2, 80, 16), [80, 1, 45, 0]), ((3, 8, 2, 20, 16), [20, 0, 7])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window,cap,shift", [(0, 0.0, 0.0), (13, 5.0, 0.0), (0, 0.0, 8.0)])
@pytest.mark.parametrize("case", SINK_DECODE_CASES)
def test_decode_sinks_match_reference(case, window, cap, shift, dtype, assert_close):
    (B, HQ, HKV, S, D), lens = case
    q, kc, vc = big_scores_qkv((B, HQ, D), (B, HKV, S, D), dtype)
    lens = torch.tensor(lens, device=DEVICE)
    args = dict(alibi_slopes=alibi(HQ), window=window, softcap=cap, sinks=sinks_for(HQ, shift))
    ws = decode_attention_workspace(q, kc).fill_(float("nan"))
    o = decode_attention(q, kc, vc, lens, 0.25, workspace=ws, **args)
    ref = decode_attention_reference(q, kc, vc, lens, 0.25, **args)
    assert_close(o, ref, dtype)
    assert torch.count_nonzero(o[lens == 0]) == 0


def test_decode_sinks_equal_last_row_of_prefill(assert_close):
    B, HQ, HKV, S, D = 2, 4, 2, 75, 16
    q = rand(B, HQ, S, D, dtype=torch.float32, seed=0)
    k, v = (rand(B, HKV, S, D, dtype=torch.float32, seed=i) for i in (1, 2))
    sinks = sinks_for(HQ)
    full = prefill_attention(q, k, v, 0.25, window=20, sinks=sinks)
    o = decode_attention(q[:, :, -1].contiguous(), k, v, torch.full((B,), S, device=DEVICE), 0.25, window=20,
                         sinks=sinks)
    assert_close(o, full[:, :, -1], torch.float32, tol=1e-5)


def test_sinks_reject_bad_shapes():
    q = rand(1, 4, 3, 8, dtype=torch.float32, seed=0)
    lens = torch.tensor([3], device=DEVICE)
    for bad in (sinks_for(2), sinks_for(4)[None], torch.zeros(4, dtype=torch.int32, device=DEVICE)):
        for fn in (prefill_attention, prefill_attention_reference):
            with pytest.raises(ValueError, match="sinks must be"):
                fn(q, q, q, 1.0, sinks=bad)
        for fn in (decode_attention, decode_attention_reference):
            with pytest.raises(ValueError, match="sinks must be"):
                fn(q[:, :, 0], q, q, lens, 1.0, sinks=bad)


# ---------------------------------------------------------------------------------------------
# chunked attention (Llama 4): the query at p sees keys j <= p in its aligned chunk, j // C == p // C
# ---------------------------------------------------------------------------------------------
# The interpreter runs 32 x 32 prefill blocks and 32-key decode splits: chunks of 1, 3, 5 (inside a block), 16 (two
# per block, so the rows of a block straddle a chunk edge) and S or more (no chunking) at S = 70.


def chunk_mask(T, S, chunk):
    """bool [T, S], True = visible, built as transformers' create_chunked_causal_mask does: causal and
    kv_idx // chunk_size == q_idx // chunk_size, queries at absolute positions S - T .. S - 1."""
    q_idx = torch.arange(S - T, S)[:, None]
    kv_idx = torch.arange(S)[None, :]
    return ((kv_idx <= q_idx) & (kv_idx // chunk == q_idx // chunk)).to(DEVICE)


def test_decode_chunk_reference_matches_rule(assert_close):
    # The decode query sits at len - 1: it sees keys [(len - 1) // C * C, len).
    B, H, S, D, C = 4, 2, 40, 16, 8
    q = rand(B, H, D, dtype=torch.float32, seed=1)
    kc, vc = rand(B, H, S, D, dtype=torch.float32, seed=2), rand(B, H, S, D, dtype=torch.float32, seed=3)
    lens = [40, 8, 9, 23]
    ref = decode_attention_reference(q, kc, vc, torch.tensor(lens, device=DEVICE), 0.3, chunk=C)
    for b, n in enumerate(lens):
        lo = (n - 1) // C * C
        p = (q[b, :, None] @ kc[b, :, lo:n].transpose(-1, -2) * 0.3).softmax(-1)      # [H, 1, n - lo]
        assert_close(ref[b], (p @ vc[b, :, lo:n])[:, 0], torch.float32, tol=1e-5)


# (softcap, sinks shift or None, alibi, key padding)
CHUNK_PREFILL_EXTRAS = [(5.0, None, False, False), (0.0, 8.0, False, False), (0.0, None, True, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("extras", CHUNK_PREFILL_EXTRAS)
def test_prefill_chunk_with_softcap_sinks_alibi_padding(extras, dtype, assert_close):
    cap, shift, slopes, padded = extras
    B, HQ, HKV, T, S, D = 2, 4, 2, 21, 45, 16
    q, k, v = big_scores_qkv((B, HQ, T, D), (B, HKV, S, D), dtype) if cap else prefill_qkv((B, HQ, HKV, T, S, D), dtype)
    kpm = None
    if padded:
        kpm = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
        kpm[1, :36] = False         # sequence 2: rows in chunk [27, 36) see nothing
    args = dict(chunk=9, softcap=cap, sinks=None if shift is None else sinks_for(HQ, shift),
                alibi_slopes=alibi(HQ) if slopes else None, key_padding_mask=kpm)
    o = prefill_attention(q, k, v, 0.25, **args)
    ref = prefill_attention_reference(q, k, v, 0.25, **args)
    assert_close(o, ref, dtype)
    if padded:
        assert torch.count_nonzero(o[1, :, :12]) == 0     # rows 0..11 are positions 24..35
        assert torch.count_nonzero(o[1, :, 12:]) > 0


def decode_chunk_lens(S, chunk):
    """Two batches of 3 seq_lens: empty, an exact multiple of the chunk, one past a chunk; a single key, full, other."""
    mult = min(S, max(chunk, S // chunk * chunk))
    return [[0, mult, min(S, chunk + 1)], [1, S, min(S, 2 * chunk + 3)]]


# ((B, Hq, Hkv, S_max, D), chunk): S_max = 100 runs 4 splits of 32 keys (chunks inside a split, equal to it, not a
# multiple of it, spanning two, and past S_max); S_max = 30 takes the one-split (DIRECT) path (29: only the last
# position is in the second chunk).
CHUNK_DECODE_CASES = ([((3, 4, 2, 100, 16), c) for c in (1, 7, 32, 40, 64, 150)]
                      + [((3, 4, 1, 30, 24), c) for c in (1, 7, 16, 29, 40)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CHUNK_DECODE_CASES)
def test_decode_chunk_matches_reference(case, dtype, assert_close):
    (B, HQ, HKV, S, D), chunk = case
    q = rand(B, HQ, D, dtype=dtype, seed=1)
    kc = rand(B, HKV, S, D, dtype=dtype, seed=2)
    vc = rand(B, HKV, S, D, dtype=dtype, seed=3)
    for lens in decode_chunk_lens(S, chunk):
        lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
        # Stale NaNs in a reused workspace must not leak in through the skipped splits.
        ws = decode_attention_workspace(q, kc).fill_(float("nan"))
        o = decode_attention(q, kc, vc, lens, 1 / math.sqrt(D), chunk=chunk, workspace=ws)
        assert_close(o, decode_attention_reference(q, kc, vc, lens, 1 / math.sqrt(D), chunk=chunk), dtype)
        assert torch.count_nonzero(o[lens == 0]) == 0


@pytest.mark.parametrize("S", [100, 30])
def test_decode_chunk_reads_no_key_outside_it(S, assert_close):
    B, HQ, HKV, D, C = 4, 4, 2, 16, 12
    lens = [S, 13, 24, 0]
    q = rand(B, HQ, D, dtype=torch.float32, seed=1)
    kc, vc = rand(B, HKV, S, D, dtype=torch.float32, seed=2), rand(B, HKV, S, D, dtype=torch.float32, seed=3)
    kp, vp = kc.clone(), vc.clone()
    pos = torch.arange(S, device=DEVICE)
    for b, n in enumerate(lens):    # NaN everywhere but the chunk [(n - 1) // C * C, n): any read of it shows
        outside = (pos < max(n - 1, 0) // C * C) | (pos >= n)
        kp[b, :, outside] = float("nan")
        vp[b, :, outside] = float("nan")
    lens = torch.tensor(lens, device=DEVICE)
    o = decode_attention(q, kp, vp, lens, 0.25, chunk=C)
    assert_close(o, decode_attention_reference(q, kc, vc, lens, 0.25, chunk=C), torch.float32)


@pytest.mark.parametrize("S", [75, 64])
def test_decode_chunk_equals_last_row_of_chunked_prefill(S, assert_close):
    B, HQ, HKV, D, C = 2, 4, 2, 16, 16
    q = rand(B, HQ, S, D, dtype=torch.float32, seed=0)
    k, v = (rand(B, HKV, S, D, dtype=torch.float32, seed=i) for i in (1, 2))
    sinks = sinks_for(HQ)
    full = prefill_attention(q, k, v, 0.25, chunk=C, softcap=5.0, sinks=sinks)
    o = decode_attention(q[:, :, -1].contiguous(), k, v, torch.full((B,), S, device=DEVICE), 0.25, chunk=C,
                         softcap=5.0, sinks=sinks)
    assert_close(o, full[:, :, -1], torch.float32, tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", SINK_DECODE_CASES)
def test_decode_chunk_with_softcap_sinks_alibi(case, dtype, assert_close):
    (B, HQ, HKV, S, D), lens = case
    q, kc, vc = big_scores_qkv((B, HQ, D), (B, HKV, S, D), dtype)
    lens = torch.tensor(lens, device=DEVICE)
    for args in (dict(softcap=5.0), dict(sinks=sinks_for(HQ, 8.0), alibi_slopes=alibi(HQ))):
        ws = decode_attention_workspace(q, kc).fill_(float("nan"))
        o = decode_attention(q, kc, vc, lens, 0.25, workspace=ws, chunk=6, **args)
        ref = decode_attention_reference(q, kc, vc, lens, 0.25, chunk=6, **args)
        assert_close(o, ref, dtype)
        assert (ref.float() - decode_attention_reference(q, kc, vc, lens, 0.25, **args).float()).abs().max() > 0.05


def test_chunk_rejects_bad_inputs():
    q = rand(1, 2, 4, 8, dtype=torch.float32, seed=0)
    lens = torch.tensor([4], device=DEVICE)
    for fn in (prefill_attention, prefill_attention_reference):
        with pytest.raises(ValueError, match="chunk must be >= 0"):
            fn(q, q, q, 1.0, chunk=-1)
        with pytest.raises(ValueError, match="causal"):
            fn(q, q, q, 1.0, causal=False, chunk=2)
        with pytest.raises(ValueError, match="exclude"):
            fn(q, q, q, 1.0, chunk=2, window=3)
        with pytest.raises(TypeError):
            fn(q, q, q, 1.0, chunk=2.5)
    for fn in (decode_attention, decode_attention_reference):
        with pytest.raises(ValueError, match="chunk must be >= 0"):
            fn(q[:, :, 0], q, q, lens, 1.0, chunk=-3)
        with pytest.raises(ValueError, match="exclude"):
            fn(q[:, :, 0], q, q, lens, 1.0, chunk=2, window=3)
