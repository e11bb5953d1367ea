"""The Triton kernels' machine code for sm_90, compiled here without a GPU (benchmarks/sass_report.py): no kernel
spills registers at a configuration its launcher or autotuner can use, and every int8 GEMV step issues all its
loads before its first barrier. These are properties the kernels were shaped for; only their effect on time needs
the card."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this triton wheel carries no cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # compile for real, not interpret
    env["PYTHONPATH"] = str(ROOT)
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sass_report.py")], capture_output=True,
                       text=True, timeout=600, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def test_every_kernel_compiles_for_sm90_without_spilling(report):
    assert "FAILED" not in report, report
    rows = re.findall(r"^(.+?): (\d+) regs, (\d+) B stack, (\d+) B local", report, re.M)
    names = " ".join(r[0] for r in rows)
    for kernel in ("GEMV", "GEMM", "decode attention", "prefill attention", "rope_append", "rmsnorm", "swiglu",
                   "mla decode", "gated delta", "gated delta step per-channel (KDA)", "mamba2 scan", "mamba1 scan",
                   "causal conv1d", "gated norm", "gated norm kda sigmoid", "float GEMV swiglu", "float GEMV 4x512",
                   "rglru scan", "mlstm scan"):
        assert kernel in names, kernel
    spilling = [r for r in rows if int(r[2]) or int(r[3])]
    assert not spilling, spilling


def test_gemv_issues_every_load_of_a_step_before_its_barrier(report):
    rows = re.findall(r"early(\d): .*?(\d+)/(\d+) loads before the first barrier, (\d+) 16-byte", report)
    assert rows, report
    for early, before, total, wide in rows:
        assert int(wide) >= 1                             # the int8 weights arrive as 16-byte vectors
        if early == "1":
            assert before == total, report
    # That the count can see a late load: Triton 3.9's scheduler leaves the old order's weight loads behind the
    # barrier (2 of 6 before it). Triton 3.6, the GPU image's, already hoists them in both orders (6 of 6).
    if pytest.importorskip("triton").__version__.startswith("3.9"):
        assert any(early == "0" and int(before) < int(total) for early, before, total, _ in rows), report


def test_gemm_scales_are_asked_for_before_the_step_s_mma(report):
    """With one scale group per K tile (BLOCK_K <= 128) the GEMM loads the next tile's scales a step ahead; the
    pipeliner stages only what the dot reads, so scales loaded in their own step waited out their latency."""
    rows = re.findall(r"^int8 GEMM (?:swiglu )?\d+x\d+x(\d+) .*?(\d+)/(\d+) plain loads before the first MMA",
                      report, re.M)
    ahead = [(before, total) for bk, before, total in rows if int(bk) <= 128]
    assert ahead, report
    assert all(before == total for before, total in ahead), report


def test_chained_gemv_steps_take_fewer_instructions_a_weight_byte(report):
    """CHAIN (per-thread fused multiply-add chains, one cross-thread reduction at the end) and MAGIC 4 (no
    subtraction per weight) exist to cut the K loop's instructions; the count per weight byte shows whether the
    compiled loop kept that shape (split halves moved through shared memory would undo it)."""
    ipb = {m.group(1): float(m.group(2)) for m in
           re.finditer(r"^int8 GEMV (8x2048 w8 magic\d pair0 early1(?: chain)?): .*?([\d.]+) instructions a weight",
                       report, re.M)}
    plain, chained, both = ipb["8x2048 w8 magic3 pair0 early1"], ipb["8x2048 w8 magic3 pair0 early1 chain"], \
        ipb["8x2048 w8 magic4 pair0 early1 chain"]
    assert chained < 0.9 * plain and both < 0.8 * plain, ipb


def test_add_norm_asks_for_every_operand_before_reducing(report):
    rows = re.findall(r"^add\+rmsnorm \d+(?: pre\+gain)?: .*?(\d+)/(\d+) loads before the first barrier", report,
                      re.M)
    assert len(rows) == 3, report                  # Gemma 4's, with its output norm and gain, among them
    assert all(before == total for before, total in rows), rows
