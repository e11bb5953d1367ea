"""Kernel tests run on CUDA when present, else on CPU through the Triton interpreter.

TRITON_INTERPRET must be set before any @triton.jit kernel is defined, i.e. before the test
modules import fmconvert.kernels; this conftest is loaded first.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # One config per kernel: autotuning every specialization would dominate test time;
    # test_int8_gemv_every_gpu_config covers the other candidates.
    os.environ.setdefault("FMCONVERT_AUTOTUNE", "0")

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
FLOAT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_CUDA else [])
# max |y - ref| / max(1, max |ref|) allowed per output dtype
TOL = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _runnable():
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return ON_CUDA or os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    if _runnable():
        return
    skip = pytest.mark.skip(reason="needs triton with CUDA or TRITON_INTERPRET=1")
    for item in items:
        if "tests/kernels" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(name="assert_close")
def assert_close_fixture():
    return assert_close


@pytest.fixture(name="sqnr_db")
def sqnr_db_fixture():
    return sqnr_db


def assert_close(out, ref, dtype=None, tol=None):
    dtype = dtype or ref.dtype
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert out.dtype == ref.dtype, (out.dtype, ref.dtype)
    assert not torch.isnan(out).any(), "NaN in kernel output"
    o, r = out.float().cpu(), ref.float().cpu()
    err = (o - r).abs().max().item() if o.numel() else 0.0
    scale = max(1.0, r.abs().max().item() if r.numel() else 0.0)
    limit = (tol if tol is not None else TOL[dtype]) * scale
    assert err <= limit, f"max abs err {err:.3g} > {limit:.3g} (dtype {dtype}, ref max {scale:.3g})"


def sqnr_db(out, ref):
    o, r = out.double().cpu(), ref.double().cpu()
    noise = (o - r).pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * torch.log10(r.pow(2).sum() / noise).item()
