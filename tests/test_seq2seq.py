"""Encoder-decoders (configs/t5_seq2seq.toml with configs/t5.toml): T5ForConditionalGeneration as T5 v1.0 (tied,
scaled head), T5 v1.1 / Flan-T5 (gated MLP, a head of its own), MT5 and UMT5 (a relative bias per layer), against
transformers at tp 1 and 2: the encoder's states, teacher-forced logits over a padded source, an incremental decode
through the cache, greedy generation token for token; int8 within its error; the halves' tensors stored once each;
the CLI's generate and verify; bad configs refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import tiny
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.generate import generate
from fmconvert.runtime.load import load

BASE = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0,
            pad_token_id=0, eos_token_id=1)
BART = dict(vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
            decoder_start_token_id=2, pad_token_id=1, bos_token_id=0, eos_token_id=2, forced_eos_token_id=None)
MODELS = {   # name -> (config class, model class, config overrides, untied head)
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(feed_forward_proj="relu"), False),
    "flan_t5": ("T5Config", "T5ForConditionalGeneration", dict(feed_forward_proj="gated-gelu"), True),
    "mt5": ("MT5Config", "MT5ForConditionalGeneration", dict(feed_forward_proj="gated-gelu"), True),
    "umt5": ("UMT5Config", "UMT5ForConditionalGeneration", dict(feed_forward_proj="gated-gelu"), True),
    "bart": ("BartConfig", "BartForConditionalGeneration", dict(BART, activation_function="gelu"), False),
    "mbart": ("MBartConfig", "MBartForConditionalGeneration", dict(BART, activation_function="relu",
                                                                     scale_embedding=True), False),
    "plbart": ("PLBartConfig", "PLBartForConditionalGeneration", dict(BART, activation_function="gelu",
                                                                        scale_embedding=True), False),
}


def build(name: str, **overrides):
    """transformers' model with random weights (norms and relative biases randomized so that a wrong one shows);
    Flan-T5's head its own, as Flan-T5 and T5 v1.1 save it (tie_word_embeddings false, no scaling)."""
    import transformers
    cfg_cls, model_cls, kw, untied = MODELS[name]
    config = getattr(transformers, cfg_cls)(**{**({} if "d_model" in kw else BASE), **kw, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layer_norm" in n or "layernorm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            elif n.endswith("relative_attention_bias.weight"):
                p.copy_(torch.randn_like(p))
        if hasattr(model, "final_logits_bias"):      # BART: zeros by default
            model.final_logits_bias.copy_(torch.randn_like(model.final_logits_bias) * 0.1)
        if untied:
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.2)
            model.config.tie_word_embeddings = False
            model.config.scale_decoder_outputs = False
    return model


def saver(tmp_path_factory, make):
    """name -> the directory of make(name) saved, once per module."""
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = tmp_path_factory.mktemp(name) / "src"
            make(name).save_pretrained(made[name])
        return made[name]
    return get


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return saver(tmp_path_factory, build)


def source():
    """Two sources of 9, the second padded on the right (mask 0 there), and a teacher-forced target."""
    ids = tiny.ids(9, 3, B=2).remainder(94) + 2
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = 0, 0
    target = tiny.ids(6, 4, B=2).remainder(94) + 2
    target[:, 0] = 0
    return ids, mask, target


def until_eos(tokens, eos: int) -> list:
    """Each row's tokens after the start token, up to and with its first eos (transformers pads a finished row; the
    runtime goes on until every row has finished)."""
    rows = []
    for row in tokens[:, 1:].tolist():
        rows.append(row[:row.index(eos) + 1] if eos in row else row)
    return rows


def matches_transformers(src, out, hf, tp, ids, mask, target):
    """src converted at tp into out gives, on every rank, transformers' (hf's) encoder states over the real tokens,
    teacher-forced logits, the same logits a step at a time through the cache, and its greedy tokens."""
    convert(src, out, Options(tp=tp), progress=False)
    assert (out / "encoder" / "manifest.json").is_file()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=target)
        greedy = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=False, num_beams=1)

    def run(m):
        enc = m.source_encoder.hidden(ids, attention_mask=mask)
        m.attach(enc, mask)
        whole = m(target)
        cache = m.new_cache(2, target.shape[1])
        steps = torch.cat([m(target[:, j:j + 1], cache) for j in range(target.shape[1])], 1)
        return enc, whole, steps, generate(m, ids, 7, source_mask=mask, eos_token_id=hf.config.eos_token_id)[0]
    real = mask.bool()
    for enc, whole, steps, tokens in tiny.on_ranks(out, tp, run):
        assert tiny.rel(enc[real], want.encoder_last_hidden_state[real]) < 1e-5
        assert tiny.rel(whole, want.logits) < 1e-5
        assert tiny.rel(steps, want.logits) < 1e-5
        assert until_eos(tokens, hf.config.eos_token_id) == until_eos(greedy, hf.config.eos_token_id)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_transformers(saved, tmp_path, name, tp):
    matches_transformers(saved(name), tmp_path / "out", build(name), tp, *source())


def test_the_bias_and_the_source_each_matter(saved, tmp_path):
    """Leaving out the decoder's relative bias, or the source's padding, moves the logits: both are exercised."""
    convert(saved("flan_t5"), tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    ids, mask, target = source()
    m.attach(m.source_encoder.hidden(ids, attention_mask=mask), mask)
    base = m(target)
    assert m.spec["rel_bias"] == {"buckets": 8, "max_distance": 20, "causal": True}
    unmasked = m.cross_mask
    m.cross_mask = None
    assert tiny.rel(m(target)[1], base[1]) > 1e-3
    m.cross_mask = unmasked
    m.g["rel_bias.weight"] = torch.zeros_like(m.g["rel_bias.weight"])
    assert tiny.rel(m(target), base) > 1e-3


def test_int8_stays_close_and_halves_are_stored_apart(saved, tmp_path):
    """int8 (cross-attention quantized too) keeps the logits close; the encoder's tensors live in encoder/ only,
    the decoder's beside it, and the summary counts the shared embedding once."""
    out = tmp_path / "out"
    s = convert(saved("flan_t5"), out, Options(tp=2, int8=True), progress=False)
    hf = build("flan_t5")
    assert s["params"] == sum(p.numel() for p in hf.parameters())      # shared.weight once, lm_head its own
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["encoder"] == "encoder" and m["model"]["decoder_start_token_id"] == 0
    assert "layers.0.cross_kv.weight" in m["quantization"]["tensors"]
    enc = json.loads((out / "encoder" / "manifest.json").read_text())
    assert enc["model"]["architecture"] == "T5EncoderModel" and enc["model"]["kind"] == "encoder"
    # the shared embeddings are stored once, with the decoder, and the encoder half reads them from there
    assert enc["model"]["embed_from"] == ".." and not any(n.startswith("embed.") for r in enc["ranks"]
                                                           for n in r["tensors"])
    with safe_open(out / "rank1-00001.safetensors", "pt") as f:
        names = set(f.keys())
    assert "layers.1.cross_q.weight" in names and not any("encoder" in n for n in names)
    ids, mask, target = source()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits

    def run(m):
        m.attach(m.source_encoder.hidden(ids, attention_mask=mask), mask)
        return m(target)
    for got in tiny.on_ranks(out, 2, run):
        assert tiny.rel(got, want) < 0.05


def test_reassembles_to_the_source_exactly(saved, tmp_path):
    """Both halves back under the source's names: every tensor the source holds, bit for bit (the embeddings the
    two halves share once, T5's tied copies as transformers saves them left out)."""
    from safetensors.torch import load_file

    from fmconvert.reassemble import reassemble
    for name in ("umt5", "bart"):      # BART: the shared table's name, picked by the flags the conversion recorded
        src = saved(name)
        convert(src, tmp_path / name, Options(tp=2), progress=False)
        got = reassemble(tmp_path / name)[1]
        want = load_file(src / "model.safetensors")
        want = {k: v for k, v in want.items() if not k.endswith("embed_tokens.weight")}
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_cli_generate_and_verify(saved, tmp_path):
    """`fmconvert generate` prints the decoder's text alone (not the source) and the tokens of greedy decoding;
    `fmconvert verify` passes, and fails when the encoder's shard is changed."""
    import shutil

    from click.testing import CliRunner

    from fmconvert.cli import cli
    src = tmp_path / "src"
    shutil.copytree(saved("flan_t5"), src)
    out = tmp_path / "out"
    runner = CliRunner()
    r = runner.invoke(cli, ["convert", str(src), str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["generate", str(out), "-p", "hello", "-n", "6"])
    assert r.exit_code == 0, r.output
    assert "hello" not in r.stdout and "6 tokens" in r.stderr
    assert runner.invoke(cli, ["generate", str(out), "-p", "x", "--chat"]).exit_code != 0
    r = runner.invoke(cli, ["verify", str(src), str(out)])
    assert r.exit_code == 0 and "PASSED" in r.output, r.output
    shard = out / "encoder" / "rank0-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-8:] = b"\x7f" * 8
    shard.write_bytes(bytes(data))
    r = runner.invoke(cli, ["verify", str(src), str(out)])
    assert r.exit_code != 0 and "encoder:" in r.output, r.output


def test_a_forced_first_token_as_transformers_forces_it(saved, tmp_path):
    """mBART-50 and NLLB start their output with the target language's token (forced_bos_token_id): the first new
    token is that one, and the rest follows from it as in transformers."""
    convert(saved("mbart"), tmp_path / "out", Options(), progress=False)
    ids, mask, _ = source()
    with torch.no_grad():
        want = build("mbart").generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                       num_beams=1, forced_bos_token_id=7)
    got = generate(load(tmp_path / "out"), ids, 6, source_mask=mask, forced_bos=7, eos_token_id=2)[0]
    assert got[:, 1].tolist() == [7, 7] and until_eos(got, 2) == until_eos(want, 2)


def test_the_encoder_half_loads_on_its_own(saved, tmp_path):
    """encoder/ is a conversion of its own (`fmconvert embed` reads it): loaded alone it reads the shared embeddings
    from the decoder's files above it and gives the states transformers' encoder does; with the decoder gone it
    says where its embeddings were."""
    import shutil
    out = tmp_path / "out"
    convert(saved("bart"), out, Options(), progress=False)
    ids, mask, _ = source()
    with torch.no_grad():
        want = build("bart").get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    got = load(out / "encoder").hidden(ids, attention_mask=mask)
    assert tiny.rel(got[mask.bool()], want[mask.bool()]) < 1e-5
    shutil.copytree(out / "encoder", tmp_path / "alone")
    with pytest.raises(Exception, match="embeddings are stored with its decoder"):
        load(tmp_path / "alone")


def test_t5_head_is_tied_unless_the_checkpoint_holds_another(tmp_path):
    """transformers 5 calls every T5 tied, keeps T5 v1.0's scaling, and unties the head when the checkpoint holds an
    lm_head that differs from the embeddings: a scaled model with a head of its own converts with that head."""
    hf = build("t5")
    with torch.no_grad():
        hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.lm_head.weight) * 0.2)
    hf.save_pretrained(tmp_path / "src")
    from transformers import T5ForConditionalGeneration
    ref = T5ForConditionalGeneration.from_pretrained(tmp_path / "src").eval()
    assert ref.config.scale_decoder_outputs and ref.lm_head.weight.data_ptr() != ref.shared.weight.data_ptr()
    convert(tmp_path / "src", tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    assert not m.spec["tied_embeddings"] and m.spec["logit_scale"] == pytest.approx(32 ** -0.5)
    ids, mask, target = source()
    m.attach(m.source_encoder.hidden(ids, attention_mask=mask), mask)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits
    assert tiny.rel(m(target), want) < 1e-5


def test_a_missing_or_foreign_encoder_is_refused_in_one_line(saved, tmp_path, capsys):
    """An encoder-decoder whose encoder/ is gone, or is another conversion (here: the same model at another tp), is
    refused by the CLI in one line that names it, with no traceback."""
    import shutil

    from corpus import assert_one_line_error, run_main
    out, other = tmp_path / "out", tmp_path / "other"
    convert(saved("bart"), out, Options(), progress=False)
    convert(saved("bart"), other, Options(tp=2), progress=False)
    shutil.rmtree(out / "encoder")
    shutil.copytree(other / "encoder", out / "encoder")
    code, _, err = run_main(capsys, "generate", out, "-p", "hi", "-n", "2")
    assert_one_line_error(code, err, 2, "is not this decoder's encoder", "tp=2")
    shutil.rmtree(out / "encoder")
    code, _, err = run_main(capsys, "generate", out, "-p", "hi", "-n", "2")
    assert_one_line_error(code, err, 2, "whose encoder (encoder/) cannot be read", "does not exist")


def test_untied_bart_reads_each_halfs_own_embeddings(tmp_path):
    """BART with tie_word_embeddings false: transformers 5 unties the encoder's and the decoder's tables from the
    shared one (and the head); the conversion reads each half's own, stores the encoder's with it, and matches."""
    hf = build("bart", tie_word_embeddings=False)
    with torch.no_grad():
        for emb in (hf.model.encoder.embed_tokens, hf.model.decoder.embed_tokens, hf.lm_head):
            emb.weight.copy_(torch.randn_like(emb.weight) * 0.2)
    hf.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out", Options(tp=2), progress=False)
    enc = json.loads((tmp_path / "out" / "encoder" / "manifest.json").read_text())["model"]
    assert enc["embed_from"] is None
    from transformers import BartForConditionalGeneration
    ref = BartForConditionalGeneration.from_pretrained(tmp_path / "src").eval()
    ids, mask, target = source()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=target)

    def run(m):
        m.attach(m.source_encoder.hidden(ids, attention_mask=mask), mask)
        return m(target)
    for got in tiny.on_ranks(tmp_path / "out", 2, run):
        assert tiny.rel(got, want.logits) < 1e-5


def test_generation_past_a_position_table_is_refused_in_one_line(saved, tmp_path, capsys):
    """BART's tables end at 64 positions: a source past the encoder's, or more new tokens than the decoder's holds,
    is refused in one line naming the limit (before, an IndexError); a decoder with learned positions likewise."""
    from corpus import assert_one_line_error, run_main
    from fmconvert.errors import FmError
    out = tmp_path / "out"
    convert(saved("bart"), out, Options(), progress=False)
    m = load(out)
    with pytest.raises(FmError, match="the source is 70 tokens, but BartForConditionalGeneration's encoder reads at "
                                      "most 64: shorten it"):
        generate(m, torch.randint(3, 90, (1, 70)), 4)
    from fmconvert.runtime.beam import beam_search
    with pytest.raises(FmError, match="need 66 positions, but BartForConditionalGeneration has 64: ask for at most 63"):
        beam_search(m, torch.randint(3, 90, (1, 5)), 2, 65)
    code, _, err = run_main(capsys, "generate", out, "-p", "hi", "-n", "100")
    assert_one_line_error(code, err, 2, "has 64: ask for at most 63 new tokens")


def test_cli_target_language(saved, tmp_path, capsys):
    """--tgt-lang makes the language's token the first new one (NLLB's fra_Latn; here a word of the test vocabulary,
    w7), as transformers does with forced_bos_token_id; an unknown language, or a tokenizer without source
    languages, is refused in one line."""
    import shutil

    from test_classify import tokenizer

    from corpus import assert_one_line_error, run_main
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(saved("mbart"), src)
    tok = tokenizer()
    tok.save_pretrained(src)
    convert(src, out, Options(), progress=False)
    code, stdout, err = run_main(capsys, "generate", out, "-p", "w5 w6", "-n", "3", "--tgt-lang", "w7")
    assert code == 0, err
    with torch.no_grad():
        want = build("mbart").generate(input_ids=torch.tensor([tok("w5 w6").input_ids]), max_new_tokens=3,
                                       do_sample=False, num_beams=1, forced_bos_token_id=7)
    assert want[0, 1] == 7 and stdout.strip() == tok.decode(want[0, 1:], skip_special_tokens=True).strip()
    code, _, err = run_main(capsys, "generate", out, "-p", "w5", "--tgt-lang", "xx_Nope")
    assert_one_line_error(code, err, 2, "no token for the language 'xx_Nope'")
    code, _, err = run_main(capsys, "generate", out, "-p", "w5", "--src-lang", "en_XX")
    assert_one_line_error(code, err, 2, "takes no source language")


def test_cli_generate_file_in_batches(saved, tmp_path, capsys):
    """generate --file: each source's output on its own line, in order, the same text as transformers' greedy
    decoding of that source alone, though sources of several lengths ran padded together in batches of 2."""
    import shutil

    from test_classify import tokenizer

    from corpus import assert_one_line_error, run_main
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(saved("bart"), src)
    tok = tokenizer()
    tok.save_pretrained(src)
    convert(src, out, Options(), progress=False)
    lines = ["w5 w6 w7 w8 w9", "w10", "w11 w12 w13", "w14 w15"]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    code, stdout, err = run_main(capsys, "generate", out, "-f", tmp_path / "in.txt", "--batch-size", "2", "-n", "5")
    assert code == 0, err
    hf = build("bart")

    def alone(beams):           # transformers' text for each source on its own
        with torch.no_grad():
            return [tok.decode(hf.generate(input_ids=torch.tensor([tok(t).input_ids]), max_new_tokens=5,
                                           do_sample=False, num_beams=beams)[0, 1:], skip_special_tokens=True)
                    for t in lines]
    assert stdout.split("\n")[:len(lines)] == alone(1) and len(stdout.strip("\n").split("\n")) == len(lines)
    code, stdout, err = run_main(capsys, "generate", out, "-f", tmp_path / "in.txt", "--batch-size", "3", "-n", "5",
                                 "--num-beams", "2")
    assert code == 0, err
    assert stdout.split("\n")[:len(lines)] == alone(2)
    code, _, err = run_main(capsys, "generate", out, "-f", tmp_path / "in.txt", "-p", "w5")
    assert_one_line_error(code, err, 2, "give --prompt or --file")


def test_dry_run_and_inspect_size_both_halves(saved, tmp_path, capsys):
    """--dry-run plans both halves (their bytes the conversion's) and sizes the source's keys and values a decoder
    keeps per source token; inspect says the same of the written output."""
    from corpus import run_main
    dry = convert(saved("flan_t5"), tmp_path / "out", Options(tp=2, dry_run=True), progress=False)
    real = convert(saved("flan_t5"), tmp_path / "out", Options(tp=2), progress=False)
    assert dry["bytes_out"] == real["bytes_out"] and dry["params"] == real["params"]
    assert dry["source_kv"] == 2 * 2 * 2 * 8 * 4        # 2 layers x k, v x 2 heads a rank x 8 wide x float32
    code, stdout, _ = run_main(capsys, "inspect", tmp_path / "out")
    words = " ".join(w for w in stdout.split() if w not in ("│", "┃"))        # the table may wrap its cells
    assert code == 0 and "source keys a rank" in words and "256 B a source token" in words, stdout


@pytest.mark.parametrize("name", ["t5", "umt5", "bart"])
def test_the_graph_safe_decode_step_matches_the_eager_forward(saved, tmp_path, name):
    """The decoder's graph-safe step (what a CUDA graph captures) gives each teacher-forced step's logits: T5's
    relative bias from the step's position on the device over the whole static cache (UMT5: each layer's own
    table), BART's learned positions, cross-attention over the padded source; past T5's max distance too."""
    convert(saved(name), tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    ids, mask, _ = source()
    target = tiny.ids(30, 5, B=2).remainder(94) + 2              # 30 steps: offsets past max_distance (20)
    m.attach(m.source_encoder.hidden(ids, attention_mask=mask), mask)
    want = m(target)
    cache = m.new_cache(2, target.shape[1] + 4)                  # rows past the filled ones stay masked
    got = []
    for j in range(target.shape[1]):
        got.append(m.decode_step(target[:, j:j + 1], cache, torch.tensor([j])))
        cache.length += 1
    assert tiny.rel(torch.stack(got, 1), want) < 1e-5


CLASSIFIERS = {     # the test tokenizer's ids: pad 1, eos 2
    "BartForSequenceClassification": ("BartConfig", dict(BART, activation_function="gelu")),
    "MBartForSequenceClassification": ("MBartConfig", dict(BART, activation_function="gelu", scale_embedding=True)),
    "T5ForSequenceClassification": ("T5Config", dict(BASE, feed_forward_proj="gated-gelu", pad_token_id=1,
                                                     eos_token_id=2, decoder_start_token_id=1)),
}


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("arch", list(CLASSIFIERS))
def test_sequence_classifier_as_transformers(tmp_path, capsys, tp, arch):
    """BART's, mBART's and T5's *ForSequenceClassification (bart-large-mnli, the zero-shot classifiers): the source
    through the encoder and, shifted behind the start token, through the decoder, whose state at each text's last
    end token goes through the head. `classify` gives transformers' logits for premise/hypothesis pairs of several
    lengths; verify checks the head (its source rows end on the end token) and the decoder's states."""
    import transformers

    from test_classify import tokenizer

    from corpus import run_main
    from fmconvert.runtime.classify import classify
    torch.manual_seed(0)
    cfg_cls, kw = CLASSIFIERS[arch]
    hf = getattr(transformers, arch)(getattr(transformers, cfg_cls)(**kw, num_labels=3)).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "layer_norm" in n or "layernorm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            elif "classification_head" in n:
                p.copy_(torch.randn_like(p) * 0.5)
    src, out = tmp_path / "src", tmp_path / "out"
    hf.save_pretrained(src)
    tok = tokenizer()
    tok.save_pretrained(src)
    convert(src, out, Options(tp=tp), progress=False)
    premises, hypotheses = ["w5 w6 w7 w8", "w9", "w10 w11"], ["w12 w13", "w14 w15 w16", "w17"]
    batch = tok(premises, hypotheses, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    for got in tiny.on_ranks(out, tp, lambda m: classify(m, tok, premises, hypotheses)):
        assert tiny.rel(got, want) < 1e-5
    if tp == 1:
        code, stdout, err = run_main(capsys, "classify", out, "-t", premises[0], "--pair", hypotheses[0])
        assert code == 0, err
        assert json.loads(stdout)["label"] == hf.config.id2label[int(want[0].argmax())]
    code, stdout, err = run_main(capsys, "verify", src, out)
    assert code == 0 and "classifier logits" in stdout, stdout + err
    if tp == 1 and arch.startswith("Bart"):     # zero-shot, as transformers' pipeline scores labels by entailment
        from transformers import pipeline
        hf.config.id2label = {0: "contradiction", 1: "neutral", 2: "entailment"}
        cfg = json.loads((out / "config.json").read_text())
        cfg["id2label"] = {str(k): v for k, v in hf.config.id2label.items()}
        (out / "config.json").write_text(json.dumps(cfg))
        zs = pipeline("zero-shot-classification", model=hf, tokenizer=tok)
        for multi in (False, True):
            want = zs("w5 w6 w7", candidate_labels=["w20", "w21", "w22"], hypothesis_template="w30 {}",
                      multi_label=multi)
            code, stdout, err = run_main(capsys, "classify", out, "-t", "w5 w6 w7", "--labels", "w20,w21,w22",
                                         "--template", "w30 {}", *(["--multi-label"] if multi else []))
            got = json.loads(stdout)
            assert code == 0 and got["labels"] == want["labels"], (stdout, want)
            assert got["scores"] == pytest.approx(want["scores"], abs=1e-5)


def test_a_decoder_needs_its_source(saved, tmp_path):
    convert(saved("t5"), tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    with pytest.raises(ValueError, match="needs its source"):
        m(torch.tensor([[0, 5]]))


def test_a_start_token_outside_the_vocab_is_refused(tmp_path):
    src = tmp_path / "src"
    build("t5").save_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["decoder_start_token_id"] = 500
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="decoder_start_token_id"):
        convert(src, tmp_path / "out", Options(), progress=False)
    assert not (tmp_path / "out").exists()
