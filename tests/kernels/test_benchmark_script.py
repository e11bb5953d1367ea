import importlib.util
import pathlib
import subprocess
import sys

import torch

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_kernels.py"


def test_benchmark_imports_and_exposes_run():
    spec = importlib.util.spec_from_file_location("gpu_kernels_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert callable(mod.run) and callable(mod.sweep) and callable(mod.bench_gemv)
    assert len(mod.LINEAR_SHAPES) == 4


def test_benchmark_exits_cleanly_without_cuda():
    if torch.cuda.is_available():
        return
    res = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60,
                         cwd=SCRIPT.parents[1])
    assert res.returncode == 0, res.stderr
    assert "no CUDA" in res.stdout


def test_gpu_check_prefill_probe_accounts_every_int8_slot(model_dir, tmp_path):
    """gpu_check's --prefill-probe on a tiny int8 model (interpreter): a breakdown whose categories hold every kernel,
    each int8 slot timed three ways, every dequantization tile run, and the model dequantized ahead still computing
    the same logits (it is timed as the int8 model's prompt without the dequantization pass)."""
    from fmconvert.pipeline import Options, convert
    from fmconvert.runtime.load import load
    from fmconvert.runtime.ops import Int8Weight

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT.parent / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.DEV = "cuda" if torch.cuda.is_available() else "cpu"
    out = tmp_path / "out"
    convert(model_dir("llama"), out, Options(tp=1, int8=True, group_size=32), progress=False)
    m = load(out, device=mod.DEV, backend="triton", dequantize=False)
    slots = {k for k, v in m.blocks[0].t.items() if isinstance(v, Int8Weight)}
    assert len(slots) == 4
    ids = torch.randint(0, 100, (1, 8), device=mod.DEV)
    with torch.inference_mode():
        before = m(ids).float()
    r = mod.prefill_probe(m, ids, reps=1)
    assert r["kernels"] > 0 and sum(c["count"] for c in r["categories"].values()) == r["kernels"]
    assert set(r["per_slot_us"]) == slots
    assert all(v[k] > 0 for v in r["per_slot_us"].values() for k in ("int8_linear", "dequant", "cublas"))
    assert len(r["dequant_tiles_us"]) == 8
    assert all(set(v) == slots for v in r["dequant_tiles_us"].values()), r["dequant_tiles_us"]
    assert r["predequantized_prefill_s"] > 0
    assert not any(isinstance(v, Int8Weight) for b in m.blocks for v in b.t.values())
    with torch.inference_mode():
        after = m(ids).float()
    assert ((after - before).norm() / before.norm()).item() < 1e-4
