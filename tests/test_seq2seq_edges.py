"""Encoder-decoder and beam-search edges a review found broken (each test failed before its fix): transformers'
forced end token, a foreign encoder/, embed and verify pointed at the wrong half, beam search with no new tokens or
one beam, the convert summary's worst SQNR over both halves, a source attached for another batch."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.beam import beam_search
from fmconvert.runtime.load import load
from test_seq2seq import build, source, until_eos


def _with_tokenizer(tmp_path, name="bart", **overrides):
    """A tiny encoder-decoder with the test word tokenizer (w0 w1 ...), its source dir and its conversion."""
    from test_classify import tokenizer
    src, out = tmp_path / "src", tmp_path / "out"
    hf = build(name, **overrides)
    hf.save_pretrained(src)
    tok = tokenizer()
    tok.save_pretrained(src)
    convert(src, out, Options(), progress=False)
    return hf, tok, src, out


def test_cli_generate_ignores_forced_eos_token_id(tmp_path, capsys):
    """BART's (and Marian's) config and generation_config.json carry forced_eos_token_id (BartConfig's default is
    2; bart-large-cnn and every opus-mt model set it): transformers forces the end token at the last step allowed by
    max_new_tokens, and so does `fmconvert generate` (greedy: `w42 w42` + </s>, not `w42 w42 w42`)."""
    from corpus import run_main
    hf, tok, src, out = _with_tokenizer(tmp_path, forced_eos_token_id=2)
    assert json.loads((out / "generation_config.json").read_text())["forced_eos_token_id"] == 2
    ids = torch.tensor([tok("w5 w6").input_ids])
    with torch.no_grad():
        want = hf.generate(input_ids=ids, max_new_tokens=3, do_sample=False, num_beams=1)
    assert want[0, -1] == 2
    code, stdout, err = run_main(capsys, "generate", out, "-p", "w5 w6", "-n", "3")
    assert code == 0, err
    assert stdout.strip() == tok.decode(want[0, 1:], skip_special_tokens=True).strip()


def test_a_foreign_encoder_of_another_vocabulary_is_refused(tmp_path):
    """An encoder/ taken from another conversion (here a BART of 200 tokens, same width) is refused at load, in one
    line, by its config's hash (before, it ran with the decoder's 96-row table and failed later on a token id)."""
    build("bart").save_pretrained(tmp_path / "a")
    build("bart", vocab_size=200).save_pretrained(tmp_path / "b")
    convert(tmp_path / "a", tmp_path / "out", Options(), progress=False)
    convert(tmp_path / "b", tmp_path / "other", Options(), progress=False)
    shutil.rmtree(tmp_path / "out" / "encoder")
    shutil.copytree(tmp_path / "other" / "encoder", tmp_path / "out" / "encoder")
    with pytest.raises(FmError):
        load(tmp_path / "out")


def test_cli_embed_on_an_encoder_decoder_is_a_one_line_error(tmp_path, capsys):
    """`fmconvert embed OUT` on an encoder-decoder's output is refused in one line naming OUT/encoder, which embed
    reads (before: an internal error from the decoder's forward)."""
    from corpus import run_main
    _, _, _, out = _with_tokenizer(tmp_path)
    code, _, err = run_main(capsys, "embed", out, "-t", "w5 w6")
    assert code == 2 and "internal error" not in err and "Traceback" not in err, (code, err)


def test_cli_beam_search_with_no_new_tokens_is_not_an_internal_error(tmp_path, capsys):
    """`generate -n 0 --num-beams 2` is a one-line usage error (before: an internal error from beam search)."""
    from corpus import run_main
    _, _, _, out = _with_tokenizer(tmp_path)
    code, _, err = run_main(capsys, "generate", out, "-p", "w5", "-n", "0", "--num-beams", "2")
    assert code in (0, 2) and "internal error" not in err, err


def test_convert_summary_worst_sqnr_includes_the_encoder(tmp_path):
    """The convert summary's worst int8 SQNR covers both halves (their slot names are the same: the encoder's were
    overwritten by the decoder's, so a badly quantized encoder tensor at 34.3 dB was reported as 44.9 dB)."""
    hf = build("bart")
    with torch.no_grad():
        w = hf.model.encoder.layers[0].self_attn.q_proj.weight
        w.fill_(0.0035)
        w[:, 0] = 1.0           # each group: one value sets the scale, the rest round to zero
    hf.save_pretrained(tmp_path / "src")
    s = convert(tmp_path / "src", tmp_path / "out", Options(int8=True, group_size=32), progress=False)
    worst = min(v["sqnr_db"] for d in (tmp_path / "out", tmp_path / "out" / "encoder")
                for v in json.loads((d / "manifest.json").read_text())["quantization"]["tensors"].values()
                if v["sqnr_db"] is not None)
    assert s["worst_sqnr_db"] == pytest.approx(worst)


def test_beam_search_with_one_beam_is_transformers_greedy(tmp_path):
    """beam_search with one beam is greedy decoding, as transformers' generate(num_beams=1) is (before, its search
    went on past a finished hypothesis with early_stopping="never")."""
    stop = "never"
    build("flan_t5").save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out", Options(), progress=False)
    hf = build("flan_t5")
    ids, mask, _ = source()
    src, sm = ids[:1], mask[:1]
    with torch.no_grad():
        first = hf(input_ids=src, attention_mask=sm, decoder_input_ids=torch.zeros(1, 1, dtype=torch.long)).logits
        eos = [int(first[0, -1].argmax())]          # greedy's first token ends the text
        want = hf.generate(input_ids=src, attention_mask=sm, num_beams=1, max_new_tokens=5, do_sample=False,
                           early_stopping=stop, eos_token_id=eos, pad_token_id=eos[0])
    got, _ = beam_search(load(tmp_path / "out"), src, 1, 5, eos, 1.0, stop, source_mask=sm)
    assert until_eos(got, eos[0]) == until_eos(want, eos[0])


def test_a_source_attached_for_another_batch_is_refused(tmp_path):
    """A forward whose batch differs from the attached source's (beam search attaches k rows) says so, rather than
    failing in a matmul or, at the same size, reading another batch's source."""
    build("bart").save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    ids, mask, target = source()
    beam_search(m, ids[:1], 3, 3, 2)
    with pytest.raises(ValueError, match="the attached source has 3 rows and this batch 2: attach its own source"):
        m(target)


def test_verify_of_the_encoder_half_alone_points_to_the_pair(tmp_path, capsys):
    from corpus import assert_one_line_error, run_main
    build("bart").save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out", Options(), progress=False)
    code, _, err = run_main(capsys, "verify", tmp_path / "src", tmp_path / "out" / "encoder")
    assert_one_line_error(code, err, 2, "is the encoder half of the encoder-decoder", "verify them together")
