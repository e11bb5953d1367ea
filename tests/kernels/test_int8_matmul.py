import pytest
import torch
import torch.nn.functional as F

from fmconvert.kernels import dequantize, int8_linear, int8_linear_reference
ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
FLOAT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_CUDA else [])

# GPT-OSS's clamped SwiGLU with a limit small enough that both clamps bite at these outputs (|y| ~ 1).
OAI = ("swiglu_oai", 1.702, 0.6)
LIM = ("swiglu_limit", 0.6)       # HY-V4's experts: the same clamps, a plain SwiGLU
ACTS = [None, "relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "geglu_erf", OAI, LIM, "relu2", "reglu2",
        "quick_gelu"]
GATED = ("swiglu", "geglu", "geglu_erf", OAI, LIM, "reglu2")


def quantize(w, group_size, scale_dtype=torch.float16):
    N, K = w.shape
    g = w.float().reshape(N, K // group_size, group_size)
    scale = (g.abs().amax(-1) / 127.0).clamp_min(1e-8)
    q = torch.round(g / scale[..., None]).clamp(-127, 127).to(torch.int8).reshape(N, K)
    return q, scale.to(scale_dtype)


def make(M, N, K, G, dtype, bias, scale_dtype=torch.float16, lead=()):
    gen = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    x = torch.randn(*lead, M, K, generator=gen).to(dtype).to(DEVICE)
    w = torch.randn(N, K, generator=gen) * 0.05
    q, s = quantize(w, G, scale_dtype)
    b = (torch.randn(N, generator=gen) * 0.1).to(dtype).to(DEVICE) if bias else None
    return x, w.to(DEVICE), q.to(DEVICE), s.to(DEVICE), b


# (M, N, K, group): odd N on purpose; K is a multiple of the group but not of the kernel blocks;
# group 48 is not a power of two.
DECODE_SHAPES = [(1, 1, 32, 32), (1, 17, 96, 32), (3, 77, 320, 64), (1, 129, 384, 128), (3, 34, 144, 48)]
GEMM_SHAPES = [(33, 17, 96, 32), (70, 129, 384, 128), (33, 77, 320, 64), (70, 6, 144, 48)]
if ON_CUDA:
    DECODE_SHAPES += [(1, 4096, 4096, 128), (2, 11008, 4096, 128), (1, 4096, 11008, 128)]
    GEMM_SHAPES += [(257, 4096, 4096, 128), (100, 1000, 2048, 64)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", DECODE_SHAPES + GEMM_SHAPES)
def test_int8_linear_matches_reference(shape, dtype, assert_close):
    M, N, K, G = shape
    x, _, q, s, b = make(M, N, K, G, dtype, bias=True)
    y = int8_linear(x, q, s, G, b)
    assert_close(y, int8_linear_reference(x, q, s, G, b), dtype)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("M", [1, 3, 33])
def test_int8_linear_activations(act, bias, M, assert_close):
    dtype = torch.float16
    x, _, q, s, b = make(M, 70, 192, 64, dtype, bias)    # gate and up 35 rows each: two row blocks, one partial
    y = int8_linear(x, q, s, 64, b, act)
    ref = int8_linear_reference(x, q, s, 64, b, act)
    assert y.shape == (M, 35 if act in GATED else 70)
    assert_close(y, ref, dtype)


@pytest.mark.parametrize("act", [None, "swiglu", "gelu", "geglu", OAI])
@pytest.mark.parametrize("split", [2, 3])
def test_int8_linear_split_k(split, act, assert_close):
    # Split-K: fp32 atomics into a zeroed buffer, then the epilogue kernel (bias + activation).
    x, _, q, s, b = make(3, 22, 384, 64, torch.float32, bias=True)
    y = int8_linear(x, q, s, 64, b, act, _split_k=split)
    assert_close(y, int8_linear_reference(x, q, s, 64, b, act), torch.float32)


@pytest.mark.parametrize("path", ["decode", "gemm"])
@pytest.mark.parametrize("G", [32, 64, 128])
def test_int8_linear_sqnr_vs_float_weights(G, path, sqnr_db):
    M = 1 if path == "decode" else 33
    x, w, q, s, _ = make(M, 65, 512, G, torch.float32, bias=False)
    y = int8_linear(x, q, s, G)
    assert sqnr_db(y, F.linear(x, w)) > 30
    assert sqnr_db(y, int8_linear_reference(x, q, s, G)) > 80


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_scale_dtypes_and_batch_dims(scale_dtype, assert_close):
    x, _, q, s, b = make(3, 17, 128, 32, torch.float16, bias=True, scale_dtype=scale_dtype, lead=(2,))
    y = int8_linear(x, q, s, 32, b, "silu")
    assert y.shape == (2, 3, 17)
    assert_close(y, int8_linear_reference(x, q, s, 32, b, "silu"), torch.float16)


def test_int8_linear_noncontiguous_input(assert_close):
    x, _, q, s, _ = make(4, 17, 96, 32, torch.float32, bias=False)
    xt = torch.cat([x, x], dim=1)[:, ::2]
    assert not xt.is_contiguous()
    assert_close(int8_linear(xt, q, s, 32), int8_linear_reference(xt, q, s, 32), torch.float32)


def test_dequantize_roundtrip():
    w = torch.randn(8, 64)
    q, s = quantize(w, 32, torch.float32)
    assert (dequantize(q, s, 32, torch.float32) - w).abs().max() <= s.max() / 2 + 1e-6


def test_int8_linear_rejects_bad_inputs():
    x, _, q, s, _ = make(1, 8, 64, 32, torch.float32, bias=False)
    with pytest.raises(ValueError, match="group_size"):
        int8_linear(x, q, s, 48)
    with pytest.raises(ValueError, match="scale"):
        int8_linear(x, q, s[:, :1], 32)
    with pytest.raises(ValueError, match="last dim"):
        int8_linear(x[:, :32], q, s, 32)
    with pytest.raises(ValueError, match="activation"):
        int8_linear(x, q, s, 32, activation="tanh")
    with pytest.raises(ValueError, match="int8"):
        int8_linear(x, q.float(), s, 32)
    with pytest.raises(ValueError, match="swiglu"):
        int8_linear(x, q[:7], s[:7], 32, activation="swiglu")
    with pytest.raises(ValueError, match="swiglu_oai"):
        int8_linear(x, q, s, 32, activation=("swiglu_oai", 1.702))
    with pytest.raises(ValueError, match="limit"):
        int8_linear(x, q, s, 32, activation=("swiglu_oai", 1.702, -7.0))


@pytest.mark.parametrize("M", [1, 3])
def test_int8_gemv_every_gpu_config(M, assert_close):
    # Each autotune candidate (block shape, int8->fp32 conversion variant) must be correct,
    # with K both a multiple of BLOCK_K (mask-free loads) and not.
    import triton

    from fmconvert.kernels.int8_matmul import _GEMV_CONFIGS, _decode

    for K, G in [(1024, 128), (2048, 64), (1152, 128), (144, 48)]:
        x, _, q, s, b = make(M, 6, K, G, torch.float16, bias=True)
        ref = int8_linear_reference(x, q, s, G, b, "swiglu")
        for cfg in _GEMV_CONFIGS:
            if not ON_CUDA and cfg.kwargs["MAGIC"] in (3, 4):     # inline PTX: GPU only
                if cfg.kwargs["MAGIC"] == 3:
                    continue
                cfg = triton.Config({**cfg.kwargs, "MAGIC": 5}, num_warps=cfg.num_warps)  # 4's math in Triton
            out = torch.empty(M, 3, dtype=x.dtype, device=DEVICE)
            _decode(x, q, s, G, b, 5, out, split_k=1, config=cfg)
            assert_close(out, ref, torch.float16)


@pytest.mark.parametrize("act", [None, "swiglu", "gelu", OAI])
@pytest.mark.parametrize("shape", [(5, 18, 96, 32), (9, 78, 320, 64), (6, 34, 144, 48)])
def test_int8_linear_dense_path(shape, act, assert_close):
    # The long-prompt path (dequantize once, then a float matmul), forced at small M. N not a multiple of the
    # block and a group of 48 (not a power of two) exercise the dequantization kernel's masks.
    M, N, K, G = shape
    x, _, q, s, b = make(M, N, K, G, torch.float32, bias=True)
    y = int8_linear(x, q, s, G, b, act, _path="dense")
    assert_close(y, int8_linear_reference(x, q, s, G, b, act), torch.float32)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("N,K,G", [(37, 144, 48), (9, 96, 32), (5, 200, 8), (3, 384, 128)])
def test_dequantize_dense_matches_reference(dtype, N, K, G):
    from fmconvert.kernels.int8_matmul import dequantize_dense
    _, _, q, s, _ = make(1, N, K, G, dtype, bias=False)
    got = dequantize_dense(q, s, G, dtype)
    assert got.dtype == dtype and got.shape == (N, K)
    assert torch.equal(got, dequantize(q, s, G, torch.float32).to(dtype))      # one rounding, same as the reference


@pytest.mark.parametrize("tile", [(16, 64, 4), (4, 128, 2), (64, 32, 8)])
def test_dequantize_dense_any_tile(tile):
    """The tiles gpu_check's prefill probe sweeps: taller, wider and narrower than a group, partial at both edges."""
    from fmconvert.kernels.int8_matmul import dequantize_dense
    for N, K, G in ((37, 144, 48), (70, 200, 8), (3, 384, 128)):
        _, _, q, s, _ = make(1, N, K, G, torch.float16, bias=False)
        got = dequantize_dense(q, s, G, torch.float16, tile=tile)
        assert torch.equal(got, dequantize(q, s, G, torch.float32).to(torch.float16)), (N, K, G)


def test_gemv_pair_configs_are_offered_for_swiglu_only():
    from fmconvert.kernels.int8_matmul import _GEMV_CONFIGS, _prune_gemv

    plain = _prune_gemv(_GEMV_CONFIGS, {}, SWIGLU=False)
    assert plain and not any(c.kwargs["PAIR"] for c in plain)
    assert _prune_gemv(_GEMV_CONFIGS, {}, SWIGLU=True) == _GEMV_CONFIGS
    assert not _GEMV_CONFIGS[0].kwargs["PAIR"]          # the untuned default is the measured one
    assert any(c.kwargs["PAIR"] and c.kwargs["MAGIC"] != 3 for c in _GEMV_CONFIGS)   # one the interpreter can run


def test_gemv_inexact_conversion_is_not_offered_to_fp32():
    from fmconvert.kernels.int8_matmul import _GEMV_CONFIGS, _prune_gemv

    def magics(dtype):
        return {c.kwargs["MAGIC"] for c in _prune_gemv(_GEMV_CONFIGS, {"x_ptr": torch.empty(1, dtype=dtype)},
                                                         SWIGLU=True)}
    assert 4 in magics(torch.bfloat16) and 4 in magics(torch.float16)
    assert max(magics(torch.float32)) < 4


@pytest.mark.parametrize("act,x_every", [("swiglu", 2), (None, 1), ("gelu", 3)])
@pytest.mark.parametrize("E,N,K,G", [(4, 34, 96, 32), (3, 18, 200, 8), (5, 6, 64, 64)])
def test_int8_expert_linear_matches_reference(E, N, K, G, act, x_every, assert_close):
    """Each (token, expert) pair reads its expert from device memory: odd N, K not a power of two, tokens routed to
    the same expert twice and to the last one."""
    from fmconvert.kernels import int8_expert_linear, int8_expert_linear_reference
    gen = torch.Generator().manual_seed(E * N + K)
    q = torch.randint(-127, 128, (E, N, K), generator=gen, dtype=torch.int8).to(DEVICE)
    s = (torch.rand(E, N, K // G, generator=gen) * 0.02 + 0.001).to(DEVICE)
    x = torch.randn(3, K, generator=gen).to(torch.float16).to(DEVICE)
    eids = torch.tensor(([E - 1, 0, 1, 1, 0, E - 1, 2 % E, 0, 1] * 2)[:3 * x_every], device=DEVICE)
    y = int8_expert_linear(x, q, s, G, eids, x_every, act)
    ref = int8_expert_linear_reference(x, q, s, G, eids, x_every, act)
    assert y.shape == ref.shape == (3 * x_every, N // 2 if act == "swiglu" else N)
    assert_close(y, ref, torch.float16)


def expert_weights(E, N, K, G, dtype):
    gen = torch.Generator().manual_seed(E * N + K)
    q = torch.randint(-127, 128, (E, N, K), generator=gen, dtype=torch.int8).to(DEVICE)
    s = (torch.rand(E, N, K // G, generator=gen) * 0.02 + 0.001).to(DEVICE)
    b = (torch.randn(E, N, generator=gen) * 0.5).to(dtype).to(DEVICE)
    return q, s, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act", [None, "swiglu", OAI, LIM])
def test_int8_expert_linear_bias(act, dtype, assert_close):
    """GPT-OSS's experts carry a bias [E, N]: each pair adds its own expert's row, gate and up alike."""
    from fmconvert.kernels import int8_expert_linear, int8_expert_linear_reference
    E, N, K, G = 4, 34, 96, 32
    q, s, b = expert_weights(E, N, K, G, dtype)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    eids = torch.tensor([3, 0, 1, 1, 0, 3], device=DEVICE)
    y = int8_expert_linear(x, q, s, G, eids, 2, act, bias=b)
    ref = int8_expert_linear_reference(x, q, s, G, eids, 2, act, bias=b)
    assert_close(y, ref, dtype)
    # the reference against one pair spelt out: pair 4 is token 2 through expert 0
    assert_close(ref[4:5], int8_linear_reference(x[2:3], q[0], s[0], G, b[0], act), dtype, tol=0)
    assert (ref - int8_expert_linear_reference(x, q, s, G, eids, 2, act)).abs().max() > 0.05


@pytest.mark.parametrize("path,M,split", [("decode", 1, None), ("decode", 3, 2), ("gemm", 33, None),
                                          ("dense", 5, None)])
def test_int8_linear_bias_reaches_gate_and_up_rows(path, M, split, assert_close):
    # Bias on the fused [gate; up] rows is added to both halves before the clamped SwiGLU, on every path.
    x, _, q, s, _ = make(M, 34, 192, 64, torch.float32, bias=False)
    b = torch.randn(34, generator=torch.Generator().manual_seed(2)).to(DEVICE) * 0.5
    y = int8_linear(x, q, s, 64, b, OAI, _path=path, _split_k=split)
    h = x @ dequantize(q, s, 64).T + b
    gate, up = h[:, :17].clamp(max=0.6), h[:, 17:].clamp(-0.6, 0.6)
    assert_close(y, gate * torch.sigmoid(1.702 * gate) * (up + 1), torch.float32)
    b_gate_only = torch.cat([b[:17], torch.zeros(17, device=DEVICE)])
    assert (y - int8_linear(x, q, s, 64, b_gate_only, OAI, _path=path, _split_k=split)).abs().max() > 0.05


def test_int8_expert_linear_rejects_bad_inputs():
    from fmconvert.kernels import int8_expert_linear
    q = torch.zeros(2, 4, 32, dtype=torch.int8, device=DEVICE)
    s = torch.ones(2, 4, 1, device=DEVICE)
    x = torch.zeros(1, 32, device=DEVICE)
    with pytest.raises(ValueError, match="experts must be"):
        int8_expert_linear(x, q, s, 32, torch.tensor([0, 1], device=DEVICE))
    with pytest.raises(ValueError, match="scale must have shape"):
        int8_expert_linear(x, q, s[:, :2], 32, torch.tensor([0], device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        int8_expert_linear(x, q.transpose(1, 2).contiguous().transpose(1, 2), s, 32, torch.tensor([0], device=DEVICE))
    with pytest.raises(ValueError, match="bias must have shape"):
        int8_expert_linear(x, q, s, 32, torch.tensor([0], device=DEVICE), bias=torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError, match="swiglu_oai"):
        int8_expert_linear(x, q, s, 32, torch.tensor([0], device=DEVICE), activation=("swiglu_oai", 1.0))


# ---------------------------------------------------------------------------------------------
# expert_linear: the same (token, expert) GEMV over float (bf16/fp16/fp32) expert weights
# ---------------------------------------------------------------------------------------------


def float_experts(E, N, K, dtype, R=3, w_dtype=None):
    gen = torch.Generator().manual_seed(E * N + K)
    w = (torch.randn(E, N, K, generator=gen) / K ** 0.5).to(w_dtype or dtype).to(DEVICE)    # |y| ~ 1
    b = (torch.randn(E, N, generator=gen) * 0.5).to(dtype).to(DEVICE)
    x = torch.randn(R, K, generator=gen).to(dtype).to(DEVICE)
    return x, w, b


def expert_ids(E, n):
    # the last expert, the first, repeats back to back and apart
    return torch.tensor(([E - 1, 0, 1, 1, 0, E - 1, 2 % E, 0, 1] * 2)[:n], device=DEVICE)


# (act, x_every, bias, (E, N, K)): odd N ungated; K not a power of two (masked walk) or a multiple of the run (one
# run of 64, two runs of 2048), 2144 = 2048 + 96 is two runs, the second one masked.
EXPERT_CASES = [
    (None, 1, False, (3, 17, 200)),
    (None, 2, True, (4, 33, 96)),
    (None, 1, True, (2, 5, 4096)),
    ("swiglu", 2, False, (4, 34, 96)),
    ("swiglu", 1, True, (5, 6, 64)),
    ("geglu", 2, True, (3, 18, 200)),
    (OAI, 2, True, (4, 34, 96)),
    (OAI, 1, False, (2, 10, 2144)),
    (LIM, 2, True, (3, 18, 64)),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("act,x_every,bias,shape", EXPERT_CASES)
def test_expert_linear_matches_reference(act, x_every, bias, shape, dtype, assert_close):
    from fmconvert.kernels import expert_linear, expert_linear_reference
    E, N, K = shape
    x, w, b = float_experts(E, N, K, dtype)
    b = b if bias else None
    eids = expert_ids(E, 3 * x_every)
    y = expert_linear(x, w, eids, x_every, act, bias=b)
    ref = expert_linear_reference(x, w, eids, x_every, act, bias=b)
    assert y.shape == ref.shape == (3 * x_every, N // 2 if act in GATED else N)
    assert y.dtype == dtype
    assert_close(y, ref, dtype)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16)])
def test_expert_linear_weight_dtype_may_differ_from_x(x_dtype, w_dtype, assert_close):
    """Each weight tile is converted to fp32 as it is loaded: any float weight dtype with any x dtype, y in x's."""
    from fmconvert.kernels import expert_linear, expert_linear_reference
    x, w, b = float_experts(3, 34, 96, x_dtype, w_dtype=w_dtype)
    eids = expert_ids(3, 6).to(torch.int32)
    y = expert_linear(x, w, eids, 2, OAI, bias=b)
    assert y.dtype == x_dtype
    assert_close(y, expert_linear_reference(x, w, eids, 2, OAI, bias=b), x_dtype)


def test_expert_linear_agrees_with_int8_experts(assert_close):
    """Float experts holding the dequantized int8 weights give the int8 kernel's answer (kernels and references)."""
    from fmconvert.kernels import (expert_linear, expert_linear_reference, int8_expert_linear,
                                   int8_expert_linear_reference)
    E, N, K, G = 4, 34, 96, 32
    q, s, b = expert_weights(E, N, K, G, torch.float32)
    w = torch.stack([dequantize(q[e], s[e], G) for e in range(E)])
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    eids = expert_ids(E, 6)
    ref = int8_expert_linear_reference(x, q, s, G, eids, 2, "swiglu", bias=b)
    assert_close(expert_linear_reference(x, w, eids, 2, "swiglu", bias=b), ref, torch.float32)
    y_int8 = int8_expert_linear(x, q, s, G, eids, 2, "swiglu", bias=b)
    assert_close(expert_linear(x, w, eids, 2, "swiglu", bias=b), y_int8, torch.float32)


@pytest.mark.parametrize("act", [None, "swiglu"])
def test_expert_linear_no_pairs(act):
    from fmconvert.kernels import expert_linear, expert_linear_reference
    x, w, b = float_experts(3, 18, 64, torch.float32, R=0)
    eids = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    for fn in (expert_linear, expert_linear_reference):
        y = fn(x, w, eids, 2, act, bias=b)
        assert y.shape == (0, 9 if act else 18) and y.dtype == torch.float32


def test_expert_linear_rejects_bad_inputs():
    from fmconvert.kernels import expert_linear, int8_expert_linear
    w = torch.zeros(2, 4, 32, device=DEVICE)
    x = torch.zeros(1, 32, device=DEVICE)
    e1 = torch.tensor([0], device=DEVICE)
    with pytest.raises(ValueError, match="weight must be one of"):
        expert_linear(x, w.to(torch.int8), e1)
    with pytest.raises(ValueError, match="x must be one of"):
        expert_linear(x.to(torch.int32), w, e1)
    with pytest.raises(ValueError, match=r"need x \[R, K\]"):
        expert_linear(x, w[0], e1)
    with pytest.raises(ValueError, match=r"need x \[R, K\]"):
        expert_linear(x[:, :16], w, e1)
    with pytest.raises(ValueError, match="experts must be"):
        expert_linear(x, w, torch.tensor([0, 1], device=DEVICE))
    with pytest.raises(ValueError, match="experts must be"):
        expert_linear(x, w, e1.float())
    with pytest.raises(ValueError, match="experts must be"):
        expert_linear(x, w, e1, x_every=2)
    with pytest.raises(ValueError, match="x_every"):
        expert_linear(x, w, e1, x_every=0)
    with pytest.raises(ValueError, match="contiguous"):
        expert_linear(x, w.transpose(1, 2).contiguous().transpose(1, 2), e1)
    with pytest.raises(ValueError, match="bias must have shape"):
        expert_linear(x, w, e1, bias=torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError, match="swiglu"):
        expert_linear(x, w[:, :3], e1, activation="swiglu")
    with pytest.raises(ValueError, match="activation"):
        expert_linear(x, w, e1, activation="tanh")
    with pytest.raises(ValueError, match="swiglu_oai"):
        expert_linear(x, w, e1, activation=("swiglu_oai", 1.0))
    with pytest.raises(ValueError, match="x_every"):        # the int8 launcher shares these checks
        int8_expert_linear(x, torch.zeros(2, 4, 32, dtype=torch.int8, device=DEVICE),
                           torch.ones(2, 4, 1, device=DEVICE), 32, e1, x_every=-1)


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need a GPU")
def test_expert_linear_replays_in_a_cuda_graph(assert_close):
    """The expert ids are read on the device: a captured step follows new ids written into the same tensor."""
    from fmconvert.kernels import expert_linear, expert_linear_reference
    x, w, b = float_experts(4, 34, 96, torch.bfloat16)
    eids = expert_ids(4, 6)
    expert_linear(x, w, eids, 2, "swiglu", bias=b)          # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = expert_linear(x, w, eids, 2, "swiglu", bias=b)
    eids.copy_(torch.tensor([2, 3, 3, 0, 1, 2], device=DEVICE))
    g.replay()
    torch.cuda.synchronize()
    assert_close(y, expert_linear_reference(x, w, eids, 2, "swiglu", bias=b), torch.bfloat16)


def test_decode_path_is_the_faster_of_two_that_agree(monkeypatch, assert_close):
    """A decode step's int8 linear on CUDA runs the GEMV or the 16-row GEMM, whichever timed faster for the shape;
    a path whose output disagrees with the GEMV's is never chosen. Driven here with a stand-in timer."""
    import fmconvert.kernels.int8_matmul as im

    monkeypatch.setattr(im, "_DECODE_CHOICE", {})
    times = {"decode": 2.0, "gemm": 1.0}
    timed = []

    def fake_time(fn):
        path = "gemm" if fn.__code__.co_names.count("_gemm") else "decode"
        timed.append(path)
        return times[path]

    monkeypatch.setattr(im, "_time_ms", fake_time)
    x, _, q, s, b = make(1, 34, 192, 64, torch.float32, bias=True)
    x2 = x.reshape(-1, 192)
    args = (x2, q, s, 64, b, "swiglu", *im.epilogue("swiglu"), 17)
    assert im._decode_path(*args) == "gemm" and sorted(timed) == ["decode", "gemm"]
    assert im._decode_path(*args) == "gemm" and len(timed) == 2            # kept: not timed again
    times.update(decode=0.5)
    assert im._decode_path(x2[:, :], q, s, 64, None, None, *im.epilogue(None), 34) == "decode"   # another key
    real_gemm = im._gemm
    monkeypatch.setattr(im, "_gemm", lambda *a, **kw: real_gemm(*a, **kw).add_(1.0))       # a wrong kernel
    times.update(decode=2.0)
    n = len(timed)
    assert im._decode_path(x2, q, s, 64, None, "relu", *im.epilogue("relu"), 34) == "decode"
    assert len(timed) == n                                                  # disagreed: not even timed


def test_a_candidate_that_cannot_build_is_never_chosen():
    # The autotuners' timing gives a config that fails to compile or run an infinite time (said once in a warning)
    # rather than failing the load: candidates are read off one Triton's machine code and may meet another.
    import math

    from fmconvert.kernels._common import tuner_bench

    def broken():
        raise RuntimeError("PassManager::run failed\nmore detail")

    with pytest.warns(UserWarning, match="candidate was skipped: RuntimeError: PassManager::run failed$"):
        assert tuner_bench(broken, (0.5, 0.2, 0.8)) == [math.inf] * 3
    with pytest.warns(UserWarning):
        assert tuner_bench(broken, None) == math.inf
