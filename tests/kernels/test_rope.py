import pytest
import torch

from fmconvert.kernels import apply_rope, apply_rope_reference, rope_append, rope_append_reference

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


def decode_qkv(B, HQ, HKV, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, 1, (HQ + 2 * HKV) * D, generator=gen).to(dtype).to(DEVICE)
    q, k, v = qkv.split([HQ * D, HKV * D, HKV * D], -1)
    return q.view(B, 1, HQ, D), k.view(B, 1, HKV, D), v.view(B, 1, HKV, D)


# (B, Hq, Hkv, D, rotary_dim, S_max); rotary_dim 0: no RoPE (ALiBi or learned positions only append)
APPEND_SHAPES = [(1, 1, 1, 8, None, 4), (2, 6, 2, 24, None, 9), (3, 5, 5, 20, 12, 7), (1, 17, 1, 64, 32, 33),
                 (2, 4, 1, 18, 0, 5), (1, 3, 3, 6, 2, 3)] + ([(4, 32, 8, 128, None, 300)] if ON_CUDA else [])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("shape", APPEND_SHAPES)
def test_rope_append_matches_reference(shape, style, dtype, assert_close):
    B, HQ, HKV, D, R, S = shape
    q, k, v = decode_qkv(B, HQ, HKV, D, dtype, seed=B + D)
    cos, sin = tables(S, R or D) if R != 0 else (None, None)
    R = R or None
    gen = torch.Generator().manual_seed(S)
    kc = torch.randn(B, HKV, S, D, generator=gen).to(dtype).to(DEVICE)
    vc = torch.randn(B, HKV, S, D, generator=gen).to(dtype).to(DEVICE)
    for p in sorted({0, S // 2, S - 1}):
        pos = torch.tensor([p], device=DEVICE)
        kr, vr = kc.clone(), vc.clone()
        qo = rope_append(q, k, v, kc, vc, pos, cos, sin, style, R)
        qr = rope_append_reference(q, k, v, kr, vr, pos, cos, sin, style, R)
        assert qo.shape == (B, HQ, D) and qo.is_contiguous()
        assert_close(qo, qr, dtype)
        assert_close(kc, kr, dtype)
        assert torch.equal(vc, vr)                       # v is copied, never rounded
        assert torch.equal(vc[:, :, p], v[:, 0])


@pytest.mark.parametrize("plus_one", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("shape", [s for s in APPEND_SHAPES if s[4] != 0])
def test_rope_append_with_qk_norm_matches_reference(shape, style, dtype, plus_one, assert_close):
    """Qwen3: each q and k head RMS-normalised over all D dims (partial RoPE included) and scaled, then rotated;
    Gemma 3 scales by 1 + the weight (stored as the offset, so near 0 here)."""
    B, HQ, HKV, D, R, S = shape
    q, k, v = decode_qkv(B, HQ, HKV, D, dtype, seed=B + D + 1)
    cos, sin = tables(S, R or D)
    gen = torch.Generator().manual_seed(D)
    qn = (0 if plus_one else 1) + 0.3 * torch.randn(D, generator=gen)
    kn = (0 if plus_one else 1) + 0.3 * torch.randn(D, generator=gen)
    qn, kn = qn.to(dtype).to(DEVICE), kn.to(dtype).to(DEVICE)
    kc, vc = torch.zeros(B, HKV, S, D, dtype=dtype, device=DEVICE), torch.zeros(B, HKV, S, D, dtype=dtype, device=DEVICE)
    kr, vr = kc.clone(), vc.clone()
    pos = torch.tensor([S - 1], device=DEVICE)
    qo = rope_append(q, k, v, kc, vc, pos, cos, sin, style, R, q_norm=qn, k_norm=kn, eps=1e-6, plus_one=plus_one)
    qr = rope_append_reference(q, k, v, kr, vr, pos, cos, sin, style, R, q_norm=qn, k_norm=kn, eps=1e-6,
                               plus_one=plus_one)
    assert_close(qo, qr, dtype)
    assert_close(kc, kr, dtype)
    assert torch.equal(vc, vr)
    plain = rope_append_reference(q, k, v, kr.clone(), vr.clone(), pos, cos, sin, style, R)
    assert (plain.float() - qr.float()).abs().max() > 0.05          # the norm did change q
    if plus_one:       # and 1 + w is not w: the flag matters
        other = rope_append_reference(q, k, v, kr.clone(), vr.clone(), pos, cos, sin, style, R, q_norm=qn,
                                      k_norm=kn, eps=1e-6)
        assert (other.float() - qr.float()).abs().max() > 0.05


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [s for s in APPEND_SHAPES if s[4] != 0])
def test_rope_append_with_v_norm_matches_reference(shape, dtype, qk_norm, assert_close):
    """Gemma 4: each v head RMS-normalised (a weight of ones there; any weight here) as it is written."""
    B, HQ, HKV, D, R, S = shape
    q, k, v = decode_qkv(B, HQ, HKV, D, dtype, seed=B + D + 3)
    cos, sin = tables(S, R or D)
    gen = torch.Generator().manual_seed(D + 1)
    vn = (1 + 0.3 * torch.randn(D, generator=gen)).to(dtype).to(DEVICE)
    norms = dict(q_norm=torch.ones(D, dtype=dtype, device=DEVICE), k_norm=vn.flip(0)) if qk_norm else {}
    kc = torch.zeros(B, HKV, S, D, dtype=dtype, device=DEVICE)
    vc = torch.zeros_like(kc)
    kr, vr = kc.clone(), vc.clone()
    pos = torch.tensor([S - 1], device=DEVICE)
    qo = rope_append(q, k, v, kc, vc, pos, cos, sin, "neox", R, eps=1e-6, v_norm=vn, **norms)
    qr = rope_append_reference(q, k, v, kr, vr, pos, cos, sin, "neox", R, eps=1e-6, v_norm=vn, **norms)
    assert_close(qo, qr, dtype)
    assert_close(kc, kr, dtype)
    assert_close(vc, vr, dtype)
    plain = vr.clone()
    rope_append_reference(q, k, v, kr.clone(), plain, pos, cos, sin, "neox", R, eps=1e-6, **norms)
    assert (plain.float() - vr.float()).abs().max() > 0.05          # the norm did change v


@pytest.mark.parametrize("pos", [0, 4, 5, 13, 37])
def test_rope_append_into_a_ring_writes_row_pos_mod_its_length(pos, assert_close):
    """A sliding window's cache is a ring of 5 rows: position p goes to row p % 5, rotated for p, not the row."""
    q, k, v = decode_qkv(2, 4, 2, 16, torch.float32, seed=pos)
    cos, sin = tables(64, 16)
    kc, vc = torch.zeros(2, 2, 5, 16, device=DEVICE), torch.zeros(2, 2, 5, 16, device=DEVICE)
    kr, vr = kc.clone(), vc.clone()
    at = torch.tensor([pos], device=DEVICE)
    qo = rope_append(q, k, v, kc, vc, at, cos, sin, "neox", 16, ring=True)
    qr = rope_append_reference(q, k, v, kr, vr, at, cos, sin, "neox", 16, ring=True)
    assert_close(qo, qr, torch.float32)
    assert_close(kc, kr, torch.float32)
    assert torch.equal(vc[:, :, pos % 5], v[:, 0]) and torch.equal(vc, vr)
    assert int((kc.abs().sum((0, 1, 3)) > 0).sum()) == 1                 # one row written
    if pos >= 5:       # rotated by its position: row pos % 5 of a plain append at pos % 5 would differ
        plain = torch.zeros_like(kc)
        rope_append_reference(q, k, v, plain, torch.zeros_like(vc), at % 5, cos, sin, "neox", 16)
        assert (plain - kc).abs().max() > 1e-3


def test_rope_append_past_the_cache_writes_nothing_and_checks_inputs():
    q, k, v = decode_qkv(2, 4, 2, 8, torch.float32)
    kc, vc = torch.randn(2, 2, 5, 8, device=DEVICE), torch.randn(2, 2, 5, 8, device=DEVICE)
    before = kc.clone(), vc.clone()
    cos, sin = tables(5, 8)
    rope_append(q, k, v, kc, vc, torch.tensor([5], device=DEVICE), cos, sin)
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])
    with pytest.raises(ValueError, match="one-element"):
        rope_append(q, k, v, kc, vc, torch.tensor([1, 2], device=DEVICE), cos, sin)
    with pytest.raises(ValueError, match="both cos and sin"):
        rope_append(q, k, v, kc, vc, torch.tensor([1], device=DEVICE), cos, None)
    with pytest.raises(ValueError, match="k_cache"):
        rope_append(q, k, v, kc[:1], vc, torch.tensor([1], device=DEVICE), cos, sin)
    with pytest.raises(ValueError, match="dtype"):
        rope_append(q, k, v, kc.half(), vc, torch.tensor([1], device=DEVICE), cos, sin)
    with pytest.raises(ValueError, match="q_norm and k_norm"):
        rope_append(q, k, v, kc, vc, torch.tensor([1], device=DEVICE), cos, sin, q_norm=torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match="need RoPE"):
        rope_append(q, k, v, kc, vc, torch.tensor([1], device=DEVICE), q_norm=torch.ones(8, device=DEVICE),
                    k_norm=torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match="q_norm must be"):
        rope_append(q, k, v, kc, vc, torch.tensor([1], device=DEVICE), cos, sin, q_norm=torch.ones(4, device=DEVICE),
                    k_norm=torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match="one new token"):
        rope_append(q.expand(2, 2, 4, 8), k, v, kc, vc, torch.tensor([1], device=DEVICE), cos, sin)
