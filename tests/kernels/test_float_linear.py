import pytest
import torch

from fmconvert.kernels.float_linear import (DECODE_MAX_M, _FLOAT_GEMV_CONFIGS, _cfg, _gated_fits, _prune, float_gemv,
                                            float_gemv_reference)

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
FLOAT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_CUDA else [])
OAI = ("swiglu_oai", 1.702, 0.6)
LIM = ("swiglu_limit", 0.6)       # HY-V4's experts: the same clamps, a plain SwiGLU
ACTS = [None, "relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "geglu_erf", OAI, LIM, "relu2", "reglu2",
        "quick_gelu"]
GATED = ("swiglu", "geglu", "geglu_erf", OAI, LIM, "reglu2")

# (M, N, K): odd N and K that no block divides, one row or several
SHAPES = [(1, 1, 8), (1, 17, 96), (3, 77, 320), (4, 130, 200), (2, 6, 1000)]
if ON_CUDA:
    SHAPES += [(1, 4096, 4096), (1, 4096, 11008), (3, 1000, 4100)]


def make(M, N, K, dtype, bias, w_dtype=None, lead=()):
    gen = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    x = torch.randn(*lead, M, K, generator=gen).to(dtype).to(DEVICE)
    w = (torch.randn(N, K, generator=gen) * 0.05).to(w_dtype or dtype).to(DEVICE)
    b = (torch.randn(N, generator=gen) * 0.1).to(dtype).to(DEVICE) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_float_gemv_matches_reference(shape, dtype, assert_close):
    M, N, K = shape
    x, w, b = make(M, N, K, dtype, bias=True)
    assert_close(float_gemv(x, w, b), float_gemv_reference(x, w, b), dtype)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("M", [1, 3])
def test_float_gemv_activations(act, bias, M, assert_close):
    dtype = torch.float16
    x, w, b = make(M, 70, 200, dtype, bias)       # gate and up 35 rows each: two row blocks, one partial
    y = float_gemv(x, w, b, act)
    assert y.shape == (M, 35 if act in GATED else 70)
    assert_close(y, float_gemv_reference(x, w, b, act), dtype)


def test_float_gemv_bias_reaches_gate_and_up_rows(assert_close):
    x, w, _ = make(2, 34, 192, torch.float32, bias=False)
    b = (torch.randn(34, generator=torch.Generator().manual_seed(3)) * 0.5).to(DEVICE)
    y = float_gemv(x, w, b, OAI)
    h = x @ w.T + b
    gate, up = h[:, :17].clamp(max=0.6), h[:, 17:].clamp(-0.6, 0.6)
    assert_close(y, gate * torch.sigmoid(1.702 * gate) * (up + 1), torch.float32)
    b_gate_only = torch.cat([b[:17], torch.zeros(17, device=DEVICE)])
    assert (y - float_gemv(x, w, b_gate_only, OAI)).abs().max() > 0.05


def test_float_gemv_strided_and_batched_inputs(assert_close):
    # x a strided view with leading dims (a decode step's [B, 1, K]); weight a row slice of a fused matrix
    x, w, b = make(3, 40, 96, torch.float32, bias=True, lead=(1,))
    xs = torch.cat([x, x], dim=-1)[..., ::2]
    wide = torch.randn(60, 96, generator=torch.Generator().manual_seed(4)).to(DEVICE) * 0.05
    y = float_gemv(xs, wide[10:50], b)
    assert y.shape == (1, 3, 40)
    assert_close(y, float_gemv_reference(xs.contiguous(), wide[10:50].contiguous(), b), torch.float32)


def test_float_gemv_mixed_weight_dtype(assert_close):
    # fp32 activations over a bf16/fp16 weight: the product is formed in fp32 whatever the two dtypes are
    x, w, _ = make(1, 33, 130, torch.float32, bias=False, w_dtype=torch.float16)
    assert_close(float_gemv(x, w), float_gemv_reference(x, w), torch.float32)


@pytest.mark.parametrize("cfg", (_FLOAT_GEMV_CONFIGS if ON_CUDA else [_cfg(2, 32, 1), _cfg(8, 16, 2)]),
                         ids=str)
def test_float_gemv_every_config(cfg, assert_close):
    # Each autotuning candidate on its own (the tests otherwise see only the first), with a gate where the tuner
    # may pick it for one
    dtype = torch.float16
    x, w, b = make(2, 38, 1100 if ON_CUDA else 72, dtype, bias=True)
    assert_close(float_gemv(x, w, b, config=cfg), float_gemv_reference(x, w, b), dtype)
    if _gated_fits(cfg):
        assert_close(float_gemv(x, w, b, "swiglu", config=cfg), float_gemv_reference(x, w, b, "swiglu"), dtype)


def test_gated_configs_are_pruned_to_those_that_fit():
    kept = _prune(_FLOAT_GEMV_CONFIGS, {"GATED": True})
    assert kept and all(_gated_fits(c) for c in kept) and len(kept) < len(_FLOAT_GEMV_CONFIGS)
    assert _prune(_FLOAT_GEMV_CONFIGS, {"GATED": False}) == _FLOAT_GEMV_CONFIGS


def test_float_gemv_empty_and_bad_inputs():
    x, w, b = make(1, 6, 16, torch.float32, bias=True)
    assert float_gemv(x[:0], w).shape == (0, 6)
    cases = [
        ((x.to(torch.int32), w), "x must be one of"),
        ((x, w.to(torch.int8)), "weight must be one of"),
        ((x, w[0]), "weight must be 2-D"),
        ((x[:, :8], w), "x last dim 8 != weight in_features 16"),
        ((x, w, b[:3]), r"bias must have shape \(6,\)"),
        ((x, w[:5], None, "swiglu"), "even number of weight rows"),
        ((x, w, None, "tanh"), "activation must be one of"),
        ((x.expand(DECODE_MAX_M + 1, 16), w), "at most 4 rows"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            float_gemv(*args)


def test_runtime_keeps_the_faster_path_per_shape(monkeypatch, assert_close):
    """TritonOps times the float GEMV against cuBLAS once per shape and routes by the result; a shape that cannot be
    timed (off CUDA, inside a graph capture) takes cuBLAS and is timed at a later call."""
    from fmconvert.runtime.ops import TritonOps

    monkeypatch.delenv("FMCONVERT_FLOAT_GEMV", raising=False)
    ops = TritonOps()
    calls, verdicts = [], {}
    monkeypatch.setattr(ops, "_time_float_gemv", lambda x, w, b, a: calls.append(x.shape[0]) or verdicts[x.shape[0]])
    used = []
    real = ops.k.float_gemv

    class Spy:                                    # the kernels module, with float_gemv counted
        def __getattr__(self, name):
            return getattr(ops.__dict__["_k"], name)

        def float_gemv(self, *a, **kw):
            used.append(a[0].shape[0])
            return real(*a, **kw)

    ops._k, ops.k = ops.k, Spy()
    x1, w, b = make(1, 34, 72, torch.float32, bias=True)
    x2 = make(2, 34, 72, torch.float32, bias=True)[0]
    verdicts.update({1: True, 2: None})
    for _ in range(2):
        assert_close(ops.linear(x1, w, b, "swiglu"), float_gemv_reference(x1, w, b, "swiglu"), torch.float32)
        assert_close(ops.linear(x2, w, b, "swiglu"), float_gemv_reference(x2, w, b, "swiglu"), torch.float32)
    assert calls == [1, 2, 2] and used == [1, 1]        # M=1 timed once and kept; M=2 untimeable: cuBLAS, asked again
    verdicts[2] = False
    ops.linear(x2, w, b)                                # another activation is another key
    ops.linear(x2, w, b)
    assert calls == [1, 2, 2, 2] and used == [1, 1]
    x5 = make(DECODE_MAX_M + 1, 34, 72, torch.float32, bias=False)[0]
    ops.linear(x5, w)                                   # a prompt: cuBLAS without asking
    assert calls == [1, 2, 2, 2]
    monkeypatch.setenv("FMCONVERT_FLOAT_GEMV", "cublas")
    ops.linear(x1, w, b, "swiglu")
    assert used == [1, 1]
    monkeypatch.setenv("FMCONVERT_FLOAT_GEMV", "triton")
    ops.linear(x2, w, b)
    assert used == [1, 1, 2] and calls == [1, 2, 2, 2]


def test_timed_choices_are_reported(monkeypatch):
    """What `generate` prints after a run on CUDA: how many decode shapes each timed choice went to."""
    import fmconvert.kernels.int8_matmul as im
    from fmconvert.runtime.ops import TritonOps

    ops = TritonOps()
    monkeypatch.setattr(im, "_DECODE_CHOICE", {})
    assert ops.timed_choices() == ""
    ops._gemv_choice.update({("a",): True, ("b",): False, ("c",): True})
    monkeypatch.setattr(im, "_DECODE_CHOICE", {("x",): "decode", ("y",): "gemm"})
    assert ops.timed_choices() == ("float GEMV on 2 of 3 shapes, cuBLAS on 1; "
                                   "int8 tensor-core GEMM on 1 of 2 shapes, GEMV on 1")


def test_the_float_gemv_wins_only_when_faster_and_in_agreement(monkeypatch):
    from fmconvert.runtime.ops import TritonOps

    ops = TritonOps()
    x, w, b = make(1, 34, 72, torch.float32, bias=True)
    fast_gemv = lambda fn: 1.0 if "float_gemv" in fn.__code__.co_names else 2.0      # noqa: E731
    slow_gemv = lambda fn: 3.0 if "float_gemv" in fn.__code__.co_names else 2.0      # noqa: E731
    assert ops._float_gemv_wins(x, w, b, "swiglu", fast_gemv) is True
    assert ops._float_gemv_wins(x, w, b, "swiglu", slow_gemv) is False
    real = ops.k.float_gemv

    class Broken:                                   # the kernels module with a float GEMV that is off by one
        def __getattr__(self, name):
            return getattr(ops.__dict__["_k"], name)

        def float_gemv(self, *a, **kw):
            return real(*a, **kw) + 1

    ops._k, ops.k = ops.k, Broken()
    assert ops._float_gemv_wins(x, w, b, "swiglu", fast_gemv) is False
