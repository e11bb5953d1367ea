import pytest
import torch

from fmconvert.kernels import gated, gated_reference, swiglu, swiglu_reference

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
FLOAT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_CUDA else [])
OAI = ("swiglu_oai", 1.702, 7.0)
LIM = ("swiglu_limit", 7.0)       # HY-V4's experts: the same clamps, a plain SwiGLU       # GPT-OSS's alpha and limit; inputs of |y| up to ~16 below hit both clamps


@pytest.mark.parametrize("act", ["swiglu", "geglu", "geglu_erf", OAI, LIM, "reglu2"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (1, 22), (3, 5, 2 * 769), (7, 2 * 1500), (2, 0, 8)])
def test_glu_matches_reference(shape, dtype, act, assert_close):
    y = (torch.randn(shape, generator=torch.Generator().manual_seed(shape[-1])) * 4).to(dtype).to(DEVICE)
    out = gated(y, act)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    assert_close(out, gated_reference(y, act), dtype)


def test_geglu_is_not_swiglu():
    # The two gates differ enough that a kernel applying the wrong one fails the comparison above.
    y = torch.linspace(-4, 4, 64, device=DEVICE).reshape(2, 32)
    assert (gated_reference(y, "geglu") - gated_reference(y, "swiglu")).abs().max() > 0.1
    assert torch.equal(swiglu_reference(y), gated_reference(y, "swiglu"))


def test_geglu_erf_is_the_exact_gelu(assert_close):
    # The erf GELU and the tanh one differ by up to ~3e-4, under the comparison above's tolerance at large inputs:
    # here, with up = 1 where the two differ most, the kernel must give the exact one and not the other.
    gate = torch.linspace(-3, 3, 64, dtype=torch.float32)
    y = torch.cat([gate, torch.ones(64)]).reshape(1, 128).to(DEVICE)
    exact = torch.nn.functional.gelu(gate).to(DEVICE)
    assert (gated_reference(y, "geglu")[0] - exact).abs().max() > 1e-4
    assert (gated_reference(y, "geglu_erf")[0] - exact).abs().max() < 1e-6
    assert (gated(y, "geglu_erf")[0] - exact).abs().max() < 1e-5


def test_glu_strided_input_and_errors(assert_close):
    y = torch.randn(4, 40, device=DEVICE)[:, :20]          # rows with a stride of 40
    assert_close(swiglu(y), swiglu_reference(y), torch.float32)
    assert_close(gated(y, "geglu"), gated_reference(y, "geglu"), torch.float32)
    with pytest.raises(ValueError, match="even"):
        swiglu(torch.randn(3, 5, device=DEVICE))
    with pytest.raises(ValueError, match="must be one of"):
        swiglu(torch.ones(2, 4, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="activation must be one of"):
        gated(torch.randn(2, 4, device=DEVICE), "gelu")


def test_swiglu_oai_reference_matches_gpt_oss_formula(assert_close):
    y = torch.linspace(-12, 12, 96, device=DEVICE).reshape(2, 48)
    gate, up = y[:, :24].clamp(max=7.0), y[:, 24:].clamp(-7.0, 7.0)
    assert_close(gated_reference(y, OAI), gate * torch.sigmoid(1.702 * gate) * (up + 1), torch.float32, tol=1e-6)
    assert (gated_reference(y, OAI) - gated_reference(y, "swiglu")).abs().max() > 1.0


def test_swiglu_limit_reference_is_the_clamped_swiglu(assert_close):
    y = torch.linspace(-12, 12, 96, device=DEVICE).reshape(2, 48)
    gate, up = y[:, :24].clamp(max=7.0), y[:, 24:].clamp(-7.0, 7.0)
    assert_close(gated_reference(y, LIM), torch.nn.functional.silu(gate) * up, torch.float32, tol=1e-6)
    assert (gated_reference(y, LIM) - gated_reference(y, "swiglu")).abs().max() > 1.0
    for bad in [("swiglu_limit", 0.0), ("swiglu_limit", float("inf"))]:
        with pytest.raises(ValueError, match="swiglu_limit"):
            gated(y, bad)


def test_swiglu_oai_rejects_bad_tuples():
    y = torch.randn(2, 4, device=DEVICE)
    for bad in [("swiglu_oai", 1.702), ("swish", 1.0, 7.0), ("swiglu_oai", 1.702, 0.0),
                ("swiglu_oai", float("nan"), 7.0)]:
        with pytest.raises(ValueError, match="swiglu_oai"):
            gated(y, bad)
