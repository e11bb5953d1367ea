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
    convert(tmp_path / "src", tmp_path / "out", Options(), progress=False)
    hf = build(name)
    ids, mask, _ = source()
    ids, mask = ids[1:, :6], mask[1:, :6]
    eos = hf.config.eos_token_id
    with torch.no_grad():
        want = hf.generate(input_ids=ids, attention_mask=mask, num_beams=k, max_new_tokens=9, do_sample=False,
                           length_penalty=penalty, early_stopping=stop)
    got, _ = beam_search(load(tmp_path / "out"), ids, k, 9, eos, penalty, stop, source_mask=mask)
    assert until_eos(got, eos) == until_eos(want, eos)


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
