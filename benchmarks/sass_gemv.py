"""Read the int8 GEMV's machine code for an H100/H200 without a GPU: registers, and the order of its loads and barriers.

    .venv/bin/python benchmarks/sass_gemv.py [--swiglu] [--k 4096]

Triton compiles for sm_90 on any machine (its wheel carries ptxas and cuobjdump), so the questions that need no
timing are answered here, at no device time: does each step issue its weight, scale and x loads together, are the
int8 loads 16 bytes wide (LDG.E.128), how many registers does a config take (residency per SM), does anything spill.
This is how the load order of `_gemv_rows` (EARLY) was chosen. Timings still need the card (`make gpu-check`).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fmconvert.kernels import int8_matmul as im  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
POINTERS = {"x_ptr": "*bf16", "w_ptr": "*i8", "s_ptr": "*bf16", "b_ptr": "*i8", "out_ptr": "*bf16"}
ALIGNED = ("x_ptr", "w_ptr", "s_ptr", "out_ptr", "K", "stride_wn", "stride_xm")   # what a real launch specializes on


def compile_gemv(cfg: triton.Config, K: int, swiglu: bool, group: int = 128):
    fn = im._int8_gemv_kernel
    names = fn.arg_names
    kw = cfg.kwargs
    gs = min(kw["BLOCK_K"], group & -group)
    const = dict(GROUP=group, GS=gs, NG=kw["BLOCK_K"] // gs, HAS_BIAS=False, ACT=5 if swiglu else 0, SWIGLU=swiglu,
                 SPLIT=False, EVEN_K=K % kw["BLOCK_K"] == 0, **kw)
    sig = {n: POINTERS.get(n, "constexpr" if n in const else "i32") for n in names}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def sass_report(kernel) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([BIN / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([BIN / "cuobjdump", "-sass", cubin], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    spill = re.search(r"LOCAL:(\d+)", usage)
    ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass)
    # The main loop: from the target of the last backward branch to that branch.
    loop = []
    for i, line in enumerate(sass.splitlines()):
        m = re.search(r"/\*([0-9a-f]{4})\*/.*\bBRA\s+0x([0-9a-f]+)", line)
        if m and int(m.group(2), 16) < int(m.group(1), 16):
            start, end = int(m.group(2), 16), int(m.group(1), 16)
            loop = [op for addr, op in re.findall(r"/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass)
                    if start <= int(addr, 16) <= end]
            break
    order = [op for op in loop if op.startswith(("LDG", "BAR", "LDS", "STS"))]
    first_bar = order.index("BAR.SYNC.DEFER_BLOCKING") if "BAR.SYNC.DEFER_BLOCKING" in order else len(order)
    return {"regs": int(regs.group(1)) if regs else None, "local_bytes": int(spill.group(1)) if spill else None,
            "instructions": len(ops), "loop_instructions": len(loop),
            "loads_before_first_barrier": sum(op.startswith("LDG") for op in order[:first_bar]),
            "loads_in_loop": sum(op.startswith("LDG") for op in order),
            "loop_order": " ".join(op.replace(".DEFER_BLOCKING", "").replace("LDG.E.", "LDG") for op in order),
            "top": Counter(op.split(".")[0] for op in loop).most_common(6)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--swiglu", action="store_true", help="the gate|up launch (PAIR configs apply)")
    ap.add_argument("--k", type=int, default=4096)
    args = ap.parse_args()
    for cfg in im._prune_gemv(im._GEMV_CONFIGS, {}, SWIGLU=args.swiglu):
        try:
            r = sass_report(compile_gemv(cfg, args.k, args.swiglu))
        except Exception as exc:        # a config that does not compile is a finding too
            print(f"{cfg}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
            continue
        kw = cfg.kwargs
        print(f"{kw['BLOCK_N']}x{kw['BLOCK_K']} w{cfg.num_warps} magic{kw['MAGIC']} pair{int(kw['PAIR'])} "
              f"early{int(kw['EARLY'])}: {r['regs']} regs, {r['local_bytes']} B local, loop {r['loop_instructions']} "
              f"instrs, {r['loads_before_first_barrier']}/{r['loads_in_loop']} loads before the first barrier | "
              f"{r['loop_order']}")


if __name__ == "__main__":
    main()
