"""kernels/rglru_scan.py (RecurrentGemma's RG-LRU recurrence) against its torch reference over odd shapes and
dtypes, a prompt then decode steps continuing one state, strided views, and bad inputs."""

import pytest
import torch

from fmconvert.kernels.rglru_scan import linear_scan, linear_scan_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]     # no tl.dot: bf16 is exact under the interpreter too


def inputs(B, T, W, dtype, seed=0):
    """Decays in (0, 1) and inputs about as the RG-LRU makes them, and a nonzero initial state."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(B, T, W, generator=g).to(dtype).to(DEVICE)
    x = (torch.randn(B, T, W, generator=g) * 0.5).to(dtype).to(DEVICE)
    state = torch.randn(B, W, generator=g).to(DEVICE)
    return a, x, state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,W", [(1, 1, 1), (2, 7, 33), (3, 19, 300), (1, 64, 257), (2, 3, 769)])
def test_matches_reference(B, T, W, dtype):
    a, x, state = inputs(B, T, W, dtype, seed=B * 100 + T)
    s1, s2 = state.clone(), state.clone()
    y, want = linear_scan(a, x, s1), linear_scan_reference(a, x, s2)
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert y.dtype == dtype and y.shape == (B, T, W)
    torch.testing.assert_close(y.float(), want.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(s1, s2, atol=1e-6, rtol=1e-6)     # the final states, fp32 in both


def test_a_prompt_then_decode_steps_continue_one_state():
    a, x, state = inputs(2, 12, 40, torch.float32, seed=3)
    whole = linear_scan_reference(a, x, state.clone())
    s = state.clone()
    parts = [linear_scan(a[:, :5], x[:, :5], s)] + [linear_scan(a[:, j:j + 1], x[:, j:j + 1], s) for j in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-6, rtol=1e-6)


def test_strided_views_and_the_state_as_is():
    a, x, state = inputs(2, 9, 48, torch.float32, seed=4)
    wide = torch.cat([x, x], -1)[..., :48]          # a view with another row stride
    s1, s2 = state.clone(), state.clone()
    torch.testing.assert_close(linear_scan(a, wide, s1), linear_scan_reference(a, x, s2))
    empty = linear_scan(a[:, :0], x[:, :0], s1)
    assert empty.shape == (2, 0, 48) and torch.equal(s1, s2)


@pytest.mark.parametrize("bad", ["shape", "state_dtype", "int"])
def test_bad_inputs_are_refused(bad):
    a, x, state = inputs(2, 4, 8, torch.float32)
    if bad == "shape":
        a = a[:, :3]
    elif bad == "state_dtype":
        state = state.half()
    else:
        x = x.to(torch.int32)
    with pytest.raises(ValueError):
        linear_scan(a, x, state)
