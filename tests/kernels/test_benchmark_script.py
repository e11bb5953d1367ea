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
    assert callable(mod.run) and callable(mod.sweep)
    assert len(mod.LINEAR_SHAPES) == 4


def test_benchmark_exits_cleanly_without_cuda():
    if torch.cuda.is_available():
        return
    res = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60,
                         cwd=SCRIPT.parents[1])
    assert res.returncode == 0, res.stderr
    assert "no CUDA" in res.stdout
