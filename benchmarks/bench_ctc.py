"""CPU speech recognition by CTC: fmconvert's Wav2Vec2 encoder and CTC head against transformers' Wav2Vec2ForCTC.

    OMP_NUM_THREADS=2 python benchmarks/bench_ctc.py [--runs 3] [--smoke] [--json FILE] [--only base,large]

One process per model holds every side: fmconvert from a float32 conversion and from an int8 one (both made in
that process by `fmconvert.pipeline.convert`, loaded with dtype float32), transformers' Wav2Vec2ForCTC from the
source in float32 with eager attention (the baseline) and with SDPA (timed beside it). At batch 1, 10 s and 30 s of
a seeded synthetic voice at 16 kHz through Wav2Vec2FeatureExtractor (zero mean, unit variance; the attention mask
where the released processor returns one: large-lv60's, not base's), then waveform in, CTC logits per frame out.
Every side is warmed up once on each clip, then the sides are alternated run by run (the order rotating), median of
--runs. Reported per model, clip and fmconvert kind: seconds per clip, the real-time factor (audio seconds / wall),
the speed-up over HF eager and over SDPA, the share of frames whose argmax matches HF's, the logits' relative L2
error, and the front end alone (conv stack, feature projection, positional conv: `wave_front` against the same
three HF modules), timed in the same rounds.

Models: wav2vec2-base's shape (768 wide, 12 layers, group-normed convs without bias, post-LN) and
wav2vec2-large-lv60's (1024, 24 layers, layer-normed convs with bias, stable pre-LN), both with the released conv
stack (7 x 512, 320 samples a frame) and positional conv (kernel 128, 16 groups), a 32-letter vocab. Random weights
(transformers' init under a fixed seed, norms and biases then perturbed so none is exactly 1 or 0), saved as
float32 safetensors under benchmarks/.cache, built on first use.

Runtime, estimated, not measured: the full run about 10-15 minutes on 2 threads of a recent x86 server core, and
some 5 GB of memory at the peak (large's worker holds four models). The first run spends about a minute building
the two checkpoints (1.5 GB); each worker then converts twice (about 20 s for large). The forward passes come to
some 10 TFLOP a round (wav2vec2-large on 30 s: about 1.3 TFLOP a side, the conv stack about 0.15 of it), four
rounds with the warm-up. --smoke: tiny shapes, one run, about 15 s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import synth  # noqa: E402
from bench_seq2seq import _voice  # noqa: E402

_CONVS = dict(conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
              num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, vocab_size=32, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
# facebook/wav2vec2-base-960h's and wav2vec2-large-960h-lv60-self's configs, less their dropouts; `attention_mask`
# is what their preprocessor_config.json says of return_attention_mask
BASE = dict(_CONVS, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False, attention_mask=False)
LARGE = dict(_CONVS, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
             feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True, attention_mask=True)
# 20 samples a frame, an even positional kernel (the trimmed last frame) over 4 groups; each kind of block
_SMOKE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16,) * 3,
              conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=16,
              num_conv_pos_embedding_groups=4)
SMOKE_BASE, SMOKE_LARGE = dict(BASE, **_SMOKE), dict(LARGE, **_SMOKE)

MODELS = {"base": ("wav2vec2-base", BASE, "smoke-base", SMOKE_BASE),
          "large": ("wav2vec2-large-lv60", LARGE, "smoke-large", SMOKE_LARGE)}
CLIPS_S, SMOKE_CLIPS_S = (10, 30), (1, 2)
SR = 16000


def ctc_key(shape: dict) -> str:
    digest = hashlib.sha1(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]
    return f"wav2vec2-ctc-h{shape['hidden_size']}-l{shape['num_hidden_layers']}-{digest}-fp32"


def build_ctc(shape: dict, cache: Path, seed: int = 0) -> Path:
    """A saved random Wav2Vec2ForCTC of this shape in float32, with its feature extractor; built on first use."""
    out = Path(cache) / ctc_key(shape)
    if (out / "config.json").is_file() and (out / "preprocessor_config.json").is_file():
        return out
    import torch
    import transformers
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    C.log(f"building synthetic checkpoint {out.name} (once; cached) ...")
    cfg = {k: v for k, v in shape.items() if k != "attention_mask"}
    config = transformers.Wav2Vec2Config(**cfg, hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0,
                                         feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0)
    torch.manual_seed(seed)
    model = transformers.Wav2Vec2ForCTC(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # transformers' init leaves every norm at 1 and most biases at 0, which would hide a swapped or dropped one
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen), alpha=0.1 if "norm" in name and "weight" in name else 0.02)
    fe = transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SR, padding_value=0.0, do_normalize=True,
                                               return_attention_mask=shape["attention_mask"])
    return synth.save_whole(out, model, {"shape": shape, "seed": seed, "dtype": "float32"}, beside=[fe])


def _rows(label, r):
    rows = []
    for clip in r["clips"]:
        c = r["clip"][str(clip)]
        eager, sdpa, hf_front = C.med(c["hf_eager_s"]), C.med(c["hf_sdpa_s"]), C.med(c["hf_front_s"])
        for kind in r["kinds"]:
            k = c[kind]
            s, front = C.med(k["s"]), C.med(k["front_s"])
            rows.append(C.figure(
                f"ctc {label} {clip} s {kind}", s, "s/clip", "HF eager", eager, eager / s, "", None,
                note=f"{clip / s:.1f}x real time (HF eager {clip / eager:.1f}x, SDPA {clip / sdpa:.1f}x); "
                     f"{sdpa / s:.2f}x HF SDPA's {sdpa:.3g} s/clip; {c['frames']} frames, argmax as HF eager's "
                     f"in {k['agree_eager']:.4f}, SDPA's {k['agree_sdpa']:.4f}, logits within {k['rel_err']:.1e} "
                     f"(relative L2); front end {front:.3g} s against {hf_front:.3g} s; {len(k['s'])} run(s) each",
                rtf=clip / s, baseline_rtf=clip / eager, sdpa_s=sdpa, speedup_sdpa=sdpa / s,
                agreement=k["agree_eager"], agreement_sdpa=k["agree_sdpa"], rel_err=k["rel_err"], front_s=front,
                baseline_front_s=hf_front, frames=c["frames"]))
    return rows


def run(ctx: dict, names=tuple(MODELS)) -> list[dict]:
    """Each model of `names` (or its smoke shape): built once, then the worker below in a fresh process."""
    work = ctx["cache"] / "work"
    work.mkdir(parents=True, exist_ok=True)
    raw = ctx["raw"].setdefault("ctc", {})
    rows = []
    for name in names:
        label, shape, smoke_label, smoke_shape = MODELS[name]
        if ctx["smoke"]:
            label, shape = smoke_label, smoke_shape
        src = build_ctc(shape, ctx["cache"])
        out = work / f"ctc-{label}"
        C.rmtree(out)
        r = C.run_json([C.PY, __file__, "worker", str(src), str(out), "--runs", str(max(ctx["runs"], 1)),
                        "--clips", ",".join(map(str, SMOKE_CLIPS_S if ctx["smoke"] else CLIPS_S))])
        C.rmtree(out)
        raw[label.replace("-", "_")] = r
        rows += _rows(label, r)
    return rows


def worker(argv=None):
    """In a fresh process: convert SRC to float32 and to int8 under OUT, load both and transformers' model twice
    (eager, SDPA), and alternate them on each clip. One JSON line out."""
    import torch
    ap = argparse.ArgumentParser(prog="bench_ctc.py worker")
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--clips", default="10,30", help="clip lengths in seconds")
    a = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC
    from transformers.utils import logging as hf_logging

    from fmconvert.pipeline import Options, convert
    from fmconvert.runtime.classify import head_logits
    from fmconvert.runtime.load import load
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    clips = [int(x) for x in a.clips.split(",")]

    a.out.mkdir(parents=True, exist_ok=True)
    fms, convert_s = {}, {}
    for kind, int8 in (("fp32", False), ("int8", True)):
        t0 = time.perf_counter()
        convert(a.src, a.out / kind, Options(int8=int8, dtype="fp32", force=True), progress=False)
        convert_s[kind] = time.perf_counter() - t0
        fms[kind] = load(a.out / kind, device="cpu", check_hashes=False, dtype=torch.float32)
    hfs = {attn: Wav2Vec2ForCTC.from_pretrained(a.src, dtype=torch.float32, attn_implementation=attn).eval()
           for attn in ("eager", "sdpa")}
    fe = Wav2Vec2FeatureExtractor.from_pretrained(a.src)
    inputs = {}
    for clip in clips:
        b = fe(_voice(clip * SR).numpy(), sampling_rate=SR, return_tensors="pt")
        inputs[clip] = (b.input_values, b.get("attention_mask"))           # [1, samples], [1, samples] or None

    def fm_logits(fm, waves, mask):
        hidden, pooled = fm(waves, attention_mask=mask)
        return head_logits(fm, hidden, pooled, fm.frames)[0]             # [frames, vocab]

    def hf_logits(hf, waves, mask):
        return hf(waves, attention_mask=mask).logits[0].float()

    def fm_front(fm, waves, mask):
        return fm.wave_front(waves, mask)

    def hf_front(hf, waves, mask):
        # what wave_front covers: the conv stack, the features' norm and projection, the positional conv added
        w = hf.wav2vec2
        x, _ = w.feature_projection(w.feature_extractor(waves).transpose(1, 2))
        return x + w.encoder.pos_conv_embed(x)

    def timed(fn, *args):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = fn(*args)
        return out, time.perf_counter() - t0

    sides = [(f"fm_{k}", fm_logits, m) for k, m in fms.items()] + [(f"hf_{k}", hf_logits, m) for k, m in hfs.items()]
    fronts = [(f"fm_{k}", fm_front, m) for k, m in fms.items()] + [("hf", hf_front, hfs["eager"])]
    t0 = time.perf_counter()
    logits = {clip: {name: timed(fn, m, *inputs[clip])[0] for name, fn, m in sides} for clip in clips}
    for clip in clips:
        for _, fn, m in fronts:
            timed(fn, m, *inputs[clip])
    warmup_s = time.perf_counter() - t0
    secs = {clip: {name: [] for name, _, _ in sides} for clip in clips}
    front_s = {clip: {name: [] for name, _, _ in fronts} for clip in clips}
    for i in range(a.runs):
        for clip in clips:
            for name, fn, m in sides[i % len(sides):] + sides[:i % len(sides)]:      # no side always first
                secs[clip][name].append(timed(fn, m, *inputs[clip])[1])
            for name, fn, m in fronts[i % len(fronts):] + fronts[:i % len(fronts)]:
                front_s[clip][name].append(timed(fn, m, *inputs[clip])[1])

    r = {"clips": clips, "kinds": list(fms), "clip": {}, "convert_s": convert_s, "warmup_s": warmup_s,
         "threads": torch.get_num_threads(), "attention_mask": inputs[clips[0]][1] is not None,
         "params": sum(p.numel() for p in hfs["eager"].parameters())}
    for clip in clips:
        got = logits[clip]
        ref, sdpa = got["hf_eager"], got["hf_sdpa"]
        c = {"frames": ref.shape[0], "samples": inputs[clip][0].shape[1], "hf_eager_s": secs[clip]["hf_eager"],
             "hf_sdpa_s": secs[clip]["hf_sdpa"], "hf_front_s": front_s[clip]["hf"],
             "hf_sdpa_agree_eager": (sdpa.argmax(-1) == ref.argmax(-1)).float().mean().item()}
        for kind in fms:
            x = got[f"fm_{kind}"]
            if x.shape != ref.shape:
                raise SystemExit(f"fmconvert {kind} made logits {list(x.shape)}, transformers {list(ref.shape)}")
            c[kind] = {"s": secs[clip][f"fm_{kind}"], "front_s": front_s[clip][f"fm_{kind}"],
                       "agree_eager": (x.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                       "agree_sdpa": (x.argmax(-1) == sdpa.argmax(-1)).float().mean().item(),
                       "rel_err": ((x - ref).norm() / ref.norm()).item()}
        r["clip"][str(clip)] = c
    print(json.dumps(r))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker(argv[1:])
    ctx = C.parse_args("CPU speech recognition by CTC", argv, sections={name: None for name in MODELS})
    C.main_one(ctx, lambda ctx: run(ctx, ctx["only"]))


if __name__ == "__main__":
    main()
