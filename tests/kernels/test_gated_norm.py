import inspect

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


@pytest.mark.parametrize("family,cls,D,gate", [("qwen3_5", "Qwen3_5RMSNormGated", 100, "silu"),
                                               ("kimi_linear", "KimiLinearRMSNormGated", 128, "sigmoid")])
@pytest.mark.parametrize("dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
def test_reference_is_transformers_bit_for_bit(dtype, w_dtype, family, cls, D, gate):
    mod = pytest.importorskip(f"transformers.models.{family}.modeling_{family}")
    norm = getattr(mod, cls)(D, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(D, generator=torch.Generator().manual_seed(6)))
    norm = norm.to(w_dtype)
    x = rand(2, 3, 4, D, seed=7, dtype=dtype, scale=3.0).cpu()
    z = gate_view((2, 3, 4, D), seed=8, dtype=dtype).cpu()
    with torch.no_grad():
        hf = norm(x, z)
    ref = gated_rms_norm_reference(x, z, norm.weight.detach(), EPS, gate=gate)
    assert ref.dtype == dtype and torch.equal(ref, hf)


def test_gated_rms_norm_rejects_bad_inputs():
    x, z, w = rand(3, 16, seed=9), rand(3, 16, seed=10), rand(16, seed=11)
    for fn in (gated_rms_norm, gated_rms_norm_reference):
        with pytest.raises(ValueError, match="z must have"):
            fn(x, z[:2], w, EPS)
        with pytest.raises(ValueError, match="weight"):
            fn(x, z, w[:8], EPS)
        with pytest.raises(ValueError, match="x must be one of"):
            fn(x.to(torch.int32), z, w, EPS)


# Mamba2's variant (gate_first): the norm over the whole mixer width D in groups of D / n_groups channels, wider
# than a head. (shape, group_size): groups of 40, 20 (two per row), 250 (four), and 5000 > MAX_BLOCK, read in two
# blocks; None is the whole row.
MAMBA_CASES = [((3, 40), 40), ((2, 3, 40), 20), ((2, 1000), 250), ((1, 2, 5000), None), ((2, 2, 96), None)]


def mixer_view(shape, seed, dtype=torch.float32, scale=2.0):
    """[..., D] columns of a wider fused projection, as the gate z of a Mamba2 mixer is (a row stride > D)."""
    *lead, D = shape
    return rand(*lead, D + 13, seed=seed, dtype=dtype, scale=scale)[..., 5:5 + D]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,group", MAMBA_CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("w_dtype", ["fp32", "same"])
def test_gate_first_matches_reference(shape, group, dtype, w_dtype, assert_close):
    x = rand(*shape, seed=sum(shape), dtype=dtype, scale=3.0)
    z = mixer_view(shape, seed=sum(shape) + 1, dtype=dtype)
    assert not z.is_contiguous()
    w = (1 + 0.2 * rand(shape[-1], seed=12)).to(torch.float32 if w_dtype == "fp32" else dtype)
    y = gated_rms_norm(x, z, w, EPS, group_size=group, gate_first=True)
    ref = gated_rms_norm_reference(x, z, w, EPS, group_size=group, gate_first=True)
    # weight * n in torch's promotion: fp32 for an fp32 weight, else x's dtype.
    assert y.dtype == ref.dtype == torch.promote_types(w.dtype, dtype) and y.is_contiguous()
    assert_close(y, ref, dtype)


@pytest.mark.parametrize("shape,group", [((2, 3, 4, 100), 25), ((3, 5000), 2500), ((2, 5000), None)],
                         ids=lambda c: str(c))
def test_grouped_gate_last_matches_reference(shape, group, assert_close):
    """group_size for the Qwen order (norm, then gate) too; D = 5000 takes the two-pass path."""
    x = rand(*shape, seed=13, dtype=torch.float16, scale=3.0)
    z = mixer_view(shape, seed=14, dtype=torch.float16)
    w = rand(shape[-1], seed=15, dtype=torch.float16)
    y = gated_rms_norm(x, z, w, EPS, group_size=group)
    assert y.dtype == torch.float16
    assert_close(y, gated_rms_norm_reference(x, z, w, EPS, group_size=group), torch.float16)
    if group is None:
        assert torch.equal(y, gated_rms_norm(x, z, w, EPS, group_size=shape[-1]))


def test_gate_first_strided_x_and_bf16(assert_close):
    """x a slice of a wider tensor too, bf16 with an fp32 weight (fp32 out) and a bf16 weight (bf16 out)."""
    x = mixer_view((2, 3, 200), seed=16, dtype=torch.bfloat16)
    z = mixer_view((2, 3, 200), seed=17, dtype=torch.bfloat16)
    for w in (rand(200, seed=18), rand(200, seed=18, dtype=torch.bfloat16)):
        y = gated_rms_norm(x, z, w, EPS, group_size=100, gate_first=True)
        assert_close(y, gated_rms_norm_reference(x, z, w, EPS, group_size=100, gate_first=True), torch.bfloat16)


@pytest.mark.parametrize("dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("n_groups", [1, 2])
def test_gate_first_reference_is_transformers_bit_for_bit(dtype, w_dtype, n_groups):
    mod = pytest.importorskip("transformers.models.granitemoehybrid.modeling_granitemoehybrid")
    D = 96
    if "group_size" in inspect.signature(mod.GraniteMoeHybridRMSNormGated).parameters:
        norm = mod.GraniteMoeHybridRMSNormGated(D, group_size=D // n_groups, eps=EPS)
    elif n_groups == 1:      # older transformers (5.17, the GPU image's): one group over the whole width
        norm = mod.GraniteMoeHybridRMSNormGated(D, eps=EPS)
    else:
        pytest.skip("this transformers' gated norm has no groups")
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(D, generator=torch.Generator().manual_seed(19)))
    norm = norm.to(w_dtype)
    x = rand(2, 5, D, seed=20, dtype=dtype, scale=3.0).cpu()
    z = mixer_view((2, 5, D), seed=21, dtype=dtype).cpu()
    with torch.no_grad():
        hf = norm(x, z)
    ref = gated_rms_norm_reference(x, z, norm.weight.detach(), EPS, group_size=D // n_groups, gate_first=True)
    assert torch.equal(ref, hf)


def test_group_size_must_divide_d():
    x, z, w = rand(3, 16, seed=22), rand(3, 16, seed=23), rand(16, seed=24)
    for fn in (gated_rms_norm, gated_rms_norm_reference):
        for bad in (5, 0, 32):
            with pytest.raises(ValueError, match="group_size must divide the last dim 16"):
                fn(x, z, w, EPS, group_size=bad, gate_first=True)


# KDA's output norm (Kimi Linear): gate="sigmoid", everything in fp32 and rounded once at the end.

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 40), (2, 3, 4, 100), (7, 1), (3, 2, 256), (2, 2, 3, 37)])
@pytest.mark.parametrize("w_dtype", ["fp32", "same"])
def test_sigmoid_gate_matches_reference(shape, dtype, w_dtype, assert_close):
    x = rand(*shape, seed=sum(shape) + 30, dtype=dtype, scale=3.0)
    z = gate_view(shape, seed=sum(shape) + 31, dtype=dtype) if len(shape) > 2 else rand(*shape, seed=32, dtype=dtype)
    w = (1 + 0.2 * rand(shape[-1], seed=33)).to(torch.float32 if w_dtype == "fp32" else dtype)
    y = gated_rms_norm(x, z, w, EPS, gate="sigmoid")
    assert y.dtype == dtype and y.is_contiguous()
    ref = gated_rms_norm_reference(x, z, w, EPS, gate="sigmoid")
    assert_close(y, ref, dtype)
    # Not silu's result: the flag reaches the kernel.
    assert not torch.allclose(y.float(), gated_rms_norm(x, z, w, EPS).float(), atol=1e-2)


@pytest.mark.parametrize("shape,group", [((2, 3, 100), 25), ((2, 5000), None)], ids=lambda c: str(c))
def test_sigmoid_gate_grouped_and_two_pass(shape, group, assert_close):
    """Groups narrower than the row, and a row wider than MAX_BLOCK (read twice), with x a strided view too."""
    x = mixer_view(shape, seed=34, dtype=torch.float16, scale=3.0)
    z = mixer_view(shape, seed=35, dtype=torch.float16)
    w = rand(shape[-1], seed=36)
    y = gated_rms_norm(x, z, w, EPS, group_size=group, gate="sigmoid")
    assert_close(y, gated_rms_norm_reference(x, z, w, EPS, group_size=group, gate="sigmoid"), torch.float16)




def test_gate_keyword_rejects_bad_values():
    x, z, w = rand(3, 16, seed=40), rand(3, 16, seed=41), rand(16, seed=42)
    for fn in (gated_rms_norm, gated_rms_norm_reference):
        with pytest.raises(ValueError, match="needs gate_first=False"):
            fn(x, z, w, EPS, gate="sigmoid", gate_first=True)
        with pytest.raises(ValueError, match="gate must be one of"):
            fn(x, z, w, EPS, gate="relu")
        # gate="silu" spelled out is the default.
        assert torch.equal(fn(x, z, w, EPS, gate="silu"), fn(x, z, w, EPS))
