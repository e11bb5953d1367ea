import pytest
import torch

from fmconvert.kernels.gated_norm import gated_rms_norm, gated_rms_norm_reference

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
# No tl.dot in this kernel: bf16 runs correctly under the interpreter too.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-6


def rand(*shape, seed, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype).to(DEVICE)


def gate_view(shape, seed, dtype=torch.float32):
    """z as the runtime sees it: [..., H, D] columns of a wider fused projection (a row stride > H * D)."""
    *lead, H, D = shape
    wide = rand(*lead, H * D + 11, seed=seed, dtype=dtype, scale=2.0)
    return wide[..., 5:5 + H * D].view(*lead, H, D)


# D odd and up to 256 (Qwen3.5's head_v_dim is 128); rows from 1 to 36.
SHAPES = [(1, 1, 1, 40), (2, 3, 4, 100), (7, 1), (3, 2, 256), (2, 2, 3, 37)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("w_dtype", ["fp32", "same"])
def test_gated_rms_norm_matches_reference(shape, dtype, w_dtype, assert_close):
    """The fp32 weight of an HF checkpoint loaded as is, and one in x's dtype (its product then rounds)."""
    x = rand(*shape, seed=sum(shape), dtype=dtype, scale=3.0)
    z = gate_view(shape, seed=sum(shape) + 1, dtype=dtype) if len(shape) > 2 else rand(*shape, seed=1, dtype=dtype)
    w = (1 + 0.2 * rand(shape[-1], seed=2)).to(torch.float32 if w_dtype == "fp32" else dtype)
    y = gated_rms_norm(x, z, w, EPS)
    assert y.is_contiguous()
    assert_close(y, gated_rms_norm_reference(x, z, w, EPS), dtype)


def test_gated_rms_norm_strided_x_and_an_fp32_gate(assert_close):
    """x a strided view too (heads transposed: not mergeable, so copied), and z in fp32 with bf16 x."""
    x = rand(2, 4, 3, 40, seed=3, dtype=torch.bfloat16).transpose(1, 2)      # (2, 3, 4, 40)
    z = gate_view((2, 3, 4, 40), seed=4)
    w = rand(40, seed=5, dtype=torch.bfloat16)
    assert_close(gated_rms_norm(x, z, w, EPS), gated_rms_norm_reference(x, z, w, EPS), torch.bfloat16)
    assert_close(gated_rms_norm(x, z, w, EPS), gated_rms_norm(x.contiguous(), z.contiguous(), w, EPS),
                 torch.bfloat16)


@pytest.mark.parametrize("dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
def test_reference_is_transformers_bit_for_bit(dtype, w_dtype):
    mod = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")
    D = 100
    norm = mod.Qwen3_5RMSNormGated(D, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(D, generator=torch.Generator().manual_seed(6)))
    norm = norm.to(w_dtype)
    x = rand(2, 3, 4, D, seed=7, dtype=dtype, scale=3.0).cpu()
    z = gate_view((2, 3, 4, D), seed=8, dtype=dtype).cpu()
    with torch.no_grad():
        hf = norm(x, z)
    assert torch.equal(gated_rms_norm_reference(x, z, norm.weight.detach(), EPS), hf)


def test_gated_rms_norm_rejects_bad_inputs():
    x, z, w = rand(3, 16, seed=9), rand(3, 16, seed=10), rand(16, seed=11)
    for fn in (gated_rms_norm, gated_rms_norm_reference):
        with pytest.raises(ValueError, match="z must have"):
            fn(x, z[:2], w, EPS)
        with pytest.raises(ValueError, match="weight"):
            fn(x, z, w[:8], EPS)
        with pytest.raises(ValueError, match="x must be one of"):
            fn(x.to(torch.int32), z, w, EPS)
