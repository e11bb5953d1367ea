"""Whisper's token and word timestamps (runtime/alignment.py) against transformers: generate(return_token_timestamps=
True)'s times, each window's as it computes them and as it returns them, one row and two that end apart, with and
without the frames that hold audio, at tp 1 and 2, with beams, int8 within its error; the speech pipeline's
return_timestamps="word" chunks, one window and several, through a byte-level tokenizer whose words span tokens
and characters; bad alignment heads refused in one line.

Our decode is speech.transcribe's, each window's generate() (or beam_search()) watched: right after it returns, the
model still attached to the window, cross_weights reads its alignment heads; token_times runs when the window's seek
is known. `timed` below is the recipe a caller follows."""

from __future__ import annotations

import pytest
import torch

import tiny
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert
from fmconvert.runtime import alignment, speech
from fmconvert.runtime.alignment import alignment_heads, cross_weights, decoder_inputs, token_times, words
from fmconvert.runtime.load import load
from test_whisper import GEN, STAMPS, build, feature_extractor, features

HEADS = [[0, 1], [1, 2], [1, 0]]
END, NEW = GEN["eos_token_id"], 14
BEGIN = GEN["no_timestamps_token_id"] + 1


def ending(stamps=False):
    """test_whisper's tiny Whisper, its end token's embedding (tied to the head) near that of a word it often says,
    so that rows end apart (test_whisper_beam's trick); alignment heads in its generation config."""
    import transformers
    hf = build()
    with torch.no_grad():
        emb = hf.model.decoder.embed_tokens.weight
        emb[END] = emb[93] + 0.05 * torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(1))
    hf.generation_config = transformers.GenerationConfig(**gc_of(stamps))
    return hf


def gc_of(stamps=False) -> dict:
    return {**(STAMPS if stamps else GEN), "alignment_heads": HEADS}


@pytest.fixture(scope="module")
def hf():
    return ending()


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """The conversions: float at tp 1 and 2, int8 at tp 1."""
    src = tmp_path_factory.mktemp("whisper_words") / "src"
    ending().save_pretrained(src)
    dirs = {}
    for name, opts in (("tp1", Options()), ("tp2", Options(tp=2)), ("int8", Options(int8=True))):
        convert(src, src.parent / name, opts, progress=False)
        dirs[name] = src.parent / name
    return dirs


def watched(monkeypatch, gc) -> dict:
    """rank -> each window transcribe decodes from now on, as (its decode's output, prompt length, cross
    weights), read the moment its generate() or beam_search() returns."""
    windows = {0: [], 1: []}

    def watch(fn):
        def run(model, source, new, *args, **kw):
            given, seen = kw.get("decoder_prompt"), {}

            def prompt(m):
                p = given(m) if callable(given) else given
                seen["P"] = p.shape[1]
                return p
            kw["decoder_prompt"] = prompt
            out, st = fn(model, source, new, *args, **kw)
            fed = decoder_inputs(out, seen["P"], gc["eos_token_id"], gc["pad_token_id"])
            windows[model.rank].append((out, seen["P"], cross_weights(model, fed, alignment_heads(gc, model))))
            return out, st
        return run
    monkeypatch.setattr(speech, "generate", watch(speech.generate))
    monkeypatch.setattr(speech, "beam_search", watch(speech.beam_search))
    return windows


def timed(windows, num_frames=None, window_frames=100) -> tuple[list, list]:
    """One row's transcript from its windows (watched): each window's tokens as transformers keeps them (up to its
    last whole segment), each one's time offset by the window's start (its seek, in 10 ms frames); the frames with
    audio counted from the window's start. -> (every window's raw times [P + N], (tokens, times) of the row)."""
    raw, tokens, times, seek = [], [], [], 0
    for out, P, w in windows:
        nf = None if num_frames is None else [num_frames - seek]
        t = token_times(w[:1], P, nf)[0]
        raw.append(t)
        row = out[0, P:].tolist()
        row = row[:row.index(END)] if END in row else row
        stamp = [x >= BEGIN for x in row]
        cuts = [i + 1 for i in range(len(row) - 1) if stamp[i] and stamp[i + 1]]
        if cuts and stamp[-2:] != [False, True]:            # cut mid-segment: read again from its last whole one
            keep, step = cuts[-1] + 1, (row[cuts[-1] - 1] - BEGIN) * 2
        else:
            keep, step = len(row), window_frames
        tokens += row[:keep]
        times += (t[P:P + keep] + seek * 0.01).tolist()
        seek += step
    return raw, (tokens, times)


def theirs(hf, feats, **kw):
    with torch.no_grad():
        return hf.generate(input_features=feats, return_token_timestamps=True, return_segments=True,
                           max_new_tokens=NEW, **kw)


def returned(raw: torch.Tensor, P: int, rows: list) -> torch.Tensor:
    """generate()'s token_timestamps from the windows' raw times: each row's new tokens before its end token, the
    rows padded with their last time."""
    n = max(len(r) for r in rows)
    return torch.stack([torch.cat([t[P:P + len(r)], t[P + len(r) - 1:P + len(r)].expand(n - len(r))])
                        for t, r in zip(raw, rows)])


@pytest.mark.parametrize("tp", [1, 2])
def test_token_timestamps_as_transformers(hf, out, monkeypatch, tp):
    """Two rows ending apart, and one; with no frames given and with each row's frames (the feature extractor's
    attention mask, two lengths, then one): every window's times are transformers', exactly, on every rank, and so
    are the times generate() returns."""
    feats = features(2, 3)
    mask = torch.zeros(2, 100, dtype=torch.long)
    mask[0, :83], mask[1, :61] = 1, 1
    cases = [(feats, None), (feats, mask), (feats[1:], None), (feats, torch.ones(2, 100, dtype=torch.long))]
    want = [theirs(hf, f, language="en", **({} if m is None else dict(attention_mask=m))) for f, m in cases]
    assert len({len(s[0]["tokens"]) for s in want[0]["segments"]}) == 2     # one row ends, the other runs on

    windows = watched(monkeypatch, gc_of())

    def run(m):
        got = []
        for f, mk in cases:
            speech.transcribe(m, f, gc_of(), "en", max_new_tokens=NEW)
            o, P, w = windows[m.rank].pop()
            got.append((o, P, token_times(w, P, None if mk is None else mk.sum(-1))))
        return got
    for got in tiny.on_ranks(out[f"tp{tp}"], tp, run):
        for (o, P, times), res in zip(got, want):
            raw = torch.stack([s[0]["result"]["token_timestamps"] for s in res["segments"]])
            assert times.shape == raw.shape and torch.equal(times, raw)
            rows = [s[0]["tokens"].tolist() for s in res["segments"]]
            assert torch.equal(returned(times, P, rows), res["token_timestamps"])
    assert not torch.equal(want[0]["token_timestamps"], want[1]["token_timestamps"])    # the frames matter


def test_long_form_times_as_transformers(out, monkeypatch):
    """Audio of several windows: each window's times, offset by where it starts and cut where transformers cuts its
    text, are its segments' token_timestamps, exactly. (What its generate() returns as token_timestamps leaves the
    offsets out: each window's times start again from 0.)"""
    hf, fe = ending(stamps=True), feature_extractor()
    inputs = fe(tone(2.6), sampling_rate=16000, return_attention_mask=True, return_tensors="pt", truncation=False,
                padding="longest")
    with torch.no_grad():
        res = hf.generate(input_features=inputs.input_features, attention_mask=inputs.attention_mask,
                          return_token_timestamps=True, return_segments=True, language="en")
    windows = watched(monkeypatch, gc_of(True))
    frames = [int(inputs.attention_mask.sum())]
    got = speech.transcribe(load(out["tp1"]), inputs.input_features, gc_of(True), "en", timestamps=True,
                            word_timestamps=True, frames=frames)[0][0]
    raw, (tokens, times) = timed(windows[0], frames[0])
    segments = res["segments"][0]
    assert len(raw) > 2 and tokens == torch.cat([s["tokens"] for s in segments]).tolist()
    want = torch.cat([s["token_timestamps"] for s in segments])
    assert torch.equal(torch.tensor(times), want)
    # transcribe's own: each segment's tokens' times
    assert [len(s.token_times) for s in got.segments] == [len(s["tokens"]) for s in segments]
    assert torch.equal(torch.tensor([t for s in got.segments for t in s.token_times]), want)
    first = sum(len(s["tokens"]) for s in segments if s["result"] is segments[0]["result"])
    assert torch.equal(res["token_timestamps"][0, :first], want[:first])
    assert res["token_timestamps"][0].max() < 1.0 < want.max()


def test_beams_as_transformers(hf, out, monkeypatch):
    """With beams the best hypothesis, read again teacher-forced, gives transformers' times, which it gathers from
    each step's beam: one row, and of two the longer. Not the shorter: transformers reads its steps after its end
    from row 0 of the batch's beams (a beam index of -1 taken as 0), another hypothesis."""
    m = load(out["tp1"])
    for B, seed, same in ((1, 5, [True]), (2, 3, [True, False])):
        feats = features(B, seed)
        res = theirs(hf, feats, language="en", num_beams=3)
        windows = watched(monkeypatch, gc_of())
        speech.transcribe(m, feats, gc_of(), "en", max_new_tokens=NEW, num_beams=3)
        monkeypatch.undo()
        (o, P, w), = windows[0]
        rows = [s[0]["tokens"].tolist() for s in res["segments"]]
        assert rows == [r[:r.index(END)] if END in r else r for r in o[:, P:].tolist()]
        raw = torch.stack([s[0]["result"]["token_timestamps"] for s in res["segments"]])
        got = token_times(w, P)
        assert [torch.equal(g, r) for g, r in zip(got, raw)] == same
        assert B == 1 or len(rows[1]) < len(rows[0])


def test_int8_stays_close(hf, out):
    """int8 (whose tokens drift from float's on this model of large weights): over transformers' own decode, its
    alignment heads' weights stay close, and the times within a few positions."""
    feats = features(2, 3)
    res = theirs(hf, feats, language="en")
    seqs = torch.stack([s[0]["result"]["sequences"] for s in res["segments"]])
    raw = torch.stack([s[0]["result"]["token_timestamps"] for s in res["segments"]])
    got = {}
    for name in ("tp1", "int8"):
        m = load(out[name])
        m.attach(m.source_encoder.hidden(feats))
        got[name] = cross_weights(m, decoder_inputs(seqs, 4, END, END), alignment_heads(gc_of(), m))
    assert torch.equal(token_times(got["tp1"], 4), raw)
    assert tiny.rel(got["int8"], got["tp1"]) < 0.25
    assert (token_times(got["int8"], 4) - raw).abs().max() <= 0.1


def byte_chars() -> dict:
    """GPT-2's byte-level alphabet: byte -> the printable character that stands for it."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


# what the byte-level tokenizer's ids spell where the tiny model says them most: a word, a piece that goes on one,
# marks the pipeline joins to the word before or after, é in two tokens (half a character each); the rest " w<id>"
PIECES = {35: " the", 93: "ing", 75: ",", 77: " (", 85: b"\xc3", 0: b"\xa9", 1: " caf", 2: "'", 4: " 東京"}


def whisper_tokenizer():
    """A WhisperTokenizer (byte-level BPE) over the tiny vocabulary: PIECES, the special tokens of test_whisper's
    tokenizer with <|startofprev|> at 106, timestamps from 108 on."""
    from transformers import WhisperTokenizer
    chars = byte_chars()
    spell = [PIECES.get(i, f" w{i}") for i in range(99)]
    vocab = {"".join(chars[b] for b in (s if isinstance(s, bytes) else s.encode())): i for i, s in enumerate(spell)}
    special = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|fr|>", "<|de|>", "<|translate|>",
               "<|transcribe|>", "<|startofprev|>", "<|notimestamps|>"]
    vocab.update({t: 99 + i for i, t in enumerate(special)})
    vocab.update({f"<|{i * 0.02:.2f}|>": BEGIN + i for i in range(120 - BEGIN)})
    return WhisperTokenizer(vocab=vocab, merges=[], additional_special_tokens=special[1:])


def tone(seconds: float):
    """test_whisper.long_features' audio, 16 kHz samples: a tone over noise."""
    n = int(16000 * seconds)
    noise = torch.randn(n, generator=torch.Generator().manual_seed(0))
    return (torch.sin(2 * torch.pi * 300 * torch.arange(n) / 16000) * 0.3 + 0.05 * noise).numpy()


def test_words_as_the_pipeline(out, monkeypatch):
    """The speech pipeline's return_timestamps="word" chunks (its default five beams, and greedy), from a clip of one
    window and one of several: ours from transcribe's windows' tokens and times. Its words span tokens and
    characters, and marks join the words beside them."""
    import transformers
    hf, tok, fe = ending(stamps=True), whisper_tokenizer(), feature_extractor()
    pipe = transformers.pipeline("automatic-speech-recognition", model=hf, tokenizer=tok, feature_extractor=fe)
    m = load(out["tp1"])
    seen = set()
    for seconds, beams in ((0.8, 5), (2.6, 5), (2.6, 1)):
        wave = tone(seconds)
        want = pipe(wave, return_timestamps="word", generate_kwargs=dict(language="en", num_beams=beams))["chunks"]
        kw = dict(truncation=False, padding="longest") if seconds > 1 else {}
        inputs = fe(wave, sampling_rate=16000, return_attention_mask=True, return_tensors="pt", **kw)
        windows = watched(monkeypatch, gc_of(True))
        got = speech.transcribe(m, inputs.input_features, gc_of(True), "en", timestamps=True, num_beams=beams,
                                word_timestamps=True, frames=[int(inputs.attention_mask.sum())])[0][0]
        monkeypatch.undo()
        raw, (tokens, times) = timed(windows[0], int(inputs.attention_mask.sum()))
        assert tokens == got.tokens and (len(raw) == 1) == (seconds < 1)
        assert words(tok, tokens, times) == want
        assert words(tok, got.tokens, [t for s in got.segments for t in s.token_times]) == want
        seen |= {w["text"] for w in want}
    assert {" ( ( the", " theinging", ",ing\ufffd\ufffd\ufffd\ufffd\ufffd,,"} <= seen


def test_words_by_character_as_transformers():
    """Japanese (and the other unspaced languages, given by code or name): words at whole characters, é's two
    halves one word, marks still joined; as transformers' grouping."""
    from transformers.models.whisper.tokenization_whisper import _combine_tokens_into_words
    tok = whisper_tokenizer()
    ids = [35, 85, 0, 4, 93, 75, 77, 1, 85, 85, 0, 2, 35]
    times = [0.02 * i for i in range(len(ids))]
    for language, name in (("ja", "japanese"), (None, "english")):
        texts, _, at = _combine_tokens_into_words(tok, ids, name)
        want = [{"text": t, "timestamp": (round(times[a[0] - 1], 2) if a[0] else 0.0, round(times[a[-1]], 2))}
                for t, a in zip(texts, at)]
        assert words(tok, ids, times, language) == want
    assert len(words(tok, ids, times, "japanese")) > len(words(tok, ids, times))


class Outputs(dict):
    """What transformers' _extract_token_timestamps reads of generate()'s output."""
    __getattr__ = dict.__getitem__


@pytest.mark.parametrize("new", [1, 2, 9])
def test_token_times_as_transformers_on_the_same_weights(new):
    """Random cross-attention weights of 3 prompt tokens and `new` new ones (one has no row to align; two have one,
    whose normalization divides 0 by 0) through transformers' own _extract_token_timestamps and ours: the same
    times, with no frames, one count for all, one per row, and so few that no median is taken."""
    from types import SimpleNamespace

    from transformers import WhisperForConditionalGeneration
    g = torch.Generator().manual_seed(new)
    B, L, H, S, P = 2, 2, 4, 50, 3
    steps = [torch.randn(B, L, H, P if i == 0 else 1, S, generator=g).mul(3).softmax(-1) for i in range(new)]
    model = SimpleNamespace(config=SimpleNamespace(decoder_layers=L, median_filter_width=7))
    outputs = Outputs(sequences=torch.zeros(B, P + new), cross_attentions=[tuple(s.unbind(1)) for s in steps])
    every = torch.cat(steps, 3)
    weights = torch.stack([every[:, layer, head] for layer, head in HEADS], 1)
    for frames in (None, 60, [60, 37], torch.tensor([7, 5])):
        want = WhisperForConditionalGeneration._extract_token_timestamps(
            model, outputs, HEADS, num_frames=frames, num_input_ids=P)
        assert torch.equal(token_times(weights, P, frames), want), frames


def test_dtw_breaks_ties_as_transformers():
    """A cost of many ties (a few integer values) and one of none: the path of transformers' loop, step for step."""
    from transformers.models.whisper.generation_whisper import _dynamic_time_warping
    g = torch.Generator().manual_seed(0)
    for cost in (torch.randint(0, 3, (23, 61), generator=g).double(), torch.randn(40, 30, generator=g).double()):
        for got, want in zip(alignment.dtw(cost.numpy()), _dynamic_time_warping(cost.numpy())):
            assert (got == want).all()


def test_bad_alignment_heads_are_refused_in_one_line(out):
    """No alignment_heads, a layer or a head the decoder lacks, a malformed pair: one line each."""
    m = load(out["tp1"])
    for gc, match in [(GEN, "no alignment_heads"), ({**GEN, "alignment_heads": [[2, 0]]}, r"\[2, 0\] is not in"),
                      ({**GEN, "alignment_heads": [[1, 4]]}, r"\[1, 4\] is not in this decoder \(2 layers of 4"),
                      ({**GEN, "alignment_heads": [[1]]}, "must be \\[layer, head\\] pairs")]:
        with pytest.raises(FmError, match=match) as e:
            alignment_heads(gc, m)
        assert "\n" not in str(e.value)


def test_cli_word_timestamps(out, tmp_path, capsys):
    """`transcribe --word-timestamps`: a word a line with its times, and a words list in JSON, the pipeline's words
    (the byte-level tokenizer above, the frames the extractor's attention mask counts); a model without alignment
    heads, and --no-timestamps, refused in one line."""
    import json

    import transformers

    from corpus import run_main
    from test_whisper import save, write_wav
    hf, tok, fe = ending(stamps=True), whisper_tokenizer(), feature_extractor()
    for x in (hf, tok, fe):
        x.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out", Options(), progress=False)
    wav = write_wav(tmp_path / "talk.wav", 2.3, 16000, 1, 300.0)
    pipe = transformers.pipeline("automatic-speech-recognition", model=hf, tokenizer=tok, feature_extractor=fe)
    from fmconvert.runtime.audio import load_audio
    want = pipe(load_audio(wav).numpy(), return_timestamps="word",
                generate_kwargs=dict(language="en", num_beams=1))["chunks"]
    assert len(want) > 5
    code, stdout, err = run_main(capsys, "transcribe", tmp_path / "out", wav, "-l", "en", "--word-timestamps")
    assert code == 0, err
    assert stdout.splitlines() == [f"[{w['timestamp'][0]:.2f} -> {w['timestamp'][1]:.2f}] {w['text'].strip()}"
                                   for w in want]
    code, stdout, err = run_main(capsys, "transcribe", tmp_path / "out", wav, "-l", "en", "--word-timestamps",
                                 "--format", "json")
    assert code == 0, err
    assert [(w["start"], w["end"], w["text"]) for w in json.loads(stdout)["words"]] == \
        [(round(w["timestamp"][0], 3), round(w["timestamp"][1], 3), w["text"].strip()) for w in want]
    plain = tmp_path / "plain"
    convert(save(tmp_path / "src2"), plain, Options(), progress=False)        # no alignment_heads
    for d, args, match in [(plain, [], "no alignment_heads"), (tmp_path / "out", ["--no-timestamps"], "drop --no")]:
        code, stdout, err = run_main(capsys, "transcribe", d, wav, "-l", "en", "--word-timestamps", *args)
        assert code != 0 and match in err and len(err.strip().splitlines()) == 1 and not stdout, err
