"""benchmarks/gpu_check.py runs on a lent GPU where a crash wastes scarce device time, so its --dry-run-cpu mode
(tiny shapes, torch backend) must get through every stage here, decode-step breakdown included."""

from __future__ import annotations

import importlib.util
import json
import time
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run-cpu", "--layers", "2",
                        "--new", "4", "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = report["stages"]
    failed = {name: s.get("error") for name, s in stages.items() if not s["ok"]}
    assert not failed, failed
    measured = {t["target"] for t in report["targets"] if t["value"] is not None}
    assert {"bf16 decode vs HF eager", "int8 decode, % of the bandwidth limit"} <= measured, report["targets"]
    assert "issue #5 targets" in p.stdout
    for tag, r in stages["seq2seq_decode"].items():        # the encoder-decoders' stage, and their parity
        if isinstance(r, dict) and "rel_err" in r:
            assert r["rel_err"] < 5e-2 and r["fm_s"] > 0 and r["hf_s"] > 0, (tag, r)
    assert {"t5_v1_1_base", "bart_base"} <= set(stages["seq2seq_decode"]), stages["seq2seq_decode"]
    ctc = stages["ctc_encode"]                  # Wav2Vec2's CTC logits, bf16 and int8, batch 1 and 8
    assert {"bf16_b1", "bf16_b8", "int8_b1", "int8_b8"} <= set(ctc), ctc
    assert all(ctc[k]["rel_err"] < 5e-2 and ctc[k]["fm_s"] > 0 for k in ("bf16_b1", "bf16_b8")), ctc
    for key in ("fmconvert_bf16", "fmconvert_int8"):
        b = stages[key]["breakdown"]
        assert "error" not in b, b
        assert b["device"] == "cpu" and b["count"] > 0 and b["per_layer"] > 0, b
        assert sum(c["count"] for c in b["categories"].values()) == b["count"], b
        par = stages[key]["parity"]
        assert "error" not in par, par
        assert par["step_rel_err_vs_eager"] < 2e-2 and par["logits_rel_err_vs_hf"] < 5e-2, par
    assert stages["fmconvert_int8"]["fused_ab_skipped"]
    spec = stages["speculative"]                # the bf16 model drafted by its int8 conversion: its own tokens
    assert spec["k4_same_tokens"] and spec["k2_same_tokens"] and spec["k4_tok_s"] > 0, spec
    mla = stages["mla_decode"]                  # latent attention: bf16 on CPU against HF, at both prompt lengths
    for T in (16, 64):                          # the dry run's prompts (128 and 2048 on a GPU)
        assert mla[f"parity_{T}"]["logits_rel_err_vs_hf"] < 5e-2 and mla[f"decode_tok_s_{T}"] > 0, mla
    for key in ("hybrid_decode", "mamba_decode"):        # the state-space stages, likewise
        for T in (16, 64):
            r = stages[key]
            assert r[f"parity_{T}"]["logits_rel_err_vs_hf"] < 5e-2 and r[f"decode_tok_s_{T}"] > 0, (key, r)


@pytest.mark.slow
def test_gpu_check_targets_only_measures_the_targets_and_nothing_else(tmp_path):
    """--targets-only: issue #5's decode and prefill targets from the 7B stages, without batch 8/32, the fused-append
    A/B, the decode profile, the small models or the sweep (the GEMV rows come from the kernel bench on a GPU)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run-cpu", "--layers", "2",
                        "--new", "4", "--targets-only", "--out", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = report["stages"]
    assert set(stages) == {"model_build", "convert", "hf_eager", "fmconvert_bf16", "fmconvert_int8"}, set(stages)
    assert all(s["ok"] for s in stages.values()), stages
    for key in ("hf_eager", "fmconvert_bf16", "fmconvert_int8"):
        assert stages[key]["prefill_tok_s"] > 0 and "decode_tok_s_b8" not in stages[key], stages[key]
    assert not {"breakdown", "fused_ab_skipped", "decode_tok_s_b1_fused"} & set(stages["fmconvert_int8"])
    measured = {t["target"] for t in report["targets"] if t["value"] is not None}
    assert {"int8 decode, % of the bandwidth limit", "int8 prefill of 2048 tokens vs HF eager"} <= measured


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernel_events_cuda_branch():
    """The CUDA side of the breakdown cannot run here: feed it profiler-shaped events instead."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Interval

    mod = _gpu_check()

    def ev(name, dev, us, annotation=False):
        return SimpleNamespace(name=name, device_type=dev, time_range=Interval(10, 10 + us),
                               is_user_annotation=annotation)

    events = [ev("_int8_gemv_kernel", DeviceType.CUDA, 30), ev("_splitk_epilogue_kernel", DeviceType.CUDA, 2),
              ev("_rope_append_kernel", DeviceType.CUDA, 3), ev("_decode_partial_kernel", DeviceType.CUDA, 5),
              ev("_add_norm_kernel", DeviceType.CUDA, 2), ev("nvjet_tst_128x64_64x8", DeviceType.CUDA, 40),
              ev("void at::native::index_elementwise_kernel<128, 4>", DeviceType.CUDA, 1),
              ev("nvjet_sm90_tst_128x8_64x12_4x1_v_bz_splitK_TNT", DeviceType.CUDA, 6),
              ev("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>", DeviceType.CUDA, 1),
              ev("cudaLaunchKernel", DeviceType.CPU, 4), ev("my_range", DeviceType.CUDA, 90, annotation=True)]
    got = mod.profiled_events(SimpleNamespace(events=lambda: events), cuda=True)
    assert [us for _, us in got] == [30, 2, 3, 5, 2, 40, 1, 6, 1]
    assert [mod.category(n) for n, _ in got] == ["int8", "int8", "rope_append", "attention", "norm", "gemm",
                                                "copy_elementwise", "gemm", "gemm"]


def test_fused_append_ab_interleaves_and_restores(monkeypatch):
    from types import SimpleNamespace

    mod = _gpu_check()
    m = SimpleNamespace(ops=SimpleNamespace(fuse_decode_append=True))
    seen = []

    def rate(model, prompt, new):
        seen.append(model.ops.fuse_decode_append)
        return 120.0 + len(seen) if model.ops.fuse_decode_append else 100.0 + len(seen)

    monkeypatch.setattr(mod, "ours_decode_tok_s", rate)
    r = mod.fused_append_ab(m, None, 4, reps=3)
    assert seen == [False, True] * 3 and m.ops.fuse_decode_append is True
    assert r["decode_tok_s_b1_unfused"] == 103 and r["decode_tok_s_b1_fused"] == 124
    assert r["fused_vs_unfused"] == 124 / 103

    monkeypatch.setattr(mod, "ours_decode_tok_s", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        mod.fused_append_ab(m, None, 4)
    assert m.ops.fuse_decode_append is True


def test_kernel_tests_run_in_parallel_groups_and_are_cut_short(tmp_path):
    """The CUDA kernel tests run as background groups while the model converts: a group that outlasts the wait is
    stopped and reported from its progress dots, and failures are counted, not lost."""
    mod = _gpu_check()
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_ok.py").write_text("def test_a():\n    pass\n\ndef test_b():\n    pass\n")
    (tests / "test_bad.py").write_text("def test_c():\n    assert 1 == 2\n")
    (tests / "test_slow.py").write_text("import time\n\ndef test_d():\n    pass\n\n"
                                        "def test_e():\n    time.sleep(60)\n")
    (tests / "test_int8_gemv_cpu.py").write_text("def test_skipped_file():\n    assert False\n")
    assert mod.kernel_test_groups(tests) == [["test_bad.py"], ["test_ok.py"], ["test_slow.py"]]
    assert mod.kernel_test_groups(tests, only=["test_ok.py"]) == [["test_ok.py"]]
    out = tmp_path / "out"
    out.mkdir()
    procs = mod.start_kernel_tests(out, tests)
    time.sleep(8)
    res = mod.join_kernel_tests(procs, out, wait_s=2, ran_s=8)
    by_file = {g["files"][0]: g for g in res["groups"]}
    assert by_file["test_ok.py"]["passed"] == 2 and by_file["test_ok.py"]["returncode"] == 0
    assert by_file["test_bad.py"]["failed"] == 1 and by_file["test_bad.py"]["returncode"] == 1
    assert by_file["test_slow.py"]["cut_short"] and by_file["test_slow.py"]["returncode"] != 0
    assert res["failed"] == 1 and res["cut_short"]
    assert "assert 1 == 2" in (out / "kernel_tests.log").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["kernel_tests.log"]


def test_targets_read_the_issue_s_figures_from_the_report():
    mod = _gpu_check()
    rows = [{"name": "int8_linear", "shape": "M=1 N=4096 K=4096", "speedup": 1.75},
            {"name": "int8_linear", "shape": "M=1 N=14336 K=4096", "speedup": 1.40},
            {"name": "int8_linear", "shape": "M=4 N=4096 K=4096", "speedup": 3.0}]
    report = {"stages": {"kernel_bench": {"rows": rows},
                         "fmconvert_bf16": {"pct_of_limit": 85.0, "decode_tok_s_b1_vs_hf": 7.37,
                                            "prefill_tok_s_vs_hf": 1.33},
                         "fmconvert_int8": {"pct_of_limit": 61.5, "decode_tok_s_b1_vs_hf": 10.5,
                                            "prefill_tok_s_vs_hf": 0.90}}}
    got = {t["target"]: (t["value"], t["met"]) for t in mod.targets(report)}
    assert len(got) == 10
    assert got["int8 GEMV vs bf16 cuBLAS, batch 1, 4096x4096"] == (1.75, True)
    assert got["int8 GEMV vs bf16 cuBLAS, batch 1, 14336x4096"] == (1.40, False)
    assert got["int8 GEMV vs bf16 cuBLAS, batch 1, 11008x4096"] == (None, None)      # not in this run
    assert got["bf16 decode, % of the bandwidth limit"] == (85.0, True)
    assert got["int8 decode, % of the bandwidth limit"] == (61.5, False)
    assert got["int8 decode vs HF eager"] == (10.5, True)
    assert got["int8 prefill of 2048 tokens vs HF eager"] == (0.90, False)
    assert all(t["met"] is None for t in mod.targets({}))
