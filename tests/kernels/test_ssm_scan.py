import pytest
import torch
import torch.nn.functional as F

from fmconvert.kernels.selective_scan import ssm_scan, ssm_scan_reference
from fmconvert.runtime.ops import ssm_scan_chunked

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
# The kernel has no tl.dot, so bf16 runs correctly under the interpreter too.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HF = "transformers.models.granitemoehybrid.modeling_granitemoehybrid"


def rand(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def inputs(B, T, H, G, P, N, dtype=torch.float32, seed=0, dt_scale=1.0, with_d=True):
    """x, dt, A, Bm, Cm, D and a nonzero initial state, distributed as in a Mamba2 layer: dt = softplus(raw + bias)
    (> 0), A = -exp(A_log) with A_log in [0, 2.5) (Granite initialises A = -1 .. -H)."""
    x = rand(B, T, H, P, seed=seed, dtype=dtype)
    dt = F.softplus(rand(B, T, H, seed=seed + 1) - 1.0) * dt_scale
    A = -torch.exp(torch.rand(H, generator=torch.Generator().manual_seed(seed + 2)) * 2.5).to(DEVICE)
    Bm = rand(B, T, G, N, seed=seed + 3, dtype=dtype)
    Cm = rand(B, T, G, N, seed=seed + 4, dtype=dtype)
    D = rand(H, seed=seed + 5) if with_d else None
    state = rand(B, H, P, N, seed=seed + 6) * 0.5
    return x, dt, A, Bm, Cm, D, state


def run(fn, x, dt, A, Bm, Cm, D, state, **kw):
    """(y, final state) of fn on a copy of state."""
    s = state.clone()
    return fn(x, dt, A, Bm, Cm, D, s, **kw), s


def check(out, ref, dtype, assert_close):
    assert_close(out[0], ref[0], dtype)
    # The state is fp32 in every form; only y is rounded to the input dtype.
    assert_close(out[1], ref[1], torch.float32)


def ids(s):
    return "B{}-T{}-H{}-G{}-P{}-N{}".format(*s)


# (B, T, H, G, P, N). T = 1 (decode), T < chunk, T = 67 and 130 (not multiples of 64 or 16: padded); G = 1,
# G = 2 with H = 4, G = H; P != N, sizes that are not powers of two.
CHUNK_SHAPES = [
    (2, 1, 2, 1, 24, 40),
    (1, 5, 4, 2, 40, 24),
    (2, 67, 4, 2, 24, 40),
    (1, 130, 3, 3, 16, 8),
    (1, 130, 4, 1, 8, 40),
]


@pytest.mark.parametrize("with_d", [True, False], ids=["D", "noD"])
@pytest.mark.parametrize("chunk", [64, 16])
@pytest.mark.parametrize("shape", CHUNK_SHAPES, ids=ids)
def test_chunked_matches_reference(shape, chunk, with_d, assert_close):
    x = inputs(*shape, seed=10, with_d=with_d)
    check(run(ssm_scan_chunked, *x, chunk=chunk), run(ssm_scan_reference, *x), torch.float32, assert_close)


def test_chunked_strong_decay_and_fp16(assert_close):
    # dt * A down to about -100 a token: decays underflow to 0 within a chunk, and nothing may turn into inf or NaN.
    x = inputs(2, 70, 4, 2, 24, 40, dtype=torch.float16, seed=20, dt_scale=10.0)
    check(run(ssm_scan_chunked, *x, chunk=32), run(ssm_scan_reference, *x), torch.float16, assert_close)


# Interpreter time grows with B * H * cdiv(P, 16) programs times T steps: keep these small.
TRITON_SHAPES = [
    (1, 1, 2, 1, 24, 40),      # decode; P over two blocks of 16, the second masked; N pads 40 -> 64
    (2, 6, 4, 2, 40, 24),      # three row blocks; two heads a group
    (1, 9, 3, 3, 16, 8),       # G = H, powers of two, one block
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=ids)
def test_triton_matches_reference(shape, dtype, assert_close):
    x = inputs(*shape, dtype=dtype, seed=30)
    out = run(ssm_scan, *x)
    assert out[0].dtype == dtype and out[0].is_contiguous()
    check(out, run(ssm_scan_reference, *x), dtype, assert_close)


def test_triton_without_d(assert_close):
    x = inputs(2, 4, 4, 2, 24, 40, seed=35, with_d=False)
    check(run(ssm_scan, *x), run(ssm_scan_reference, *x), torch.float32, assert_close)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_views_of_fused_projection(dtype, assert_close):
    # x | B | C are column slices of one conv output (as Mamba2 splits xBC), dt a strided slice of a wider
    # tensor, and the state one layer of a [B, L, H, P, N] pool: the kernel reads them all through strides.
    B, T, H, G, P, N = 2, 5, 4, 2, 24, 40
    fused = rand(B, T, H * P + 2 * G * N + 8, seed=40, dtype=dtype)
    x = fused[..., :H * P].view(B, T, H, P)
    Bm = fused[..., H * P:H * P + G * N].view(B, T, G, N)
    Cm = fused[..., H * P + G * N:H * P + 2 * G * N].view(B, T, G, N)
    dt = F.softplus(rand(B, T, H, 3, seed=41))[..., 1]
    _, _, A, _, _, D, _ = inputs(B, T, H, G, P, N, seed=42)
    pool = rand(B, 3, H, P, N, seed=43) * 0.5
    others = pool[:, [0, 2]].clone()
    state = pool[:, 1]
    assert not (x.is_contiguous() or Bm.is_contiguous() or dt.is_contiguous() or state.is_contiguous())
    s0 = state.clone()
    y = ssm_scan(x, dt, A, Bm, Cm, D, state)
    contig = [t.contiguous() for t in (x, dt, A, Bm, Cm, D)]
    y_ref, s_ref = run(ssm_scan_reference, *contig, s0)
    assert_close(y, y_ref, dtype)
    assert_close(pool[:, 1], s_ref, torch.float32)
    assert torch.equal(pool[:, [0, 2]], others)                                            # other layers untouched
    y_c, s_c = run(ssm_scan, *contig, s0)
    assert torch.equal(y, y_c) and torch.equal(pool[:, 1], s_c)
    # The torch prompt path takes the same views.
    pool[:, 1] = s0
    assert_close(ssm_scan_chunked(x, dt, A, Bm, Cm, D, pool[:, 1], chunk=4), y_ref, dtype)
    assert_close(pool[:, 1], s_ref, torch.float32)
    assert torch.equal(pool[:, [0, 2]], others)


@pytest.mark.parametrize("fn", [ssm_scan, ssm_scan_chunked, ssm_scan_reference],
                         ids=["triton", "chunked", "reference"])
def test_state_updated_in_place(fn, assert_close):
    x = inputs(2, 3, 2, 1, 24, 16, seed=50)
    state = x[-1].clone()
    ptr = state.data_ptr()
    fn(*x[:-1], state)
    assert state.data_ptr() == ptr
    assert_close(state, run(ssm_scan_reference, *x)[1], torch.float32)
    assert not torch.equal(state, x[-1])


@pytest.mark.parametrize("prompt_fn", [ssm_scan, ssm_scan_chunked], ids=["triton", "chunked"])
def test_prompt_then_decode_steps_equal_one_call(prompt_fn, assert_close):
    # The runtime's pattern: a prompt through one form, then T = 1 steps through the kernel on the same state.
    B, T, P_LEN, H, G, P, N = 1, 10, 6, 2, 1, 24, 24
    x, dt, A, Bm, Cm, D, state = inputs(B, T, H, G, P, N, seed=60)
    y_full, s_full = run(ssm_scan, x, dt, A, Bm, Cm, D, state)
    s = state.clone()
    kw = {"chunk": 4} if prompt_fn is ssm_scan_chunked else {}
    p = slice(0, P_LEN)
    outs = [prompt_fn(x[:, p], dt[:, p], A, Bm[:, p], Cm[:, p], D, s, **kw)]
    for t in range(P_LEN, T):
        sl = slice(t, t + 1)
        outs.append(ssm_scan(x[:, sl], dt[:, sl], A, Bm[:, sl], Cm[:, sl], D, s))
    assert_close(torch.cat(outs, 1), y_full, torch.float32)
    assert_close(s, s_full, torch.float32)
    assert_close(y_full, run(ssm_scan_reference, x, dt, A, Bm, Cm, D, state)[0], torch.float32)


def test_empty_sequence_keeps_state():
    x, dt, A, Bm, Cm, D, state = inputs(2, 0, 2, 1, 24, 16, seed=70)
    for fn in (ssm_scan, ssm_scan_chunked, ssm_scan_reference):
        s = state.clone()
        y = fn(x, dt, A, Bm, Cm, D, s)
        assert y.shape == (2, 0, 2, 24) and torch.equal(s, state)


def test_reference_matches_transformers_decode(assert_close):
    # Pins the semantics (decay, write, read, skip, grouped heads) to the model code's own decode step, fed our
    # final dt (no bias, no softplus) and A, dt, D expanded over [P, N] as GraniteMoeHybridMambaLayer does.
    mod = pytest.importorskip(HF)
    B, T, H, G, P, N = 2, 3, 4, 2, 24, 40
    x, dt, A, Bm, Cm, D, state = inputs(B, T, H, G, P, N, seed=80)
    s_hf, s = state.clone(), state.clone()
    for t in range(T):
        y_hf = mod.mamba2_selective_state_update(
            s_hf, x[:, t], dt[:, t, :, None].expand(-1, -1, P), A[:, None, None].expand(-1, P, N), Bm[:, t],
            Cm[:, t], D[:, None].expand(-1, P), dt_bias=None, dt_softplus=False)
        y = ssm_scan_reference(x[:, t:t + 1], dt[:, t:t + 1], A, Bm[:, t:t + 1], Cm[:, t:t + 1], D, s)
        assert_close(y[:, 0], y_hf, torch.float32, tol=1e-5)
        assert_close(s, s_hf, torch.float32, tol=1e-5)


def test_reference_matches_transformers_prompt(assert_close):
    mod = pytest.importorskip(HF)
    B, T, H, G, P, N = 2, 37, 4, 2, 24, 40
    x, dt, A, Bm, Cm, D, state = inputs(B, T, H, G, P, N, seed=90)
    y_hf, s_hf = mod.mamba2_chunk_scan(x, dt, A, Bm, Cm, chunk_size=16, D=D, initial_states=state.clone(),
                                       return_final_states=True)
    y, s = run(ssm_scan_reference, x, dt, A, Bm, Cm, D, state)
    assert_close(y, y_hf, torch.float32, tol=1e-5)
    assert_close(s, s_hf, torch.float32, tol=1e-5)


def test_rejects_bad_inputs():
    B, T, H, G, P, N = 2, 3, 4, 2, 16, 8
    x, dt, A, Bm, Cm, D, state = inputs(B, T, H, G, P, N, seed=100)
    big = inputs(1, 1, 1, 1, 8, 264, seed=101)
    cases = [
        ((x.to(torch.int32), dt, A, Bm, Cm, D, state), "x must be one of"),
        ((x[0], dt, A, Bm, Cm, D, state), r"x must be \[B, T, H, P\]"),
        ((x, dt, A, Bm[..., :4], Cm, D, state), "do not match"),
        ((x, dt, A, Bm[:, :2], Cm[:, :2], D, state), "do not match"),
        ((x, dt, A, Bm.half(), Cm, D, state), "dtypes differ"),
        ((x[:, :, :3], dt[..., :3], A[:3], Bm, Cm, D[:3], state[:, :3]), "must be a multiple of the groups"),
        ((x, dt.half(), A, Bm, Cm, D, state), "dt must be fp32"),
        ((x, dt[:, :2], A, Bm, Cm, D, state), "dt must be fp32"),
        ((x, dt, A[:2], Bm, Cm, D, state), "A must be fp32"),
        ((x, dt, A, Bm, Cm, D.half(), state), "D must be fp32"),
        ((x, dt, A, Bm, Cm, D, state[..., :4]), "state must be fp32"),
        ((x, dt, A, Bm, Cm, D, state.double()), "state must be fp32"),
        ((x, dt, A, Bm, Cm, D, state.transpose(2, 3).contiguous().transpose(2, 3)), "contiguous last dim"),
        (big, "N must be <= 256"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            ssm_scan(*args)
    for args, match in cases[:-2]:
        with pytest.raises(ValueError, match=match):
            ssm_scan_reference(*args)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        ssm_scan_chunked(x, dt, A, Bm, Cm, D, state, chunk=0)
    with pytest.raises(ValueError, match="a multiple of the groups"):
        ssm_scan_chunked(x[:, :, :3], dt[..., :3], A[:3], Bm, Cm, D[:3], state[:, :3])


@pytest.mark.skipif(not ON_CUDA, reason="Granite 4 sizes are too slow for the interpreter")
@pytest.mark.parametrize("H", [48, 64])
@pytest.mark.parametrize("T", [1, 300])
def test_triton_granite4_sizes(T, H, assert_close):
    # Granite 4.0 hybrid's Mamba2 mixer: 48 or 64 heads, P = 64, N = 128, one group, bf16.
    x = inputs(2, T, H, 1, 64, 128, dtype=torch.bfloat16, seed=110)
    # The reference runs on CPU: no TF32 in its fp32 products, whatever the process set.
    ref = run(ssm_scan_reference, *(t.cpu() for t in x))
    check(run(ssm_scan, *x), ref, torch.bfloat16, assert_close)
    if T > 1:
        check(run(ssm_scan_chunked, *x), ref, torch.bfloat16, assert_close)


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need CUDA")
def test_triton_decode_cuda_graph_capture(assert_close):
    x, dt, A, Bm, Cm, D, state = inputs(2, 1, 48, 1, 64, 128, dtype=torch.bfloat16, seed=120)
    ssm_scan(x, dt, A, Bm, Cm, D, state.clone())                                          # compile outside capture
    s = state.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ssm_scan(x, dt, A, Bm, Cm, D, s)
    s.copy_(state)
    graph.replay()
    torch.cuda.synchronize()
    s_ref = state.cpu()
    y_ref = ssm_scan_reference(*(t.cpu() for t in (x, dt, A, Bm, Cm, D)), s_ref)
    assert_close(out, y_ref, torch.bfloat16)
    assert_close(s, s_ref, torch.float32)
