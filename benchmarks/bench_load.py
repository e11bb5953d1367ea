"""Load time: one converted rank, ready to run, against transformers from_pretrained of the source.

    python benchmarks/bench_load.py [--runs 3] [--smoke] [--json FILE]

Each load is a fresh process timing the call alone (imports excluded on both sides): fmconvert `load()` of rank 0
of the `--tp 2 --int8` output (manifest, sha256 of the rank's files on threads while the tensors are built, int8
weights reordered for the CPU int8 GEMV, FusedModel built), and `AutoModelForCausalLM.from_pretrained` of the bf16 source. One unmeasured
load of each warms the page cache first; then the variants alternate, run by run.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import synth  # noqa: E402

WORKER = str(C.ROOT / "benchmarks" / "workers.py")
VARIANTS = {
    "fm": ("default (sha256 check, int8 packed for the CPU GEMV)", []),
    "fm_nohash": ("no sha256 check", ["--no-hash"]),
    "fm_dequant": ("sha256 check, int8 dequantized at load", ["--dequantize"]),
}


def run(ctx: dict) -> list[dict]:
    shape = synth.SMOKE if ctx["smoke"] else synth.LLAMA_1B
    src = synth.build(shape, ctx["cache"])
    out = ctx.get("fm_out")
    if out is None or not (Path(out) / "manifest.json").is_file():
        out = ctx["cache"] / "work" / "convert-fm"
        C.rmtree(out)
        C.run_timed([C.FMCONVERT, "convert", "-q", "--tp", "2", "--int8", str(src), str(out)])
    variants = {k: v for k, v in VARIANTS.items() if k == "fm" or not ctx["smoke"]}
    cmds = {k: [C.PY, WORKER, "load-fm", str(out), *flags] for k, (_, flags) in variants.items()}
    cmds["hf"] = [C.PY, WORKER, "load-hf", str(src)]
    if not ctx["smoke"]:
        for cmd in cmds.values():
            C.run_json(cmd)
    res = {k: [] for k in cmds}
    order = list(cmds)
    for i in range(ctx["runs"]):
        for k in order[i % len(order):] + order[:i % len(order)]:
            r = C.run_json(cmds[k])
            res[k].append(r["seconds"])
            C.log(f"load round {i + 1}: {k:9s} {r['seconds']:6.2f} s")
    t = {k: C.med(v) for k, v in res.items()}
    ctx["raw"]["load"] = {"runs": res, "out": str(out)}
    rows = []
    for k, (what, _) in variants.items():
        speedup = t["hf"] / t[k]
        rows.append(C.figure(f"load rank 0/2, {what}", t[k], "s", "HF from_pretrained (whole model)", t["hf"],
                             speedup, ">= 3x faster", speedup >= 3.0 if k == "fm" else None,
                             note="" if k != "fm" else "ratio = HF time / fmconvert time; imports not timed; the CPU "
                                  "int8 kernels compile on the first decode call (see the decode rows)"))
    return rows


def main(argv=None):
    ctx = C.parse_args("load time", argv)
    C.main_one(ctx, run)


if __name__ == "__main__":
    main()
