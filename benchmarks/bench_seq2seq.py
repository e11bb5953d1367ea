"""CPU encoder-decoders: greedy generation through fmconvert's encoder and decoder against transformers' generate.

    python benchmarks/bench_seq2seq.py [--runs 3] [--smoke] [--json FILE]

One process per model loads both sides (fmconvert from a `--tp 1` float32 conversion, or an `--int8` one;
transformers from the source, float32, SDPA) and alternates them run by run: 64 new tokens from a 128-token source,
neither side stopping at an end token. Reported: the decoder's new tokens/s after the first, and beside it the whole
call (encoder, first step, the rest) and the share of tokens both chose. Models:
t5-base's shape (T5 v1.0, 12 + 12 layers, ReLU) and bart-base's (6 + 6, post-LN), random bf16 weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

MODELS = (("t5-base", "T5_BASE"), ("bart-base", "BART_BASE"))


def _row(label, r):
    fm, hf = C.med(r["fm_tok_s"]), C.med(r["hf_tok_s"])
    same = sum(r["token_agreement"]) / max(len(r["token_agreement"]), 1)
    return C.figure(f"seq2seq {label}", fm, "tok/s", "HF generate", hf, fm / hf, "", None,
                    note=f"{r['tokens']} new tokens from {r['source_len']}, {len(r['fm_tok_s'])} run(s) each; whole "
                         f"call {C.med(r['fm_call_s']):.2f} s against {C.med(r['hf_call_s']):.2f} s; "
                         f"{same:.0%} of tokens the same")


def run(ctx: dict) -> list[dict]:
    return C.fp32_and_int8(ctx, "seq2seq", MODELS, "SEQ2SEQ_SMOKE", (), ("--tokens", "8", "--source-len", "16"),
                           _row)


def main(argv=None):
    ctx = C.parse_args("CPU encoder-decoders", argv)
    C.main_one(ctx, run)


if __name__ == "__main__":
    main()
