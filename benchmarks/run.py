"""All CPU benchmarks in one table: conversion (speed, memory), load time, decode. See BENCHMARKS.md.

    python benchmarks/run.py                    # the full run (~10 min the first time: builds 6 GB of checkpoints)
    python benchmarks/run.py --json out.json    # the figures, the raw runs and the machine, as JSON
    python benchmarks/run.py --smoke            # tiny shapes, one run each: checks the scripts still work
    python benchmarks/run.py --only convert,load
    python benchmarks/run.py --only whisper     # Whisper's transcribe against transformers (bench_seq2seq.py)
    python benchmarks/run.py --only ctc         # Wav2Vec2 CTC against transformers' Wav2Vec2ForCTC (bench_ctc.py)

Synthetic checkpoints are cached under benchmarks/.cache (by shape). Every process runs with 2 torch/OpenMP threads.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_convert  # noqa: E402
import bench_ctc  # noqa: E402
import bench_decode  # noqa: E402
import bench_encode  # noqa: E402
import bench_load  # noqa: E402
import bench_seq2seq  # noqa: E402
import common as C  # noqa: E402

SECTIONS = {"convert": bench_convert.run, "load": bench_load.run, "decode": bench_decode.run,
            "encode": bench_encode.run, "seq2seq": bench_seq2seq.run, "whisper": bench_seq2seq.run_whisper,
            "ctc": bench_ctc.run}


def main(argv=None):
    ctx = C.parse_args("all CPU benchmarks", argv, sections=SECTIONS)
    C.main_many(ctx, [(name, SECTIONS[name]) for name in ctx["only"]])


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    C.log(f"done in {time.perf_counter() - t0:.0f} s")
