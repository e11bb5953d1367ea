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
    B, HQ, HKV, T, S, D = shape
    q = rand(B, HQ, T, D, dtype=dtype, seed=1)
    k = rand(B, HKV, S, D, dtype=dtype, seed=2)
    v = rand(B, HKV, S, D, dtype=dtype, seed=3)
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
