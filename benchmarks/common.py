"""Shared helpers of the benchmark scripts: the machine, timed child processes, medians, the table, --json."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
FMCONVERT = str(Path(PY).with_name("fmconvert"))
THREADS = 2            # torch / OpenMP threads for every measured process
GNU_TIME = "/usr/bin/time"


def env(threads: int = THREADS) -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
             HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONPATH=str(ROOT))
    return e


def machine() -> dict:
    def first(path, key):
        try:
            for line in open(path):
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return None

    mem = first("/proc/meminfo", "MemTotal")
    info = {"cpu": first("/proc/cpuinfo", "model name") or platform.processor(),
            "nproc": os.cpu_count(), "mem_gib": round(int(mem.split()[0]) / 2**20, 1) if mem else None,
            "os": platform.platform(), "python": platform.python_version(), "threads": THREADS,
            "loadavg_at_start": open("/proc/loadavg").read().split()[:3] if Path("/proc/loadavg").exists() else None}
    try:
        import safetensors
        import torch
        import transformers
        info.update(torch=torch.__version__, transformers=transformers.__version__, safetensors=safetensors.__version__,
                    cpu_capability=torch.backends.cpu.get_cpu_capability())
    except ImportError:
        pass
    return info


def run_timed(cmd: list[str], cwd=None, threads: int = THREADS) -> dict:
    """Run a command in a fresh process: wall seconds (perf_counter around it) and the peak RSS the OS reports
    (GNU time's maximum resident set size of the child, or, without it, the child's own RUSAGE_CHILDREN)."""
    if os.path.exists(GNU_TIME):
        full = [GNU_TIME, "-v"] + cmd
    else:  # a fresh Python parent per run, so RUSAGE_CHILDREN covers exactly this command
        full = [PY, "-c", "import resource,subprocess,sys;r=subprocess.run(sys.argv[1:]).returncode;"
                "sys.stderr.write('Maximum resident set size (kbytes): %d\\n' % "
                "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);sys.exit(r)"] + cmd
    t0 = time.perf_counter()
    p = subprocess.run(full, cwd=cwd, env=env(threads), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return {"wall_s": wall, "rss_mib": int(m.group(1)) / 1024 if m else None, "stdout": p.stdout}


def run_json(cmd: list[str], threads: int = THREADS) -> dict:
    """Run a worker that prints one JSON object as its last stdout line."""
    p = subprocess.run(cmd, env=env(threads), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def sync():
    subprocess.run(["sync"], check=False)


def rmtree(p: Path):
    shutil.rmtree(p, ignore_errors=True)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def figure(name: str, value, unit: str, baseline: str, base_value=None, ratio=None, target: str = "",
           met=None, note: str = "", **extra) -> dict:
    return {"figure": name, "value": value, "unit": unit, "baseline": baseline, "baseline_value": base_value,
            "ratio": ratio, "target": target, "met": met, "note": note, **extra}


def _fmt(v, unit=""):
    if v is None:
        return "-"
    if isinstance(v, float):
        s = f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    else:
        s = str(v)
    return f"{s} {unit}".strip()


def table(rows: list[dict], title: str = "") -> str:
    cols = ["figure", "value", "baseline", "ratio", "target", "met"]
    cells = [[r["figure"], _fmt(r["value"], r["unit"]),
              f"{r['baseline']}: {_fmt(r['baseline_value'], r.get('baseline_unit', r['unit']))}"
              if r["baseline_value"] is not None else r["baseline"],
              "-" if r["ratio"] is None else f"{r['ratio']:.2f}x", r["target"] or "-",
              {True: "yes", False: "NO", None: "-"}[r["met"]]] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join("-" * w for w in widths)
    out = [title] if title else []
    out += ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    notes = [f"  [{i + 1}] {r['figure']}: {r['note']}" for i, r in enumerate(rows) if r.get("note")]
    return "\n".join(out + ([""] + notes if notes else []))


def write_json(path, payload: dict):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=1, default=str) + "\n")


def log(msg: str):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(what: str, argv=None, sections: dict | None = None) -> dict:
    import argparse
    ap = argparse.ArgumentParser(description=f"fmconvert CPU benchmarks: {what}")
    ap.add_argument("--runs", type=int, default=None, help="measured runs per figure (default 3; 1 with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="tiny synthetic shapes, one run: checks the scripts work")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures, raw runs and machine here")
    ap.add_argument("--cache", type=Path, default=Path(__file__).resolve().parent / ".cache",
                    help="where synthetic checkpoints and outputs live (default benchmarks/.cache)")
    if sections:
        ap.add_argument("--only", default=",".join(sections), help=f"comma list of {', '.join(sections)}")
    a = ap.parse_args(argv)
    only = [s for s in a.only.split(",") if s] if sections else []
    bad = [s for s in only if s not in (sections or {})]
    if bad:
        ap.error(f"unknown section(s) {bad}")
    return {"runs": a.runs or (1 if a.smoke else 3), "smoke": a.smoke, "json": a.json, "cache": a.cache,
            "only": only, "raw": {}}


def _finish(ctx: dict, rows: list[dict], title: str):
    print(table(rows, title))
    if ctx["json"]:
        write_json(ctx["json"], {"machine": ctx["machine"], "smoke": ctx["smoke"], "runs": ctx["runs"],
                                 "figures": rows, "raw": ctx["raw"],
                                 "date": time.strftime("%Y-%m-%d %H:%M:%S")})


def _title(ctx: dict) -> str:
    m = ctx["machine"]
    return (f"fmconvert CPU benchmarks{' (SMOKE: tiny shapes, not figures)' if ctx['smoke'] else ''}: "
            f"{m['cpu']}, {m['nproc']} cores, {m['mem_gib']} GiB, {m['threads']} threads, "
            f"median of {ctx['runs']} run(s)")


def main_one(ctx: dict, fn):
    ctx["machine"] = machine()
    _finish(ctx, fn(ctx), _title(ctx))


def main_many(ctx: dict, sections):
    ctx["machine"] = machine()
    rows = []
    for name, fn in sections:
        log(f"section {name}")
        rows += fn(ctx)
    _finish(ctx, rows, _title(ctx))


def fp32_and_int8(ctx: dict, section: str, models, smoke_shape: str, worker_args, smoke_args, row) -> list[dict]:
    """Each model of `models` ((label, synth shape name)), or the smoke shape: built once, converted to float32 and
    to int8, and the worker's `section` run on both against transformers; row(label, result, key) -> a figure."""
    import synth
    work = ctx["cache"] / "work"
    work.mkdir(parents=True, exist_ok=True)
    ctx["raw"][section] = {}
    worker = str(ROOT / "benchmarks" / "workers.py")
    rows = []
    for label, shape in (("smoke", smoke_shape),) if ctx["smoke"] else models:
        src = synth.build(getattr(synth, shape), ctx["cache"])
        for flags, kind in (((), "fp32"), (("--int8",), "int8")):
            out = work / f"{section}-{shape.lower()}-{kind}"
            rmtree(out)
            run_timed([FMCONVERT, "convert", "-q", "--dtype", "fp32", *flags, str(src), str(out)])
            r = run_json([PY, worker, section, str(src), str(out), "--runs", str(max(ctx["runs"], 1)),
                          *(smoke_args if ctx["smoke"] else worker_args)])
            ctx["raw"][section][f"{shape.lower()}_{kind}"] = r
            rows.append(row(f"{label} {kind}", r))
            rmtree(out)
    return rows
