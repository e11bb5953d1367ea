"""Sequence and token classification (`fmconvert classify`, runtime/classify.py): each encoder family's own task
head, kept as passthrough tensors and described in the manifest, run on the converted encoder and compared with
transformers' logits at tp 1 and 2, with padding; a token classifier's labels and character spans, and extractive QA's
answers, through the CLI; a cross-encoder's (text, pair) inputs and a one-logit reranker's
score through the CLI; verify checking the head; heads that cannot run refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import tiny
from corpus import assert_one_line_error, run_main
from fmconvert.errors import EXIT_BAD_INPUT
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.classify import head_logits

# BERT (its pooler), RoBERTa's kin (XLM-R: a tanh layer), DeBERTa (ContextPooler), DistilBERT (ReLU), ELECTRA (GELU),
# MPNet, ModernBERT (mean pooling, then a LayerNormed head), NomicBERT and GTE (the pooler), Jina v3 (RoBERTa's)
FAMILIES = ["bert_cls", "xlm_roberta", "deberta_v3", "distilbert_cls", "electra_cls", "mpnet_cls", "modernbert_cls",
            "nomic_bert", "gte_untyped", "jina_cls", "albert", "eurobert_late", "eurobert_bos"]


def batch():
    """Padding on the right, as these tokenizers pad: with it on the left the first token (which most heads read)
    would be padding, whose state transformers' DeBERTa computes differently (a pad query there sees every key)."""
    ids = tiny.ids(9, 7, B=3)
    ids[1, 6:] = 1
    ids[2, 3:] = 1
    return ids, (ids != 1).long()


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(model_dir, tmp_path, capsys, name, tp):
    convert(model_dir(name), tmp_path / "out", Options(tp=tp), progress=False)
    ids, mask = batch()
    with torch.no_grad():
        want = tiny.build(name)(ids, attention_mask=mask).logits
    for got in tiny.on_ranks(tmp_path / "out", tp, lambda m: head_logits(m, *m(ids, attention_mask=mask), mask)):
        assert got.shape == want.shape and tiny.rel(got, want) < 1e-5
    assert run_main(capsys, "inspect", tmp_path / "out")[0] == 0        # inspect describes every kind of head
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())["model"]["classifier"]
    assert m["steps"][-1]["op"] == "linear" and m["pool"] == ("mean" if name == "modernbert_cls" else "pooler"
                                                              if name in ("bert_cls", "nomic_bert", "gte_untyped",
                                                                          "albert")
                                                              else "late" if name == "eurobert_late" else "first")


def tokenizer():
    """A word-level tokenizer over the tiny vocab with RoBERTa's specials and pair template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 101)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                      special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", cls_token="<s>", sep_token="</s>")


QUERIES = ["w5 w6", "w7 w8 w9 w10"]
PASSAGES = ["w11 w12 w13", "w14"]


def cross_encoder(model_copy, tmp_path, capsys, **overrides):
    src = model_copy("xlm_roberta", **overrides)
    tokenizer().save_pretrained(src)
    assert run_main(capsys, "convert", "--quiet", src, tmp_path / "out")[0] == 0
    enc = tokenizer()(QUERIES, PASSAGES, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = tiny.build("xlm_roberta", **overrides)(**enc).logits
    return tmp_path / "out", logits


def test_a_cross_encoder_scores_pairs_through_the_cli(model_copy, tmp_path, capsys):
    out, logits = cross_encoder(model_copy, tmp_path, capsys, id2label={0: "no", 1: "maybe", 2: "yes"}, num_labels=3)
    args = [a for q, p in zip(QUERIES, PASSAGES) for a in ("-t", q, "--pair", p)]
    code, stdout, err = run_main(capsys, "classify", out, *args)
    assert code == 0, err
    rows = [json.loads(line) for line in stdout.splitlines()]
    probs = logits.softmax(-1)
    for row, p in zip(rows, probs):
        assert row["label"] == ["no", "maybe", "yes"][int(p.argmax())]
        assert torch.allclose(torch.tensor(list(row["scores"].values())), p, atol=1e-5)
    (tmp_path / "pairs.tsv").write_text("".join(f"{q}\t{p}\n" for q, p in zip(QUERIES, PASSAGES)))
    assert run_main(capsys, "classify", out, "--file", tmp_path / "pairs.tsv")[1] == stdout
    assert run_main(capsys, "classify", out, "--file", tmp_path / "pairs.tsv", "--batch-size", 1)[1] == stdout


def test_a_one_logit_reranker_gives_a_score(model_copy, tmp_path, capsys):
    out, logits = cross_encoder(model_copy, tmp_path, capsys, num_labels=1)
    code, stdout, err = run_main(capsys, "classify", out, "-t", QUERIES[0], "--pair", PASSAGES[0], "-t", QUERIES[1],
                                 "--pair", PASSAGES[1])
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert code == 0 and [r["logit"] for r in rows] == pytest.approx(logits[:, 0].tolist(), abs=1e-5)
    assert [r["score"] for r in rows] == pytest.approx(torch.sigmoid(logits[:, 0]).tolist(), abs=1e-5)


def test_what_cannot_be_classified_is_refused_in_one_line(model_dir, model_copy, tmp_path, capsys):
    src = model_copy("roberta")                     # a masked-LM checkpoint: no classifier
    tokenizer().save_pretrained(src)
    assert run_main(capsys, "convert", "--quiet", src, tmp_path / "mlm")[0] == 0
    assert_one_line_error(*run_main(capsys, "classify", tmp_path / "mlm", "-t", "w5")[::2], EXIT_BAD_INPUT,
                          "holds no classifier fmconvert runs")
    assert_one_line_error(*run_main(capsys, "classify", tmp_path / "mlm", "-t", "w5", "--pair", "w6", "--pair",
                                    "w7")[::2], EXIT_BAD_INPUT, "2 pairs for 1 inputs")
    tiny.refuses(model_copy("deberta_v3"), tmp_path / "out", "classifier's activation 'mish'", pooler_hidden_act="mish")
    shutil.copytree(model_dir("deberta_v3"), tmp_path / "quick")     # one the runtime has, but no classifier takes
    tiny.refuses(tmp_path / "quick", tmp_path / "out", "classifier's activation 'quick_gelu'",
                 pooler_hidden_act="quick_gelu")


def test_verify_checks_the_head_and_catches_a_wrong_one(model_dir, tmp_path):
    """verify runs the head too, against the task model's own logits: int8 at tp 2 passes with every label agreed;
    a head with relu for its tanh in the manifest fails on the classifier's logits."""
    from fmconvert.manifest import MANIFEST, dumps, read
    from fmconvert.verify import verify
    src = model_dir("xlm_roberta")
    convert(src, tmp_path / "out", Options(tp=2, int8=True, group_size=16), progress=False)
    r = verify(src, tmp_path / "out", tokens=32)
    assert r["passed"] and r["end_to_end"]["classifier"]["top1"] == 1.0
    assert r["end_to_end"]["classifier"]["rel_rms"] < 0.05
    m = read(tmp_path / "out")
    m["model"]["classifier"]["steps"][0]["act"] = "relu"
    (tmp_path / "out" / MANIFEST).write_text(dumps(m))
    r = verify(src, tmp_path / "out", tokens=32)
    assert not r["passed"] and any("classifier logits" in f for f in r["failures"])


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", ["bert_tokens", "roberta_tokens", "deberta_tokens", "modernbert_tokens"])
def test_token_logits_match_transformers(model_dir, tmp_path, name, tp):
    convert(model_dir(name), tmp_path / "out", Options(tp=tp), progress=False)
    ids, mask = batch()
    with torch.no_grad():
        want = tiny.build(name)(ids, attention_mask=mask).logits
    real = mask.bool()
    for got in tiny.on_ranks(tmp_path / "out", tp, lambda m: head_logits(m, *m(ids, attention_mask=mask), mask)):
        assert got.shape == want.shape and tiny.rel(got[real], want[real]) < 1e-5


def test_a_token_classifier_labels_each_word_through_the_cli(model_copy, tmp_path, capsys):
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    src = model_copy("roberta_tokens", id2label=dict(enumerate(names)))
    tokenizer().save_pretrained(src)
    assert run_main(capsys, "convert", "--quiet", src, tmp_path / "out")[0] == 0
    text = "w5 w6  w7 w8"
    code, stdout, err = run_main(capsys, "classify", tmp_path / "out", "-t", text, "-t", "w9")
    assert code == 0, err
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [(r["token"], r["start"], r["end"]) for r in rows[0]] == [("w5", 0, 2), ("w6", 3, 5), ("w7", 7, 9),
                                                                      ("w8", 10, 12)]
    with torch.no_grad():
        p = tiny.build("roberta_tokens", id2label=dict(enumerate(names)))(
            **tokenizer()([text], return_tensors="pt")).logits.softmax(-1)[0, 1:-1]      # the words, not <s> </s>
    assert [r["label"] for r in rows[0]] == [names[int(i)] for i in p.argmax(-1)]
    assert [r["score"] for r in rows[0]] == pytest.approx(p.max(-1).values.tolist(), abs=1e-5)
    assert len(rows[1]) == 1
    assert_one_line_error(*run_main(capsys, "classify", tmp_path / "out", "-t", "w5", "--pair", "w6")[::2],
                          EXIT_BAD_INPUT, "drop --pair")


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", ["roberta_qa", "modernbert_qa"])
def test_qa_start_and_end_logits_match_transformers(model_dir, tmp_path, name, tp):
    convert(model_dir(name), tmp_path / "out", Options(tp=tp), progress=False)
    ids, mask = batch()
    with torch.no_grad():
        o = tiny.build(name)(ids, attention_mask=mask)
    want, real = torch.stack([o.start_logits, o.end_logits], -1), mask.bool()
    for got in tiny.on_ranks(tmp_path / "out", tp, lambda m: head_logits(m, *m(ids, attention_mask=mask), mask)):
        assert tiny.rel(got[real], want[real]) < 1e-5


def test_answers_are_the_best_context_spans(model_copy, tmp_path, capsys, monkeypatch):
    """Each answer is the span of the context (never of the question) whose start and end logits sum highest, at
    most --max-answer tokens, by brute force over transformers' logits; its characters come back from the text."""
    src = model_copy("roberta_qa")
    tokenizer().save_pretrained(src)
    assert run_main(capsys, "convert", "--quiet", src, tmp_path / "out")[0] == 0
    questions, contexts = ["w5 w6", "w7"], ["w10 w11  w12 w13 w14 w15", "w20 w21 w22"]
    code, stdout, err = run_main(capsys, "answer", tmp_path / "out", "--max-answer", 3,
                                 *[a for q, c in zip(questions, contexts) for a in ("-q", q, "-c", c)])
    assert code == 0, err
    got = [json.loads(line) for line in stdout.splitlines()]
    hf = tiny.build("roberta_qa")
    for q, c, g in zip(questions, contexts, got):
        enc = tokenizer()(q, c, return_tensors="pt", return_offsets_mapping=True)
        spans = enc.pop("offset_mapping")[0]
        with torch.no_grad():
            o = hf(**enc)
        ctx = [k for k, s in enumerate(enc.sequence_ids(0)) if s == 1]
        best = max(((i, j) for i in ctx for j in ctx if i <= j < i + 3),
                   key=lambda ij: float(o.start_logits[0, ij[0]] + o.end_logits[0, ij[1]]))
        a, z = int(spans[best[0], 0]), int(spans[best[1], 1])
        assert (g["answer"], g["start"], g["end"]) == (c[a:z], a, z) and 0 < g["score"] <= 1
    assert_one_line_error(*run_main(capsys, "answer", tmp_path / "out", "-q", "w5")[::2], EXIT_BAD_INPUT,
                          "1 questions for 0 contexts")
    monkeypatch.setenv("COLUMNS", "300")              # inspect's table, unwrapped
    code, stdout, _ = run_main(capsys, "inspect", tmp_path / "out")
    assert code == 0 and "a start and an end logit each" in stdout and "fmconvert answer" in stdout


def test_a_qa_head_is_verified_and_misuse_refused_in_one_line(model_copy, tmp_path, capsys):
    """verify compares a QA head's start and end logits with transformers'; classify points a QA model to answer;
    a question that leaves its context no token under --max-length is refused, not handed to the tokenizer."""
    from fmconvert.verify import verify
    src = model_copy("roberta_qa")
    tokenizer().save_pretrained(src)
    out = tmp_path / "out"
    assert run_main(capsys, "convert", "--quiet", src, out)[0] == 0
    r = verify(src, out, tokens=16)
    assert r["passed"] and r["end_to_end"]["classifier"]["rel_rms"] < 1e-5
    assert_one_line_error(*run_main(capsys, "classify", out, "-t", "w5")[::2], EXIT_BAD_INPUT, "fmconvert answer")
    # 4 question tokens and <s> </s> </s> </s> fill 8
    assert_one_line_error(*run_main(capsys, "answer", out, "-q", "w5 w6 w7 w8", "-c", "w9", "--max-length", 8)[::2],
                          EXIT_BAD_INPUT, "no room for its context", "--max-length")
    code, stdout, err = run_main(capsys, "answer", out, "-q", "w5 w6 w7", "-c", "w9 w10", "--max-length", 8)
    assert code == 0 and json.loads(stdout)["answer"] == "w9", err


def test_a_long_context_is_read_in_overlapping_windows(model_copy, tmp_path, capsys):
    """A context past --max-length: windows of 16 tokens overlapping by 4, each searched as a whole context is, the
    most probable span of any window kept (brute force over transformers' logits for each window); --stride 0 reads
    the first window only."""
    src = model_copy("roberta_qa")
    tokenizer().save_pretrained(src)
    assert run_main(capsys, "convert", "--quiet", src, tmp_path / "out")[0] == 0
    question, context = "w5 w6", " ".join(f"w{i}" for i in range(10, 40))
    tok, hf = tokenizer(), tiny.build("roberta_qa")
    enc = tok(question, context, truncation="only_second", max_length=16, stride=4, return_overflowing_tokens=True,
              return_offsets_mapping=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        o = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    found = []
    for b in range(enc["input_ids"].shape[0]):
        ctx = torch.tensor([s == 1 for s in enc.sequence_ids(b)])
        st, en = o.start_logits[b].masked_fill(~ctx, -1e9), o.end_logits[b].masked_fill(~ctx, -1e9)
        ij = max(((i, j) for i in range(len(ctx)) for j in range(i, min(i + 3, len(ctx))) if ctx[i] and ctx[j]),
                 key=lambda ij: float(st[ij[0]] + en[ij[1]]))
        p = float(st.softmax(0)[ij[0]] * en.softmax(0)[ij[1]])
        spans = enc["offset_mapping"][b]
        found.append((p, int(spans[ij[0], 0]), int(spans[ij[1], 1])))
    assert len(found) > 2
    for stride, want in [(4, max(found)), (0, found[0])]:
        code, stdout, err = run_main(capsys, "answer", tmp_path / "out", "-q", question, "-c", context,
                                     "--max-length", 16, "--max-answer", 3, "--stride", stride)
        assert code == 0, err
        got = json.loads(stdout)
        assert (got["start"], got["end"]) == want[1:] and got["score"] == pytest.approx(want[0], abs=1e-5)
