import pytest
import torch

from fmconvert.kernels import add_norm, add_norm_reference

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
FLOAT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_CUDA else [])
SHAPES = [(1, 1), (3, 17), (2, 5, 77), (129,), (2, 129), (1, 4096)] + ([(33, 8192), (7, 5120)] if ON_CUDA else [])


def make(shape, dtype, kind, residual, bias):
    gen = torch.Generator().manual_seed(sum(shape))
    N = shape[-1]
    x = (torch.randn(shape, generator=gen) * 3 + 0.5).to(dtype).to(DEVICE)
    r = torch.randn(shape, generator=gen).to(dtype).to(DEVICE) if residual else None
    w = (1 + 0.1 * torch.randn(N, generator=gen)).to(dtype).to(DEVICE)
    b = (0.1 * torch.randn(N, generator=gen)).to(dtype).to(DEVICE) if bias else None
    return x, r, w, b


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["rms", "layer", "rms_plus_one", "layer_plus_one"])
def test_add_norm_matches_reference(kind, shape, dtype, assert_close):
    x, r, w, b = make(shape, dtype, kind, residual=True, bias=kind.startswith("layer"))
    y, h = add_norm(x, r, w, b, 1e-5, kind)
    y_ref, h_ref = add_norm_reference(x, r, w, b, 1e-5, kind)
    assert_close(h, h_ref, dtype)
    assert_close(y, y_ref, dtype)


@pytest.mark.parametrize("kind", ["rms", "layer", "rms_plus_one", "layer_plus_one"])
def test_add_norm_without_residual_returns_input(kind, assert_close):
    x, _, w, _ = make((3, 77), torch.float16, kind, residual=False, bias=False)
    y, h = add_norm(x, None, w, None, 1e-6, kind)
    assert h is x
    assert_close(y, add_norm_reference(x, None, w, None, 1e-6, kind)[0], torch.float16)


def test_add_norm_out_dtype_and_no_weight(assert_close):
    x, r, _, _ = make((5, 33), torch.float16, "layer", residual=True, bias=False)
    y, h = add_norm(x, r, None, None, 1e-5, "layer", out_dtype=torch.float32)
    y_ref, h_ref = add_norm_reference(x, r, None, None, 1e-5, "layer", out_dtype=torch.float32)
    assert y.dtype == torch.float32 and h.dtype == torch.float16
    assert_close(y, y_ref, torch.float32, tol=1e-4)
    assert_close(h, h_ref, torch.float16)


def test_rms_plus_one_scales_by_one_plus_weight(assert_close):
    """Gemma's norm: the stored weight is an offset from 1 (a zero weight is the identity scale)."""
    x, _, w, _ = make((3, 40), torch.float32, "rms", residual=False, bias=False)
    y1, _ = add_norm(x, None, w - 1, None, 1e-6, "rms_plus_one")
    assert_close(y1, add_norm(x, None, w, None, 1e-6, "rms")[0], torch.float32)
    y0, _ = add_norm(x, None, torch.zeros_like(w), None, 1e-6, "rms_plus_one")
    assert_close(y0, add_norm(x, None, None, None, 1e-6, "rms")[0], torch.float32)


def test_layer_plus_one_scales_by_one_plus_weight(assert_close):
    """Nemotron's LayerNorm1P: the stored weight is an offset from 1, the bias as usual."""
    x, _, w, b = make((3, 40), torch.float32, "layer", residual=False, bias=True)
    y1, _ = add_norm(x, None, w - 1, b, 1e-5, "layer_plus_one")
    assert_close(y1, add_norm(x, None, w, b, 1e-5, "layer")[0], torch.float32)
    assert_close(y1, torch.nn.functional.layer_norm(x, (40,), w, b, 1e-5), torch.float32)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(3, 17), (2, 129), (1, 4096)])
@pytest.mark.parametrize("kind", ["rms", "rms_plus_one"])
@pytest.mark.parametrize("residual", [True, False])
def test_add_norm_with_a_pre_norm_matches_reference(kind, shape, dtype, residual, assert_close):
    """Gemma 2/3: y = norm(norm(x; pre_weight) + residual; weight), h = the sum; one launch for both norms."""
    x, r, w, _ = make(shape, dtype, kind, residual=residual, bias=False)
    pw = (0.5 + 0.3 * torch.randn(shape[-1], generator=torch.Generator().manual_seed(7))).to(dtype).to(DEVICE)
    y, h = add_norm(x, r, w, None, 1e-6, kind, pre_weight=pw)
    y_ref, h_ref = add_norm_reference(x, r, w, None, 1e-6, kind, pre_weight=pw)
    assert_close(h, h_ref, dtype)
    assert_close(y, y_ref, dtype)
    # the reference is the two norms one after the other, and the pre-norm matters
    xn = add_norm_reference(x, None, pw, None, 1e-6, kind)[0]
    assert torch.equal(h_ref, xn if r is None else add_norm_reference(xn, r, w, None, 1e-6, kind)[1])
    assert (h.float() - (x.float() if r is None else x.float() + r.float())).abs().max() > 0.1
    with pytest.raises(ValueError, match="RMS norms"):
        add_norm(x, r, w, None, 1e-6, "layer", pre_weight=pw)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_add_norm_scales_x_before_the_add(kind, dtype, assert_close):
    """Granite: h = x * residual_multiplier + residual; without a residual x is left as it is."""
    x, r, w, b = make((3, 129), dtype, kind, residual=True, bias=kind == "layer")
    y, h = add_norm(x, r, w, b, 1e-5, kind, x_scale=0.22)
    y_ref, h_ref = add_norm_reference(x, r, w, b, 1e-5, kind, x_scale=0.22)
    assert_close(h, h_ref, dtype)
    assert_close(y, y_ref, dtype)
    assert_close(h_ref, (x.float() * 0.22 + r.float()).to(dtype), dtype)
    assert (h.float() - add_norm(x, r, w, b, 1e-5, kind)[1].float()).abs().max() > 0.5
    assert add_norm(x, None, w, b, 1e-5, kind, x_scale=0.22)[1] is x


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(3, 17), (2, 5, 129), (1, 4096)])
@pytest.mark.parametrize("pre", [False, True])
def test_add_norm_gain_scales_the_stream(shape, dtype, pre, assert_close):
    """Gemma 4's layer scalar, folded into the next add+norm: h = (norm_pre(x) + residual) * gain, rounded after the
    add and after the product, then normed."""
    x, r, w, _ = make(shape, dtype, "rms", residual=True, bias=False)
    gain = torch.tensor([0.37], dtype=dtype, device=DEVICE)
    pw = (w * 0.9) if pre else None
    y, h = add_norm(x, r, w, None, 1e-6, "rms", pre_weight=pw, gain=gain)
    y_ref, h_ref = add_norm_reference(x, r, w, None, 1e-6, "rms", pre_weight=pw, gain=gain)
    assert_close(h, h_ref, dtype)
    assert_close(y, y_ref, dtype)
    plain = add_norm_reference(x, r, w, None, 1e-6, "rms", pre_weight=pw)[1]
    assert_close(h_ref, (plain.float() * 0.37).to(dtype), dtype)       # the reference does what it says
    with pytest.raises(ValueError, match="gain"):
        add_norm(x, None, w, None, 1e-6, "rms", gain=gain)


def test_add_norm_rejects_bad_inputs():
    x, r, w, _ = make((2, 16), torch.float32, "rms", residual=True, bias=False)
    with pytest.raises(ValueError, match="kind"):
        add_norm(x, r, w, None, 1e-5, "batch")
    with pytest.raises(ValueError, match="weight"):
        add_norm(x, r, w[:8], None, 1e-5, "rms")
    with pytest.raises(ValueError, match="residual"):
        add_norm(x, r[:1], w, None, 1e-5, "rms")
