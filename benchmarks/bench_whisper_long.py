"""Whisper's long-form transcription on CPU: files past 30 s decoded one at a time against side by side
(`transcribe(frames=)`), and the cost of word timestamps (`word_timestamps=True`), each with the same tokens
required. whisper-base's shape with random weights (built once under benchmarks/.cache by bench_seq2seq.py's
`build_whisper`), float32, seeded synthetic voice.

    python benchmarks/bench_whisper_long.py [--files 4] [--seconds 45] [--runs 2] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
# whisper-base's alignment heads (its generation_config.json); the synthetic config has none
BASE_HEADS = [[3, 1], [4, 2], [4, 3], [4, 7], [5, 1], [5, 2], [5, 4], [5, 6]]


def main(argv=None):
    from bench_seq2seq import WHISPER_MODELS, WHISPER_SMOKE, _voice, build_whisper

    from fmconvert.pipeline import Options, convert
    from fmconvert.runtime.load import load
    from fmconvert.runtime.speech import feature_extractor, long_features, transcribe
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=45.0)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="a tiny model, one run: the script still works")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    cache = ROOT / ".cache"
    shape = WHISPER_SMOKE if a.smoke else dict(WHISPER_MODELS)["whisper-base"]
    src = build_whisper(shape, cache)
    out = src.with_name(src.name + "-fmconvert")
    if not (out / "manifest.json").is_file():
        convert(src, out, Options(), progress=False)
    m = load(out, dtype=torch.float32, check_hashes=False)
    gc = json.loads((out / "generation_config.json").read_text())
    if not a.smoke:
        gc["alignment_heads"] = BASE_HEADS
    else:
        gc["alignment_heads"] = [[0, 0], [1, 1]]
    fe = feature_extractor(out)
    seconds = 2 * fe.chunk_length if a.smoke else a.seconds
    waves = [_voice(int(16000 * seconds), seed=s) for s in range(a.files)]
    runs = 1 if a.smoke else a.runs

    def decode(batch, words=False):
        tokens, t0, n = [], time.perf_counter(), 0
        for j in range(0, len(waves), batch):
            feats, frames = long_features(fe, waves[j:j + batch])
            got, st = transcribe(m, feats, gc, "en", frames=frames, word_timestamps=words)
            tokens += [g.tokens for g in got]
            n += st.new_tokens
        return tokens, time.perf_counter() - t0, n
    rows = []
    with torch.inference_mode():
        decode(len(waves))                                      # warm up
        for _ in range(runs):
            one, t_one, n = decode(1)
            side, t_side, _ = decode(len(waves))
            worded, t_words, _ = decode(len(waves), words=True)
            rows.append(dict(files=len(waves), audio_s=seconds * len(waves), new_tokens=n, one_at_a_time_s=t_one,
                             side_by_side_s=t_side, side_by_side_with_words_s=t_words,
                             same_tokens=one == side == worded, threads=torch.get_num_threads()))
            print(f"{len(waves)} files of {seconds:.0f} s, {n} tokens: one at a time {t_one:.2f} s, side by side "
                  f"{t_side:.2f} s ({t_one / t_side:.2f}x), with word timestamps {t_words:.2f} s "
                  f"(+{100 * (t_words / t_side - 1):.0f}%); same tokens {rows[-1]['same_tokens']}", file=sys.stderr)
    if a.json:
        a.json.write_text(json.dumps(rows))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
