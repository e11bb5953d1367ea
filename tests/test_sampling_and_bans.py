"""Bad words (transformers' bad_words_ids, which generation configs such as Marian's set: applied by default, as
generate() does) and the sampling warpers (temperature, top-k, top-p, in transformers' order), against
transformers; --generation-config's sampling settings."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from corpus import run_main
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.beam import beam_search
from fmconvert.runtime.generate import generate, sample
from fmconvert.runtime.load import load
from fmconvert.runtime.processors import Processors


@pytest.mark.parametrize("beams", [1, 3])
def test_bad_words_as_transformers(model_dir, tmp_path, beams):
    """A one-token bad word and a two-token one, taken from what the model says without them: transformers'
    tokens with them, greedy and in beam search; the end token as a bad word is ignored, as transformers does."""
    convert(model_dir("llama"), tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    hf = tiny.build("llama")
    ids = tiny.ids(5, 2, B=1)

    def theirs(**kw):
        with torch.no_grad():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                               pad_token_id=0, eos_token_id=95, num_beams=beams, **kw)[0, 5:].tolist()
    plain = theirs()
    bad = [[plain[1]], [plain[4], plain[5]], [95]]
    want = theirs(bad_words_ids=bad)
    assert want != plain and plain[1] not in want
    procs = Processors(bad_words=tuple(map(tuple, bad)))
    got = (beam_search(m, ids, beams, 10, 95, processors=procs) if beams > 1 else
           generate(m, ids, 10, eos_token_id=95, processors=procs))[0][0, 5:].tolist()
    assert got == want[:len(got)]


def test_cli_applies_the_generation_configs_bad_words(tmp_path, capsys):
    """generate applies generation_config.json's bad_words_ids without being asked, as transformers' generate()
    does (Marian bans its pad token so), and refuses a malformed one in one line."""
    from test_classify import tokenizer
    from test_seq2seq import build
    hf = build("bart")
    tok = tokenizer()
    ids = torch.tensor([tok("w5 w6 w7").input_ids])
    with torch.no_grad():
        plain = hf.generate(input_ids=ids, max_new_tokens=8, num_beams=1)[0].tolist()
    hf.generation_config.bad_words_ids = [[plain[2]]]
    src, out = tmp_path / "src", tmp_path / "out"
    hf.save_pretrained(src)
    tok.save_pretrained(src)
    convert(src, out, Options(), progress=False)
    with torch.no_grad():
        want = hf.generate(input_ids=ids, max_new_tokens=8, num_beams=1)[0]
    assert want.tolist() != plain
    code, stdout, err = run_main(capsys, "generate", out, "-p", "w5 w6 w7", "-n", "8")
    assert code == 0, err
    assert stdout.strip() == tok.decode(want[1:], skip_special_tokens=True).strip()
    gc = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**gc, "bad_words_ids": [[10 ** 6]]}))
    code, _, err = run_main(capsys, "generate", out, "-p", "w5", "-n", "2")
    assert code == 2 and "bad_words_ids must be" in err and len(err.strip().splitlines()) == 1


def test_top_k_and_top_p_as_transformers_warpers():
    """The distribution sample() draws from is the one transformers' temperature, top-k and top-p warpers leave:
    the same tokens kept; top-k of one is greedy."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    for t, k, p in [(0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 10, 0.5), (0.5, 1, 1.0)]:
        want = TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            want = TopKLogitsWarper(k)(None, want)
        if p < 1:
            want = TopPLogitsWarper(p)(None, want)
        kept = torch.isfinite(want)
        draws = torch.stack([sample(logits, t, p, torch.Generator().manual_seed(s), k) for s in range(300)], 1)
        for row in range(4):
            seen = set(draws[row].tolist())
            assert seen <= set(kept[row].nonzero().flatten().tolist())
            assert len(seen) == int(kept[row].sum()) or int(kept[row].sum()) > 3      # few kept: each one drawn
    assert torch.equal(sample(logits, 0.9, 1.0, torch.Generator().manual_seed(1), 1), logits.argmax(-1))


def test_generation_config_sampling_settings(model_dir, tmp_path, capsys):
    """--generation-config with do_sample (or a temperature given) takes its temperature, top_k and top_p
    (transformers' defaults where it sets none); a flag wins; without either decoding stays greedy; beams with a
    sampling config are refused."""
    from fmconvert.cli import _sampling
    gc = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}
    assert _sampling(gc, None, None, None) == (0.6, 50, 0.9)
    assert _sampling(gc, 0.0, 5, None) == (0.0, 0, 1.0)          # greedy: nothing to cut
    assert _sampling({"top_k": 20, "top_p": 0.9}, 0.7, None, None) == (0.7, 20, 0.9)    # do_sample by -t
    assert _sampling({"temperature": 0.6}, None, None, None) == (0.0, 0, 1.0)
    assert _sampling({}, 0.8, None, 0.5) == (0.8, 0, 0.5)
    with pytest.raises(Exception, match="top_k must be a valid setting"):
        _sampling({"do_sample": True, "top_k": -1}, None, None, None)
    assert _sampling({"do_sample": True}, None, None, None) == (1.0, 50, 1.0)       # transformers' defaults
    convert(model_dir("llama"), tmp_path / "out", Options(), progress=False)
    from test_classify import tokenizer
    tokenizer().save_pretrained(tmp_path / "out")
    (tmp_path / "out" / "generation_config.json").write_text(json.dumps({**gc, "eos_token_id": 2}))
    code, _, err = run_main(capsys, "generate", tmp_path / "out", "-p", "w5", "--generation-config", "--num-beams",
                            "2")
    assert code == 2 and "give --temperature 0" in err
    runs = [run_main(capsys, "generate", tmp_path / "out", "-p", "w5", "-n", "6", "--generation-config", "--seed",
                     str(s)) for s in range(4)]
    assert all(c == 0 for c, _, _ in runs) and len({o for _, o, _ in runs}) > 1      # it samples
