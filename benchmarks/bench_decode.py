"""CPU decode: fmconvert generate against transformers generate, greedy, same prompt and length.

    python benchmarks/bench_decode.py [--runs 3] [--smoke] [--json FILE]

One process per model loads both sides (fmconvert from a `--tp 1` conversion, transformers from the source, both
in float32) and alternates them run by run: tok/s of the decode steps, the prefill and its first token excluded
(transformers' time comes from a streamer's timestamps, so both count the same steps). transformers runs eagerly
(no torch.compile) with its default sdpa attention. The 1.1B int8 row loads a `--int8` conversion the default
way: weights stay int8 and decode runs the CPU int8 GEMV (`fmconvert/kernels/int8_gemv_cpu.py`), with float32
activations, against transformers float32 on the same source; its warm-up generation (4 tokens, which compiles the
kernels) is timed apart. stories260K has no int8 row: its weights are all below the size where the kernel pays
(load() dequantizes them). The latent-attention rows (DeepSeek-V2-Lite's attention on 4 layers) decode after
a 128- and a 1024-token prompt, where each transformers step expands the whole cache; so do the Qwen3.5 rows
(its hybrid layers: 6 Gated DeltaNet, 2 attention), Granite 4.0-H ones (7 Mamba2, 1 attention) and FalconMamba ones
(8 Mamba layers, no attention).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import synth  # noqa: E402

WORKER = str(C.ROOT / "benchmarks" / "workers.py")
STORIES = C.ROOT.parent / "shared" / "models" / "stories260K"


def _convert(src: Path, out: Path, *flags: str) -> Path:
    C.rmtree(out)
    C.run_timed([C.FMCONVERT, "convert", "-q", *flags, str(src), str(out)])
    return out


def _decode(src, out, tokens, runs, *flags) -> dict:
    return C.run_json([C.PY, WORKER, "decode", str(src), str(out), "--tokens", str(tokens), "--runs", str(runs),
                       *flags])


def _row(label, r, ctx, key):
    fm, hf = C.med(r["fm_tok_s"]), C.med(r["hf_tok_s"])
    ctx["raw"]["decode"][key] = r
    agree = C.med(r["token_agreement"])
    return C.figure(f"decode {label}", fm, "tok/s", "HF generate", hf, fm / hf, ">= 1.5x", fm / hf >= 1.5,
                    note=f"{r['tokens']} new tokens after an {r['prompt_len']}-token prompt, {len(r['fm_tok_s'])} "
                         f"run(s) each; greedy tokens agree {agree:.0%}" if agree is not None else "")


def run(ctx: dict) -> list[dict]:
    work = ctx["cache"] / "work"
    work.mkdir(parents=True, exist_ok=True)
    ctx["raw"]["decode"] = {}
    smoke, runs = ctx["smoke"], ctx["runs"]
    rows = []
    if (STORIES / "config.json").is_file():
        fp = _convert(STORIES, work / "decode-stories")
        tokens = 16 if smoke else 256
        r = _decode(STORIES, fp, tokens, max(runs, 1 if smoke else 5))
        rows.append(_row("stories260K fp32", r, ctx, "stories_fp32"))
        if not smoke:
            e = _decode(STORIES, fp, tokens, max(runs, 5), "--attn", "eager")
            ctx["raw"]["decode"]["stories_fp32_hf_eager_attention"] = e
            rows[-1]["note"] += (f"; HF with attn_implementation='eager': {C.med(e['hf_tok_s']):.0f} tok/s "
                                 f"(ratio {C.med(e['fm_tok_s']) / C.med(e['hf_tok_s']):.2f}x)")
    if smoke and rows:
        return rows
    shape = synth.SMOKE if smoke else synth.LLAMA_1B
    src = synth.build(shape, ctx["cache"])
    label = "synthetic smoke shape fp32" if smoke else "1.1B shape fp32"
    out = _convert(src, work / "decode-llama")
    tokens = 8 if smoke else 32
    r = _decode(src, out, tokens, max(runs, 1))
    rows.append(_row(label, r, ctx, "llama_fp32"))
    q = _convert(src, work / "decode-llama-int8", "--int8")
    qi = _decode(src, q, tokens, max(runs, 1))
    rows.append(_row(label.replace("fp32", "int8 (CPU int8 GEMV)"), qi, ctx, "llama_int8"))
    fm_f = C.med(r["fm_tok_s"])
    rows[-1]["note"] += (f"; fmconvert fp32 {fm_f:.2f} tok/s (int8 {C.med(qi['fm_tok_s']) / fm_f:.2f}x of it); "
                         f"first 4-token generation, which compiles the kernels: {qi['fm_warmup_s']:.1f} s; "
                         f"{qi['int8_packed']} int8 weights packed")
    C.rmtree(work / "decode-llama-int8")
    C.rmtree(out)
    rows += _latent(ctx, work, smoke, runs)
    rows += _hybrid(ctx, work, smoke, runs)
    return rows


HYBRIDS = (("qwen35", "Qwen3.5 hybrid layers (2048 wide, 6 DeltaNet + 2 attention)", "QWEN35", "sdpa"),
           ("granite_h", "Granite 4.0-H layers (2048 wide, 7 Mamba2 + 1 attention)", "GRANITE_H", "sdpa"),
           ("falcon_mamba", "FalconMamba layers (2048 wide, 8 Mamba)", "FALCON_MAMBA", "eager"))   # no attention


def _hybrid(ctx, work, smoke, runs) -> list[dict]:
    """Hybrids: a Gated DeltaNet or Mamba2 layer's decode step reads a fixed-size state, whatever the context; only
    the attention layers grow with it."""
    rows = []
    for key, label, shape, attn in HYBRIDS:
        src = synth.build(getattr(synth, shape + ("_SMOKE" if smoke else "_LITE")), ctx["cache"])
        out = _convert(src, work / f"decode-{key}")
        for prompt in (16,) if smoke else (128, 1024):
            r = C.run_json([C.PY, WORKER, "decode", str(src), str(out), "--tokens", str(8 if smoke else 32),
                            "--runs", str(max(runs, 1)), "--prompt-len", str(prompt), "--attn", attn])
            rows.append(_row(f"{'smoke ' + key if smoke else label}, fp32, prompt {prompt}", r, ctx,
                             f"{key}_fp32_prompt{prompt}"))
        C.rmtree(out)
    return rows


def _latent(ctx, work, smoke, runs) -> list[dict]:
    """Latent attention against a long cache: transformers expands every cached latent through kv_b at each step,
    fmconvert's decode step attends over the latents with kv_b absorbed into q and the output."""
    src = synth.build(synth.MLA_SMOKE if smoke else synth.MLA_LITE, ctx["cache"])
    out = _convert(src, work / "decode-mla")
    rows = []
    for prompt in (16,) if smoke else (128, 1024):
        r = C.run_json([C.PY, WORKER, "decode", str(src), str(out), "--tokens", str(8 if smoke else 32), "--runs",
                        str(max(runs, 1)), "--prompt-len", str(prompt)])
        rows.append(_row(f"{'smoke' if smoke else 'DeepSeek-V2-Lite attention, 4 layers,'} fp32, prompt {prompt}",
                         r, ctx, f"mla_fp32_prompt{prompt}"))
    C.rmtree(out)
    return rows


def main(argv=None):
    ctx = C.parse_args("CPU decode", argv)
    C.main_one(ctx, run)


if __name__ == "__main__":
    main()
