import pytest
import torch

from fmconvert.kernels.conv1d import causal_conv1d, causal_conv1d_reference

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"


def rand(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def inputs(B, T, C, K, dtype=torch.float32, bias=True, state=True, seed=0):
    """x as the runtime sees it: the q|k|v columns of a wider fused projection (row stride C + 9, not C)."""
    x = rand(B, T, C + 9, seed=seed, dtype=dtype)[..., 4:4 + C]
    w = rand(C, K, seed=seed + 1) * 0.5
    b = rand(C, seed=seed + 2) if bias else None
    s = rand(B, C, K - 1, seed=seed + 3, dtype=dtype) if state else None
    return x, w, b, s


def both(x, w, b, s, silu=True):
    """(out, state after) of the kernel and of the reference, each on its own copy of the state."""
    s1, s2 = (None, None) if s is None else (s.clone(), s.clone())
    return (causal_conv1d(x, w, b, s1, silu=silu), s1), (causal_conv1d_reference(x, w, b, s2, silu=silu), s2)


# T = 1 (decode), T = 2 < K - 1 (the state only shifts), 5, and 70 (several blocks of 16 steps, the last partial);
# C = 1, 37 and 130 (a partial channel block; 130 spans three blocks of 64).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", [1, 2, 5, 70])
@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("C", [1, 37, 130])
def test_conv1d_matches_reference(C, K, T, dtype, assert_close):
    # bias and silu take all four combinations over K and T; each case runs without and with a state.
    bias, silu = K % 2 == 0, T % 2 == 1
    for state in (False, True):
        x, w, b, s = inputs(2, T, C, K, dtype, bias=bias != state, state=state, seed=C + K + T)
        (o, s_out), (r, s_ref) = both(x, w, b, s, silu=silu != state)
        assert o.is_contiguous() and o.shape == (2, T, C)
        assert_close(o, r, dtype)
        if state:
            assert torch.equal(s_out, s_ref)                   # copies of inputs: exact
            xin = torch.cat([s.float(), x.float().transpose(1, 2)], dim=-1)
            assert torch.equal(s_ref.float(), xin[..., T:])    # the last K - 1 inputs, oldest first


def test_conv1d_bf16_and_a_state_of_another_dtype(assert_close):
    """bf16 x (no tl.dot here, so the interpreter runs it), and an fp32 state with fp16 x: read as they are, the
    new columns taken from x are rounded to the state's dtype."""
    x, w, b, _ = inputs(2, 7, 37, 4, torch.bfloat16, seed=3)
    (o, _), (r, _) = both(x, w, b, rand(2, 37, 3, seed=4, dtype=torch.bfloat16))
    assert_close(o, r, torch.bfloat16)
    for T in (1, 7):
        x, w, b, _ = inputs(2, T, 37, 4, torch.float16, seed=5)
        (o, s_out), (r, s_ref) = both(x, w, b, rand(2, 37, 3, seed=6))
        assert s_out.dtype == torch.float32
        assert_close(o, r, torch.float16)
        assert torch.equal(s_out, s_ref)


def test_conv1d_strided_x_and_state(assert_close):
    """x with no unit stride (a transposed [B, C, T]) and a state that is a slot of a bigger pool: read and
    written in place, the pool's other entries untouched."""
    B, T, C, K = 2, 9, 37, 4
    x = rand(B, C, T, seed=7).transpose(1, 2)
    w, b = rand(C, K, seed=8), rand(C, seed=9)
    pool = rand(3, B, C, K + 1, seed=10)
    before = pool.clone()
    state = pool[1, :, :, 2:]                                  # (B, C, K - 1), strides (C (K + 1), K + 1, 1)
    ref_state = state.clone()
    o = causal_conv1d(x, w, b, state)
    assert_close(o, causal_conv1d_reference(x, w, b, ref_state), torch.float32)
    assert torch.equal(state, ref_state)
    pool[1, :, :, 2:] = before[1, :, :, 2:]
    assert torch.equal(pool, before)
    # and the wider-projection view against a contiguous copy of it
    x, w, b, s = inputs(B, T, C, K, seed=11)
    assert not x.is_contiguous()
    assert_close(causal_conv1d(x, w, b, s.clone()), causal_conv1d(x.contiguous(), w, b, s.clone()), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("K", [2, 4])
def test_prompt_then_decode_steps_equal_one_call(K, dtype, assert_close):
    """A prompt from a zero state, then steps of 1 token (and one of 2 < K - 1): the outputs and the final state
    equal one call over the whole sequence."""
    B, C = 2, 37
    x, w, b, _ = inputs(B, 24, C, K, dtype, seed=12)
    whole_state = torch.zeros(B, C, K - 1, dtype=dtype, device=DEVICE)
    whole = causal_conv1d(x, w, b, whole_state)
    state = torch.zeros_like(whole_state)
    cuts = [0, 19, 20, 21, 23, 24]
    parts = [causal_conv1d(x[:, i:j], w, b, state) for i, j in zip(cuts, cuts[1:])]
    assert_close(torch.cat(parts, dim=1), whole, dtype)
    assert torch.equal(state, whole_state)
    # a prompt without a cache is the same as one from a zero state
    assert_close(causal_conv1d(x, w, b, None), whole, dtype)


def test_reference_matches_transformers(assert_close):
    """HF's torch fallbacks take [B, C, T]; their weight is [C, K] too (the conv's [C, 1, K] squeezed) and the
    decode state [B, C, K - 1], updated in place."""
    mod = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")
    B, C, K = 2, 37, 4
    for T, bias, silu in ((1, True, True), (2, False, True), (6, True, False)):
        x, w, b, s = inputs(B, T, C, K, bias=bias, seed=13 + T)
        act = "silu" if silu else None
        hf_state = s.clone()
        hf = mod.causal_conv1d_update(x.transpose(1, 2).contiguous(), hf_state, w, b, act).transpose(1, 2)
        assert torch.equal(causal_conv1d_reference(x, w, b, s, silu=silu), hf)
        assert torch.equal(s, hf_state)
        # HF pads the conv instead of prepending zeros: a different conv algorithm, equal to the last bit or so
        hf = mod.causal_conv1d_fn(x.transpose(1, 2).contiguous(), w, b, activation=act).transpose(1, 2)
        assert_close(causal_conv1d_reference(x, w, b, None, silu=silu), hf, torch.float32, tol=1e-6)
    # fp16 activations with the fp32 weights: both compute in fp32 and round once
    x, w, b, s = inputs(B, 5, C, K, torch.float16, seed=20)
    hf = mod.causal_conv1d_fn(x.transpose(1, 2).contiguous(), w, b, activation="silu").transpose(1, 2)
    assert_close(causal_conv1d_reference(x, w, b, None), hf, torch.float16, tol=1e-3)


def test_conv1d_rejects_bad_inputs():
    x, w, b, s = inputs(2, 3, 8, 4)
    for fn in (causal_conv1d, causal_conv1d_reference):
        with pytest.raises(ValueError, match="x must be"):
            fn(x[0], w, b, s)
        with pytest.raises(ValueError, match="x must be one of"):
            fn(x.to(torch.int32), w, b, s)
        with pytest.raises(ValueError, match="weight"):
            fn(x, w[:5], b, s)
        with pytest.raises(ValueError, match="bias"):
            fn(x, w, b[:5], s)
        with pytest.raises(ValueError, match="state"):
            fn(x, w, b, s[..., :2])
        with pytest.raises(ValueError, match="state"):
            fn(x, w, b, s[:1])
