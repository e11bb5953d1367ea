"""The int8 GEMV's machine code for sm_90, compiled here without a GPU (benchmarks/sass_gemv.py): every load of a
step is issued before the step's first barrier, and nothing spills. These are the properties its load order was
chosen for; only their effect on time needs the card."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("swiglu", [False, True])
def test_gemv_issues_every_load_of_a_step_before_its_barrier(swiglu):
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this triton wheel carries no cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # compile for real, not interpret
    env["PYTHONPATH"] = str(ROOT)
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sass_gemv.py")] + (["--swiglu"] if swiglu else []),
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = re.findall(r"early(\d): (\d+) regs, (\d+) B local, .*?(\d+)/(\d+) loads before the first barrier",
                      p.stdout)
    assert rows and "FAILED" not in p.stdout, p.stdout
    for early, regs, local, before, total in rows:
        assert int(local) == 0 and int(regs) <= 128, p.stdout
        if early == "1":
            assert before == total, p.stdout
    assert any(early == "0" and int(before) < int(total) for early, _, _, before, total in rows), p.stdout
