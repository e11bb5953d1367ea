"""Beam search (runtime/beam.py) against transformers' generate(num_beams=k): the same best hypothesis, token for
token, for decoders whose caches differ (plain, a hybrid's conv and recurrent states, latent attention, windowed
rings) and for encoder-decoders, over length penalties and the three early-stopping rules; at tp 2; from the CLI."""

from __future__ import annotations

import pytest
import torch

import tiny
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.beam import beam_search
from fmconvert.runtime.load import load
from test_seq2seq import build, source, until_eos


@pytest.mark.parametrize("name", ["llama", "qwen3_5", "deepseek_v2", "gemma3"])
def test_decoders_search_as_transformers(model_dir, tmp_path, name):
    convert(model_dir(name), tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    hf = tiny.build(name)
    ids = tiny.ids(7, 1, B=1)
    eos = hf.generation_config.eos_token_id
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), num_beams=3, max_new_tokens=10, do_sample=False,
                           pad_token_id=0)
    got, st = beam_search(m, ids, 3, 10, eos)
    assert got[0, 7:].tolist() == want[0, 7:7 + got.shape[1] - 7].tolist() and st.tokens == got[0, 7:].tolist()


@pytest.mark.parametrize("k,penalty,stop", [(3, 1.0, False), (4, 2.0, True), (2, 0.5, "never")])
@pytest.mark.parametrize("name", ["flan_t5", "umt5", "bart"])
def test_encoder_decoders_search_as_transformers(tmp_path, name, k, penalty, stop):
    build(name).save_pretrained(tmp_path / "src")
    ids, mask, _ = source()
    _beams_match(tmp_path, name, ids[1:, :6], mask[1:, :6], k, penalty, stop, 9)


def _beams_match(tmp_path, name, ids, mask, k, penalty, stop, new) -> list:
    """The conversion's beam search over these sources gives transformers' best hypotheses -> those (to eos)."""
    convert(tmp_path / "src", tmp_path / "out", Options(), progress=False)
    hf = build(name)
    eos = hf.config.eos_token_id
    with torch.no_grad():
        want = hf.generate(input_ids=ids, attention_mask=mask, num_beams=k, max_new_tokens=new, do_sample=False,
                           length_penalty=penalty, early_stopping=stop)
    got, _ = beam_search(load(tmp_path / "out"), ids, k, new, eos, penalty, stop, source_mask=mask)
    assert until_eos(got, eos) == until_eos(want, eos)
    return until_eos(want, eos)


def test_the_beams_agree_across_ranks(tmp_path):
    build("umt5").save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out", Options(tp=2, int8=True, group_size=16), progress=False)
    ids = source()[0][:1]
    got = tiny.on_ranks(tmp_path / "out", 2, lambda m: beam_search(m, ids, 3, 8, 1)[0].tolist())
    assert got[0] == got[1] and len(got[0][0]) > 1


def test_cli_num_beams_on_the_real_model(model_dir, tmp_path, capsys):
    """stories260K with 3 beams: the prompt, then text transformers' beam search gives for it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corpus import run_main
    out = tmp_path / "out"
    convert(model_dir("stories"), out, Options(), progress=False)
    code, stdout, err = run_main(capsys, "generate", out, "-p", "Once upon a time", "-n", "12", "--num-beams", "3")
    assert code == 0, err
    tok = AutoTokenizer.from_pretrained(model_dir("stories"))
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(model_dir("stories")).generate(
            ids, num_beams=3, max_new_tokens=12, do_sample=False)
    assert stdout.strip() == tok.decode(want[0], skip_special_tokens=True).strip()
    code, _, err = run_main(capsys, "generate", out, "-p", "hello", "--num-beams", "2", "-t", "0.7")
    assert code == 2 and "drop --temperature" in err


def test_cli_generate_file_for_a_decoder(model_dir, tmp_path, capsys):
    """generate --file on a decoder: each prompt's continuation (greedy, and with beams) on its own line, in order,
    as transformers continues each prompt alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corpus import run_main
    out = tmp_path / "out"
    convert(model_dir("stories"), out, Options(), progress=False)
    prompts = ["Once upon a time", "The cat sat"]
    (tmp_path / "in.txt").write_text("\n".join(prompts))
    tok = AutoTokenizer.from_pretrained(model_dir("stories"))
    hf = AutoModelForCausalLM.from_pretrained(model_dir("stories"))
    for beams in ("1", "2"):
        code, stdout, err = run_main(capsys, "generate", out, "-f", tmp_path / "in.txt", "-n", "8", "--num-beams",
                                     beams)
        assert code == 0, err
        want = []
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids
            with torch.no_grad():
                g = hf.generate(ids, max_new_tokens=8, do_sample=False, num_beams=int(beams))
            want.append(tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True).replace("\n", " "))
        assert stdout.split("\n")[:2] == want, (stdout, want)


PROCESSORS = [dict(repetition_penalty=1.3), dict(no_repeat_ngram_size=1), dict(min_new_tokens=6),
              dict(repetition_penalty=0.7, no_repeat_ngram_size=2, min_length=10)]


def _processors(kw):
    from fmconvert.runtime.processors import Processors
    return Processors(repetition_penalty=kw.get("repetition_penalty", 1.0),
                      no_repeat_ngram=kw.get("no_repeat_ngram_size", 0), min_new_tokens=kw.get("min_new_tokens", 0),
                      min_length=kw.get("min_length", 0))


def _eos_and_want(generate_hf, start: int, kw):
    """The end token, and transformers' tokens with the processors. The minimum lengths get a token the search picks
    third when it has no end (an end they must hold back); the others get none it picks (95), so that all ten tokens
    are there to penalize or ban. The processors must change transformers' tokens, or the test shows nothing."""
    base = generate_hf(eos=95)
    assert 95 not in base[0, start:].tolist()
    eos = int(base[0, start + 2]) if "min_new_tokens" in kw or "min_length" in kw else 95
    plain, want = generate_hf(eos=eos), generate_hf(eos=eos, **kw)
    assert plain.tolist() != want.tolist(), kw
    return eos, want


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("kw", PROCESSORS)
def test_processors_as_transformers_on_a_decoder(model_dir, tmp_path, kw, beams):
    """Repetition penalty, n-gram ban and minimum lengths, greedy and in beam search: the tokens transformers'
    generate gives with the same settings."""
    from fmconvert.runtime.generate import generate
    convert(model_dir("llama"), tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    hf = tiny.build("llama")
    ids = tiny.ids(5, 2, B=1)

    def generate_hf(eos, **more):
        with torch.no_grad():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                               pad_token_id=0, eos_token_id=eos, **{"num_beams": beams, **more})
    eos, want = _eos_and_want(generate_hf, ids.shape[1], kw)
    got = (beam_search(m, ids, beams, 10, eos, processors=_processors(kw)) if beams > 1 else
           generate(m, ids, 10, eos_token_id=eos, processors=_processors(kw)))[0]
    n = got.shape[1]
    assert got[0].tolist() == want[0, :n].tolist() and (n == want.shape[1] or want[0, n:].eq(0).all())


@pytest.mark.parametrize("beams", [1, 2])
@pytest.mark.parametrize("kw", PROCESSORS)
def test_processors_as_transformers_on_an_encoder_decoder(tmp_path, kw, beams):
    from fmconvert.runtime.generate import generate
    build("umt5").save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out", Options(), progress=False)
    hf = build("umt5")
    ids, mask, _ = source()
    ids, mask = ids[:1], mask[:1]

    def generate_hf(eos, **more):
        with torch.no_grad():
            return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                               eos_token_id=eos, pad_token_id=0, **{"num_beams": beams, **more})
    eos, want = _eos_and_want(generate_hf, 1, kw)
    m = load(tmp_path / "out")
    got = (beam_search(m, ids, beams, 10, eos, processors=_processors(kw), source_mask=mask) if beams > 1 else
           generate(m, ids, 10, eos_token_id=eos, processors=_processors(kw), source_mask=mask))[0]
    assert until_eos(got, eos) == until_eos(want, eos)


def test_cli_generation_config_as_transformers_generate(tmp_path, capsys):
    """--generation-config takes what the flags leave out from generation_config.json, as transformers' generate()
    does with no arguments: a summarizer's beams, length penalty, early stopping, n-gram ban, minimum and maximum
    length and forced end token give the text transformers gives; a flag still wins over the file."""
    from test_classify import tokenizer

    from corpus import run_main
    hf = build("bart", forced_eos_token_id=2)
    gc = hf.generation_config
    gc.num_beams, gc.length_penalty, gc.early_stopping, gc.no_repeat_ngram_size = 3, 2.0, True, 2
    gc.min_length, gc.max_length, gc.repetition_penalty = 5, 12, 1.2
    src, out = tmp_path / "src", tmp_path / "out"
    hf.save_pretrained(src)
    tok = tokenizer()
    tok.save_pretrained(src)
    convert(src, out, Options(), progress=False)
    ids = torch.tensor([tok("w5 w6 w7").input_ids])
    with torch.no_grad():
        want = hf.generate(input_ids=ids)
        plain = hf.generate(input_ids=ids, num_beams=1, max_new_tokens=11, no_repeat_ngram_size=0, min_length=0,
                            repetition_penalty=1.0)
    assert want.tolist() != plain.tolist()                  # the settings change the text
    code, stdout, err = run_main(capsys, "generate", out, "-p", "w5 w6 w7", "--generation-config")
    assert code == 0, err
    assert stdout.strip() == tok.decode(want[0, 1:], skip_special_tokens=True).strip()
    code, stdout, err = run_main(capsys, "generate", out, "-p", "w5 w6 w7", "--generation-config", "--num-beams", "1",
                                 "--no-repeat-ngram", "0", "--min-new-tokens", "0", "--repetition-penalty", "1")
    assert code == 0, err
    with torch.no_grad():
        want = hf.generate(input_ids=ids, num_beams=1, no_repeat_ngram_size=0, repetition_penalty=1.0)
    assert stdout.strip() == tok.decode(want[0, 1:], skip_special_tokens=True).strip()


@pytest.mark.parametrize("k,penalty,stop", [(3, 1.0, False), (2, 2.0, True), (3, 0.5, "never")])
@pytest.mark.parametrize("name", ["umt5", "flan_t5"])
def test_a_batch_searches_as_transformers(tmp_path, name, k, penalty, stop):
    """Several sources side by side (padded on the right), each row's best hypothesis as transformers' batched beam
    search finds it: rows that finish early wait for the others without changing them."""
    build(name).save_pretrained(tmp_path / "src")
    ids, mask, _ = source()
    ids = torch.cat([ids, ids[:1, [2, 0, 1, 3, 4, 5, 6, 7, 8]]])        # a third row: the first's tokens shuffled
    mask = torch.cat([mask, mask[:1]])
    want = _beams_match(tmp_path, name, ids, mask, k, penalty, stop, 8)
    assert len({tuple(r) for r in want}) > 1          # the rows differ: each is searched on its own


def test_a_decoders_batch_searches_as_transformers(model_dir, tmp_path):
    convert(model_dir("llama"), tmp_path / "out", Options(), progress=False)
    hf = tiny.build("llama")
    ids = tiny.ids(6, 3, B=2)
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), num_beams=3, max_new_tokens=8, do_sample=False,
                           pad_token_id=0, eos_token_id=95)
    got, _ = beam_search(load(tmp_path / "out"), ids, 3, 8, 95)
    assert got.tolist() == want.tolist()
