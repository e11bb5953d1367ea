import pytest
import torch
import torch.nn.functional as F

from fmconvert.kernels.delta_rule import gated_delta, gated_delta_reference
from fmconvert.runtime.ops import gated_delta_chunked

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
# The kernel has no tl.dot, so bf16 runs correctly under the interpreter too (conftest's FLOAT_DTYPES leave it out
# on CPU for the dot kernels' sake).
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rand(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def inputs(B, T, Hk, Hv, Dk, Dv, dtype=torch.float32, seed=0, g_scale=1.0):
    """q, k, v, g, beta and a nonzero initial state, distributed as in a Qwen3.5 layer: g = -softplus (<= 0),
    beta = sigmoid."""
    q = rand(B, T, Hk, Dk, seed=seed, dtype=dtype)
    k = rand(B, T, Hk, Dk, seed=seed + 1, dtype=dtype)
    v = rand(B, T, Hv, Dv, seed=seed + 2, dtype=dtype)
    g = -F.softplus(rand(B, T, Hv, seed=seed + 3)) * g_scale
    beta = torch.sigmoid(rand(B, T, Hv, seed=seed + 4))
    state = rand(B, Hv, Dk, Dv, seed=seed + 5) * 0.5
    return q, k, v, g, beta, state


def run(fn, q, k, v, g, beta, state, **kw):
    """(o, final state) of fn on a copy of state."""
    s = state.clone()
    o = fn(q, k, v, g, beta, s, q.shape[-1] ** -0.5, **kw)
    return o, s


def check(out, ref, dtype, assert_close):
    assert_close(out[0], ref[0], dtype)
    # The state is fp32 in every form; only o is rounded to the input dtype.
    assert_close(out[1], ref[1], torch.float32)


# (B, T, Hk, Hv, Dk, Dv). T = 1 (decode), T < chunk, T = 67 and 130 (not multiples of 64 or 16: padded);
# Hv = Hk and Hv = 3 * Hk; Dk != Dv with sizes that are not powers of two.
CHUNK_SHAPES = [
    (2, 1, 2, 2, 24, 40),
    (1, 5, 1, 3, 40, 24),
    (2, 67, 2, 6, 24, 40),
    (1, 130, 2, 2, 16, 32),
    (1, 130, 1, 3, 24, 40),
]


@pytest.mark.parametrize("chunk", [64, 16])
@pytest.mark.parametrize("shape", CHUNK_SHAPES, ids=lambda s: "B{}-T{}-Hk{}-Hv{}-Dk{}-Dv{}".format(*s))
def test_chunked_matches_reference(shape, chunk, assert_close):
    x = inputs(*shape, seed=10)
    check(run(gated_delta_chunked, *x, chunk=chunk), run(gated_delta_reference, *x), torch.float32, assert_close)


def test_chunked_strong_decay_and_fp16(assert_close):
    # g down to about -20 a token: e^gamma underflows to 0 within a chunk, and nothing may turn into inf or NaN.
    x = inputs(2, 70, 1, 2, 24, 40, dtype=torch.float16, seed=20, g_scale=8.0)
    check(run(gated_delta_chunked, *x, chunk=32), run(gated_delta_reference, *x), torch.float16, assert_close)


# Interpreter time grows with B * Hv * cdiv(Dv, 16) programs times T steps: keep these small.
TRITON_SHAPES = [
    (1, 1, 1, 2, 40, 24),      # decode; Hv = 2 * Hk; Dv over two value blocks, the second masked
    (2, 6, 2, 4, 24, 40),      # three value blocks; Dk pads 24 -> 32
    (1, 9, 3, 3, 16, 8),       # Hv = Hk, powers of two, one block narrower than 16
]


# (B, T, Hk, Hv, Dk, Dv): Dk 3, 16, 17 (pads to 4, -, 32); Dv 5, 16, 33 (one block, one full, three with a
# 1-wide last); T 1, 2, 9; Hv = Hk and Hv = 2 * Hk.
KDA_SHAPES = [
    (1, 1, 1, 1, 3, 5),
    (2, 2, 2, 2, 16, 33),
    (1, 9, 1, 2, 17, 16),
    (1, 9, 2, 4, 3, 33),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay,shape", [("head", s) for s in TRITON_SHAPES] + [("channel", s) for s in KDA_SHAPES],
                         ids=lambda s: "B{}-T{}-Hk{}-Hv{}-Dk{}-Dv{}".format(*s) if isinstance(s, tuple) else s)
def test_triton_matches_reference(decay, shape, dtype, assert_close):
    x = (inputs(*shape, dtype=dtype, seed=30) if decay == "head"       # KDA: a decay per key channel
         else kda_inputs(*shape, dtype=dtype, seed=120))
    out = run(gated_delta, *x)
    assert out[0].dtype == dtype
    check(out, run(gated_delta_reference, *x), dtype, assert_close)


def _views_match_contiguous(q, k, v, g, beta, pool, dtype, assert_close):
    """The kernel on views (q|k|v column slices of one projection, the state one layer of a [B, 3, ...] pool)
    equals the reference on contiguous copies, bit for bit the kernel on those copies, and leaves the pool's other
    layers untouched. Returns (the reference's output, its final state, the initial state)."""
    others, state = pool[:, [0, 2]].clone(), pool[:, 1]
    assert not (q.is_contiguous() or v.is_contiguous() or state.is_contiguous())
    s0 = state.clone()
    o = gated_delta(q, k, v, g, beta, state, q.shape[-1] ** -0.5)
    contig = [t.contiguous() for t in (q, k, v, g, beta)]
    o_ref, s_ref = run(gated_delta_reference, *contig, s0)
    assert_close(o, o_ref, dtype)
    assert_close(pool[:, 1], s_ref, torch.float32)
    assert torch.equal(pool[:, [0, 2]], others)
    o_c, s_c = run(gated_delta, *contig, s0)
    assert torch.equal(o, o_c) and torch.equal(pool[:, 1], s_c)
    return o_ref, s_ref, s0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_views_of_fused_projection(dtype, assert_close):
    # q | k | v are column slices of one projection output, g and beta strided slices of one [B, T, Hv, 2]
    # tensor, and the state one layer of a [B, L, Hv, Dk, Dv] pool: the kernel reads them all through strides.
    B, T, Hk, Hv, Dk, Dv = 2, 5, 2, 4, 40, 24
    fused = rand(B, T, 2 * Hk * Dk + Hv * Dv + 8, seed=40, dtype=dtype)
    q = fused[..., :Hk * Dk].view(B, T, Hk, Dk)
    k = fused[..., Hk * Dk:2 * Hk * Dk].view(B, T, Hk, Dk)
    v = fused[..., 2 * Hk * Dk:2 * Hk * Dk + Hv * Dv].view(B, T, Hv, Dv)
    ab = rand(B, T, Hv, 2, seed=41)
    g, beta = -F.softplus(ab[..., 0]), torch.sigmoid(ab[..., 1])
    g, beta = torch.stack([g, beta], -1).unbind(-1)                                        # strided again
    pool = rand(B, 3, Hv, Dk, Dv, seed=42) * 0.5
    assert not g.is_contiguous()
    o_ref, s_ref, s0 = _views_match_contiguous(q, k, v, g, beta, pool, dtype, assert_close)
    # The torch prompt path takes the same views.
    pool[:, 1] = s0
    assert_close(gated_delta_chunked(q, k, v, g, beta, pool[:, 1], Dk ** -0.5, chunk=4), o_ref, dtype)
    assert_close(pool[:, 1], s_ref, torch.float32)


@pytest.mark.parametrize("fn", [gated_delta, gated_delta_chunked, gated_delta_reference],
                         ids=["triton", "chunked", "reference"])
def test_state_updated_in_place(fn, assert_close):
    x = inputs(2, 3, 1, 2, 24, 16, seed=50)
    state = x[-1].clone()
    ptr = state.data_ptr()
    fn(*x[:-1], state, 24 ** -0.5)
    assert state.data_ptr() == ptr
    assert_close(state, run(gated_delta_reference, *x)[1], torch.float32)
    assert not torch.equal(state, x[-1])


@pytest.mark.parametrize("prompt_fn", [gated_delta, gated_delta_chunked], ids=["triton", "chunked"])
def test_prompt_then_decode_steps_equal_one_call(prompt_fn, assert_close):
    # The runtime's pattern: a prompt through one form, then T = 1 steps through the kernel on the same state.
    B, T, P, Hk, Hv, Dk, Dv = 1, 10, 6, 1, 2, 24, 24
    q, k, v, g, beta, state = inputs(B, T, Hk, Hv, Dk, Dv, seed=60)
    scale = Dk ** -0.5
    o_full, s_full = run(gated_delta, q, k, v, g, beta, state)
    s = state.clone()
    kw = {"chunk": 4} if prompt_fn is gated_delta_chunked else {}
    outs = [prompt_fn(q[:, :P], k[:, :P], v[:, :P], g[:, :P], beta[:, :P], s, scale, **kw)]
    for t in range(P, T):
        sl = slice(t, t + 1)
        outs.append(gated_delta(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], s, scale))
    assert_close(torch.cat(outs, 1), o_full, torch.float32)
    assert_close(s, s_full, torch.float32)
    assert_close(o_full, run(gated_delta_reference, q, k, v, g, beta, state)[0], torch.float32)


def test_empty_sequence_keeps_state():
    q, k, v, g, beta, state = inputs(2, 0, 1, 2, 24, 16, seed=70)
    for fn in (gated_delta, gated_delta_chunked, gated_delta_reference):
        s = state.clone()
        o = fn(q, k, v, g, beta, s, 0.2)
        assert o.shape == (2, 0, 2, 16) and torch.equal(s, state)


def test_reference_matches_transformers(assert_close):
    # Pins the semantics (L2 norm eps, scale, decay order, grouped heads) to the model code's own recurrence.
    mod = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")
    B, T, Hk, Hv, Dk, Dv = 2, 7, 2, 4, 24, 40
    q, k, v, g, beta, state = inputs(B, T, Hk, Hv, Dk, Dv, seed=80)
    # Older transformers (5.17, the GPU image's) take q/k already repeated to the value heads; newer ones group
    # them inside. Repeated here, both read the same grouping: value head h uses key head h // (Hv // Hk).
    qr, kr = (t.repeat_interleave(Hv // Hk, dim=2) for t in (q, k))
    o_hf, s_hf = mod.torch_recurrent_gated_delta_rule(qr, kr, v, g, beta, initial_state=state.clone(),
                                                      output_final_state=True, use_qk_l2norm_in_kernel=True)
    o, s = run(gated_delta_reference, q, k, v, g, beta, state)
    assert_close(o, o_hf, torch.float32, tol=1e-5)
    assert_close(s, s_hf, torch.float32, tol=1e-5)


def test_rejects_bad_inputs():
    B, T, Hk, Hv, Dk, Dv = 2, 3, 2, 4, 16, 8
    q, k, v, g, beta, state = inputs(B, T, Hk, Hv, Dk, Dv, seed=90)
    big = inputs(1, 1, 1, 1, 264, 8, seed=91)
    cases = [
        ((q.to(torch.int32), k, v, g, beta, state), "q must be one of"),
        ((q[0], k, v, g, beta, state), r"q, k must be \[B, T, Hk, Dk\]"),
        ((q, k[..., :8], v, g, beta, state), "do not match"),
        ((q, k, v[:, :2], g, beta, state), "do not match"),
        ((q, k, v.half(), g, beta, state), "dtypes differ"),
        ((q, k, v[:, :, :3], g[..., :3], beta[..., :3], state[:, :3]), "must be a multiple of key heads"),
        ((q, k, v, g.half(), beta, state), "g must be fp32"),
        ((q, k, v, g, beta[:, :2], state), "beta must be fp32"),
        ((q, k, v, g, beta, state[..., :4]), "state must be fp32"),
        ((q, k, v, g, beta, state.double()), "state must be fp32"),
        ((q, k, v, g, beta, state.transpose(2, 3).contiguous().transpose(2, 3)), "contiguous last dim"),
        (big, "head dims must be <= 256"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            gated_delta(*args, 0.25)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        gated_delta_chunked(q, k, v, g, beta, state, 0.25, chunk=0)
    with pytest.raises(ValueError, match="a multiple of the key heads"):
        q3 = rand(B, T, 3, Dk, seed=92)
        gated_delta_chunked(q3, q3, v, g, beta, state, 0.25)


@pytest.mark.skipif(not ON_CUDA, reason="Qwen3.5 sizes are too slow for the interpreter")
@pytest.mark.parametrize("T", [1, 300])
def test_triton_qwen35_sizes(T, assert_close):
    # Qwen3.5's linear attention: 16 key heads, 32 value heads, Dk = Dv = 128, bf16.
    x = inputs(2, T, 16, 32, 128, 128, dtype=torch.bfloat16, seed=100)
    # The reference runs on CPU: no TF32 in its fp32 matmuls, whatever the process set.
    check(run(gated_delta, *x), run(gated_delta_reference, *(t.cpu() for t in x)), torch.bfloat16, assert_close)


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need CUDA")
def test_triton_decode_cuda_graph_capture(assert_close):
    q, k, v, g, beta, state = inputs(2, 1, 2, 4, 128, 128, dtype=torch.bfloat16, seed=110)
    gated_delta(q, k, v, g, beta, state.clone(), 0.1)                                      # compile outside capture
    s = state.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gated_delta(q, k, v, g, beta, s, 0.1)
    s.copy_(state)
    graph.replay()
    torch.cuda.synchronize()
    s_ref = state.cpu()
    assert_close(out, gated_delta_reference(q.cpu(), k.cpu(), v.cpu(), g.cpu(), beta.cpu(), s_ref, 0.1),
                 torch.bfloat16)
    assert_close(s, s_ref, torch.float32)


# KDA (Kimi Linear): g [B, T, Hv, Dk], a log decay per key channel, i.e. per row of the state.

def kda_inputs(B, T, Hk, Hv, Dk, Dv, dtype=torch.float32, seed=0):
    """inputs() with a per-channel g: -softplus of a wide normal, so channels decay at clearly different rates
    (some barely, some to ~e^-6 a token)."""
    q, k, v, _, beta, state = inputs(B, T, Hk, Hv, Dk, Dv, dtype=dtype, seed=seed)
    g = -F.softplus(rand(B, T, Hv, Dk, seed=seed + 6) * 2.5)
    return q, k, v, g, beta, state




def test_per_channel_decay_equal_across_channels_is_per_head(assert_close):
    # The same decay in every key channel is the per-head rule: pins which axis the per-channel g scales.
    q, k, v, g, beta, state = inputs(1, 4, 1, 2, 17, 24, seed=130)
    g4 = g[..., None].expand(*g.shape, 17).contiguous()
    for fn in (gated_delta, gated_delta_reference):
        check(run(fn, q, k, v, g4, beta, state), run(fn, q, k, v, g, beta, state), torch.float32, assert_close)
    # ...and a different decay per channel is not.
    g4[..., 0] = -3.0
    assert not torch.allclose(run(gated_delta, q, k, v, g4, beta, state)[1],
                              run(gated_delta, q, k, v, g, beta, state)[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_per_channel_views_of_fused_projection(dtype, assert_close):
    # Kimi's layout: q | k | v columns of one projection, g [Hv * Dk] columns of a wider fp32 tensor (row stride
    # > Hv * Dk, last dim contiguous), beta a strided column, the state one layer of a pool.
    B, T, H, Dk, Dv = 2, 3, 2, 17, 24
    fused = rand(B, T, H * (2 * Dk + Dv) + 5, seed=140, dtype=dtype)
    q = fused[..., :H * Dk].view(B, T, H, Dk)
    k = fused[..., H * Dk:2 * H * Dk].view(B, T, H, Dk)
    v = fused[..., 2 * H * Dk:2 * H * Dk + H * Dv].view(B, T, H, Dv)
    g = (-F.softplus(rand(B, T, H * Dk + 7, seed=141) * 2))[..., 3:3 + H * Dk].view(B, T, H, Dk)
    beta = torch.sigmoid(rand(B, T, H, 2, seed=142))[..., 1]
    pool = rand(B, 3, H, Dk, Dv, seed=143) * 0.5
    assert not (g.is_contiguous() or beta.is_contiguous())
    _views_match_contiguous(q, k, v, g, beta, pool, dtype, assert_close)


def test_per_channel_prompt_then_decode_steps_equal_one_call(assert_close):
    B, T, P, Hk, Hv, Dk, Dv = 1, 7, 4, 1, 2, 16, 5
    q, k, v, g, beta, state = kda_inputs(B, T, Hk, Hv, Dk, Dv, seed=150)
    scale = Dk ** -0.5
    o_full, s_full = run(gated_delta, q, k, v, g, beta, state)
    for fn in (gated_delta, gated_delta_reference):
        s = state.clone()
        outs = [fn(q[:, :P], k[:, :P], v[:, :P], g[:, :P], beta[:, :P], s, scale)]
        for t in range(P, T):
            sl = slice(t, t + 1)
            outs.append(fn(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], s, scale))
        assert_close(torch.cat(outs, 1), o_full, torch.float32)
        assert_close(s, s_full, torch.float32)


def test_reference_per_channel_matches_transformers(assert_close):
    # Kimi Linear's own recurrence (Hv = Hk, scale 1/sqrt(Dk), its l2norm x / sqrt(sum x^2 + 1e-6)), and the
    # kernel through the reference.
    mod = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    B, T, H, Dk, Dv = 2, 6, 3, 17, 24
    q, k, v, g, beta, state = kda_inputs(B, T, H, H, Dk, Dv, seed=160)
    o_hf, s_hf = mod.recurrent_kimi_delta_attention(q, k, v, g, beta, initial_state=state.clone(),
                                                    output_final_state=True, use_qk_l2norm_in_kernel=True)
    o, s = run(gated_delta_reference, q, k, v, g, beta, state)
    assert_close(o, o_hf, torch.float32, tol=1e-5)
    assert_close(s, s_hf, torch.float32, tol=1e-5)
    check(run(gated_delta, q, k, v, g, beta, state), (o_hf, s_hf), torch.float32, assert_close)


def test_rejects_bad_per_channel_g():
    B, T, Hk, Hv, Dk, Dv = 1, 2, 1, 2, 16, 8
    q, k, v, g, beta, state = kda_inputs(B, T, Hk, Hv, Dk, Dv, seed=170)
    cases = [
        (g[..., :15], "g must be fp32"),                                     # Dk - 1 channels
        (torch.cat([g, g[..., :1]], -1), "g must be fp32"),                  # Dk + 1
        (g[..., :1], "g must be fp32"),                                      # one channel: not broadcast
        (g[:, :, :1], "g must be fp32"),                                     # Hk heads, not Hv
        (g[..., None], "g must be fp32"),                                    # 5-d
        (g[:, :, 0, 0], "g must be fp32"),                                   # 2-d
        (g.half(), "g must be fp32"),
        (g.transpose(2, 3).contiguous().transpose(2, 3), "contiguous last dim"),
        (g[..., :1].expand(B, T, Hv, Dk), "contiguous last dim"),           # a broadcast: stride 0
    ]
    for bad, match in cases:
        for fn in (gated_delta, gated_delta_reference):
            with pytest.raises(ValueError, match=match):
                fn(q, k, v, bad, beta, state.clone(), 0.25)
    if ON_CUDA:
        with pytest.raises(ValueError, match="share one device"):
            gated_delta(q, k, v, g.cpu(), beta, state, 0.25)
