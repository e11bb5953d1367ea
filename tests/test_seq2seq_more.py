"""The fairseq-style encoder-decoders beside BART: Marian (configs/marian_seq2seq.toml with marian.toml: opus-mt,
post-LN, Marian's sinusoidal table from position 0), Pegasus (pegasus_seq2seq.toml with pegasus.toml: pre-LN,
Marian's table, which the checkpoint stores and the converter recomputes), Blenderbot (blenderbot_seq2seq.toml with
blenderbot.toml: pre-LN, learned positions from 0) and M2M100 / NLLB-200 (m2m100_seq2seq.toml with m2m100.toml:
pre-LN, fairseq's table counted from the ids past the pad token), against transformers at tp 1 and 2: the encoder's
states, teacher-forced logits over a padded source (M2M100's also padded on the left), an incremental decode through
the cache, greedy generation token for token. Each half's own embeddings (separate vocabularies, untied) are refused
in one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from test_seq2seq import matches_transformers, saver

import tiny
from fmconvert.pipeline import Options, convert

DIMS = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64, forced_eos_token_id=None)
# Marian: pad is the last id and starts the decoder, eos is 0 (opus-mt's); M2M100: fairseq's bos 0, pad 1, eos 2
MARIAN = dict(DIMS, vocab_size=128, pad_token_id=127, decoder_start_token_id=127, eos_token_id=0,
              activation_function="swish", scale_embedding=True)
MODELS = {   # name -> (config class, model class, config overrides, pad id)
    "marian": ("MarianConfig", "MarianMTModel", MARIAN, 127),
    "marian_separate": ("MarianConfig", "MarianMTModel",
                        dict(MARIAN, share_encoder_decoder_embeddings=False, decoder_vocab_size=80, pad_token_id=79,
                             decoder_start_token_id=79), 79),
    "marian_untied": ("MarianConfig", "MarianMTModel", dict(MARIAN, tie_word_embeddings=False,
                                                            scale_embedding=False), 127),
    "pegasus": ("PegasusConfig", "PegasusForConditionalGeneration",
                dict(DIMS, vocab_size=96, pad_token_id=0, decoder_start_token_id=0, eos_token_id=1,
                     activation_function="relu", scale_embedding=True), 0),
    "m2m100": ("M2M100Config", "M2M100ForConditionalGeneration",
               dict(DIMS, vocab_size=112, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                    activation_function="relu", scale_embedding=True, encoder_layerdrop=0.0, decoder_layerdrop=0.0),
               1),
    "blenderbot": ("BlenderbotConfig", "BlenderbotForConditionalGeneration",
                   dict(DIMS, vocab_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                        activation_function="gelu", scale_embedding=True), 0),
}


def build(name: str, **overrides):
    """transformers' model with random weights, its LayerNorms and final_logits_bias randomized so that a wrong one
    shows (an untied head its own)."""
    import transformers
    cfg_cls, model_cls, kw, _ = MODELS[name]
    config = getattr(transformers, cfg_cls)(**{**kw, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layer_norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
        if hasattr(model, "final_logits_bias"):      # zeros by default
            model.final_logits_bias.copy_(torch.randn_like(model.final_logits_bias) * 0.1)
        if not config.tie_word_embeddings:
            model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight) * 0.2)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return saver(tmp_path_factory, build)


def source(name: str, left: bool = False):
    """Two sources of 9 real ids (none the pad id, eos or the start token), the second padded with the pad id, on
    the right or (left) on the left, its mask 0 there; a teacher-forced target from the decoder's start token."""
    _, _, kw, pad = MODELS[name]
    vocab = kw.get("decoder_vocab_size") or kw["vocab_size"]
    ids = tiny.ids(9, 3, B=2).remainder(kw["vocab_size"] - 5) + 3
    ids[ids == pad] = 4
    mask = torch.ones_like(ids)
    cut = slice(0, 3) if left else slice(6, None)
    ids[1, cut], mask[1, cut] = pad, 0
    target = tiny.ids(6, 4, B=2).remainder(vocab - 5) + 3
    target[target == pad] = 4
    target[:, 0] = kw["decoder_start_token_id"]
    return ids, mask, target


def check(src, out, name, tp, ids, mask, target, **overrides):
    matches_transformers(src, out, build(name, **overrides), tp, ids, mask, target)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_transformers(saved, tmp_path, name, tp):
    check(saved(name), tmp_path / "out", name, tp, *source(name))


@pytest.mark.parametrize("tp", [1, 2])
def test_m2m100_with_a_source_padded_on_the_left(saved, tmp_path, tp):
    """fairseq's positions count a row's real tokens only: a source padded on the left gives its real tokens the
    states it gives them unpadded (in transformers and here), and the converted model still matches throughout."""
    ids, mask, target = source("m2m100", left=True)
    check(saved("m2m100"), tmp_path / "out", "m2m100", tp, ids, mask, target)

    def run(m):
        enc = m.source_encoder
        assert enc.spec["position"] == {"type": "sinusoidal", "offset": 2, "pad_id": 1}
        padded = enc.hidden(ids, attention_mask=mask)[1, 3:]
        alone = enc.hidden(ids[1:, 3:], attention_mask=mask[1:, 3:])[0]
        enc.spec["position"] = {"type": "sinusoidal", "offset": 2}      # positions counted from the row's start
        return tiny.rel(padded, alone), tiny.rel(enc.hidden(ids, attention_mask=mask)[1, 3:], alone)
    for same, moved in tiny.on_ranks(tmp_path / "out", tp, run):
        assert same < 1e-5 and moved > 1e-3


def test_the_position_tables(saved, tmp_path):
    """Pegasus's stored tables (ignored) are the ones the converter computes; Marian's table starts at position 0
    (sin 0 | cos 0) and is recorded as Marian's style; every table is written once per half, on each rank."""
    src = saved("pegasus")
    convert(src, tmp_path / "out", Options(tp=2), progress=False)
    with safe_open(src / "model.safetensors", "pt") as f:
        stored = f.get_tensor("model.encoder.embed_positions.weight")
        assert torch.equal(stored, f.get_tensor("model.decoder.embed_positions.weight"))
    for sub in ("", "encoder/"):
        for r in range(2):
            with safe_open(tmp_path / "out" / f"{sub}rank{r}-00001.safetensors", "pt") as f:
                assert torch.equal(f.get_tensor("pos_embed.weight"), stored)
    convert(saved("marian"), tmp_path / "m", Options(), progress=False)
    spec = json.loads((tmp_path / "m" / "manifest.json").read_text())["model"]
    assert spec["position"] == {"type": "sinusoidal", "offset": 0, "style": "marian"}
    with safe_open(tmp_path / "m" / "rank0-00001.safetensors", "pt") as f:
        table = f.get_tensor("pos_embed.weight")
    assert table.shape == (64, 32) and torch.equal(table[0], torch.tensor([0.0] * 16 + [1.0] * 16))
    with torch.no_grad():
        assert torch.equal(table, build("marian").model.decoder.embed_positions.weight)


@pytest.mark.parametrize("name", ["pegasus", "m2m100", "blenderbot"])
def test_untied_embeddings_each_half_its_own(tmp_path, name):
    """tie_word_embeddings false: transformers 5 gives each half its own table and the head its own; so does the
    conversion (the encoder half stores its table, not the decoder's), and the logits match."""
    build(name, tie_word_embeddings=False).save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out", Options(), progress=False)
    enc = json.loads((tmp_path / "out" / "encoder" / "manifest.json").read_text())["model"]
    assert enc["embed_from"] is None
    check(tmp_path / "src", tmp_path / "out2", name, 1, *source(name), tie_word_embeddings=False)



def test_verify_passes(saved, tmp_path):
    from click.testing import CliRunner

    from fmconvert.cli import cli
    for name in ("marian", "m2m100"):
        out = tmp_path / name
        convert(saved(name), out, Options(), progress=False)
        r = CliRunner().invoke(cli, ["verify", str(saved(name)), str(out)])
        assert r.exit_code == 0 and "PASSED" in r.output, r.output


@pytest.mark.parametrize("name", ["marian", "pegasus", "m2m100", "blenderbot"])
def test_the_graph_safe_decode_step_matches_the_eager_forward(saved, tmp_path, name):
    """The decoder's graph-safe step (what a CUDA graph captures: positions and cache writes from a device tensor,
    cross-attention over the attached source) gives each teacher-forced step's logits, for every position layout
    (Marian's and fairseq's tables, M2M100's counted from the ids, Blenderbot's learned one)."""
    from fmconvert.runtime.load import load
    convert(saved(name), tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    ids, mask, target = source(name)
    m.attach(m.source_encoder.hidden(ids, attention_mask=mask), mask)
    want = m(target)
    cache = m.new_cache(2, target.shape[1])
    got = []
    for j in range(target.shape[1]):
        got.append(m.decode_step(target[:, j:j + 1], cache, torch.tensor([j])))
        cache.length += 1
    assert tiny.rel(torch.stack(got, 1), want) < 1e-5
