"""Whisper's beam search (runtime/beam.py from a decoder prompt) against transformers' generate(num_beams=k) on
test_whisper's tiny model: the same best hypothesis, token for token, with the language given and detected, over
length penalties; at tp 2.

transformers' Whisper generate() drops each row's end token and pads the rows with pad_token_id (the end token, in
the released checkpoints and here), so a row that ends on it and the longest row alike are compared by their tokens
before the end token."""

from __future__ import annotations

import pytest
import torch

import tiny
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.beam import beam_search
from fmconvert.runtime.load import load
from fmconvert.runtime.processors import Processors
from fmconvert.runtime.speech import detect_language, prompt_tokens
from test_whisper import GEN, build, features

END = GEN["eos_token_id"]
NEW = 12
SEEDS = (3, 4, 5)           # feature seeds: rows whose best hypotheses end early and late
PENALTIES = (1.0, 0.5, 2.0)


def ending():
    """test_whisper's tiny Whisper with its end token's embedding (tied to the head) near that of a word it often
    says (93): with init_std 0.5 it would hardly ever end, and the length penalty would never matter."""
    hf = build()
    with torch.no_grad():
        emb = hf.model.decoder.embed_tokens.weight
        emb[END] = emb[93] + 0.05 * torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(1))
    return hf


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    src = tmp_path_factory.mktemp("whisper_beam") / "src"
    ending().save_pretrained(src)
    convert(src, src.parent / "out", Options(), progress=False)
    return src


@pytest.fixture(scope="module")
def hf():
    return ending()


def text(rows) -> list:
    """Each row's tokens before its end token."""
    return [r[:r.index(END)] if END in r else r for r in rows]


def theirs(hf, feats, language, k, penalty) -> list:
    kw = dict(language=language) if language else {}
    with torch.no_grad():
        out = hf.generate(input_features=feats, num_beams=k, max_new_tokens=NEW, length_penalty=penalty, **kw)
    return text(out.tolist())


def ours(m, feats, language, k, penalty) -> list:
    rows, B = prompt_tokens(GEN, language), feats.shape[0]
    given, sources = rows is not None, []

    def detect(model):
        nonlocal rows
        langs = detect_language(model, GEN)
        sources.append(len(langs))
        rows = prompt_tokens(GEN, detected=langs)
        return torch.tensor(rows)
    procs = Processors(suppress=tuple(GEN["suppress_tokens"]), begin_suppress=tuple(GEN["begin_suppress_tokens"]))
    out, st = beam_search(m, feats, k, NEW, END, penalty, processors=procs,
                          decoder_prompt=torch.tensor(rows * B) if rows else detect)
    assert sources == ([] if given else [B])         # detection read one row per source, not per beam
    P = len(rows[0])
    assert text([st.tokens]) == text([out[0, P:].tolist()])
    return text(out[:, P:].tolist())


@pytest.mark.parametrize("language", ["en", None])
@pytest.mark.parametrize("k", [2, 3])
def test_beams_as_transformers(saved, hf, k, language):
    """For each feature seed and length penalty, the best hypotheses are transformers'; the beams beat greedy
    decoding somewhere, and a penalty changes the winner somewhere (so each comparison can fail)."""
    m = load(saved.parent / "out")
    beams_matter = penalty_matters = False
    for seed in SEEDS:
        feats = features(2, seed)
        greedy = theirs(hf, feats, language, 1, 1.0)
        assert ours(m, feats, language, 1, 1.0) == greedy      # one beam: generate's greedy decoding
        by_penalty = {}
        for penalty in PENALTIES:
            want = theirs(hf, feats, language, k, penalty)
            assert ours(m, feats, language, k, penalty) == want, (seed, penalty)
            by_penalty[penalty] = want
        beams_matter |= by_penalty[1.0] != greedy
        penalty_matters |= any(w != by_penalty[1.0] for w in by_penalty.values())
    assert beams_matter and penalty_matters


def test_beams_agree_across_ranks(saved, tmp_path, hf):
    """At tp 2, the language detected and a penalty that favours length: both ranks give transformers' tokens."""
    convert(saved, tmp_path / "out", Options(tp=2), progress=False)
    feats = features(2, 4)
    want = theirs(hf, feats, None, 3, 2.0)
    got = tiny.on_ranks(tmp_path / "out", 2, lambda m: ours(m, feats, None, 3, 2.0))
    assert got == [want, want]


def test_transcribe_with_beams_as_transformers(saved, hf):
    """speech.transcribe with num_beams (what `transcribe --num-beams` runs): transformers' tokens, with the
    language detected and given."""
    from fmconvert.runtime.speech import transcribe
    m = load(saved.parent / "out")
    feats = features(2, 5)
    for language in (None, "en"):
        got = [t.tokens for t in transcribe(m, feats, GEN, language, max_new_tokens=NEW, eos_token_id=END,
                                            num_beams=3, length_penalty=2.0)[0]]
        assert got == theirs(hf, feats, language, 3, 2.0)
