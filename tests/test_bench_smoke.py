"""The CPU benchmark scripts still run end to end (tiny shapes, one run each). No timing is asserted here:
benchmarks are not tests, their figures live in BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--cache", str(tmp_path),
                        "--json", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "SMOKE" in p.stdout and "convert peak RSS" in p.stdout
    res = json.loads(out.read_text())
    assert res["smoke"] and res["machine"]["nproc"]
    names = [f["figure"] for f in res["figures"]]
    for want in ("convert --tp 2 --int8 wall", "convert peak RSS", "convert peak RSS, 2x deep model",
                 "load rank 0/2, default (sha256 check, int8 packed for the CPU GEMV)"):
        assert want in names, names
    assert any(n.startswith("decode ") for n in names), names
    assert any(n.startswith("encode ") for n in names), names
    assert any(n.startswith("seq2seq smoke ") for n in names), names
    for kind in ("fp32", "int8"):           # Whisper: features in, exactly the asked-for tokens out on both sides
        assert f"seq2seq whisper-smoke {kind}" in names, names
        w = res["raw"]["whisper"][f"whisper_smoke_{kind}"]
        assert w["fm_new_tokens"] == [w["tokens"]] and len(w["hf_tokens"]) == w["tokens"], w
    for label in ("smoke-base", "smoke-large"):     # Wav2Vec2 CTC: float32 picks HF's letter on every frame
        c = res["raw"]["ctc"][label.replace("-", "_")]["clip"]
        assert f"ctc {label} 1 s fp32" in names and f"ctc {label} 2 s int8" in names, names
        assert all(x["fp32"]["agree_eager"] == 1.0 and x["int8"]["agree_eager"] > 0.9 for x in c.values()), c
    for f in res["figures"]:
        assert isinstance(f["value"], (int, float)) and f["value"] > 0, f
        assert f["baseline_value"] is None or f["baseline_value"] > 0, f
    assert res["raw"]["convert"]["runs"]["fm"][0]["rss_mib"] > 0
