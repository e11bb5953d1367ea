"""CPU encoders: a batch of texts through fmconvert's encoder against transformers' AutoModel, float32 both.

    python benchmarks/bench_encode.py [--runs 3] [--smoke] [--json FILE]

One process per model loads both sides (fmconvert from a `--tp 1` conversion, or an `--int8` one, transformers from
the source) and alternates them run by run: texts/s of one forward over 16 texts of 128 tokens, half of them padded
a quarter short on the right, as a tokenizer pads a batch. The relative error of the last hidden states (real
tokens) against transformers' is reported beside each row. Models: BERT-base's shape (the family of all-MiniLM and
bge-base), all-mpnet-base-v2's MPNet (its relative-position bias) and DeBERTa-v3-base (disentangled attention),
random bf16 weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

MODELS = (("BERT-base", "BERT_BASE"), ("MPNet-base", "MPNET_BASE"), ("DeBERTa-v3-base", "DEBERTA_V3_BASE"))


def _row(label, r):
    fm, hf = C.med(r["fm_texts_s"]), C.med(r["hf_texts_s"])
    return C.figure(f"encode {label}", fm, "texts/s", "HF AutoModel", hf, fm / hf, "", None,
                    note=f"{r['batch']} x {r['seq_len']} tokens, {len(r['fm_texts_s'])} run(s) each, HF attention "
                         f"{r['hf_attention']}; last hidden state within {r['rel_err']:.1e} (relative L2)")


def run(ctx: dict) -> list[dict]:
    return C.fp32_and_int8(ctx, "encode", MODELS, "ENCODER_SMOKE", (), ("--batch", "4", "--seq-len", "16"), _row)


def main(argv=None):
    ctx = C.parse_args("CPU encoders", argv)
    C.main_one(ctx, run)


if __name__ == "__main__":
    main()
