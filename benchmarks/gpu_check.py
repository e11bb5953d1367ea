"""One device call: kernel timings, a Llama-2-7B-shaped model end to end, a latent-attention model (DeepSeek-V2-Lite's
attention, 4 layers), a hybrid (Qwen3.5's DeltaNet and gated attention layers, 8 layers) and FalconMamba's layers
(8 Mamba layers) against HF, then the kernel tests on CUDA.

    PYTHONPATH=$PWD python3 benchmarks/gpu_check.py --out DIR [--skip-tests] [--layers 32] [--deadline-s 540]

Stages run in order and each writes what it measured into DIR/gpu_check.json as soon as it has it, so a run cut
short still reports. Every ratio compares two things timed in this same run on this same card. Each model stage
first checks its logits (against HF, and the graph-replayed decode step against eager), then times. The CUDA kernel
tests run in parallel groups in the background while the 7B model is built and converted, and are joined (at most
--tests-wait-s later) before anything of the model is timed. The small models and a sweep of GEMV configs follow
while --deadline-s allows.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REPORT: dict = {"stages": {}}
DEV = "cuda"


def save(out: Path):
    (out / "gpu_check.json").write_text(json.dumps(REPORT, indent=2, default=str))


def stage(name, out):
    def deco(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            print(f"\n== {name}", flush=True)
            try:
                REPORT["stages"][name] = {"ok": True, **(fn(*a, **k) or {})}
            except Exception as e:  # keep going: later stages still report
                REPORT["stages"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                print(f"   FAILED: {type(e).__name__}: {e}", flush=True)
            REPORT["stages"][name]["seconds"] = round(time.perf_counter() - t0, 1)
            save(out)
        return run
    return deco


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps=3):
    """Median wall time of fn() in seconds (synchronized)."""
    ts = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def copy_bw() -> float:
    x = torch.randn(1 << (28 if DEV == "cuda" else 24), device=DEV)  # 1 GiB on the GPU
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), reps=7)
    return 2 * x.numel() * 4 / t


def hf_decode_tok_s(model, prompt, new):
    """HF eager generate: decode rate from the difference of a long and a one-token generation."""
    kw = dict(do_sample=False, min_new_tokens=new, max_new_tokens=new, pad_token_id=0)
    g = lambda n: model.generate(prompt, **{**kw, "min_new_tokens": n, "max_new_tokens": n})  # noqa: E731
    g(2)
    t1, tn = timed(lambda: g(1), 3), timed(lambda: g(new), 3)
    return (new - 1) / (tn - t1)


def ours_decode_tok_s(model, prompt, new):
    """Tokens per second per sequence, decode steps only (replayed from a CUDA graph on the GPU)."""
    B, T = prompt.shape
    if DEV == "cuda":
        from fmconvert.runtime.cuda_graph import GraphDecoder
        runner = GraphDecoder(model, B, T + new + 1)
        prefill, step, cache = runner.prefill, runner.step, runner.cache
    else:
        cache = model.new_cache(B, T + new + 1)
        prefill = lambda x: model(x, cache)[:, -1]                   # noqa: E731
        step = lambda t: model(t.unsqueeze(1), cache)[:, -1]        # noqa: E731
    tok = prefill(prompt).argmax(-1)

    def steps():
        cache.length = T
        t = tok
        for _ in range(new):
            t = step(t).argmax(-1)
    steps()
    return new / timed(steps, 3)


# Kernel-name substrings per category, matched in this order (lowercased): the first hit wins, so the int8 GEMV's
# split-K epilogue stays with int8 (cuBLAS's own split-K kernels are GEMMs) and a rope+append kernel is not taken
# for attention.
CATEGORIES = (
    ("int8", ("int8", "_splitk_epilogue")),
    ("rope_append", ("rope", "append")),
    ("norm", ("norm",)),
    ("attention", ("decode", "attention", "attn", "flash", "sdpa", "fmha")),
    ("gemm", ("gemm", "gemv", "cutlass", "sm90", "nvjet", "cublas", "addmm", "aten::mm", "matmul", "linear")),
    ("copy_elementwise", ("copy", "index", "elementwise", "fill", "cat", "memset")),
)


def category(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in CATEGORIES if any(k in low for k in keys)), "other")


def event_us(e, cuda: bool) -> float:
    """A kernel's own duration, or a CPU op's self time. Attribute names moved between torch versions."""
    if cuda:
        tr = getattr(e, "time_range", None)
        if tr is not None:
            return tr.elapsed_us()
        return next((getattr(e, a) for a in ("device_time_total", "cuda_time_total") if hasattr(e, a)), 0.0)
    return getattr(e, "self_cpu_time_total", 0.0)


def profiled_events(prof, cuda: bool):
    """(name, us) of every device kernel (CUDA) or every CPU op (dry run) the profiler saw."""
    try:
        from torch.autograd import DeviceType
        want = DeviceType.CUDA if cuda else DeviceType.CPU
        on_device = lambda e: e.device_type == want                        # noqa: E731
    except ImportError:
        on_device = lambda e: str(e.device_type).endswith("CUDA" if cuda else "CPU")  # noqa: E731
    # record_function ranges also appear on the GPU timeline; they are not kernels
    return [(e.name, event_us(e, cuda)) for e in prof.events()
            if on_device(e) and not getattr(e, "is_user_annotation", False) and not e.name.startswith("ProfilerStep")]


def decode_breakdown(m, prompt, step_us: float) -> dict:
    """Profile one eager decode_step: how many kernels it launches and where their device time goes. Against the
    graph's step time, the difference is time the GPU spends between kernels."""
    from torch.profiler import ProfilerActivity, profile
    cuda = DEV == "cuda"
    T = prompt.shape[1]
    cache = m.new_cache(1, T + 8)
    ids = m(prompt[:1], cache)[:, -1].argmax(-1).view(1, 1)
    pos_t = torch.zeros(1, dtype=torch.long, device=prompt.device)

    def step():
        pos_t.fill_(cache.length)
        m.decode_step(ids, cache, pos_t)
        cache.length += 1

    for _ in range(3):  # eager shapes differ from the graph's cache: compile/autotune outside the profile
        step()
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        sync()
    evs = profiled_events(prof, cuda)
    if not evs:
        return {"device": DEV, "error": "the profiler recorded no " + ("kernels" if cuda else "ops")}
    layers = len(m.blocks)
    cats, top = by_category(evs, 12)
    total = sum(us for _, us in evs)
    return {"device": DEV, "unit": "kernels" if cuda else "cpu ops", "fuse_decode_append":
            getattr(m.ops, "fuse_decode_append", None), "count": len(evs), "per_layer": len(evs) / layers,
            "us": total, "step_us": step_us, "gap_us": step_us - total, "categories": cats, "top": top}


def by_category(evs, n_top: int):
    """Profiled (name, us) events: {category: {"us", "count"}}, and the n_top names with the most time."""
    cats: dict = {}
    by_name: dict = {}
    for name, us in evs:
        c = cats.setdefault(category(name), {"us": 0.0, "count": 0})
        c["us"] += us
        c["count"] += 1
        by_name[name] = by_name.get(name, 0.0) + us
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:n_top]
    return cats, [{"name": name[:120], "us": round(us, 1)} for name, us in top]


def breakdown_line(b: dict) -> str:
    if "error" in b:
        return f"breakdown ({b.get('device')}): {b['error']}"
    return (f"breakdown ({b['device']}): {b['count']} {b['unit']}/step, {b['per_layer']:.1f}/layer, "
            f"{b['us']:.0f} us in them, step {b['step_us']:.0f} us, gap {b['gap_us']:.0f} us")


def fused_append_ab(m, prompt, new, reps=3) -> dict:
    """Graph decode tok/s at batch 1 with the rope+KV-append fusion off and on, interleaved so drift hits both."""
    before = m.ops.fuse_decode_append
    rates: dict = {False: [], True: []}
    try:
        for _ in range(reps):
            for flag in (False, True):
                m.ops.fuse_decode_append = flag  # the graph captures whichever path is set when it is built
                rates[flag].append(ours_decode_tok_s(m, prompt, new))
                gc.collect()  # the GraphDecoder (graph pool + KV cache) goes before the next one is built
                torch.cuda.empty_cache()
    finally:
        m.ops.fuse_decode_append = before
    off, on = (sorted(rates[f])[reps // 2] for f in (False, True))
    return {"decode_tok_s_b1_unfused": off, "decode_tok_s_b1_fused": on, "fused_vs_unfused": on / off}


# The CUDA kernel tests in parallel groups (compiling is CPU-bound, the lent machine has 16 cores). A test file not
# named here gets a group of its own; the CPU GEMV kernel is not what a GPU checks.
KERNEL_TEST_GROUPS = (("test_attention.py",), ("test_int8_matmul.py",), ("test_model_backend.py",),
                      ("test_gated_norm.py", "test_conv1d.py", "test_glu.py"),
                      ("test_rope.py", "test_norm.py", "test_mla.py"),
                      ("test_delta_rule.py", "test_ssm_scan.py", "test_mamba1_scan.py"))
KERNEL_TEST_SKIP = ("test_int8_gemv_cpu.py", "test_benchmark_script.py")


def prefill_probe(m, long, reps=7) -> dict:
    """Where a long prompt's time goes: the profiler's kernels by category for one forward, the CPU's time to issue
    it (a CPU-bound forward shows as launch time near the wall time), and for an int8 model each slot's int8_linear
    at this prompt length against F.linear on its dequantized weight, over every layer (so weights come from HBM),
    the dequantization alone, then the whole prefill again with every int8 weight dequantized ahead (what the int8
    path costs over bf16 GEMMs in the same model)."""
    from torch.profiler import ProfilerActivity, profile

    from fmconvert.runtime.ops import Int8Weight
    r: dict = {}
    with torch.inference_mode():
        m(long)
        sync()
        t0 = time.perf_counter()
        m(long)
        r["cpu_issue_s"] = time.perf_counter() - t0
        sync()
        r["wall_s"] = time.perf_counter() - t0
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            m(long)
            sync()
    evs = profiled_events(prof, DEV == "cuda")
    r["kernel_us"] = sum(us for _, us in evs)
    r["kernels"] = len(evs)
    r["categories"], r["top"] = by_category(evs, 15)
    slots = {k for b in m.blocks for k, v in b.t.items() if isinstance(v, Int8Weight) and v.q.dim() == 2}
    if not slots:
        return r
    from fmconvert.kernels import int8_linear
    from fmconvert.kernels.int8_matmul import dequantize_dense
    xs: dict = {}       # one prompt's activations per input width K

    def per_layer(fn):
        sync()
        t0 = time.perf_counter()
        for b in m.blocks:
            fn(b)
        sync()
        return (time.perf_counter() - t0) / len(m.blocks)

    per_slot = {}
    with torch.inference_mode():
        for slot in sorted(slots):
            w0 = m.blocks[0].t[slot]
            N, K = w0.q.shape
            x = xs.setdefault(K, torch.randn(long.shape[1], K, device=DEV, dtype=m.dtype))
            dense = [dequantize_dense(b.t[slot].q, b.t[slot].scale, b.t[slot].group_size, m.dtype)
                     for b in m.blocks[:8]]
            ms = {}
            for _ in range(2):      # the second round is kept: the first compiles
                ms["int8_linear"] = per_layer(lambda b: int8_linear(x, b.t[slot].q, b.t[slot].scale,
                                                                     b.t[slot].group_size))
                ms["dequant"] = per_layer(lambda b: dequantize_dense(b.t[slot].q, b.t[slot].scale,
                                                                     b.t[slot].group_size, m.dtype))
                ms["cublas"] = per_layer(lambda b: torch.nn.functional.linear(x, dense[b.i % len(dense)]))
            moved = N * K * 3 + w0.scale.numel() * w0.scale.element_size()
            per_slot[slot] = {"N": N, "K": K, **{k: round(v * 1e6, 1) for k, v in ms.items()},
                              "dequant_GBs": round(moved / ms["dequant"] / 1e9, 1)}
            del dense
    r["per_slot_us"] = per_slot
    # the dequantization's tile, over every layer's weights of each slot (us a layer)
    tiles = [(32, 256, 4), (16, 512, 4), (64, 256, 8), (8, 1024, 4), (32, 512, 8), (128, 128, 8), (16, 1024, 8),
             (64, 128, 4)]
    sweep = {}
    with torch.inference_mode():
        for tile in tiles:
            key = "x".join(map(str, tile))
            try:
                for _ in range(2):
                    sweep[key] = {slot: round(1e6 * per_layer(
                        lambda b: dequantize_dense(b.t[slot].q, b.t[slot].scale, b.t[slot].group_size, m.dtype,
                                                   tile=tile)), 1) for slot in sorted(slots)}
            except Exception as e:
                sweep[key] = {"error": f"{type(e).__name__}: {e}"[:200]}
    r["dequant_tiles_us"] = sweep
    print("   dequant tiles (us a layer):", sweep, flush=True)
    print("   per slot at", long.shape[1], "tokens (us, one layer):", per_slot, flush=True)
    # the whole prompt with every int8 weight dequantized ahead: the same runtime on bf16 GEMMs
    for b in m.blocks:
        for k, v in list(b.t.items()):
            if isinstance(v, Int8Weight) and v.q.dim() == 2:
                b.t[k] = v.dequantize(m.dtype)
    with torch.inference_mode():
        m(long)
        r["predequantized_prefill_s"] = timed(lambda: m(long), reps)
    return r


def kernel_test_groups(test_dir: Path, only=()) -> list:
    present = sorted(p.name for p in test_dir.glob("test_*.py") if p.name not in KERNEL_TEST_SKIP
                     and (not only or p.name in only))
    groups = [[f for f in g if f in present] for g in KERNEL_TEST_GROUPS]
    named = {f for g in groups for f in g}
    groups += [[f] for f in present if f not in named]
    return [g for g in groups if g]


def start_kernel_tests(out: Path, test_dir: Path = ROOT / "tests" / "kernels", only=(), workers=0) -> list:
    """One background pytest per group (of the files in `only`, if given), each writing its own log; returns
    [(files, Popen, log path)]."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    procs = []
    try:
        import xdist  # noqa: F401
    except ImportError:
        workers = 0
    for i, files in enumerate(kernel_test_groups(test_dir, only)):
        log = out / f".kernel_tests_{i}.log"
        cmd = [sys.executable, "-m", "pytest", "-q", "--maxfail=20", "-p", "no:cacheprovider",
               *(["-n", str(workers)] if workers else []), *(str(test_dir / f) for f in files)]
        with open(log, "w") as fh:
            procs.append((files, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                                  start_new_session=True), log))
    return procs


def _pytest_counts(text: str) -> dict:
    """pytest -q's closing counts ("3 failed, 120 passed, 2 skipped in 9.1s"); progress dots when it was cut short."""
    import re
    tail = text.strip().splitlines()[-1] if text.strip() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)", tail)}
    if "passed" not in counts and "failed" not in counts:
        dots = "".join(line for line in text.splitlines() if re.fullmatch(r"[.FEsx]+( *\[ *\d+%\])?", line))
        counts = {"passed": dots.count("."), "failed": dots.count("F") + dots.count("E"),
                  "skipped": dots.count("s"), "cut_short": True}
    return counts


def join_kernel_tests(procs: list, out: Path, wait_s: float, ran_s: float) -> dict:
    """Wait up to wait_s for every group, stop what is left, gather one log and the counts."""
    import signal
    end = time.perf_counter() + wait_s
    res: dict = {"groups": [], "ran_before_join_s": round(ran_s, 1)}
    logs = []
    for files, p, log in procs:
        try:
            p.wait(timeout=max(0.0, end - time.perf_counter()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        text = log.read_text(errors="replace")
        log.unlink()
        counts = _pytest_counts(text)
        res["groups"].append({"files": files, "returncode": p.returncode, **counts})
        logs.append(f"===== {' '.join(files)} (exit {p.returncode})\n{text}")
        print(f"   {' '.join(files)}: exit {p.returncode}, {counts}", flush=True)
        if p.returncode not in (0, -signal.SIGKILL):
            print(text[-3000:], flush=True)
    (out / "kernel_tests.log").write_text("\n".join(logs))
    for key in ("passed", "failed", "skipped"):
        res[key] = sum(g.get(key, 0) + (g.get("errors", 0) + g.get("error", 0) if key == "failed" else 0)
                       for g in res["groups"])
    res["cut_short"] = any(g.get("cut_short") for g in res["groups"])
    return res


def workdir(need_bytes: int) -> Path:
    """tmpfs when it has room: fmconvert fsyncs its output before publishing it, and a lent machine's virtual disk
    made that fsync the larger part of convert time (an 8-layer run spent 30-40 s converting 5 GB)."""
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and shutil.disk_usage(shm).free > 1.3 * need_bytes:
            return Path(tempfile.mkdtemp(prefix="fmc-", dir=shm))
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="fmc-"))


def random_bf16(model_cls, cfg):
    """An HF model of this config with seeded random bf16 weights, built on the device (no fp32 copy)."""
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEV):
        hf = model_cls(cfg).eval()
    torch.set_default_dtype(torch.float32)
    hf.config.dtype = torch.bfloat16
    return hf


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def parity(m, prompt, hf_last) -> dict:
    """Last-position logits of the prompt: eager fmconvert against HF, and the graph-safe decode step (fused RoPE and
    KV append, replayed from a CUDA graph on the GPU) against eager fmconvert. Timings of a wrong model mean nothing."""
    T = prompt.shape[1]
    with torch.inference_mode():
        eager = m(prompt)[:, -1].float()
    if DEV == "cuda":
        from fmconvert.runtime.cuda_graph import GraphDecoder
        g = GraphDecoder(m, 1, T + 1)
        g.prefill(prompt[:, :-1])
        step = g.step(prompt[:, -1]).float().clone()
        del g
    else:
        cache = m.new_cache(1, T + 1)
        m(prompt[:, :-1], cache)
        step = m.decode_step(prompt[:, -1:], cache, torch.tensor([cache.length], device=prompt.device)).float()
    r = {"step_rel_err_vs_eager": rel_err(step, eager)}
    if hf_last is not None:
        r["logits_rel_err_vs_hf"] = rel_err(eager, hf_last)
        r["same_argmax_as_hf"] = bool((eager.argmax(-1) == hf_last.argmax(-1)).all())
    return r


GEMV_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096))


def targets(report: dict) -> list[dict]:
    """Issue #5's performance targets against this run's figures: each with its value, what it needs, and whether
    it is met (None where the run did not measure it)."""
    st = report.get("stages", {})
    rows = {r.get("shape"): r for r in st.get("kernel_bench", {}).get("rows", []) if r.get("name") == "int8_linear"}
    want = [(f"int8 GEMV vs bf16 cuBLAS, batch 1, {n}x{k}", rows.get(f"M=1 N={n} K={k}", {}).get("speedup"), 1.7)
            for n, k in GEMV_SHAPES]
    for key, pct, hf in (("bf16", 75.0, 6.0), ("int8", 65.0, 10.0)):
        s = st.get(f"fmconvert_{key}", {})
        want += [(f"{key} decode, % of the bandwidth limit", s.get("pct_of_limit"), pct),
                 (f"{key} decode vs HF eager", s.get("decode_tok_s_b1_vs_hf"), hf),
                 (f"{key} prefill of 2048 tokens vs HF eager", s.get("prefill_tok_s_vs_hf"), 1.0)]
    return [{"target": name, "value": v, "need": need, "met": None if v is None else v >= need}
            for name, v, need in want]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--skip-kernel-bench", action="store_true")
    ap.add_argument("--deadline-s", type=float, default=540,
                    help="the stages after the 7B model run only while this many seconds have not passed")
    ap.add_argument("--tests-wait-s", type=float, default=120,
                    help="how long the kernel tests may still run once the model is converted")
    ap.add_argument("--kernel-parts", default="",
                    help="comma-separated parts of gpu_kernels.py to time (linear, float_gemv, ...); all if empty")
    ap.add_argument("--test-files", default="",
                    help="comma-separated files of tests/kernels to run on CUDA; all if empty")
    ap.add_argument("--only-7b", action="store_true", help="no small models and no GEMV sweep after the 7B model")
    ap.add_argument("--gemv-sweep", action="store_true", help="the GEMV sweep even with --only-7b")
    ap.add_argument("--prefill-probe", action="store_true",
                    help="the models' prompt (2048 tokens) profiled and broken down instead of batch 8/32 decode, the "
                         "fused-append A/B and the decode-step profile")
    ap.add_argument("--test-workers", type=int, default=2,
                    help="pytest-xdist workers for each group of kernel tests, where xdist is installed (0: none). "
                         "With one process a group, test_int8_matmul.py outlasted the join on an H100")
    ap.add_argument("--targets-only", action="store_true",
                    help="issue #5's targets and nothing else: the int8 GEMV at one row, then the 7B model's batch-1 "
                         "decode and 2048-token prefill (no batch 8/32, A/B, profiles, small models or sweep; kernel "
                         "tests only those of --test-files). About 4 minutes with start-up by call 1's stage times, "
                         "so one session can run it on two cards")
    ap.add_argument("--dry-run-cpu", action="store_true", help="tiny shapes on CPU, to check the script itself")
    args = ap.parse_args()
    global DEV
    if args.targets_only:
        args.only_7b, args.gemv_sweep = True, False
        args.kernel_parts = args.kernel_parts or "gemv"
        args.skip_tests = args.skip_tests or not args.test_files
    if args.dry_run_cpu:
        DEV = "cpu"
        args.skip_tests = args.skip_kernel_bench = True
    wide_batches = () if args.prefill_probe or args.targets_only else (8, 32)    # decode beside batch 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    REPORT["card"] = torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu dry run"
    REPORT["versions"] = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import triton
        import transformers
        REPORT["versions"].update(triton=triton.__version__, transformers=transformers.__version__)
    except Exception:
        pass
    print(REPORT["card"], REPORT["versions"], flush=True)

    tests: dict = {}

    def start_tests():
        """The CUDA kernel tests, in parallel groups in the background: they compile on the CPU while the model is
        built and converted (untimed work), and are joined before any timing of the model starts."""
        tests["t0"] = time.perf_counter()
        tests["procs"] = start_kernel_tests(out, only=[f for f in args.test_files.split(",") if f],
                                            workers=args.test_workers)

    @stage("kernel_tests", out)
    def join_tests(wait_s):
        return join_kernel_tests(tests["procs"], out, wait_s, time.perf_counter() - tests["t0"])

    @stage("kernel_bench", out)
    def kernel_bench():
        from benchmarks import gpu_kernels
        rep: dict = {}
        rows = gpu_kernels.run(rep, [p for p in args.kernel_parts.split(",") if p])
        for r in rows:
            print("  ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
        return {"rows": rows, "meta": rep}

    # Model end to end first, kernel tests last: the tests get whatever time is left, and a kernel that is wrong on
    # the GPU still shows in the parity checks of the model stages.
    if not args.skip_kernel_bench:
        kernel_bench()

    state: dict = {}

    @stage("model_build", out)
    def model_build():
        from transformers import LlamaConfig, LlamaForCausalLM
        size = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                    vocab_size=32000) if DEV == "cuda" else dict(hidden_size=256, intermediate_size=512,
                                                                 num_attention_heads=8, num_key_value_heads=8,
                                                                 vocab_size=32000)
        cfg = LlamaConfig(num_hidden_layers=args.layers, max_position_embeddings=4096, tie_word_embeddings=False,
                          **size)
        cfg.architectures = ["LlamaForCausalLM"]
        hf = state["hf"] = random_bf16(LlamaForCausalLM, cfg)
        params = sum(p.numel() for p in hf.parameters())
        src = workdir(int(params * 5.2)) / "llama7b"       # bf16 source, bf16 output, int8 output
        t0 = time.perf_counter()
        hf.save_pretrained(src, max_shard_size="5GB")
        state["src"] = src
        REPORT["workdir"] = str(src.parent)
        return {"params": params, "save_s": time.perf_counter() - t0, "workdir": str(src.parent)}

    @stage("convert", out)
    def convert_stage():
        res = {}
        procs = {}
        for key, extra in (("bf16", []), ("int8", ["--int8"])):
            dst = state["src"].parent / f"{state['src'].name}-{key}"
            state[key] = dst
            cmd = [sys.executable, "-m", "fmconvert", "convert", "-q", "--dtype", "bf16", *extra,
                   str(state["src"]), str(dst)]
            procs[key] = (subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                           stderr=subprocess.PIPE, text=True), time.perf_counter())
        for key, (p, t0) in procs.items():
            _, err = p.communicate(timeout=400)
            if p.returncode:
                raise RuntimeError(f"convert {key}: {err.strip()[-500:]}")
            res[f"{key}_s"] = time.perf_counter() - t0
        return res

    @stage("hf_eager", out)
    def hf_eager():
        hf = state["hf"]
        prompt = torch.randint(0, 32000, (1, 128), device=DEV)
        state["prompt"] = prompt
        with torch.inference_mode():
            state["hf_last"] = hf(prompt).logits[:, -1].float()
        r = {"decode_tok_s_b1": hf_decode_tok_s(hf, prompt, args.new)}
        long = torch.randint(0, 32000, (1, 2048), device=DEV)
        state["long"] = long
        with torch.inference_mode():
            hf(long[:, :64])
            hf(long)
            r["prefill_2048_s"] = timed(lambda: hf(long), 7 if args.prefill_probe else 5)
        r["prefill_tok_s"] = 2048 / r["prefill_2048_s"]
        for b in wide_batches:
            pb = torch.randint(0, 32000, (b, 128), device=DEV)
            r[f"decode_tok_s_b{b}"] = b * hf_decode_tok_s(hf, pb, 16)
        print("  ", r, flush=True)
        return r

    def ours(key):
        from fmconvert.runtime.generate import weight_bytes
        from fmconvert.runtime.load import load
        gc.collect()
        if DEV == "cuda":
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        m = load(state[key], device=DEV, backend="triton" if DEV == "cuda" else "torch")
        sync()
        r = {"load_s": time.perf_counter() - t0}
        wb = weight_bytes(m)
        bw = state["copy_bw"]
        r["weight_bytes"] = wb
        r["bandwidth_limit_tok_s"] = bw / wb
        try:
            r["parity"] = parity(m, state["prompt"], state.get("hf_last"))
        except Exception as e:
            r["parity"] = {"error": f"{type(e).__name__}: {e}"}
        print("   parity:", {k: round(v, 5) if isinstance(v, float) else v for k, v in r["parity"].items()},
              flush=True)
        r["decode_tok_s_b1"] = ours_decode_tok_s(m, state["prompt"], args.new)
        r["pct_of_limit"] = 100 * r["decode_tok_s_b1"] / r["bandwidth_limit_tok_s"]
        r["effective_GBs"] = r["decode_tok_s_b1"] * wb / 1e9
        with torch.inference_mode():
            m(state["long"][:, :64])
            m(state["long"])         # the 2048-row kernels compile here, not in a timed run
            r["prefill_2048_s"] = timed(lambda: m(state["long"]), 7 if args.prefill_probe else 5)
        r["prefill_tok_s"] = 2048 / r["prefill_2048_s"]
        for b in wide_batches:
            pb = torch.randint(0, 32000, (b, 128), device=DEV)
            r[f"decode_tok_s_b{b}"] = b * ours_decode_tok_s(m, pb, 16)
        hf = REPORT["stages"].get("hf_eager", {})
        for k in ("decode_tok_s_b1", "decode_tok_s_b8", "decode_tok_s_b32", "prefill_tok_s"):
            if hf.get(k):
                r[f"{k}_vs_hf"] = r[k] / hf[k]
        print("  ", {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
        if args.prefill_probe:
            try:
                r["prefill_probe"] = prefill_probe(m, state["long"])
                if r["prefill_probe"].get("predequantized_prefill_s") and hf.get("prefill_tok_s"):
                    r["predequantized_prefill_tok_s"] = 2048 / r["prefill_probe"]["predequantized_prefill_s"]
                    r["predequantized_prefill_vs_hf"] = r["predequantized_prefill_tok_s"] / hf["prefill_tok_s"]
                p = r["prefill_probe"]
                print(f"   prefill probe: {p['kernels']} kernels, {p['kernel_us'] / 1e3:.1f} ms in them, wall "
                      f"{p['wall_s'] * 1e3:.1f} ms, CPU issue {p['cpu_issue_s'] * 1e3:.1f} ms;",
                      {c: round(v["us"] / 1e3, 2) for c, v in p["categories"].items()}, flush=True)
                print("   top:", [(t["name"][:60], t["us"]) for t in p["top"][:8]], flush=True)
                if "predequantized_prefill_s" in p:
                    print(f"   predequantized int8 prefill: {r['predequantized_prefill_tok_s']:.0f} tok/s", flush=True)
            except Exception as e:
                r["prefill_probe"] = {"error": f"{type(e).__name__}: {e}"}
                print("   prefill probe FAILED:", r["prefill_probe"]["error"], flush=True)
        if args.prefill_probe or args.targets_only:        # no A/B and no decode profile
            del m
            return r
        if key == "int8":
            if DEV != "cuda":
                r["fused_ab_skipped"] = "no CUDA graphs on cpu"
            elif not hasattr(m.ops, "fuse_decode_append"):
                r["fused_ab_skipped"] = "ops have no fuse_decode_append"
            else:
                try:
                    ab = fused_append_ab(m, state["prompt"], args.new)
                    r.update(ab)
                    print(f"   fused append A/B: off {ab['decode_tok_s_b1_unfused']:.1f}, on "
                          f"{ab['decode_tok_s_b1_fused']:.1f} tok/s, x{ab['fused_vs_unfused']:.3f}", flush=True)
                except Exception as e:
                    r["fused_ab_error"] = f"{type(e).__name__}: {e}"
                    print("   fused append A/B FAILED:", r["fused_ab_error"], flush=True)
        # Last, after every timing: a CUPTI session may leave launch overhead behind on some stacks.
        try:
            r["breakdown"] = decode_breakdown(m, state["prompt"], 1e6 / r["decode_tok_s_b1"])
        except Exception as e:
            r["breakdown"] = {"device": DEV, "error": f"{type(e).__name__}: {e}"}
        print("  ", breakdown_line(r["breakdown"]), flush=True)
        del m
        return r

    def speculative():
        """The bf16 model drafted by its own int8 conversion (runtime/speculative.py, eager), greedy, batch 1:
        tok/s against the bf16 model's CUDA-graph decode alone, the proposals kept, the same tokens."""
        from fmconvert.runtime.generate import generate
        from fmconvert.runtime.load import load
        from fmconvert.runtime.speculative import speculative_generate
        gc.collect()
        backend = "triton" if DEV == "cuda" else "torch"
        m, d = load(state["bf16"], device=DEV, backend=backend), load(state["int8"], device=DEV, backend=backend)
        prompt = state["prompt"]
        want, _ = generate(m, prompt, args.new)
        r = {"alone_tok_s": ours_decode_tok_s(m, prompt, args.new)}
        for k in (2, 4):
            speculative_generate(m, d, prompt, 8, k=k)          # warm-up: the k + 1-row kernels compile here
            sync()
            t0 = time.perf_counter()
            got, st = speculative_generate(m, d, prompt, args.new, k=k)
            sync()
            r[f"k{k}_tok_s"] = args.new / (time.perf_counter() - t0)
            r[f"k{k}_vs_alone"] = r[f"k{k}_tok_s"] / r["alone_tok_s"]
            r[f"k{k}_kept"] = st.accepted / max(st.drafted, 1)
            r[f"k{k}_same_tokens"] = got.tolist() == want.cpu().tolist()
        print("  ", {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
        del m, d
        return r

    state["copy_bw"] = copy_bw()
    REPORT["copy_bandwidth_GBs"] = state["copy_bw"] / 1e9
    if not args.skip_tests:
        start_tests()
    model_build()
    if state.get("src"):
        convert_stage()
        shutil.rmtree(state["src"], ignore_errors=True)        # on tmpfs the source holds RAM
    if tests:
        join_tests(args.tests_wait_s)
    if state.get("src"):
        hf_eager()
        del state["hf"]
        stage("fmconvert_bf16", out)(lambda: ours("bf16"))()
        stage("fmconvert_int8", out)(lambda: ours("int8"))()
        # about a minute (both 7B conversions loaded again); before the small models, while the deadline allows
        if args.targets_only or args.only_7b:
            pass
        elif args.deadline_s - (time.perf_counter() - t_start) > 250 or args.dry_run_cpu:
            stage("speculative", out)(speculative)()
        else:
            REPORT["stages"]["speculative"] = {"ok": False, "error": "skipped: too little of --deadline-s left"}
        shutil.rmtree(state["src"].parent, ignore_errors=True)
    def small_model_decode(tag, hf):
        """A few layers of one architecture, bf16, random weights: fmconvert (Triton kernels, CUDA graph) against
        HF eager, decode after 128 and 2048 cached tokens at batch 1, with logit parity."""
        from fmconvert.runtime.load import load
        src = workdir(sum(p.numel() for p in hf.parameters()) * 5) / tag
        hf.save_pretrained(src)
        dst = src.parent / f"{tag}-bf16"
        p = subprocess.run([sys.executable, "-m", "fmconvert", "convert", "-q", "--dtype", "bf16", str(src), str(dst)],
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"convert: {p.stderr.strip()[-500:]}")
        m = load(dst, device=DEV, backend="triton" if DEV == "cuda" else "torch")
        r = {}
        for T in (128, 2048) if DEV == "cuda" else (16, 64):
            prompt = torch.randint(0, 32000, (1, T), device=DEV)
            with torch.inference_mode():
                hf_last = hf(prompt).logits[:, -1].float()
            r[f"parity_{T}"] = parity(m, prompt, hf_last)
            r[f"hf_decode_tok_s_{T}"] = hf_decode_tok_s(hf, prompt, 32)
            r[f"decode_tok_s_{T}"] = ours_decode_tok_s(m, prompt, 32)
            r[f"vs_hf_{T}"] = r[f"decode_tok_s_{T}"] / r[f"hf_decode_tok_s_{T}"]
        print("  ", {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
        del m
        shutil.rmtree(src.parent, ignore_errors=True)
        return r

    @stage("mla_decode", out)
    def mla_decode():
        """Latent attention end to end: DeepSeek-V2-Lite's attention (16 heads, kv_lora_rank 512, k 128 + 64,
        v 128) on 4 layers; HF eager expands every cached latent at each step, fmconvert attends over the latents
        with kv_b absorbed (kernels/mla.py)."""
        from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

        size = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, kv_lora_rank=512,
                    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, moe_intermediate_size=1408) \
            if DEV == "cuda" else dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, kv_lora_rank=32,
                                       qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                                       moe_intermediate_size=64)
        cfg = DeepseekV2Config(num_hidden_layers=4, q_lora_rank=None, first_k_dense_replace=3, n_routed_experts=4,
                               num_experts_per_tok=2, n_shared_experts=2, vocab_size=32000,
                               max_position_embeddings=4096, tie_word_embeddings=False, **size)
        cfg.architectures = ["DeepseekV2ForCausalLM"]
        return small_model_decode("mla", random_bf16(DeepseekV2ForCausalLM, cfg))

    @stage("hybrid_decode", out)
    def hybrid_decode():
        """Qwen3.5's hybrid end to end: 6 Gated DeltaNet layers (16 q/k heads, 32 v heads of 128; fixed-size state,
        kernels/delta_rule.py) and 2 gated attention layers (16 heads, 2 kv, head_dim 256), 2048 wide. HF eager
        runs transformers' torch fallbacks for the conv and the delta rule (no flash-linear-attention here)."""
        from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

        size = dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=16, head_dim=256,
                    linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                    linear_value_head_dim=128) \
            if DEV == "cuda" else dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, head_dim=32,
                                       linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
                                       linear_value_head_dim=32)
        cfg = Qwen3_5TextConfig(num_hidden_layers=8, num_key_value_heads=2, vocab_size=32000,
                                max_position_embeddings=4096, tie_word_embeddings=False, **size)
        cfg.architectures = ["Qwen3_5ForCausalLM"]
        return small_model_decode("qwen35", random_bf16(Qwen3_5ForCausalLM, cfg))

    @stage("mamba_decode", out)
    def mamba_decode():
        """FalconMamba's layers end to end: 8 Mamba layers, 4096 wide (8192 channels, state 16, dt rank 256; the
        scan in kernels/mamba1_scan.py, a fixed-size state per layer). HF eager runs transformers' torch fallbacks
        (no mamba-ssm here)."""
        from transformers import FalconMambaConfig, FalconMambaForCausalLM

        size = dict(hidden_size=4096, time_step_rank=256) if DEV == "cuda" else dict(hidden_size=128,
                                                                                      time_step_rank=8)
        cfg = FalconMambaConfig(num_hidden_layers=8, state_size=16, expand=2, conv_kernel=4, vocab_size=32000,
                                tie_word_embeddings=False, **size)
        cfg.architectures = ["FalconMambaForCausalLM"]
        return small_model_decode("falcon_mamba", random_bf16(FalconMambaForCausalLM, cfg))

    @stage("seq2seq_decode", out)
    def seq2seq_decode():
        """Encoder-decoders end to end, bf16, random weights: a T5 v1.1-shaped model (Flan-T5-base: 12 + 12 layers,
        768 wide, gated GELU, the decoder's relative bias), BART-base's (6 + 6, post-LN) and whisper-small's (12 +
        12, 768 wide, 30 s of log-mel features through its convs, a 4-token decoder prompt). fmconvert (Triton
        kernels; the decoder's steps from a CUDA graph) against HF generate, greedy, 64 new tokens from a 128-token
        source (Whisper: 30 s) at batch 1: the whole call's time on each side, and teacher-forced logit parity."""
        from transformers import (BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration,
                                  WhisperConfig, WhisperForConditionalGeneration)
        from transformers.generation.utils import GenerationMixin

        from fmconvert.runtime.generate import generate
        from fmconvert.runtime.load import load
        big = DEV == "cuda"
        t5 = dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12) if big else \
            dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
        bart = dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                    decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072) if big else \
            dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_ffn_dim=128, decoder_ffn_dim=128)
        models = {"t5_v1_1_base": (T5ForConditionalGeneration, T5Config(
                      vocab_size=32128, feed_forward_proj="gated-gelu", num_decoder_layers=t5["num_layers"],
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **t5)),
                  "bart_base": (BartForConditionalGeneration, BartConfig(
                      vocab_size=50265, max_position_embeddings=1024, forced_eos_token_id=None, **bart)),
                  "whisper_small": (WhisperForConditionalGeneration, WhisperConfig(
                      vocab_size=51865, num_mel_bins=80, max_source_positions=1500 if big else 50,
                      max_target_positions=448, decoder_start_token_id=50258, pad_token_id=50257,
                      eos_token_id=50257, begin_suppress_tokens=None, suppress_tokens=None,
                      **{**bart, **(dict(encoder_layers=12, decoder_layers=12) if big else {})}))}
        S, new = (128, 64) if big else (16, 8)
        res = {}
        for tag, (cls, cfg) in models.items():
            cfg.architectures = [cls.__name__]
            hf = random_bf16(cls, cfg)
            src = workdir(sum(p.numel() for p in hf.parameters()) * 5) / tag
            hf.save_pretrained(src)
            dst = src.parent / f"{tag}-bf16"
            p = subprocess.run([sys.executable, "-m", "fmconvert", "convert", "-q", "--dtype", "bf16", str(src),
                                str(dst)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                               text=True)
            if p.returncode:
                raise RuntimeError(f"convert {tag}: {p.stderr.strip()[-500:]}")
            m = load(dst, device=DEV, backend="triton" if DEV == "cuda" else "torch")
            speech = tag.startswith("whisper")
            ids = torch.randn(1, 80, 2 * cfg.max_source_positions, device=DEV).to(torch.bfloat16) if speech else \
                torch.randint(5, cfg.vocab_size, (1, S), device=DEV)
            source = "input_features" if speech else "input_ids"
            dec = torch.randint(5, cfg.vocab_size, (1, 16), device=DEV)
            with torch.inference_mode():
                want = hf(**{source: ids}, decoder_input_ids=dec).logits.float()
                m.attach(m.source_encoder.hidden(ids))
                got = m(dec).float()
            kw = dict(do_sample=False, num_beams=1, min_new_tokens=new, max_new_tokens=new)
            if speech:      # the decoder's prompt <|startoftranscript|> <|en|> <|transcribe|> <|notimestamps|>
                prompt = torch.tensor([[50258, 50259, 50359, 50363]], device=DEV)
                # the generic loop, not Whisper's own generate() with its language and segment handling
                hf_s = timed(lambda: GenerationMixin.generate(hf, input_features=ids, decoder_input_ids=prompt,
                                                              **kw), 3)
                fm_s = timed(lambda: generate(m, ids, new, decoder_prompt=prompt), 3)
            else:
                hf_s = timed(lambda: hf.generate(ids, **kw), 3)
                fm_s = timed(lambda: generate(m, ids, new), 3)
            r = {"rel_err": rel_err(got, want), "hf_s": hf_s, "fm_s": fm_s, "hf_tok_s": new / hf_s,
                 "fm_tok_s": new / fm_s, "vs_hf": hf_s / fm_s, "source": S, "new": new}
            print("  ", tag, {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
            res[tag] = r
            del m, hf
            shutil.rmtree(src.parent, ignore_errors=True)
        return res

    @stage("ctc_encode", out)
    def ctc_encode():
        """Speech recognition by CTC, bf16, random weights: a wav2vec2-large-lv60-shaped Wav2Vec2ForCTC (24 layers,
        1024 wide, LayerNormed convs, stable pre-LN) on 30 s of audio at batch 1 and 8 (1499 frames a clip).
        fmconvert (its conv front end in torch, Triton's layers) against HF with SDPA: seconds per forward, and the
        argmax agreement and relative error of the CTC logits."""
        from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

        from fmconvert.runtime.classify import head_logits
        from fmconvert.runtime.load import load
        big = DEV == "cuda"
        size = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096) if big \
            else dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      conv_dim=(32,) * 7, num_conv_pos_embeddings=16)
        cfg = Wav2Vec2Config(vocab_size=32, feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True,
                             **size)
        cfg.architectures = ["Wav2Vec2ForCTC"]
        hf = random_bf16(Wav2Vec2ForCTC, cfg)
        src = workdir(sum(p.numel() for p in hf.parameters()) * 5) / "wav2vec2_large"
        hf.save_pretrained(src)
        res = {}
        for kind, flags in (("bf16", []), ("int8", ["--int8"])):
            dst = src.parent / f"w2v-{kind}"
            p = subprocess.run([sys.executable, "-m", "fmconvert", "convert", "-q", "--dtype", "bf16", *flags,
                                str(src), str(dst)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               capture_output=True, text=True)
            if p.returncode:
                raise RuntimeError(f"convert wav2vec2 {kind}: {p.stderr.strip()[-500:]}")
            m = load(dst, device=DEV, backend="triton" if DEV == "cuda" else "torch")
            for B in (1, 8):
                n = 16000 * (30 if big else 1)
                x = torch.randn(B, n, device=DEV).to(torch.bfloat16)
                with torch.inference_mode():
                    want = hf(x).logits.float()
                    got = head_logits(m, *m(x), m.frames).float()
                    hf_s = timed(lambda: hf(x), 3)
                    fm_s = timed(lambda: m(x), 3)
                r = {"rel_err": rel_err(got, want), "argmax_agree": float((got.argmax(-1) == want.argmax(-1))
                                                                          .float().mean()),
                     "hf_sdpa_s": hf_s, "fm_s": fm_s, "vs_hf": hf_s / fm_s, "audio_s": n / 16000 * B,
                     "fm_x_real_time": n / 16000 * B / fm_s}
                print("  ", kind, f"batch {B}", {k: round(v, 4) for k, v in r.items()}, flush=True)
                res[f"{kind}_b{B}"] = r
            del m
        del hf
        shutil.rmtree(src.parent, ignore_errors=True)
        return res

    # Each small-model stage (about a minute each) only while enough of --deadline-s is left for it and the ones after
    for name, fn, need in (("mla_decode", mla_decode, 210), ("hybrid_decode", hybrid_decode, 160),
                           ("mamba_decode", mamba_decode, 110), ("seq2seq_decode", seq2seq_decode, 100),
                           ("ctc_encode", ctc_encode, 40)):
        if args.only_7b:
            continue
        if args.deadline_s - (time.perf_counter() - t_start) > need or args.dry_run_cpu:
            fn()
        else:
            REPORT["stages"][name] = {"ok": False, "error": "skipped: too little of --deadline-s left"}
    @stage("gemv_sweep", out)
    def gemv_sweep():
        """Every candidate int8 GEMV config and a few more, one at a time, on the four LLaMA shapes at batch 1."""
        from benchmarks import gpu_kernels
        data = gpu_kernels.sweep()
        return {"rows": [{"config": k[0], "N": k[1], "K": k[2], "us": round(v[0] * 1000, 2),
                          "GBps": round(v[1], 1)} for k, v in data.items()]}

    if args.only_7b and not args.gemv_sweep:
        pass
    elif DEV == "cuda" and args.deadline_s - (time.perf_counter() - t_start) > 45:
        gemv_sweep()
    elif DEV == "cuda":
        REPORT["stages"]["gemv_sweep"] = {"ok": False, "error": "skipped: too little of --deadline-s left"}
    REPORT["targets"] = targets(REPORT)
    save(out)
    print("\n== issue #5 targets")
    for t in REPORT["targets"]:
        value = "not measured" if t["value"] is None else f"{t['value']:.3g}"
        met = {True: "met", False: "NOT met", None: "-"}[t["met"]]
        print(f"  {t['target']:<48} {value:>12}  (needs >= {t['need']:g})  {met}")
    print("\n== summary")
    for name, s in REPORT["stages"].items():
        keep = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.items()
                if k not in ("rows", "meta", "breakdown")}
        print(f"{name}: {keep}")
        if "breakdown" in s:
            print(f"   {breakdown_line(s['breakdown'])}")


if __name__ == "__main__":
    main()
