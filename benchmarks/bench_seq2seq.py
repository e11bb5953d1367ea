"""CPU encoder-decoders: greedy generation through fmconvert's encoder and decoder against transformers' generate.

    python benchmarks/bench_seq2seq.py [--runs 3] [--smoke] [--json FILE]

One process per model loads both sides (fmconvert from a `--tp 1` float32 conversion, or an `--int8` one;
transformers from the source, float32, SDPA) and alternates them run by run: 64 new tokens from a 128-token source,
each side made to generate all 64 (random weights reach no sensible eos). Reported: the decoder's new tokens/s after
the first, and beside it the whole call (encoder, first step, the rest) and the share of tokens both chose. Models:
t5-base's shape (T5 v1.0, 12 + 12 layers, ReLU) and bart-base's (6 + 6, post-LN), random bf16 weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import synth  # noqa: E402

WORKER = str(C.ROOT / "benchmarks" / "workers.py")
MODELS = (("t5-base", "T5_BASE"), ("bart-base", "BART_BASE"))


def _row(label, r, ctx, key):
    fm, hf = C.med(r["fm_tok_s"]), C.med(r["hf_tok_s"])
    ctx["raw"]["seq2seq"][key] = r
    same = sum(r["token_agreement"]) / max(len(r["token_agreement"]), 1)
    return C.figure(f"seq2seq {label}", fm, "tok/s", "HF generate", hf, fm / hf, "", None,
                    note=f"{r['tokens']} new tokens from {r['source_len']}, {len(r['fm_tok_s'])} run(s) each; whole "
                         f"call {C.med(r['fm_call_s']):.2f} s against {C.med(r['hf_call_s']):.2f} s; "
                         f"{same:.0%} of tokens the same")


def run(ctx: dict) -> list[dict]:
    work = ctx["cache"] / "work"
    work.mkdir(parents=True, exist_ok=True)
    ctx["raw"]["seq2seq"] = {}
    smoke, runs = ctx["smoke"], max(ctx["runs"], 1)
    rows = []
    for label, shape in (("smoke", "SEQ2SEQ_SMOKE"),) if smoke else MODELS:
        src = synth.build(getattr(synth, shape), ctx["cache"])
        for flags, kind in (((), "fp32"), (("--int8",), "int8")):
            out = work / f"seq2seq-{shape.lower()}-{kind}"
            C.rmtree(out)
            C.run_timed([C.FMCONVERT, "convert", "-q", "--dtype", "fp32", *flags, str(src), str(out)])
            r = C.run_json([C.PY, WORKER, "seq2seq", str(src), str(out), "--runs", str(runs),
                            *(("--tokens", "8", "--source-len", "16") if smoke else ())])
            rows.append(_row(f"{label} {kind}", r, ctx, f"{shape.lower()}_{kind}"))
            C.rmtree(out)
    return rows


def main(argv=None):
    ctx = C.parse_args("CPU encoder-decoders", argv)
    C.main_one(ctx, run)


if __name__ == "__main__":
    main()
