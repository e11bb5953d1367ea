import pytest
import torch
import torch.nn.functional as F

from fmconvert.kernels.mamba1_scan import mamba_scan, mamba_scan_reference

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
# The kernel has no tl.dot, so bf16 runs correctly under the interpreter too.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HF = "transformers.models.mamba.modeling_mamba"


def rand(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def inputs(B, T, Dc, N, dtype=torch.float32, seed=0, dt_dtype=None, with_d=True, with_z=True):
    """x, dt, A, Bm, Cm, D, z and a nonzero initial state, distributed about as in a Mamba layer: dt the raw step
    (dt_proj's output with its bias, softplus of it ~0.3), A = -exp(A_log) per channel and state (Mamba initialises
    A[d] = -1 .. -N)."""
    x = rand(B, T, Dc, seed=seed, dtype=dtype)
    dt = (rand(B, T, Dc, seed=seed + 1) - 1.0).to(dt_dtype or dtype)
    A = -torch.exp(torch.rand(Dc, N, generator=torch.Generator().manual_seed(seed + 2)) * 2.5).to(DEVICE)
    Bm = rand(B, T, N, seed=seed + 3, dtype=dtype)
    Cm = rand(B, T, N, seed=seed + 4, dtype=dtype)
    D = rand(Dc, seed=seed + 5) if with_d else None
    z = rand(B, T, Dc, seed=seed + 6, dtype=dtype) if with_z else None
    state = rand(B, Dc, N, seed=seed + 7) * 0.5
    return x, dt, A, Bm, Cm, D, z, state


def run(fn, x, dt, A, Bm, Cm, D, z, state, **kw):
    """(y, final state) of fn on a copy of state."""
    s = state.clone()
    return fn(x, dt, A, Bm, Cm, D, z, s, **kw), s


def check(out, ref, dtype, assert_close):
    assert_close(out[0], ref[0], dtype)
    # The state is fp32 in every form; only y is rounded to the input dtype.
    assert_close(out[1], ref[1], torch.float32)


def ids(s):
    return "B{}-T{}-Dc{}-N{}".format(*s)


# (B, T, Dc, N). Interpreter time grows with B * cdiv(Dc, 64) programs times T steps: keep these small. Dc = 130
# spans three blocks of 64 (the last one masked), N = 17 pads to 32, N = 256 gets blocks of 8 channels.
SHAPES = [
    (1, 1, 1, 1),              # decode, one channel, one state
    (2, 2, 5, 3),
    (1, 7, 37, 16),            # N = 16: every Mamba1 model
    (2, 33, 130, 17),
    (1, 2, 20, 256),           # the largest state: three blocks of 8 channels
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_triton_matches_reference(shape, dtype, assert_close):
    x = inputs(*shape, dtype=dtype, seed=10)
    out = run(mamba_scan, *x)
    assert out[0].dtype == dtype and out[0].is_contiguous() and out[0].shape == x[0].shape
    check(out, run(mamba_scan_reference, *x), dtype, assert_close)


@pytest.mark.parametrize("softplus", [True, False], ids=["softplus", "final_dt"])
@pytest.mark.parametrize("with_z", [True, False], ids=["z", "noz"])
@pytest.mark.parametrize("with_d", [True, False], ids=["D", "noD"])
def test_triton_optional_terms(with_d, with_z, softplus, assert_close):
    x, dt, A, Bm, Cm, D, z, state = inputs(2, 5, 37, 16, seed=20, with_d=with_d, with_z=with_z)
    if not softplus:
        dt = F.softplus(dt)                                      # the caller already made it the final step
    args = (x, dt, A, Bm, Cm, D, z, state)
    check(run(mamba_scan, *args, softplus=softplus), run(mamba_scan_reference, *args, softplus=softplus),
          torch.float32, assert_close)


@pytest.mark.parametrize("dtype,dt_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float16),
                                            (torch.float32, torch.bfloat16)], ids=str)
def test_triton_dt_in_its_own_dtype(dtype, dt_dtype, assert_close):
    x = inputs(2, 3, 37, 3, dtype=dtype, dt_dtype=dt_dtype, seed=25)
    assert x[1].dtype == dt_dtype
    check(run(mamba_scan, *x), run(mamba_scan_reference, *x), dtype, assert_close)


def test_softplus_matches_torch_across_its_threshold(assert_close):
    # A = 0, x = 1, B = C = e_0 and a zero state make y = dt exactly: the kernel's softplus, lane by lane, against
    # torch's (log1p form up to 20, identity above), down to dt ~ 1e-17 where log(1 + e^v) alone would give 0.
    # At 10.5 the log1p term is still 3 ulp of v: a threshold of 10 would show.
    raw = torch.cat([torch.linspace(-40.0, 40.0, 57), torch.tensor([-11.0, -1e-3, 0.0, 1e-3, 10.5, 19.999, 20.0,
                                                                    20.001])]).to(DEVICE)
    Dc, N = raw.numel(), 2
    x = torch.ones(1, 1, Dc, device=DEVICE)
    e0 = torch.tensor([[[1.0, 0.0]]], device=DEVICE)
    A = torch.zeros(Dc, N, device=DEVICE)
    y = mamba_scan(x, raw.view(1, 1, Dc), A, e0, e0, None, None, torch.zeros(1, Dc, N, device=DEVICE))
    want = F.softplus(raw.cpu())
    # The GPU's exp rounds its argument times log2(e) first: ~2e-6 relative at |v| = 40. The interpreter's is exact.
    rtol = 1e-5 if ON_CUDA else 1e-6
    assert torch.allclose(y.view(-1).cpu(), want, rtol=rtol, atol=0), (y.view(-1).cpu() - want).abs().max()


def test_triton_strong_decay_and_fp16(assert_close):
    # dt up to 30 (above softplus's threshold) with A down to -150: decays underflow to 0 in one step, and nothing
    # may turn into inf or NaN; raw dt down to -30 gives steps of ~1e-13.
    x, dt, A, Bm, Cm, D, z, state = inputs(2, 6, 37, 16, dtype=torch.float16, seed=30)
    dt = torch.linspace(-30.0, 30.0, 37, device=DEVICE).expand(2, 6, 37).to(torch.float16)
    A = A * 20.0
    check(run(mamba_scan, x, dt, A, Bm, Cm, D, z, state), run(mamba_scan_reference, x, dt, A, Bm, Cm, D, z, state),
          torch.float16, assert_close)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_views_of_fused_projections(dtype, assert_close):
    # As MambaMixer splits them: x | z are column slices of in_proj's output, dt a slice of a wider tensor, B | C
    # slices of x_proj's dt_rank | N | N output, every one laid out [T, B, .] (batch stride != T * width); the state
    # is one layer of a [B, L, Dc, N] pool. The kernel reads them all through strides.
    B, T, Dc, N, R = 2, 6, 70, 16, 5
    proj = rand(T, B, 2 * Dc + 3, seed=40, dtype=dtype).transpose(0, 1)
    x, z = proj[..., :Dc], proj[..., Dc:2 * Dc]
    dt = (rand(T, B, Dc + 4, seed=41) - 1.0).to(dtype).transpose(0, 1)[..., 2:2 + Dc]
    xp = rand(T, B, R + 2 * N, seed=42, dtype=dtype).transpose(0, 1)
    Bm, Cm = xp[..., R:R + N], xp[..., R + N:]
    _, _, A, _, _, D, _, _ = inputs(B, T, Dc, N, seed=43)
    pool = rand(B, 3, Dc, N, seed=44) * 0.5
    before = pool.clone()
    state = pool[:, 1]
    assert not any(t.is_contiguous() for t in (x, z, dt, Bm, Cm, state))
    s0 = state.clone()
    y = mamba_scan(x, dt, A, Bm, Cm, D, z, state)
    contig = [t.contiguous() for t in (x, dt, A, Bm, Cm, D, z)]
    y_ref, s_ref = run(mamba_scan_reference, *contig, s0)
    assert_close(y, y_ref, dtype)
    assert_close(pool[:, 1], s_ref, torch.float32)
    assert torch.equal(pool[:, [0, 2]], before[:, [0, 2]])                              # other layers untouched
    y_c, s_c = run(mamba_scan, *contig, s0)
    assert torch.equal(y, y_c) and torch.equal(pool[:, 1], s_c)
    # The reference takes the same views.
    pool.copy_(before)
    assert_close(mamba_scan_reference(x, dt, A, Bm, Cm, D, z, pool[:, 1]), y_ref, dtype)
    assert torch.equal(pool[:, [0, 2]], before[:, [0, 2]])


@pytest.mark.parametrize("fn", [mamba_scan, mamba_scan_reference], ids=["triton", "reference"])
def test_state_updated_in_place(fn, assert_close):
    x = inputs(2, 3, 37, 16, seed=50)
    state = x[-1].clone()
    ptr = state.data_ptr()
    fn(*x[:-1], state)
    assert state.data_ptr() == ptr
    assert_close(state, run(mamba_scan_reference, *x)[1], torch.float32)
    assert not torch.equal(state, x[-1])


@pytest.mark.parametrize("prompt_fn", [mamba_scan, mamba_scan_reference], ids=["triton", "reference"])
def test_prompt_then_decode_steps_equal_one_call(prompt_fn, assert_close):
    # The runtime's pattern: a prompt (in two calls here), then T = 1 steps through the kernel on the same state.
    B, T, Dc, N = 2, 11, 37, 16
    x, dt, A, Bm, Cm, D, z, state = inputs(B, T, Dc, N, seed=60)
    y_full, s_full = run(mamba_scan, x, dt, A, Bm, Cm, D, z, state)
    s = state.clone()
    outs = []
    for sl in [slice(0, 4), slice(4, 7)] + [slice(t, t + 1) for t in range(7, T)]:
        fn = prompt_fn if sl.start < 7 else mamba_scan
        outs.append(fn(x[:, sl], dt[:, sl], A, Bm[:, sl], Cm[:, sl], D, z[:, sl], s))
    assert_close(torch.cat(outs, 1), y_full, torch.float32)
    assert_close(s, s_full, torch.float32)
    assert_close(y_full, run(mamba_scan_reference, x, dt, A, Bm, Cm, D, z, state)[0], torch.float32)


def test_empty_inputs_keep_state():
    for shape in ((2, 0, 5, 3), (2, 3, 0, 3)):
        x, dt, A, Bm, Cm, D, z, state = inputs(*shape, seed=70)
        for fn in (mamba_scan, mamba_scan_reference):
            s = state.clone()
            y = fn(x, dt, A, Bm, Cm, D, z, s)
            assert y.shape == shape[:3] and torch.equal(s, state)


def transformers_formula(x, dt, A, Bm, Cm, D, z, state, softplus=True):
    """transformers' vectorised Mamba scan (modeling_mamba.mamba_selective_scan, its sequential branch), written
    out in fp32 in its channel-major layout and from a given initial state: (y in x.dtype, final state)."""
    hs = x.float().transpose(1, 2)                                                  # [B, Dc, T]
    delta = dt.float().transpose(1, 2)
    if softplus:
        delta = F.softplus(delta)
    discrete_A = torch.exp(A[None, :, None, :] * delta[:, :, :, None])              # [B, Dc, T, N]
    deltaB_u = delta[:, :, :, None] * Bm.float()[:, None, :, :] * hs[:, :, :, None]
    S, ys = state.clone(), []
    for t in range(x.shape[1]):
        S = discrete_A[:, :, t] * S + deltaB_u[:, :, t]
        ys.append((S @ Cm.float()[:, t, :, None])[..., 0])                          # [B, Dc]
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + hs * D[None, :, None]
    if z is not None:
        y = y * F.silu(z.float().transpose(1, 2))
    return y.transpose(1, 2).to(x.dtype), S


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("flags", [(True, True, True), (False, False, True), (True, True, False)],
                         ids=["D-z-softplus", "bare-softplus", "D-z-final_dt"])
def test_reference_matches_transformers_formula(flags, dtype, assert_close):
    with_d, with_z, softplus = flags
    x, dt, A, Bm, Cm, D, z, state = inputs(2, 9, 37, 16, dtype=dtype, seed=80, with_d=with_d, with_z=with_z)
    if not softplus:
        dt = F.softplus(dt.float())
    args = (x, dt, A, Bm, Cm, D, z, state)
    y_hf, s_hf = transformers_formula(*args, softplus=softplus)
    y, s = run(mamba_scan_reference, *args, softplus=softplus)
    assert_close(y, y_hf, dtype, tol=1e-5 if dtype == torch.float32 else None)
    assert_close(s, s_hf, torch.float32, tol=1e-5)


def test_reference_matches_transformers_functions(assert_close):
    # Pins the semantics to the model code itself (fp32): its prompt scan (which starts from a zero state), then
    # its decode step on the state that scan left, bias already folded into dt as our contract has it.
    mod = pytest.importorskip(HF)
    B, T, Dc, N = 2, 7, 37, 16
    x, dt, A, Bm, Cm, D, z, _ = inputs(B, T + 2, Dc, N, seed=90)
    p = slice(0, T)
    y_hf, s_hf = mod.mamba_selective_scan(x[:, p].transpose(1, 2), dt[:, p].transpose(1, 2), A,
                                          Bm[:, p].transpose(1, 2), Cm[:, p].transpose(1, 2), D=D,
                                          z=z[:, p].transpose(1, 2), delta_softplus=True, return_last_state=True)
    s = torch.zeros(B, Dc, N, device=DEVICE)
    y = mamba_scan_reference(x[:, p], dt[:, p], A, Bm[:, p], Cm[:, p], D, z[:, p], s)
    assert_close(y, y_hf.transpose(1, 2), torch.float32, tol=1e-5)
    assert_close(s, s_hf, torch.float32, tol=1e-5)
    for t in range(T, T + 2):
        y_hf = mod.mamba_selective_state_update(s_hf, x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t], D, z=z[:, t],
                                                dt_softplus=True)
        sl = slice(t, t + 1)
        y = mamba_scan_reference(x[:, sl], dt[:, sl], A, Bm[:, sl], Cm[:, sl], D, z[:, sl], s)
        assert_close(y[:, 0], y_hf, torch.float32, tol=1e-5)
        assert_close(s, s_hf, torch.float32, tol=1e-5)


def test_rejects_bad_inputs():
    B, T, Dc, N = 2, 3, 5, 4
    x, dt, A, Bm, Cm, D, z, state = inputs(B, T, Dc, N, seed=100)
    big = inputs(1, 1, 2, 264, seed=101)

    def swap(**kw):
        args = dict(x=x, dt=dt, A=A, Bm=Bm, Cm=Cm, D=D, z=z, state=state)
        args.update(kw)
        return tuple(args.values())

    cases = [
        (swap(x=x.to(torch.int32)), "x must be one of"),
        (swap(dt=dt.to(torch.int32)), "dt must be one of"),
        (swap(x=x[0]), r"x must be \[B, T, Dc\]"),
        (swap(Bm=Bm[..., :2]), "do not match"),
        (swap(Bm=Bm[:, :2], Cm=Cm[:, :2]), "do not match"),
        (swap(Bm=Bm.half()), "dtypes differ"),
        (swap(dt=dt[..., :3]), "dt must be"),
        (swap(z=z.half()), "z must be"),
        (swap(z=z[:, :1]), "z must be"),
        (swap(A=A[:, :2]), "A must be fp32"),
        (swap(A=A.double()), "A must be fp32"),
        (swap(D=D[:3]), "D must be fp32"),
        (swap(D=D.half()), "D must be fp32"),
        (swap(state=state[..., :2]), "state must be fp32"),
        (swap(state=state.double()), "state must be fp32"),
        (swap(A=A.to("meta")), "share one device"),
        # the kernel's own limits, last: the reference takes these
        (swap(state=state.transpose(1, 2).contiguous().transpose(1, 2)), "state needs a contiguous last dim"),
        (swap(x=x.transpose(1, 2).contiguous().transpose(1, 2)), "x needs a contiguous last dim"),
        (swap(Cm=Cm.transpose(1, 2).contiguous().transpose(1, 2)), "Cm needs a contiguous last dim"),
        (big, "N must be <= 256"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            mamba_scan(*args)
    for args, match in cases[:-4]:
        with pytest.raises(ValueError, match=match):
            mamba_scan_reference(*args)


@pytest.mark.skipif(not ON_CUDA, reason="FalconMamba sizes are too slow for the interpreter")
@pytest.mark.parametrize("T", [1, 300])
def test_triton_falcon_mamba_sizes(T, assert_close):
    # FalconMamba-7B's mixer: 8192 channels, state 16, bf16.
    x = inputs(2, T, 8192, 16, dtype=torch.bfloat16, seed=110)
    # The reference runs on CPU: no TF32 in its fp32 products, whatever the process set.
    ref = run(mamba_scan_reference, *(t.cpu() for t in x))
    check(run(mamba_scan, *x), ref, torch.bfloat16, assert_close)


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need CUDA")
def test_triton_decode_cuda_graph_capture(assert_close):
    x, dt, A, Bm, Cm, D, z, state = inputs(2, 1, 8192, 16, dtype=torch.bfloat16, seed=120)
    mamba_scan(x, dt, A, Bm, Cm, D, z, state.clone())                                   # compile outside capture
    s = state.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mamba_scan(x, dt, A, Bm, Cm, D, z, s)
    s.copy_(state)
    graph.replay()
    torch.cuda.synchronize()
    s_ref = state.cpu()
    y_ref = mamba_scan_reference(*(t.cpu() for t in (x, dt, A, Bm, Cm, D, z)), s_ref)
    assert_close(out, y_ref, torch.bfloat16)
    assert_close(s, s_ref, torch.float32)
