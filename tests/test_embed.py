"""Sentence embeddings (`fmconvert embed`, runtime/embed.py): a sentence-transformers checkpoint's own pipeline (its
Pooling modes, Normalize and max_seq_length, copied beside the shards at conversion) against the same pipeline built
from transformers by hand; every pooling mode against a per-row reference, padding on either side; a decoder
embedding model saved without its head (Qwen3-Embedding's layout) converted headless and embedded by its last
token; bad pipelines refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import tiny
from corpus import assert_one_line_error, run_main
from fmconvert.errors import EXIT_BAD_INPUT
from fmconvert.runtime.embed import MODES, pool, sentence_vectors

TEXTS = ["w5 w6 w7", "w9", "w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20 w21 w22 w23 w24 w25 w26"]   # the last: cut


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 101)}}   # MPNet's ids
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", cls_token="<s>", sep_token="</s>")


def sentence_model(model_dir, root, modules=("Pooling", "Normalize"), pooling=None, max_seq_length=12):
    """The tiny MPNet saved as sentence-transformers saves all-mpnet-base-v2: the model and tokenizer at the top,
    modules.json, sentence_bert_config.json and the Pooling module's config.json under 1_Pooling."""
    src = root / "st"
    shutil.copytree(model_dir("mpnet"), src)
    tokenizer().save_pretrained(src)
    mods = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    for i, kind in enumerate(modules, 1):
        mods.append({"idx": i, "name": str(i), "path": f"{i}_{kind}", "type": f"sentence_transformers.models.{kind}"})
        (src / f"{i}_{kind}").mkdir()
        if kind == "Pooling":
            modes = pooling or {"pooling_mode_mean_tokens": True}
            (src / f"{i}_{kind}" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, **modes}))
    (src / "modules.json").write_text(json.dumps(mods))
    (src / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    return src


def by_hand(texts, max_length, modes=("mean",), normalize=True):
    """What sentence-transformers computes, from transformers' MPNetModel, row by row over the real tokens."""
    batch = tokenizer()(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = tiny.build("mpnet")(**batch).last_hidden_state
    rows = []
    for h, m in zip(hidden, batch["attention_mask"].bool()):
        real = h[m]
        one = {"mean": real.mean(0), "max": real.max(0).values, "cls": h[0]}
        rows.append(torch.cat([one[x] for x in modes]))
    vec = torch.stack(rows)
    return F.normalize(vec, dim=-1) if normalize else vec


def test_a_sentence_transformers_pipeline_end_to_end(model_dir, tmp_path, capsys, monkeypatch):
    """convert copies the pipeline's files; embed follows them: mean pooling, unit vectors, 12 tokens at most."""
    src = sentence_model(model_dir, tmp_path)
    out = tmp_path / "out"
    code, _, err = run_main(capsys, "convert", "--quiet", src, out)
    assert code == 0, err
    assert (out / "1_Pooling" / "config.json").is_file() and (out / "modules.json").is_file()
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS[1:]) + "\n")
    code, stdout, err = run_main(capsys, "embed", out, "-t", TEXTS[0], "--file", tmp_path / "texts.txt")
    assert code == 0, err
    got = torch.tensor([json.loads(line) for line in stdout.splitlines()])
    want = by_hand(TEXTS, 12)
    assert got.shape == (3, 64) and (got - want).abs().max() < 1e-5
    code, again, _ = run_main(capsys, "embed", out, "-t", TEXTS[0], "--file", tmp_path / "texts.txt", "--batch-size", 2)
    assert code == 0 and (torch.tensor([json.loads(x) for x in again.splitlines()]) - want).abs().max() < 1e-5
    assert (by_hand(TEXTS, 20) - want)[2].abs().max() > 1e-3          # the long text was cut, as it should be
    monkeypatch.setenv("COLUMNS", "300")              # inspect's table, unwrapped
    code, listing, _ = run_main(capsys, "inspect", out)
    assert code == 0 and "mean pooling, normalised, at most 12 tokens" in listing
    code, stdout, _ = run_main(capsys, "embed", out, "-t", TEXTS[0], "--no-normalize", "--pooling", "max")
    assert (torch.tensor(json.loads(stdout)) - by_hand(TEXTS[:1], 12, ("max",), False)[0]).abs().max() < 1e-5


def test_several_modes_concatenate_at_tp_2(model_dir, tmp_path):
    from fmconvert.pipeline import Options, convert
    from fmconvert.runtime.embed import sentence_config
    src = sentence_model(model_dir, tmp_path, modules=("Pooling",), max_seq_length=6,
                         pooling={"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True,
                                  "pooling_mode_max_tokens": True})
    convert(src, tmp_path / "out", Options(tp=2), progress=False)
    st = sentence_config(tmp_path / "out")
    assert st.modes == ("cls", "max", "mean") and not st.normalize and st.max_length == 6
    want = by_hand(TEXTS, 6, st.modes, False)
    tok = tokenizer()
    for got in tiny.on_ranks(tmp_path / "out", 2, lambda m: sentence_vectors(m, tok, TEXTS, st.modes, False, 6)):
        assert got.shape == (3, 192) and (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_each_pooling_mode_over_padding_on_either_side(mode):
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 5)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [0] * 2 + [1] * 5])
    got = pool(hidden, mask, mode)
    for b in range(3):
        keep = mask[b].bool()
        real, w = hidden[b][keep], torch.arange(1.0, 8.0)[keep].unsqueeze(-1)
        want = {"cls": hidden[b, 0], "max": real.max(0).values, "mean": real.mean(0),
                "mean_sqrt_len": real.sum(0) / len(real) ** 0.5, "weightedmean": (real * w).sum(0) / w.sum(),
                "lasttoken": real[-1]}[mode]
        assert torch.allclose(got[b], want, atol=1e-6)


@pytest.mark.parametrize("edit, stage, match", [
    (lambda src: _modules(src, [{"type": "sentence_transformers.models.LSTM", "path": "2_LSTM"}]), "embed",
     "has a LSTM module"),
    (lambda src: _modules(src, [{"type": "sentence_transformers.models.Dense", "path": "1_Pooling"}]), "embed",
     "not in model.safetensors (fmconvert never unpickles"),
    (lambda src: (src / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": false}'), "embed",
     "no pooling mode"),
    (lambda src: _modules(src, [{"type": "sentence_transformers.models.Pooling", "path": "../../etc"}]), "convert",
     "leaves the model directory"),
    (lambda src: (src / "modules.json").write_text("[{"), "convert", "not valid JSON"),
])
def test_bad_pipelines_are_refused_in_one_line(model_dir, tmp_path, capsys, edit, stage, match):
    src = sentence_model(model_dir, tmp_path)
    out = tmp_path / "out"
    if stage == "embed":
        assert run_main(capsys, "convert", "--quiet", src, out)[0] == 0
        edit(out)
        code, _, err = run_main(capsys, "embed", out, "-t", "w5")
    else:
        edit(src)
        code, _, err = run_main(capsys, "convert", "--quiet", src, out)
        assert not out.exists()
    assert_one_line_error(code, err, EXIT_BAD_INPUT, match)


def _modules(src, extra):
    mods = json.loads((src / "modules.json").read_text())
    (src / "modules.json").write_text(json.dumps(mods + extra))


def test_without_a_pipeline_the_choice_is_said(model_dir, tmp_path, capsys):
    """A plain MPNetModel (with its pooler) and no sentence-transformers files: the pooler, announced on stderr;
    nothing to embed is refused."""
    src = tmp_path / "plain"
    shutil.copytree(model_dir("mpnet"), src)
    tokenizer().save_pretrained(src)
    assert run_main(capsys, "convert", "--quiet", src, tmp_path / "out")[0] == 0
    code, stdout, err = run_main(capsys, "embed", tmp_path / "out", "-t", "w5 w6")
    assert code == 0 and "pooling: pooler" in err and len(json.loads(stdout)) == 64
    assert_one_line_error(*run_main(capsys, "embed", tmp_path / "out")[::2], EXIT_BAD_INPUT, "nothing to embed")


def test_a_headless_decoder_body_matches_transformers(model_dir, tmp_path, capsys):
    """A bare Qwen3Model with untied embeddings has no lm_head: it converts headless, its hidden states (left padding
    too) match transformers', verify compares them, and generate is refused in one line."""
    from fmconvert.pipeline import Options, convert
    from fmconvert.verify import verify
    src = model_dir("qwen3_body")
    convert(src, tmp_path / "out", Options(tp=2), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["model"]["headless"] and not any("lm_head" in t for r in m["ranks"] for t in r["tensors"])
    ids = tiny.ids(9, 8)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        want = tiny.build("qwen3_body")(ids, attention_mask=mask).last_hidden_state
    for got in tiny.on_ranks(tmp_path / "out", 2, lambda m: m.hidden(ids, attention_mask=mask)):
        assert tiny.rel(got[mask.bool()], want[mask.bool()]) < 1e-5
    r = verify(src, tmp_path / "out", tokens=32)
    assert r["passed"] and r["end_to_end"]["output"] == "last hidden state"
    convert(src, tmp_path / "tp1", Options(tp=1), progress=False)
    tokenizer().save_pretrained(tmp_path / "tp1")
    assert_one_line_error(*run_main(capsys, "generate", tmp_path / "tp1", "-p", "w5")[::2], EXIT_BAD_INPUT,
                          "without its language-model head")


def test_qwen3_embedding_layout_end_to_end(model_dir, tmp_path, capsys):
    """Qwen3-Embedding-8B's layout: config.json says Qwen3ForCausalLM, the weights are the body alone, and its
    sentence-transformers pipeline pools the last token and normalises; the tokenizer pads on the left; a query
    prompt named in config_sentence_transformers.json goes before each text when asked for. Without the pipeline, a
    causal LM missing its head is still refused."""
    src = tmp_path / "qwen3-embedding"
    shutil.copytree(model_dir("qwen3_body"), src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "architectures": ["Qwen3ForCausalLM"]}))
    tok = tokenizer()
    tok.padding_side = "left"
    tok.save_pretrained(src)
    code, _, err = run_main(capsys, "convert", "--quiet", src, tmp_path / "refused")
    assert_one_line_error(code, err, EXIT_BAD_INPUT, "missing tensor lm_head.weight")
    (src / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_lasttoken": True}))
    (src / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": "w30 w31 ",
                                                                                   "document": ""}}))
    assert run_main(capsys, "convert", "--quiet", src, tmp_path / "out")[0] == 0

    def by_hand(texts):
        batch = tok(texts, padding=True, return_tensors="pt")
        assert batch["attention_mask"][1, 0] == 0                       # the shorter text is padded on the left
        with torch.no_grad():
            return F.normalize(tiny.build("qwen3_body")(**batch).last_hidden_state[:, -1], dim=-1)
    for flags, prefix in [((), ""), (("--prompt-name", "query"), "w30 w31 ")]:
        code, stdout, err = run_main(capsys, "embed", tmp_path / "out", *flags,
                                     *[a for t in TEXTS[:2] for a in ("-t", t)])
        assert code == 0, err
        got = torch.tensor([json.loads(line) for line in stdout.splitlines()])
        assert (got - by_hand([prefix + t for t in TEXTS[:2]])).abs().max() < 1e-5
    assert_one_line_error(*run_main(capsys, "embed", tmp_path / "out", "--prompt-name", "passage", "-t", "w5")[::2],
                          EXIT_BAD_INPUT, "no prompt named 'passage' (its prompts: document, query)")


def test_a_dense_module_projects_the_pooled_vector(model_dir, tmp_path, capsys):
    """LaBSE's layout: Pooling (cls), Dense (a tanh layer to 32, weights in its own safetensors), Normalize; convert
    copies the Dense module's files and embed runs it."""
    from safetensors.torch import save_file
    src = sentence_model(model_dir, tmp_path, modules=("Pooling", "Dense", "Normalize"),
                         pooling={"pooling_mode_cls_token": True})
    torch.manual_seed(3)
    w, b = torch.randn(32, 64) * 0.2, torch.randn(32) * 0.1
    dense = {"in_features": 64, "out_features": 32, "bias": True,
             "activation_function": "torch.nn.modules.activation.Tanh"}
    (src / "2_Dense" / "config.json").write_text(json.dumps(dense))
    save_file({"linear.weight": w, "linear.bias": b}, src / "2_Dense" / "model.safetensors")
    assert run_main(capsys, "convert", "--quiet", src, tmp_path / "out")[0] == 0
    assert (tmp_path / "out" / "2_Dense" / "model.safetensors").is_file()
    code, stdout, err = run_main(capsys, "embed", tmp_path / "out", *[a for t in TEXTS for a in ("-t", t)])
    assert code == 0, err
    got = torch.tensor([json.loads(line) for line in stdout.splitlines()])
    want = F.normalize(torch.tanh(F.linear(by_hand(TEXTS, 12, ("cls",), False), w, b)), dim=-1)
    assert got.shape == (3, 32) and (got - want).abs().max() < 1e-5


def test_texts_are_stripped_and_lowercased_as_the_pipeline_does(model_dir, tmp_path, capsys):
    """sentence-transformers' Transformer module strips each text and, with sentence_bert_config's do_lower_case,
    lowercases it before tokenizing: with a tokenizer that sees spaces and case, "  W5 W6 " embeds as "w5 w6"."""
    from tokenizers import pre_tokenizers
    src = sentence_model(model_dir, tmp_path)
    (src / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12, "do_lower_case": True}))
    tok = tokenizer()
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", "isolated")     # a space is a token (<unk>)
    tok.save_pretrained(src)
    assert run_main(capsys, "convert", "--quiet", src, tmp_path / "out")[0] == 0
    code, stdout, err = run_main(capsys, "embed", tmp_path / "out", "-t", "  W5 W6 ", "-t", "w5 w6")
    assert code == 0, err
    got = torch.tensor([json.loads(line) for line in stdout.splitlines()])
    assert (got[0] - got[1]).abs().max() < 1e-6


def test_a_tokenizer_without_a_pad_token_and_a_text_without_tokens(model_dir, tmp_path, capsys):
    """A decoder's tokenizer often has no pad token (Llama 3's): a batch pads with its eos, masked out, so each text
    embeds as it does alone; a text the tokenizer gives no tokens at all is refused in one line."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from fmconvert.pipeline import Options, convert
    out = tmp_path / "out"
    convert(model_dir("qwen3_body"), out, Options(tp=1), progress=False)
    vocab = {"<s>": 0, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 101)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()                 # no specials added, no pad token
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>").save_pretrained(out)
    rows = []
    for texts in (TEXTS[:2], TEXTS[:1], TEXTS[1:2]):
        code, stdout, err = run_main(capsys, "embed", out, "--no-verify-hashes", *[a for t in texts for a in ("-t", t)])
        assert code == 0, err
        rows += [json.loads(line) for line in stdout.splitlines()]
    got = torch.tensor(rows)
    assert (got[:2] - got[2:]).abs().max() < 1e-5
    assert_one_line_error(*run_main(capsys, "embed", out, "--no-verify-hashes", "--pooling", "lasttoken", "-t", "w5",
                                    "-t", "")[::2], EXIT_BAD_INPUT, "text 2", "no tokens")


def test_a_dense_module_that_does_not_fit_or_comes_out_of_order_is_refused(model_dir, tmp_path, capsys):
    """A Dense module reading another width than the pooled vector's, or a pipeline in another order than
    Transformer, Pooling, Dense..., Normalize (the order embed runs them in), is refused in one line."""
    from safetensors.torch import save_file
    src = sentence_model(model_dir, tmp_path, modules=("Pooling", "Dense", "Normalize"),
                         pooling={"pooling_mode_cls_token": True})

    def dense(n_in):
        (src / "2_Dense" / "config.json").write_text(json.dumps({"in_features": n_in, "out_features": 32}))
        save_file({"linear.weight": torch.randn(32, n_in), "linear.bias": torch.randn(32)},
                  src / "2_Dense" / "model.safetensors")
    dense(32)                                                       # the pooled vector is 64 wide
    assert run_main(capsys, "convert", "--quiet", src, tmp_path / "narrow")[0] == 0
    assert_one_line_error(*run_main(capsys, "embed", tmp_path / "narrow", "-t", "w5")[::2], EXIT_BAD_INPUT,
                          "Dense module", "reads 32", "64")
    dense(64)
    mods = json.loads((src / "modules.json").read_text())
    (src / "modules.json").write_text(json.dumps([mods[0], mods[1], mods[3], mods[2]]))    # Normalize, then Dense
    assert run_main(capsys, "convert", "--quiet", src, tmp_path / "late")[0] == 0
    assert_one_line_error(*run_main(capsys, "embed", tmp_path / "late", "-t", "w5")[::2], EXIT_BAD_INPUT,
                          "Transformer, Pooling, Dense..., Normalize", "Normalize, Dense")


def test_a_file_is_split_at_newlines_only(model_dir, tmp_path, capsys):
    """--file gives one vector per line: a form feed or a U+2028 inside a line (PDF and JSON extractions hold them)
    is whitespace within it, not a line break that would shift every vector after it."""
    src = sentence_model(model_dir, tmp_path)
    assert run_main(capsys, "convert", "--quiet", src, tmp_path / "out")[0] == 0
    (tmp_path / "texts.txt").write_text("w5\x0cw6\r\nw7\u2028w8\n", encoding="utf-8", newline="")
    code, stdout, err = run_main(capsys, "embed", tmp_path / "out", "--file", tmp_path / "texts.txt")
    assert code == 0, err
    got = torch.tensor([json.loads(line) for line in stdout.splitlines()])
    assert got.shape == (2, 64) and (got - by_hand(["w5 w6", "w7 w8"], 12)).abs().max() < 1e-5
