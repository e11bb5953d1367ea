import pytest
import torch

from fmconvert.kernels import apply_rope, apply_rope_reference

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
FLOAT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_CUDA else [])

# (B, T, Hq, Hkv, D, rotary_dim)
SHAPES = [(1, 1, 1, 1, 8, None), (2, 3, 4, 2, 16, None), (1, 5, 3, 1, 80, 64), (2, 7, 17, 1, 64, 32),
          (1, 2, 2, 2, 6, 2)] + ([(4, 129, 32, 8, 128, None)] if ON_CUDA else [])


def tables(max_pos, rotary_dim, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    ang = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv[None, :]
    return ang.cos().to(DEVICE), ang.sin().to(DEVICE)


def fused_qkv(B, T, HQ, HKV, D, dtype, seed=0):
    # q and k as strided views of one fused projection output, as the runtime produces them.
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, (HQ + 2 * HKV) * D, generator=gen).to(dtype).to(DEVICE)
    q = qkv[..., : HQ * D].view(B, T, HQ, D)
    k = qkv[..., HQ * D: (HQ + HKV) * D].view(B, T, HKV, D)
    return q, k


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("shape", SHAPES)
def test_apply_rope_matches_reference(shape, style, dtype, assert_close):
    B, T, HQ, HKV, D, R = shape
    q, k = fused_qkv(B, T, HQ, HKV, D, dtype, seed=B * T + D)
    assert B * T == 1 or not q.is_contiguous()
    cos, sin = tables(300, R or D)
    pos = torch.randint(0, 300, (B, T), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    qo, ko = apply_rope(q, k, cos, sin, pos, style, R)
    qr, kr = apply_rope_reference(q, k, cos, sin, pos, style, R)
    assert_close(qo, qr, dtype)
    assert_close(ko, kr, dtype)
    if R is not None and R < D:
        assert torch.equal(qo[..., R:], q[..., R:])


def test_neox_matches_hf_rotate_half(assert_close):
    # HF LLaMA: q * cos_full + rotate_half(q) * sin_full, with cos_full = cat(cos, cos).
    B, T, H, D = 2, 5, 3, 16
    q, k = fused_qkv(B, T, H, H, D, torch.float32)
    cos, sin = tables(64, D)
    pos = torch.arange(T, device=DEVICE).expand(B, T).contiguous()
    qo, _ = apply_rope(q, k, cos, sin, pos)
    c = torch.cat([cos, cos], -1)[pos][:, :, None]
    s = torch.cat([sin, sin], -1)[pos][:, :, None]
    rot = torch.cat([-q[..., D // 2:], q[..., : D // 2]], -1)
    assert_close(qo, q * c + rot * s, torch.float32, tol=1e-5)


def test_apply_rope_int32_positions_and_errors(assert_close):
    q, k = fused_qkv(1, 3, 2, 1, 8, torch.float32)
    cos, sin = tables(16, 8)
    pos = torch.tensor([[3, 0, 7]], dtype=torch.int32, device=DEVICE)
    assert_close(apply_rope(q, k, cos, sin, pos)[1], apply_rope_reference(q, k, cos, sin, pos)[1], torch.float32)
    with pytest.raises(ValueError, match="style"):
        apply_rope(q, k, cos, sin, pos, style="glm")
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rope(q, k, cos, sin, pos, rotary_dim=5)
    with pytest.raises(ValueError, match="cos"):
        apply_rope(q, k, cos[:, :2], sin, pos)
