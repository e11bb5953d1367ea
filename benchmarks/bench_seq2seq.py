"""CPU encoder-decoders: greedy generation through fmconvert's encoder and decoder against transformers' generate.

    python benchmarks/bench_seq2seq.py [--runs 3] [--smoke] [--json FILE] [--only seq2seq,whisper]

One process per model loads both sides (fmconvert from a `--tp 1` float32 conversion, or an `--int8` one;
transformers from the source, float32, SDPA) and alternates them run by run: 64 new tokens from a 128-token source,
neither side stopping at an end token. Reported: the decoder's new tokens/s after the first, and beside it the whole
call (encoder, first step, the rest) and the share of tokens both chose. Models:
t5-base's shape (T5 v1.0, 12 + 12 layers, ReLU) and bart-base's (6 + 6, post-LN), random bf16 weights.

The whisper section does the same for speech: 30 s of a synthetic voice through the feature extractor, then
fmconvert's `transcribe` (features in, tokens out) against transformers' Whisper `generate` (float32, eager attention,
and SDPA beside it), language given, 64 new tokens, the end token banned on both sides. Besides tok/s and the whole
call it times each side's audio encoder alone, in the same alternation. whisper-base's and whisper-small's shapes,
random bf16 weights, a generation config like the released checkpoints'; fmconvert in float32, int8, and int8 with
its tied head (the embeddings) int8 too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import synth  # noqa: E402

MODELS = (("t5-base", "T5_BASE"), ("bart-base", "BART_BASE"))

# Whisper's shapes: whisper-base and whisper-small (the multilingual vocab, 80 mels, 30 s = 1500 encoder positions).
WHISPER_BASE = dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                    decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, vocab_size=51865,
                    num_mel_bins=80, max_source_positions=1500, max_target_positions=448)
WHISPER_SMALL = dict(WHISPER_BASE, d_model=768, encoder_layers=12, decoder_layers=12, encoder_attention_heads=12,
                     decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072)
# 1 s of audio (100 frames, 50 positions) and 16 mels; the real vocab, so the generation config is the same one
WHISPER_SMOKE = dict(WHISPER_BASE, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
                     max_source_positions=50)
WHISPER_MODELS = (("whisper-base", WHISPER_BASE), ("whisper-small", WHISPER_SMALL))

# The multilingual vocab's special tokens (whisper-tiny to -medium and large-v2; large-v3 has one language more).
EOT, SOT, TRANSLATE, TRANSCRIBE, NO_TIMESTAMPS = 50257, 50258, 50358, 50359, 50363
# generation_config.json's suppress_tokens of the released multilingual checkpoints
SUPPRESS = [1, 2, 7, 8, 9, 10, 14, 25, 26, 27, 28, 29, 31, 58, 59, 60, 61, 62, 63, 90, 91, 92, 93, 359, 503, 522, 542,
            873, 893, 902, 918, 922, 931, 1350, 1853, 1982, 2460, 2627, 3246, 3253, 3268, 3536, 3846, 3961, 4183, 4667,
            6585, 6647, 7273, 9061, 9383, 10428, 10929, 11938, 12033, 12331, 12562, 13793, 14157, 14635, 15265, 15618,
            16553, 16604, 18362, 18956, 20075, 21675, 22520, 26130, 26161, 26435, 28279, 29464, 31650, 32302, 32470,
            36865, 42863, 47425, 49870, 50254, 50258, 50358, 50359, 50360, 50361, 50362]


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


def whisper_generation_config() -> dict:
    """generation_config.json as the released multilingual checkpoints have it, less forced_decoder_ids (the
    language is always given here). Every timestamp token is suppressed too: random weights would otherwise choose
    them, and transformers cuts a transcript at one."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES
    langs = {f"<|{code}|>": SOT + 1 + i for i, code in enumerate(list(LANGUAGES)[:TRANSLATE - SOT - 1])}
    return dict(decoder_start_token_id=SOT, bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT,
                no_timestamps_token_id=NO_TIMESTAMPS, prev_sot_token_id=50361, is_multilingual=True, max_length=448,
                lang_to_id=langs, task_to_id={"transcribe": TRANSCRIBE, "translate": TRANSLATE},
                suppress_tokens=SUPPRESS + list(range(NO_TIMESTAMPS + 1, WHISPER_BASE["vocab_size"])),
                begin_suppress_tokens=[220, EOT])


def whisper_key(shape: dict) -> str:
    return "whisper-" + "-".join(f"{k}{v}" for k, v in sorted(shape.items())) + "-bf16"


def build_whisper(shape: dict, cache: Path, seed: int = 0) -> Path:
    """A saved random WhisperForConditionalGeneration of this shape, as synth.build makes the others (bf16, norms
    near 1, the rest N(0, 0.02), the encoder's positions the sinusoids Whisper stores), with a generation config and
    a feature extractor (preprocessor_config.json) for its mels and chunk; built on first use."""
    out = Path(cache) / whisper_key(shape)
    if (out / "config.json").is_file() and (out / "preprocessor_config.json").is_file():
        return out
    import torch
    import transformers
    from transformers.models.whisper.modeling_whisper import sinusoids
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    C.log(f"building synthetic checkpoint {out.name} (once; cached) ...")
    gc = whisper_generation_config()
    config = transformers.WhisperConfig(**shape, **{k: gc[k] for k in ("decoder_start_token_id", "bos_token_id",
                                                                       "eos_token_id", "pad_token_id")})
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        model = transformers.WhisperForConditionalGeneration(config)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    model.tie_weights()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("encoder.embed_positions.weight"):
                p.copy_(sinusoids(*p.shape))
            elif name.endswith("layer_norm.weight"):
                p.fill_(1.0)
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.bfloat16), alpha=0.1)
            else:
                torch.randn(p.shape, generator=gen, dtype=torch.bfloat16, out=p.data)
                p.mul_(0.02)
    model.generation_config = transformers.GenerationConfig(**gc)
    frames = 2 * shape["max_source_positions"]
    fe = transformers.WhisperFeatureExtractor(feature_size=shape["num_mel_bins"], sampling_rate=16000, hop_length=160,
                                              n_fft=400, chunk_length=frames * 160 // 16000)
    return synth.save_whole(out, model, {"shape": shape, "seed": seed, "dtype": "bfloat16"}, beside=[fe])


def _whisper_row(label, r):
    fm, hf = C.med(r["fm_tok_s"]), C.med(r["hf_tok_s"])
    call, hf_call = C.med(r["fm_call_s"]), C.med(r["hf_call_s"])
    enc, hf_enc = C.med(r["fm_encoder_s"]), C.med(r["hf_encoder_s"])
    same = all(x == 1.0 for x in r["token_agreement"])
    return C.figure(f"seq2seq {label}", fm, "tok/s", f"HF generate ({r['hf_attn']})", hf, fm / hf, "", None,
                    note=f"{r['tokens']} new tokens from {r['audio_s']:.0f} s of audio, {len(r['fm_tok_s'])} run(s) "
                         f"each; whole call {call:.2f} s against {hf_call:.2f} s; encoder alone {enc:.2f} s against "
                         f"{hf_enc:.2f} s; tokens the same: {'yes' if same else 'NO'} ({len(set(r['fm_tokens']))} "
                         f"distinct)" + _alt(r["hf_alt"]),
                    call_s=call, baseline_call_s=hf_call, encoder_s=enc, baseline_encoder_s=hf_enc,
                    prefill_s=C.med(r["fm_prefill_s"]), same_tokens=same)


def _alt(alt) -> str:
    if not alt:
        return ""
    same = all(x == 1.0 for x in alt["same"])
    return (f"; HF {alt['attn']}: {C.med(alt['tok_s']):.1f} tok/s, whole call {C.med(alt['call_s']):.2f} s, encoder "
            f"{C.med(alt['encoder_s']):.2f} s, tokens the same: {'yes' if same else 'NO'}")


def run_whisper(ctx: dict) -> list[dict]:
    """Each Whisper shape (or the smoke one): built once, converted to float32, to int8, and to int8 with the
    embeddings too (Whisper's head is its embedding table, 51865 rows: at whisper-base's width more than half a
    decode step's bytes, float under plain --int8), and the worker below run on each in a fresh process."""
    work = ctx["cache"] / "work"
    work.mkdir(parents=True, exist_ok=True)
    ctx["raw"]["whisper"] = {}
    rows = []
    for label, shape in (("whisper-smoke", WHISPER_SMOKE),) if ctx["smoke"] else WHISPER_MODELS:
        src = build_whisper(shape, ctx["cache"])
        kinds = (((), "fp32"), (("--int8",), "int8"), (("--int8", "--int8-embeddings"), "int8_emb"))
        for flags, kind in kinds[:2] if ctx["smoke"] else kinds:
            out = work / f"{label}-{kind}"
            C.rmtree(out)
            C.run_timed([C.FMCONVERT, "convert", "-q", "--dtype", "fp32", *flags, str(src), str(out)])
            r = C.run_json([C.PY, __file__, "worker", str(src), str(out), "--runs", str(max(ctx["runs"], 1)),
                            "--tokens", "8" if ctx["smoke"] else "64"])
            ctx["raw"]["whisper"][f"{label.replace('-', '_')}_{kind}"] = r
            rows.append(_whisper_row(f"{label} {kind}", r))
            C.rmtree(out)
    return rows


def _voice(n: int, seed: int = 0):
    """n samples of a 16 kHz synthetic voice: a gliding pitch's harmonics, syllable-rate bursts, a little noise."""
    import torch
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float64) / 16000
    f0 = 140 + 40 * torch.sin(2 * torch.pi * 0.4 * t)
    phase = 2 * torch.pi * torch.cumsum(f0, 0) / 16000
    voiced = sum(torch.sin(k * phase) / k for k in range(1, 12))
    bursts = torch.sin(2 * torch.pi * 3.5 * t).clamp(min=0)
    wave = 0.1 * voiced * bursts + 0.005 * torch.randn(n, generator=g, dtype=torch.float64)
    return wave.float()


def whisper_worker(argv=None):
    """In a fresh process: fmconvert's transcribe and transformers' Whisper generate (float32; eager attention and
    SDPA, each its own model) on the same features, alternated run by run, with each side's audio encoder timed
    alone in the same rounds. One JSON line out."""
    import torch
    ap = argparse.ArgumentParser(prog="bench_seq2seq.py worker")
    ap.add_argument("src", type=Path)
    ap.add_argument("fm", type=Path)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--hf-attn", default="eager,sdpa", help="the baseline first, then the one reported beside it")
    a = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from transformers import WhisperForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from fmconvert.runtime.generate import packed_int8
    from fmconvert.runtime.load import load
    from fmconvert.runtime.speech import feature_extractor, transcribe
    hf_logging.set_verbosity_error()
    fm = load(a.fm, device="cpu", check_hashes=False, dtype=torch.float32)
    gc = json.loads((a.fm / "generation_config.json").read_text())
    # the end token banned on both sides: exactly --tokens each, and each step pays for the same processors
    gc["suppress_tokens"] = sorted({*gc["suppress_tokens"], gc["eos_token_id"]})
    fe = feature_extractor(a.fm)
    feats = fe(_voice(fe.n_samples).numpy(), sampling_rate=16000, return_tensors="pt").input_features  # [1, mels, T]
    attns = a.hf_attn.split(",")
    hfs = {}
    for attn in attns:
        hf = WhisperForConditionalGeneration.from_pretrained(a.src, dtype=torch.float32,
                                                             attn_implementation=attn).eval()
        hf.generation_config.suppress_tokens = gc["suppress_tokens"]
        hfs[attn] = hf

    def fm_call(n):
        tokens, st = transcribe(fm, feats, gc, language="en", max_new_tokens=n, eos_token_id=gc["eos_token_id"])
        return list(getattr(tokens[0], "tokens", tokens[0])), st      # a Transcript's tokens, or the list itself

    def hf_call(hf, n):
        from workers import _Clock      # a streamer that timestamps each token transformers hands it
        clock = _Clock()
        with torch.inference_mode():
            out = hf.generate(input_features=feats, language="en", max_new_tokens=n, streamer=clock)
        new = clock.times[1:]           # [0]: the decoder's prompt
        return out[0].tolist()[-n:], (len(new) - 1) / (new[-1] - new[0]) if len(new) > 1 else 0.0, len(new)

    def timed(fn, *args):
        t0 = time.perf_counter()
        with torch.inference_mode():
            r = fn(*args)
        return r, time.perf_counter() - t0
    t0 = time.perf_counter()
    fm_call(4)                          # warm up every side (and build the CPU int8 kernels)
    warmup = time.perf_counter() - t0
    for hf in hfs.values():
        hf_call(hf, 4)
    r = {"fm_tok_s": [], "fm_call_s": [], "fm_prefill_s": [], "fm_encoder_s": [], "fm_new_tokens": [],
         **{f"hf_{attn}": {"tok_s": [], "call_s": [], "encoder_s": [], "new_tokens": [], "same": []} for attn in attns}}
    for _ in range(a.runs):
        (toks, st), secs = timed(fm_call, a.tokens)
        r["fm_call_s"].append(secs)
        r["fm_tok_s"].append(st.decode_tok_s)
        r["fm_prefill_s"].append(st.prefill_s)
        r["fm_new_tokens"].append(len(toks))
        for attn, hf in hfs.items():
            (ref, rate, streamed), secs = timed(hf_call, hf, a.tokens)
            h = r[f"hf_{attn}"]
            h["call_s"].append(secs)
            h["tok_s"].append(rate)
            h["new_tokens"].append(streamed)
            h["same"].append(sum(x == y for x, y in zip(ref, toks)) / a.tokens)
            h["tokens"] = ref
        r["fm_encoder_s"].append(timed(fm.source_encoder.hidden, feats)[1])
        for attn, hf in hfs.items():
            r[f"hf_{attn}"]["encoder_s"].append(timed(hf.model.encoder, feats)[1])
    if any(n != a.tokens for n in r["fm_new_tokens"] + [n for at in attns for n in r[f"hf_{at}"]["new_tokens"]]):
        raise SystemExit(f"a side made other than {a.tokens} tokens: {json.dumps(r)}")
    base = r.pop(f"hf_{attns[0]}")
    alt = {"attn": attns[1], **r.pop(f"hf_{attns[1]}")} if len(attns) > 1 else None
    r.update(hf_attn=attns[0], hf_tok_s=base["tok_s"], hf_call_s=base["call_s"], hf_encoder_s=base["encoder_s"],
             token_agreement=base["same"], hf_alt=alt, fm_tokens=toks, hf_tokens=base["tokens"],
             tokens=a.tokens, audio_s=fe.n_samples / 16000, features=list(feats.shape),
             threads=torch.get_num_threads(), fm_warmup_s=warmup, int8_packed=len(packed_int8(fm)))
    print(json.dumps(r))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return whisper_worker(argv[1:])
    sections = {"seq2seq": run, "whisper": run_whisper}
    ctx = C.parse_args("CPU encoder-decoders", argv, sections=sections)
    C.main_many(ctx, [(name, sections[name]) for name in ctx["only"]])


if __name__ == "__main__":
    main()
