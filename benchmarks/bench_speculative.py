"""Speculative decoding on CPU: a float32 model drafted by its own int8 conversion (runtime/speculative.py), and by
prompt lookup (no draft), against the model decoding alone and the int8 conversion alone, greedy, in one process,
alternated run by run.

    python benchmarks/bench_speculative.py [--runs 3] [--tokens 64] [--k 2,4,6] [--smoke]

The model is Llama-shaped with random weights (built once under benchmarks/.cache), and the real stories260K is
run the same way: random weights make flat distributions that a draft matches less often than a trained model's,
so the acceptance of both is printed. Each row checks that the drafted tokens are the model's own. Also timed: one
forward of the model over 1 and over k + 1 new positions against its cache (what a check costs against a step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False)
STORIES = ROOT.parent.parent / "shared" / "models" / "stories260K"


def build(shape: dict, cache: Path) -> Path:
    """A LlamaForCausalLM of this shape with transformers' random init, saved once; its float32 and int8
    conversions."""
    from transformers import LlamaConfig, LlamaForCausalLM
    key = "spec-llama-" + "-".join(f"{v}" for v in shape.values())
    src = cache / key
    if not (src / "config.json").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(src)
    return converted(src, cache / key)


def converted(src: Path, base: Path) -> Path:
    from fmconvert.pipeline import Options, convert
    for name, opts in (("fp32", Options()), ("int8", Options(int8=True))):
        if not (base.with_name(base.name + "-" + name) / "manifest.json").is_file():
            convert(src, base.with_name(base.name + "-" + name), opts, progress=False)
    return base


def median(xs):
    return statistics.median(xs) if xs else 0.0


def bench(base: Path, label: str, tokens: int, ks: list[int], runs: int, prompt: torch.Tensor) -> dict:
    """The float32 model alone, its int8 conversion alone, and the float32 model drafted by the int8 one at each
    k."""
    from fmconvert.runtime.generate import generate, warm_up
    from fmconvert.runtime.load import load
    from fmconvert.runtime.speculative import speculative_generate
    fp = load(base.with_name(base.name + "-fp32"), check_hashes=False)
    q = load(base.with_name(base.name + "-int8"), check_hashes=False)
    warm_up(q)
    want, _ = generate(fp, prompt, tokens)
    r = {"model": label, "tokens": tokens, "prompt": prompt.shape[1], "alone_s": [], "int8_s": [], "lookup_s": [],
         **{f"k{k}_s": [] for k in ks}}
    same, rate, per = {}, {}, {}
    for _ in range(runs):
        t0 = time.perf_counter()
        generate(fp, prompt, tokens)
        r["alone_s"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        generate(q, prompt, tokens)
        r["int8_s"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        got, st = speculative_generate(fp, None, prompt, tokens, k=4)      # prompt lookup: no draft
        r["lookup_s"].append(time.perf_counter() - t0)
        same["lookup"] = got.tolist() == want.tolist()
        rate["lookup"], per["lookup"] = st.accepted / max(st.drafted, 1), st.new_tokens / st.target_steps
        for k in ks:
            t0 = time.perf_counter()
            got, st = speculative_generate(fp, q, prompt, tokens, k=k)
            r[f"k{k}_s"].append(time.perf_counter() - t0)
            same[k] = got.tolist() == want.tolist()
            rate[k] = st.accepted / max(st.drafted, 1)
            per[k] = st.new_tokens / st.target_steps
    # what a check costs: the model over 1 and over k + 1 new positions after the prompt
    cost = {}
    with torch.inference_mode():
        for n in [1] + [k + 1 for k in ks]:
            times = []
            for _ in range(max(runs, 3)):
                cache = fp.new_cache(1, prompt.shape[1] + 8)
                fp(prompt, cache)
                t0 = time.perf_counter()
                fp(prompt[:, :n], cache)
                times.append(time.perf_counter() - t0)
            cost[n] = median(times)
    out = {**r, "same_tokens": same, "accepted": rate, "tokens_per_forward": per, "forward_s": cost,
           "threads": torch.get_num_threads()}
    alone = median(r["alone_s"])
    print(f"{label}, drafted by its int8 conversion: alone {tokens / alone:.1f} tok/s, int8 alone "
          f"{tokens / median(r['int8_s']):.1f} tok/s; " +
          "; ".join(f"k={k}: {tokens / median(r[f'k{k}_s']):.1f} tok/s ({alone / median(r[f'k{k}_s']):.2f}x), "
                    f"{100 * rate[k]:.0f}% kept, {per[k]:.2f} tokens a forward, same tokens {same[k]}" for k in ks) +
          f"; prompt lookup (k=4): {tokens / median(r['lookup_s']):.1f} tok/s "
          f"({alone / median(r['lookup_s']):.2f}x), {per['lookup']:.2f} tokens a forward, same tokens {same['lookup']}"
          "; forward of n positions: " + ", ".join(f"{n}: {1e3 * s:.1f} ms" for n, s in cost.items()),
          file=sys.stderr)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--k", default="2,4,6")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one run: the script still works")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    cache = ROOT / ".cache"
    ks = [int(k) for k in a.k.split(",")]
    runs = 1 if a.smoke else a.runs
    tokens = 8 if a.smoke else a.tokens
    prompt = torch.randint(0, (SMOKE if a.smoke else SHAPE)["vocab_size"], (1, 32),
                           generator=torch.Generator().manual_seed(0))
    rows = [bench(build(SMOKE if a.smoke else SHAPE, cache), "llama-random", tokens, ks, runs, prompt)]
    if (STORIES / "config.json").is_file():
        rows.append(bench(converted(STORIES, cache / "spec-stories260K"), "stories260K", tokens * 2, ks, runs,
                          torch.tensor([[1, 403, 407, 261, 378, 319]])))
    text = json.dumps(rows)
    if a.json:
        a.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
