import math

import pytest
import torch
import torch.nn.functional as F

from fmconvert.kernels import mla_decode, mla_decode_reference, mla_decode_workspace

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"


def rand(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def lens_t(lens, dtype=torch.int64):
    return torch.tensor(lens, dtype=dtype, device=DEVICE)


# (B, H, kv_rank, rope, S_max, seq_lens). The interpreter splits the cache in chunks of 32 rows walked in
# 16-row tiles and puts 16 heads in a program: S <= 32 takes the one-split path that writes o directly,
# H = 17 takes two head blocks (the second one head), and lengths 0, 1, S_max and non-multiples of 16 occur.
SHAPES = [
    (1, 1, 16, 8, 1, [1]),
    (3, 3, 24, 16, 5, [5, 0, 2]),
    (3, 17, 40, 8, 77, [77, 0, 33]),
    (1, 17, 16, 16, 130, [130]),
    (3, 1, 24, 8, 130, [65, 1, 130]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-r{}-p{}-S{}".format(*s[:5]))
def test_mla_decode_matches_reference(shape, dtype, assert_close):
    B, H, R, P, S, lens = shape
    q = rand(B, H, R + P, dtype=dtype, seed=1)
    cache = rand(B, 1, S, R + P, dtype=dtype, seed=2)
    lens = lens_t(lens)
    scale = 1 / math.sqrt(R + P)
    o = mla_decode(q, cache, lens, scale, R)
    assert_close(o, mla_decode_reference(q, cache, lens, scale, R), dtype)
    assert torch.count_nonzero(o[lens == 0]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-r{}-p{}-S{}".format(*s[:5]))
def test_mla_decode_with_sinks_matches_reference(shape, dtype, assert_close):
    """HY-V4: a logit per head in each softmax's denominator, through the one-split path and the reduce."""
    B, H, R, P, S, lens = shape
    q = rand(B, H, R + P, dtype=dtype, seed=1)
    cache = rand(B, 1, S, R + P, dtype=dtype, seed=2)
    sinks = rand(H, dtype=torch.float32, seed=3) * 2
    lens = lens_t(lens)
    scale = 1 / math.sqrt(R + P)
    o = mla_decode(q, cache, lens, scale, R, sinks=sinks)
    want = mla_decode_reference(q, cache, lens, scale, R, sinks=sinks)
    assert_close(o, want, dtype)
    assert torch.count_nonzero(o[lens == 0]) == 0
    full = lens > 0
    if full.any():      # the sink takes its share: the output is not the sinkless one
        assert (want[full].float() - mla_decode_reference(q, cache, lens, scale, R)[full].float()).abs().max() > 1e-3


def test_mla_decode_rejects_misshapen_sinks():
    q, cache = rand(1, 3, 24, dtype=torch.float32, seed=1), rand(1, 1, 4, 24, dtype=torch.float32, seed=2)
    with pytest.raises(ValueError, match="sinks"):
        mla_decode(q, cache, lens_t([4]), 0.2, 16, sinks=torch.zeros(2, device=DEVICE))


@pytest.mark.skipif(not ON_CUDA, reason="DeepSeek-V3 shapes are too slow for the interpreter")
@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("H", [16, 128])
def test_mla_decode_deepseek_v3_shapes(H, B, assert_close):
    R, P, S, dtype = 512, 64, 4096, torch.bfloat16
    q = rand(B, H, R + P, dtype=dtype, seed=1)
    cache = rand(B, 1, S, R + P, dtype=dtype, seed=2)
    lens = lens_t([S] if B == 1 else [0, S, 1] + [1 + (i * 523) % S for i in range(B - 3)], torch.int32)
    scale = 1 / math.sqrt(128 + 64)            # DeepSeek-V3's qk_nope_head_dim + qk_rope_head_dim
    o = mla_decode(q, cache, lens, scale, R, workspace=mla_decode_workspace(q, cache, R))
    assert_close(o, mla_decode_reference(q, cache, lens, scale, R), dtype)


def test_mla_decode_strided_cache_and_reused_workspace(assert_close):
    # The cache of layer 1 out of a stacked [L, B_max, S_alloc, D] buffer: a slice along batch and along S.
    B, H, R, P, S, dtype = 2, 3, 24, 8, 70, torch.float16
    big = rand(2, B + 1, S + 9, R + P, dtype=dtype, seed=3)
    cache = big[1, 1:, 4:4 + S].unsqueeze(1)                                   # [B, 1, S, D], strided
    assert not cache.is_contiguous()
    ws = mla_decode_workspace(rand(B, H, R + P, dtype=dtype, seed=0), cache, R)
    for seed, lens in ((4, [70, 17]), (5, [33, 0]), (6, [1, 64])):
        q = rand(B, H, R + P + 8, dtype=dtype, seed=seed)[..., 8:]            # a slice of a wider projection
        lens = lens_t(lens, torch.int32)
        o = mla_decode(q, cache, lens, 0.2, R, workspace=ws)
        assert_close(o, mla_decode_reference(q, cache, lens, 0.2, R), dtype)
        assert_close(o, mla_decode(q, cache.contiguous(), lens, 0.2, R), dtype, tol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mla_decode_rows_past_seq_len_do_not_matter(dtype, assert_close):
    B, H, R, P, S = 3, 5, 16, 8, 70
    q = rand(B, H, R + P, dtype=dtype, seed=7)
    clean = rand(B, 1, S, R + P, dtype=dtype, seed=8)
    lens = lens_t([45, 0, 3])
    dirty = clean.clone()
    huge = 6e4 if dtype == torch.float16 else 1e30                            # finite: no NaN in the reference
    for b, n in enumerate(lens.tolist()):
        dirty[b, :, n:] = huge * torch.sign(rand(S - n, R + P, dtype=torch.float32, seed=b)).to(dtype)
    o = mla_decode(q, dirty, lens, 0.2, R)
    assert torch.equal(o, mla_decode(q, clean, lens, 0.2, R))
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    assert_close(o, mla_decode_reference(q, clean, lens, 0.2, R), dtype)


def test_mla_decode_seq_len_past_s_max_reads_as_s_max():
    # Lengths past S_max read as S_max: no row outside the cache is loaded (direct and split paths).
    for S in (20, 70):
        q = rand(2, 3, 24, dtype=torch.float32, seed=11)
        cache = rand(2, 1, S, 24, dtype=torch.float32, seed=12)
        o = mla_decode(q, cache, lens_t([S + 5, 1 << 30]), 0.2, 16)
        assert torch.equal(o, mla_decode(q, cache, lens_t([S, S]), 0.2, 16))


def test_mla_decode_matches_sdpa_on_expanded_heads(assert_close):
    # Independent of the reference: every head gets K = the whole cache row and V = its latent prefix.
    B, H, R, P, S = 2, 5, 24, 8, 45
    q = rand(B, H, R + P, dtype=torch.float32, seed=9)
    cache = rand(B, 1, S, R + P, dtype=torch.float32, seed=10)
    lens = lens_t([45, 20])
    k = cache.expand(B, H, S, R + P)
    v = cache[..., :R].expand(B, H, S, R)
    visible = (torch.arange(S, device=DEVICE)[None, :] < lens[:, None])[:, None, None, :]   # [B, 1, 1, S]
    want = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=visible, scale=0.15)[:, :, 0]
    assert_close(mla_decode(q, cache, lens, 0.15, R), want, torch.float32)


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need CUDA")
def test_mla_decode_cuda_graph_capture(assert_close):
    B, H, R, P, S, dtype = 2, 16, 512, 64, 3000, torch.bfloat16
    q = rand(B, H, R + P, dtype=dtype, seed=1)
    cache = rand(B, 1, S, R + P, dtype=dtype, seed=2)
    lens = lens_t([5, 100])
    ws = mla_decode_workspace(q, cache, R)
    mla_decode(q, cache, lens, 0.07, R, workspace=ws)  # compile outside capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = mla_decode(q, cache, lens, 0.07, R, workspace=ws)
    lens.copy_(torch.tensor([3000, 17], device=DEVICE))
    g.replay()
    torch.cuda.synchronize()
    assert_close(out, mla_decode_reference(q, cache, lens, 0.07, R), dtype)


def test_mla_decode_rejects_bad_inputs():
    B, H, R, P, S = 2, 3, 16, 8, 10
    q = rand(B, H, R + P, dtype=torch.float32, seed=0)
    cache = rand(B, 1, S, R + P, dtype=torch.float32, seed=1)
    lens = lens_t([3, 4])
    cases = [
        ((q.to(torch.int32), cache, lens, 1.0, R), {}, "q must be one of"),
        ((q[0], cache, lens, 1.0, R), {}, r"q must be \[B, H"),
        ((q, cache.expand(B, 2, S, R + P), lens, 1.0, R), {}, r"cache \[B, 1, S_max"),
        ((q, cache[:1], lens, 1.0, R), {}, "does not match q"),
        ((q, cache[..., :R], lens, 1.0, R), {}, "does not match q"),
        ((q, cache.half(), lens, 1.0, R), {}, "dtypes differ"),
        ((q, cache, lens, 1.0, 0), {}, "kv_rank must be in"),
        ((q, cache, lens, 1.0, R + P), {}, "kv_rank must be in"),
        ((q, cache.transpose(2, 3).contiguous().transpose(2, 3), lens, 1.0, R), {}, "contiguous last dim"),
        ((q, cache, lens[:1], 1.0, R), {}, "seq_lens must be"),
        ((q, cache, lens.float(), 1.0, R), {}, "seq_lens must be"),
        ((q, cache, lens, 1.0, R), {"workspace": torch.empty(B, H, 1, R, device=DEVICE)}, "workspace must be"),
        ((q, cache, lens, 1.0, R), {"workspace": mla_decode_workspace(q, cache, R).double()}, "workspace must be"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            mla_decode(*args, **kwargs)
    with pytest.raises(ValueError, match="kv_rank must be in"):
        mla_decode_workspace(q, cache, R + P + 1)
