"""kernels/mlstm.py (xLSTM's mLSTM recurrence) against its torch reference over odd shapes (q/k narrower than v, as
the released model has them, and value widths past one block) and dtypes, a prompt then decode steps continuing one
state, a state carried in with a large stabilizer, and bad inputs."""

import pytest
import torch

from fmconvert.kernels.mlstm import mlstm_scan, mlstm_scan_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]     # no tl.dot: bf16 is exact under the interpreter too


def inputs(B, T, H, DK, DV, dtype, seed=0):
    """q, k, v as the layer makes them, gates soft-capped at 15, and a nonzero initial state (C, n and m)."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, DK, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    v = torch.randn(B, T, H, DV, generator=g).to(dtype).to(DEVICE)
    i, f = ((torch.tanh(torch.randn(B, T, H, generator=g)) * 15).to(dtype).to(DEVICE) for _ in range(2))
    state = torch.zeros(B, H, DK + 1, DV + 1)
    state[..., :DK, :DV] = torch.randn(B, H, DK, DV, generator=g) * 0.1
    state[..., :DK, DV] = torch.randn(B, H, DK, generator=g) * 0.1
    state[..., DK, 0] = torch.randn(B, H, generator=g)
    return q, k, v, i, f, state.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,DK,DV", [(1, 1, 1, 1, 1), (2, 7, 3, 5, 13), (1, 19, 2, 8, 16), (2, 4, 1, 16, 40),
                                          (1, 9, 2, 12, 77)])
def test_matches_reference(B, T, H, DK, DV, dtype):
    q, k, v, i, f, state = inputs(B, T, H, DK, DV, dtype, seed=B * 100 + T)
    s1, s2 = state.clone(), state.clone()
    y, want = mlstm_scan(q, k, v, i, f, s1), mlstm_scan_reference(q, k, v, i, f, s2)
    tol = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    assert y.dtype == dtype and y.shape == (B, T, H, DV)
    torch.testing.assert_close(y.float(), want.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(s1, s2, atol=2e-5, rtol=2e-5)     # the final states, fp32 in both


def test_a_prompt_then_decode_steps_continue_one_state():
    q, k, v, i, f, state = inputs(2, 12, 2, 8, 20, torch.float32, seed=3)
    whole = mlstm_scan_reference(q, k, v, i, f, state.clone())
    s = state.clone()
    parts = [mlstm_scan(q[:, :5], k[:, :5], v[:, :5], i[:, :5], f[:, :5], s)] + [
        mlstm_scan(q[:, j:j + 1], k[:, j:j + 1], v[:, j:j + 1], i[:, j:j + 1], f[:, j:j + 1], s) for j in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=2e-5, rtol=2e-5)


def test_the_stabilizer_keeps_large_gates_finite():
    """Input gates far past exp's range and a large stabilizer carried in: the output stays finite and equal."""
    q, k, v, i, f, state = inputs(1, 6, 2, 4, 8, torch.float32, seed=5)
    i, state[..., 4, 0] = i * 20, 80.0
    s1, s2 = state.clone(), state.clone()
    y, want = mlstm_scan(q, k, v, i, f, s1), mlstm_scan_reference(q, k, v, i, f, s2)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("bad", ["gate_shape", "state_shape", "state_dtype", "int"])
def test_bad_inputs_are_refused(bad):
    q, k, v, i, f, state = inputs(2, 4, 2, 4, 8, torch.float32)
    if bad == "gate_shape":
        i = i[:, :3]
    elif bad == "state_shape":
        state = state[..., :-1]
    elif bad == "state_dtype":
        state = state.half()
    else:
        v = v.to(torch.int32)
    with pytest.raises(ValueError):
        mlstm_scan(q, k, v, i, f, state)
    with pytest.raises(ValueError):
        mlstm_scan_reference(q, k, v, i, f, state)


@pytest.mark.parametrize("T,chunk", [(5, 4), (70, 64), (130, 16), (9, 1)])
def test_the_torch_backends_chunked_form_matches_the_reference(T, chunk):
    """runtime.ops.mlstm_chunked (the torch backend's prompt path: a [chunk, chunk] weight matrix per chunk, the
    state moved to each chunk's end at once) against the recurrence, from a nonzero state, chunks and a remainder."""
    from fmconvert.runtime.ops import mlstm_chunked
    q, k, v, i, f, state = inputs(2, T, 2, 8, 24, torch.float32, seed=T)
    s1, s2 = state.cpu(), state.cpu().clone()
    got = mlstm_chunked(q.cpu(), k.cpu(), v.cpu(), i.cpu(), f.cpu(), s1, 1e-6, chunk=chunk)
    want = mlstm_scan_reference(q.cpu(), k.cpu(), v.cpu(), i.cpu(), f.cpu(), s2)
    assert (got - want).abs().max() / want.abs().max() < 1e-4      # gates up to +-15: sums in another order
    torch.testing.assert_close(s1, s2, atol=1e-4, rtol=1e-4)
