"""What the benchmark scripts run in fresh processes. Each subcommand prints one JSON line.

    python benchmarks/workers.py roundtrip SRC OUT          # transformers from_pretrained + save_pretrained
    python benchmarks/workers.py load-hf SRC                # transformers from_pretrained, timed
    python benchmarks/workers.py load-fm OUT [--no-hash] [--dequantize]  # fmconvert load of rank 0, timed
    python benchmarks/workers.py decode SRC FM_OUT ...      # greedy decode tok/s, fmconvert vs HF, interleaved

Timings cover the call only (imports are not counted, for either side).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def _quiet_hf():
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def roundtrip(a):
    _quiet_hf()
    from transformers import AutoModelForCausalLM
    t0 = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(a.src)
    m.save_pretrained(a.out)
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def load_hf(a):
    _quiet_hf()
    from transformers import AutoModelForCausalLM
    t0 = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(a.src)
    secs = time.perf_counter() - t0
    print(json.dumps({"seconds": secs, "dtype": str(next(m.parameters()).dtype)}))


class _Rank0:
    """A communicator that says rank 0 of `world`: load() needs one for a tp>1 checkpoint, and nothing talks
    during loading."""

    def __init__(self, world):
        self.rank, self.world = 0, world


def load_fm(a):
    from fmconvert import manifest as mf
    from fmconvert.runtime.load import load
    tp = mf.read(a.out)["parallel"]["tp"]
    t0 = time.perf_counter()
    m = load(a.out, rank=0, device="cpu", comm=_Rank0(tp), check_hashes=not a.no_hash,
             dequantize=True if a.dequantize else None)
    secs = time.perf_counter() - t0
    print(json.dumps({"seconds": secs, "gib": m.load_stats["gib"], "tp": tp}))


class _Clock:
    """A transformers streamer that timestamps tokens: put() gets the prompt first, then each new token."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def _hf_decode(model, ids, n):
    clock = _Clock()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock,
                             pad_token_id=0)
    new = clock.times[1:]          # [0] is the prompt
    rate = (len(new) - 1) / (new[-1] - new[0]) if len(new) > 1 else 0.0
    return out[0, ids.shape[1]:].tolist(), rate


def decode(a):
    """fmconvert generate and HF generate on the same prompt and length, alternated run by run, in one process."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    _quiet_hf()
    from transformers import AutoModelForCausalLM

    from fmconvert.runtime.generate import generate, packed_int8
    from fmconvert.runtime.load import load
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    fm = load(a.fm, device="cpu", check_hashes=False, dtype=dtype)
    vocab = fm.spec["vocab_size"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (1, a.prompt_len), generator=g)
    hf = None
    if not a.no_hf:
        hf = AutoModelForCausalLM.from_pretrained(a.src, dtype=dtype, attn_implementation=a.attn).eval()
    t0 = time.perf_counter()
    generate(fm, ids, max_new_tokens=min(4, a.tokens))          # warm up both (and compile the CPU int8 kernels)
    warmup = time.perf_counter() - t0
    if hf is not None:
        _hf_decode(hf, ids, min(4, a.tokens))
    fm_rates, hf_rates, same = [], [], []
    for _ in range(a.runs):
        out, st = generate(fm, ids, max_new_tokens=a.tokens)
        fm_rates.append(st.decode_tok_s)
        if hf is not None:
            toks, rate = _hf_decode(hf, ids, a.tokens)
            hf_rates.append(rate)
            same.append(sum(x == y for x, y in zip(toks, st.tokens)) / max(len(toks), 1))
    print(json.dumps({"fm_tok_s": fm_rates, "hf_tok_s": hf_rates, "token_agreement": same,
                      "tokens": a.tokens, "prompt_len": a.prompt_len, "dtype": a.dtype,
                      "threads": torch.get_num_threads(), "fm_warmup_s": warmup,
                      "int8_packed": len(packed_int8(fm))}))


def encode(a):
    """fmconvert and transformers (AutoModel, fp32) on the same batch of texts' ids, alternated run by run in one
    process: texts/s of a whole forward, and how close the last hidden states are."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    _quiet_hf()
    from transformers import AutoModel

    from fmconvert.runtime.load import load
    fm = load(a.fm, device="cpu", check_hashes=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, fm.spec["vocab_size"], (a.batch, a.seq_len), generator=g)
    mask = torch.ones_like(ids)
    mask[a.batch // 2:, a.seq_len * 3 // 4:] = 0           # half the texts a quarter shorter, padded on the right
    hf = AutoModel.from_pretrained(a.src, dtype=torch.float32).eval()

    def fm_run():
        return fm(ids, attention_mask=mask)[0]

    def hf_run():
        with torch.inference_mode():
            return hf(input_ids=ids, attention_mask=mask).last_hidden_state
    got, want = fm_run(), hf_run()                          # warm up both
    real = mask.bool()
    err = float((got[real] - want[real]).norm() / want[real].norm())
    fm_s, hf_s = [], []
    for _ in range(a.runs):
        for fn, out in ((fm_run, fm_s), (hf_run, hf_s)):
            t0 = time.perf_counter()
            fn()
            out.append(a.batch / (time.perf_counter() - t0))
    print(json.dumps({"fm_texts_s": fm_s, "hf_texts_s": hf_s, "rel_err": err, "batch": a.batch,
                      "seq_len": a.seq_len, "hf_attention": hf.config._attn_implementation,
                      "threads": torch.get_num_threads()}))


def seq2seq(a):
    """fmconvert and transformers (generate, greedy, fp32, SDPA) translating the same source, alternated run by run
    in one process: new tokens/s of the decoder's steps, and the whole call's time (the encoder, the first step and
    the rest). Both make exactly --tokens tokens: neither has a stop token (transformers' min_new_tokens would instead
    ban the end token, a choice fmconvert's greedy decoding does not make, and the texts would part there)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    _quiet_hf()
    from transformers import AutoModelForSeq2SeqLM

    from fmconvert.runtime.generate import generate, packed_int8
    from fmconvert.runtime.load import load
    fm = load(a.fm, device="cpu", check_hashes=False, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, fm.spec["vocab_size"], (1, a.source_len), generator=g)
    hf = AutoModelForSeq2SeqLM.from_pretrained(a.src, dtype=torch.float32, attn_implementation="sdpa").eval()
    hf.generation_config.eos_token_id = None

    def hf_run(n):
        clock = _Clock()
        with torch.inference_mode():
            out = hf.generate(ids, max_new_tokens=n, do_sample=False, num_beams=1, streamer=clock)
        new = clock.times[1:]       # [0]: the decoder's start token
        return out[0, 1:].tolist(), (len(new) - 1) / (new[-1] - new[0]) if len(new) > 1 else 0.0
    t0 = time.perf_counter()
    generate(fm, ids, max_new_tokens=4)             # warm up both (and build the CPU int8 kernels)
    warmup = time.perf_counter() - t0
    hf_run(4)
    fm_rates, hf_rates, fm_s, hf_s, same = [], [], [], [], []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        _, st = generate(fm, ids, max_new_tokens=a.tokens)
        fm_s.append(time.perf_counter() - t0)
        fm_rates.append(st.decode_tok_s)
        t0 = time.perf_counter()
        toks, rate = hf_run(a.tokens)
        hf_s.append(time.perf_counter() - t0)
        hf_rates.append(rate)
        same.append(sum(x == y for x, y in zip(toks, st.tokens)) / max(len(toks), 1))
    print(json.dumps({"fm_tok_s": fm_rates, "hf_tok_s": hf_rates, "fm_call_s": fm_s, "hf_call_s": hf_s,
                      "token_agreement": same, "tokens": a.tokens, "source_len": a.source_len,
                      "threads": torch.get_num_threads(), "fm_warmup_s": warmup, "int8_packed": len(packed_int8(fm))}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("roundtrip")
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    p.set_defaults(fn=roundtrip)
    p = sub.add_parser("load-hf")
    p.add_argument("src", type=Path)
    p.set_defaults(fn=load_hf)
    p = sub.add_parser("load-fm")
    p.add_argument("out", type=Path)
    p.add_argument("--no-hash", action="store_true")
    p.add_argument("--dequantize", action="store_true", help="int8 dequantized at load (no CPU int8 kernel)")
    p.set_defaults(fn=load_fm)
    p = sub.add_parser("decode")
    p.add_argument("src", type=Path)
    p.add_argument("fm", type=Path)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--no-hf", action="store_true")
    p.set_defaults(fn=decode)
    p = sub.add_parser("encode")
    p.add_argument("src", type=Path)
    p.add_argument("fm", type=Path)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.set_defaults(fn=encode)
    p = sub.add_parser("seq2seq")
    p.add_argument("src", type=Path)
    p.add_argument("fm", type=Path)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--source-len", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.set_defaults(fn=seq2seq)
    a = ap.parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
