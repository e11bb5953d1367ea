"""A whole converted model on the Triton backend (interpreter on CPU, kernels on CUDA) against the torch backend."""

import pytest
import torch

from fmconvert.pipeline import Options, convert
from fmconvert.runtime.generate import generate
from fmconvert.runtime.load import load

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("name,int8", [("llama", True), ("gpt2", False), ("bloom", True)])
def test_triton_backend_matches_torch_backend(model_dir, tmp_path, name, int8):
    out = tmp_path / "out"
    convert(model_dir(name), out, Options(tp=1, int8=int8, group_size=32), progress=False)
    ref = load(out, device="cpu", backend="torch", dequantize=True)
    tri = load(out, device=DEVICE, backend="triton")
    ids = torch.randint(3, 100, (1, 6))
    want = ref(ids)
    got = tri(ids.to(DEVICE)).cpu()
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-3
    a, _ = generate(ref, ids, max_new_tokens=5)
    b, _ = generate(tri, ids.to(DEVICE), max_new_tokens=5)   # CUDA: replayed from a CUDA graph
    assert a.tolist() == b.cpu().tolist()
