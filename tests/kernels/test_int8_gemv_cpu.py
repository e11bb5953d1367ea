"""The CPU int8 GEMV (TorchInductor C++) against its pure-torch reference, and a whole model decoding through it."""

import pytest
import torch

from fmconvert.kernels import int8_gemv_cpu as K
from fmconvert.pipeline import Options, convert
from fmconvert.runtime import load as load_mod
from fmconvert.runtime.generate import generate, packed_int8, warm_up
from fmconvert.runtime.ops import Int8Weight

# A CUDA machine runs the GPU kernel tests; this kernel is the CPU's (and compiling it is the slow part).
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU kernel; tested on the CPU CI")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def quantized(N, Kdim, group, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (N, Kdim), dtype=torch.int8, generator=g)
    s = (torch.rand(N, Kdim // group, generator=g) + 0.01) / 127
    return q, s.half(), g


def test_kernel_builds_here():
    # CI's machine has the C++ compiler torch.compile needs; elsewhere load() falls back to float weights.
    assert K.available()


# (N, K, group, rows): N not a multiple of 64 (padded lanes), one row of 64, groups from 16 to 128, K of 1-9 groups.
SHAPES = [(1, 32, 32, 1), (64, 128, 128, 1), (67, 96, 32, 3), (130, 384, 128, 2), (200, 144, 16, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_reference(shape, dtype, bias):
    N, Kd, group, rows = shape
    q, s, g = quantized(N, Kd, group, seed=N + Kd)
    x = torch.randn(rows, Kd, generator=g).to(dtype)
    b = (torch.randn(N, generator=g) * 0.1).to(dtype) if bias else None
    got = K.int8_gemv(x, K.pack(q, s, group), b)
    ref = K.int8_gemv_reference(x, q, s, group, b)
    assert got.shape == ref.shape == (rows, N) and got.dtype == dtype
    err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1)).item()
    assert err <= TOL[dtype], err


def test_gemv_keeps_leading_dims_and_catches_wrong_k():
    q, s, g = quantized(70, 64, 32, seed=1)
    p = K.pack(q, s, 32)
    x = torch.randn(2, 1, 64, generator=g)
    got = K.int8_gemv(x, p)
    assert got.shape == (2, 1, 70)
    torch.testing.assert_close(got, K.int8_gemv_reference(x, q, s, 32), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="K=32"):
        K.int8_gemv(torch.randn(1, 32), p)


def test_pack_layout_and_padding():
    q, s, _ = quantized(65, 64, 32, seed=2)
    p = K.pack(q, s, 32)
    assert p.q.shape == (2, 64, 64) and p.scale.shape == (2, 2, 64) and p.n == 65
    assert torch.equal(p.q[0, :, 5], q[5]) and torch.equal(p.q[1, :, 0], q[64])
    assert not p.q[1, :, 1:].any() and not p.scale[1, :, 1:].any()      # padding rows are zero
    with pytest.raises(ValueError, match="do not fit"):
        K.pack(q, s[:, :1], 32)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_model_decodes_through_the_cpu_int8_gemv(model_dir, tmp_path, monkeypatch, name):
    """Every int8 weight packed (the size floor lowered for a tiny model): logits match the dequantized model's,
    and greedy decoding gives the same tokens; prefill (more rows than MAX_ROWS) takes the dequantize path."""
    out = tmp_path / "out"
    convert(model_dir(name), out, Options(tp=1, int8=True, group_size=16), progress=False)
    ref = load_mod.load(out, device="cpu", backend="torch", dequantize=True)
    monkeypatch.setattr(load_mod, "CPU_INT8_MIN_ELEMS", 0)
    fast = load_mod.load(out, device="cpu", backend="torch")
    packed = [w for w in fast.blocks[0].t.values() if isinstance(w, Int8Weight)]
    assert packed and all(w.packed is not None for w in packed)
    shapes = {(tuple(p.q.shape), p.group_size) for p in packed_int8(fast)}
    assert len(K.cold(packed_int8(fast))) <= len(shapes)
    warm_up(fast)                                                          # what generate() does first
    assert K.cold(packed_int8(fast)) == []
    ids = torch.randint(3, 100, (1, 6))
    want = ref(ids)
    torch.testing.assert_close(fast(ids), want, rtol=1e-4, atol=1e-4)      # prefill: dequantize path
    a, _ = generate(ref, ids, max_new_tokens=8)
    b, _ = generate(fast, ids, max_new_tokens=8)                          # decode: one row, int8 GEMV
    assert a.tolist() == b.tolist()


def test_a_kernel_that_fails_to_build_falls_back_to_dequantizing(monkeypatch):
    """No C++ compiler, say: the first decode call warns once and every later call dequantizes; results stay right."""
    from fmconvert.runtime.ops import TorchOps

    def broken(qp, group_size):
        def fn(*args):
            raise RuntimeError("Compiler: g++ not found\nmore detail")
        return fn

    monkeypatch.setattr(K, "_failed", None)
    monkeypatch.setattr(K, "_kernel", broken)
    q, s, g = quantized(70, 64, 32, seed=3)
    w = Int8Weight(q, s, 32, packed=K.pack(q, s, 32))
    x = torch.randn(1, 64, generator=g)
    with pytest.warns(RuntimeWarning, match="g\\+\\+ not found"):
        y = TorchOps().linear(x, w)
    assert not K.usable()
    torch.testing.assert_close(y, K.int8_gemv_reference(x, q, s, 32), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(TorchOps().linear(x, w), y)       # later calls go straight to dequantizing


def test_generate_cli_builds_the_kernels_first_and_says_so(model_dir, tmp_path, monkeypatch, capsys):
    """stories260K with every int8 weight packed: the CLI announces the build once, then streams the same text as the
    dequantized model."""
    import corpus
    out = tmp_path / "out"
    convert(model_dir("stories"), out, Options(tp=1, int8=True, group_size=16), progress=False)
    prompt = ["generate", out, "-p", "Once upon a time", "-n", "12", "--no-verify-hashes"]
    code, want, _ = corpus.run_main(capsys, *prompt)
    assert code == 0 and want.startswith("Once upon a time")
    monkeypatch.setattr(load_mod, "CPU_INT8_MIN_ELEMS", 0)
    monkeypatch.setattr(K, "_warm", set())
    code, got, err = corpus.run_main(capsys, *prompt)
    assert code == 0 and "building the CPU int8 kernels" in err
    assert got == want
    code, _, err = corpus.run_main(capsys, *prompt)
    assert code == 0 and "building the CPU int8 kernels" not in err        # built once per process
