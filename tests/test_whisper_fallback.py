"""Whisper's long-form heuristics against transformers' generate(): a text prompt (prompt_ids, for the first window or
every one), conditioning each window on the text before it (condition_on_prev_tokens), temperature fallback on the
compression ratio and the mean log probability (sampled windows drawn as transformers draws them, from one seeded
generator), and windows skipped as silence (no_speech_threshold); the measures each segment reports; bad settings
refused in one line."""

from __future__ import annotations

import pytest
import torch

from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.speech import compression_ratio, fallback_of, transcribe
from test_whisper import GEN, STAMPS, build, features, long_features, long_form_input, save, write_wav

PREV = 98                      # the tiny vocabulary's <|startofprev|> (prev_sot_token_id)
TEXT = [98, 12, 40, 41, 77]    # get_prompt_ids' shape: <|startofprev|>, then the prompt's text
CONFIG = {**GEN, "prev_sot_token_id": PREV}
STAMPED = {**STAMPS, "prev_sot_token_id": PREV}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """transformers' model (its generation config with timestamps allowed), its conversion loaded, and its
    directory."""
    import transformers

    from fmconvert.runtime.load import load
    root = tmp_path_factory.mktemp("whisper_fb")
    hf = build()
    hf.generation_config = transformers.GenerationConfig(**STAMPED)
    convert(save(root / "src", hf), root / "out", Options(), progress=False)
    return hf, load(root / "out"), root / "out"


def hf_segments(hf, feats, seed=None, **kw):
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = hf.generate(input_features=feats, return_segments=True, **kw)
    return out["sequences"][0].tolist(), [(round(float(s["start"]), 6), round(float(s["end"]), 6),
                                          s["tokens"].tolist()) for s in out["segments"][0]]


def ours(m, feats, gc, seed=0, **kw):
    got = transcribe(m, feats, gc, eos_token_id=99, seed=seed, **kw)[0][0]
    return got.tokens, [(round(s.start, 6), round(s.end, 6), s.tokens) for s in got.segments], got


def test_a_prompt_and_earlier_text_as_transformers(pair):
    """A text prompt before the first window (first-segment), or before every one with the text read so far
    (all-segments), and each window conditioned on the last tokens before it: the same tokens and segments as
    transformers, which each of them changes."""
    hf, m, _ = pair
    feats = long_features(3.7)
    seen = set()
    for kw in (dict(), dict(condition_on_prev_tokens=True), dict(prompt_ids=TEXT),
               dict(prompt_ids=TEXT, condition_on_prev_tokens=True),
               dict(prompt_ids=TEXT, condition_on_prev_tokens=True, prompt_condition_type="all-segments")):
        want = hf_segments(hf, feats, language="en", **{k: torch.tensor(v) if k == "prompt_ids" else v
                                                        for k, v in kw.items()})
        got = ours(m, feats, STAMPED, language="en", **kw)[:2]
        assert got == want, kw
        assert len(want[1]) >= 3
        seen.add(str(want))
    assert len(seen) == 5


def test_a_prompt_on_a_batch_of_short_clips(pair):
    """One window each, side by side, language detected: the prompt goes before every row's start token."""
    hf, m, _ = pair
    feats = features(2)
    with torch.no_grad():
        want = hf.generate(input_features=feats, prompt_ids=torch.tensor(TEXT), max_new_tokens=9).tolist()
        plain = hf.generate(input_features=feats, max_new_tokens=9).tolist()
    got = [t.tokens for t in transcribe(m, feats, STAMPED, eos_token_id=99, prompt_ids=TEXT, max_new_tokens=9)[0]]
    assert got == [row[:row.index(99)] if 99 in row else row for row in want]
    assert want != plain


def test_fallback_as_transformers(pair):
    """Temperature fallback: a window whose mean log probability is below the threshold, or whose tokens compress
    too well, is decoded again at the next temperature (sampled, top-k 50, from the seeded generator); the
    thresholds placed between the windows' own measures, so that some windows are kept greedy and some are not.
    The same tokens and segments as transformers with torch.manual_seed, for two seeds."""
    hf, m, _ = pair
    feats = long_features(3.7)
    temps = (0.0, 0.4, 0.8)
    greedy = ours(m, feats, STAMPED, language="en", fallback=fallback_of(STAMPED, logprob_threshold=-1e9))[2]
    means = sorted({s.avg_logprob for s in greedy.segments})
    ratios = sorted({s.compression_ratio for s in greedy.segments})
    assert len(means) >= 2 and len(ratios) >= 2
    for kw in (dict(logprob_threshold=(means[0] + means[1]) / 2),
               dict(compression_ratio_threshold=(ratios[-2] + ratios[-1]) / 2),
               dict(logprob_threshold=0.0)):                   # every window falls back to the hottest
        for seed in (0, 1):
            want = hf_segments(hf, feats, seed, language="en", temperature=temps, **kw)
            got, segs, tr = ours(m, feats, STAMPED, seed, language="en", fallback=fallback_of(STAMPED, temps, **kw))
            assert (got, segs) == want, (kw, seed)
            assert {s.temperature for s in tr.segments} > {0.0} or kw.get("logprob_threshold") == 0.0
        if kw.get("logprob_threshold") == 0.0:
            assert {s.temperature for s in tr.segments} == {0.8}
        assert want != hf_segments(hf, feats, language="en")


def test_fallback_on_a_batch_keeps_each_row_its_own(pair):
    """Short clips side by side: only the rows that fail are decoded again, as a smaller batch, as transformers.
    (No max_new_tokens: transformers' second try forgets it and runs to max_length.)"""
    import transformers
    _, m, _ = pair
    hf = build()          # timestamps suppressed, as a released model never gives them after <|notimestamps|>
    hf.generation_config = transformers.GenerationConfig(**CONFIG)
    feats = features(3, seed=5)
    temps = (0.0, 0.6)
    probe = transcribe(m, feats, CONFIG, "de", eos_token_id=99, fallback=fallback_of(CONFIG, logprob_threshold=-1e9))
    means = sorted(t.segments[0].avg_logprob for t in probe[0])
    threshold = (means[0] + means[1]) / 2       # the likeliest rows kept greedy, the least likely one sampled
    for seed in (0, 3):
        torch.manual_seed(seed)
        with torch.no_grad():
            want = hf.generate(input_features=feats, language="de", temperature=temps,
                               logprob_threshold=threshold).tolist()
        got = transcribe(m, feats, CONFIG, "de", eos_token_id=99, seed=seed,
                         fallback=fallback_of(CONFIG, temps, logprob_threshold=threshold))[0]
        assert [t.tokens for t in got] == [row[:row.index(99)] if 99 in row else row for row in want]
        assert sorted(t.segments[0].temperature for t in got) == [0.0, 0.0, 0.6]


def test_beam_search_with_fallback_as_transformers(pair):
    """With beams, the temperature-0 try is a beam search judged by its hypothesis's score; a failing one is sampled
    at the next temperature (one window: transformers keeps beams off for the rest of a call after sampling)."""
    import transformers
    _, m, _ = pair
    hf = build()
    hf.generation_config = transformers.GenerationConfig(**CONFIG)
    feats = features(1, seed=6)
    for threshold, temps in ((-1e9, {0.0}), (0.0, {0.7})):
        torch.manual_seed(2)
        with torch.no_grad():
            want = hf.generate(input_features=feats, language="en", num_beams=3, temperature=(0.0, 0.7),
                               logprob_threshold=threshold).tolist()[0]
        got = transcribe(m, feats, CONFIG, "en", eos_token_id=99, num_beams=3, seed=2,
                         fallback=fallback_of(CONFIG, (0.0, 0.7), logprob_threshold=threshold))[0][0]
        assert got.tokens == (want[:want.index(99)] if 99 in want else want)
        assert {s.temperature for s in got.segments} == temps


def test_silent_windows_are_skipped_as_transformers(pair):
    """A window whose mean log probability is below the threshold and whose <|nospeech|> probability is above
    no_speech_threshold is skipped: no text, the next window 30 s on; placed between the windows' probabilities,
    some are skipped and some read."""
    hf, m, _ = pair
    feats = long_features(3.7)
    probe = ours(m, feats, STAMPED, language="en", fallback=fallback_of(STAMPED, logprob_threshold=0.0,
                                                                       no_speech_threshold=2.0))[2]
    probs = sorted({s.no_speech_prob for s in probe.segments})
    assert len(probs) >= 2 and all(0 < p < 1 for p in probs)
    kw = dict(logprob_threshold=0.0, no_speech_threshold=(probs[0] + probs[1]) / 2)
    want = hf_segments(hf, feats, language="en", temperature=0.0, **kw)     # transformers needs one given here
    got = ours(m, feats, STAMPED, language="en", fallback=fallback_of(STAMPED, **kw))
    assert got[:2] == want
    assert 0 < len(want[1]) < len(probe.segments)
    assert all(s.no_speech_prob <= kw["no_speech_threshold"] for s in got[2].segments)


def test_the_measures_and_the_generation_configs_thresholds(pair):
    """compression_ratio is transformers' (zlib over the tokens' bytes); thresholds the generation config sets are
    used, one given wins; each segment reports the temperature it was read at."""
    from transformers.models.whisper.generation_whisper import WhisperGenerationMixin
    for tokens, vocab in (([5, 6, 7] * 20, 120), (list(range(300)), 51865), ([1], 2)):
        assert compression_ratio(tokens, vocab) == \
            WhisperGenerationMixin._retrieve_compression_ratio(torch.tensor(tokens), vocab)
    assert compression_ratio([5, 6, 7] * 20, 120) > compression_ratio(list(range(60)), 120)
    gc = {**STAMPED, "logprob_threshold": -0.5, "compression_ratio_threshold": 2.0, "top_k": 7}
    fb = fallback_of(gc, [0.0, 0.5], logprob_threshold=-1.0)
    assert (fb.temperatures, fb.logprob, fb.compression_ratio, fb.no_speech, fb.top_k) == ((0.0, 0.5), -1.0, 2.0,
                                                                                          None, 7)
    hf, m, _ = pair
    got = transcribe(m, long_features(3.7), gc, "en", eos_token_id=99)[0][0]
    assert all(s.avg_logprob is not None and s.compression_ratio > 0 and s.temperature == 0.0 for s in got.segments)


@pytest.mark.parametrize("kw,match", [
    (dict(fallback_args=dict(no_speech_threshold=0.5)), "needs a log-probability threshold"),
    (dict(fallback_args=dict(temperature=[0.0, -1.0])), "temperatures must be numbers"),
    (dict(fallback_args=dict(logprob_threshold="x")), "logprob_threshold must be a number"),
    (dict(prompt_condition_type="all-segments", prompt_ids=TEXT), "needs condition_on_prev_tokens"),
    (dict(prompt_condition_type="every"), "first-segment or all-segments"),
    (dict(prompt_ids=[98, 500]), "ids of the model's 120"),
    (dict(prompt_ids=[98] + [12] * 30, max_new_tokens=20), "ask for at most 5"),
    (dict(fallback_args=dict(temperature=[0.0, 0.5]), on_token=print), "none are streamed"),
])
def test_bad_settings_are_refused_in_one_line(pair, kw, match):
    hf, m, _ = pair
    kw = dict(kw)
    fb = kw.pop("fallback_args", None)
    with pytest.raises(FmError, match=match) as e:
        transcribe(m, features(1), STAMPED, "en", eos_token_id=99,
                   fallback=None if fb is None else fallback_of(STAMPED, **fb), **kw)
    assert "\n" not in str(e.value)


def test_cli_fallback_prompt_and_measures(pair, tmp_path, capsys):
    """`transcribe --fallback` is the model card's recipe (temperatures 0 to 1, compression 1.35, log probability -1,
    no speech 0.6), --prompt the tokenizer's prompt ids: the JSON's segments are transformers' with the same
    settings and seed, each with the temperature and measures of its window; the summary counts the windows decoded
    again; bad settings are refused in one line."""
    import json

    from corpus import run_main
    from test_whisper import tokenizer
    hf, _, out = pair
    wav = write_wav(tmp_path / "talk.wav", 3.1, 16000, 1, 300.0)
    feats = long_form_input(wav)
    tok = tokenizer()
    recipe = dict(temperature=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), compression_ratio_threshold=1.35,
                  logprob_threshold=-1.0, no_speech_threshold=0.6)
    for extra, kw in (([], {}), (["--prompt", "w12 w40", "--seed", "3"], dict(prompt_ids=torch.tensor([98, 12, 40])))):
        torch.manual_seed(3 if extra else 0)
        with torch.no_grad():
            segs = hf.generate(input_features=feats, language="en", return_segments=True, **recipe,
                               **kw)["segments"][0]
        want = [(round(float(s["start"]), 3), round(float(s["end"]), 3),
                 tok.decode([t for t in s["tokens"].tolist() if t < 108], skip_special_tokens=True).strip())
                for s in segs]
        code, stdout, err = run_main(capsys, "transcribe", out, wav, "-l", "en", "--fallback", "--format", "json",
                                     *extra)
        assert code == 0, err
        row = json.loads(stdout)
        assert [(s["start"], s["end"], s["text"]) for s in row["segments"]] == [w for w in want if w[2]]
        assert all({"temperature", "avg_logprob", "compression_ratio", "no_speech_prob"} <= set(s)
                   for s in row["segments"])
        assert "decoded again" in err and "skipped as silence" in err
    assert any(s["temperature"] > 0 for s in row["segments"])
    for args, match in [(["--temperature", "0,hot"], "numbers separated by commas"),
                        (["--prompt-every-window"], "give a --prompt"),
                        (["--prompt", "w1", "--prompt-every-window"], "needs condition_on_prev_tokens"),
                        (["--no-speech-threshold", "0.5"], "needs a log-probability threshold"),
                        (["--prompt", "<|en|> w5"], "special token")]:
        code, stdout, err = run_main(capsys, "transcribe", out, wav, "-l", "en", *args)
        assert code != 0 and match in err and len(err.strip().splitlines()) == 1 and not stdout, (args, err)


def test_long_files_side_by_side(pair):
    """Clips past one window decoded side by side, each from its own features (zero-padded past its frames): the
    tokens and segments transformers gives the batch with its attention mask, and each clip's as when alone;
    with fallback too."""
    from test_whisper import feature_extractor

    from fmconvert.runtime.speech import long_features
    hf, m, _ = pair
    n = torch.Generator().manual_seed(1)
    waves = [torch.randn(int(16000 * s), generator=n) * 0.1 + torch.sin(torch.arange(int(16000 * s)) / f)
             for s, f in ((3.7, 9.0), (2.3, 4.0))]
    feats, frames = long_features(feature_extractor(), waves)
    assert feats.shape[-1] == frames[0] > frames[1] > 100
    mask = (torch.arange(feats.shape[-1]) < torch.tensor(frames)[:, None]).long()
    for kw in (dict(), dict(temperature=(0.0, 0.5), logprob_threshold=-0.62)):    # some windows' mean is below
        torch.manual_seed(0)
        with torch.no_grad():
            want = hf.generate(input_features=feats, attention_mask=mask, language="en", return_segments=True,
                               **kw)["segments"]
        fb = fallback_of(STAMPED, kw.get("temperature"), logprob_threshold=kw.get("logprob_threshold"))
        got = transcribe(m, feats, STAMPED, "en", eos_token_id=99, frames=frames, fallback=fb)[0]
        for g, w in zip(got, want):
            assert [(round(s.start, 6), round(s.end, 6), s.tokens) for s in g.segments] == \
                [(round(float(s["start"]), 6), round(float(s["end"]), 6), s["tokens"].tolist()) for s in w]
        if not kw:
            alone = [transcribe(m, feats[i:i + 1, :, :frames[i]], STAMPED, "en", eos_token_id=99)[0][0].tokens
                     for i in range(2)]
            assert [g.tokens for g in got] == alone
    assert len(got[1].segments) >= 2 and 0.5 in {s.temperature for g in got for s in g.segments}


def test_cli_long_files_in_one_batch(pair, tmp_path, capsys):
    """Two files past one window in one --batch-size 2 call print what each prints alone."""
    import json

    from corpus import run_main
    _, _, out = pair
    wavs = [write_wav(tmp_path / "a.wav", 2.7, 16000, 1, 300.0), write_wav(tmp_path / "b.wav", 1.9, 16000, 1, 700.0)]
    alone = []
    for w in wavs:
        code, stdout, err = run_main(capsys, "transcribe", out, w, "-l", "en", "--format", "json")
        assert code == 0, err
        alone.append(json.loads(stdout))
    code, stdout, err = run_main(capsys, "transcribe", out, *wavs, "-l", "en", "--format", "json", "--batch-size", "2")
    assert code == 0, err
    both = [json.loads(line) for line in stdout.splitlines()]
    assert both == alone and all(len(r["segments"]) >= 2 for r in both)


def test_timestamps_said_unasked_cut_the_window_as_transformers(pair):
    """A model that says a pair of timestamp tokens after <|notimestamps|> (this tiny one does; the released ones do
    not): transformers cuts its text there and reads the rest of the window again from the pair; so does fmconvert."""
    hf, m, _ = pair
    feats = features(3, seed=5)
    with torch.no_grad():
        want = hf.generate(input_features=feats, language="de", return_segments=True)["segments"]
    got = transcribe(m, feats, STAMPED, "de", eos_token_id=99, timestamps=False)[0]
    assert [[(round(s.start, 6), round(s.end, 6), s.tokens) for s in g.segments] for g in got] == \
        [[(round(float(s["start"]), 6), round(float(s["end"]), 6), s["tokens"].tolist()) for s in w] for w in want]
    assert max(len(w) for w in want) > 3
