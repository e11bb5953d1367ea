"""Wav2Vec2-Conformer (configs/wav2vec2_conformer.toml) against transformers on tiny random models, rotary, relative
and without positions: every layer's states and the CTC logits of a padded batch (padded frames too: the
convolution modules read them, in both) at tp 1 and 2 and in int8; `fmconvert transcribe` as the ASR pipeline
reads; the classification heads; `fmconvert verify` passing, and failing on a changed tensor; every source tensor
back from `reassemble`; unsupported configs refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.classify import head_logits
from fmconvert.verify import verify
from test_wav2vec2 import VOCAB, heads_match, save, tokenizer, waves, write_wav

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, conv_dim=(16, 16, 16),
             conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=16,
             num_conv_pos_embedding_groups=4, vocab_size=len(VOCAB), pad_token_id=0, conv_depthwise_kernel_size=7,
             feat_extract_norm="layer", conv_bias=True, layer_norm_eps=1e-3)   # not the blocks' 1e-5: both show


def build(position="rotary", model="Wav2Vec2ConformerForCTC", seed=0, **overrides):
    """transformers' model with every parameter moved off its init (norms, biases, pos_bias_u/v) and BatchNorm's
    running statistics random, so a misplaced or unused one shows."""
    import transformers
    torch.manual_seed(seed)
    config = transformers.Wav2Vec2ConformerConfig(**{**SMALL, "position_embeddings_type": position, **overrides})
    m = getattr(transformers, model)(config).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        for name, b in m.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.5)
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
            elif name.endswith("num_batches_tracked"):
                b.fill_(1234)
        if hasattr(m, "lm_head"):
            m.lm_head.weight.mul_(5)      # decisive characters, so argmax ties do not decide a test
    return m


@pytest.mark.parametrize("position,tp", [("rotary", 1), ("rotary", 2), ("relative", 1), ("relative", 2), (None, 2)])
def test_matches_transformers(tmp_path, position, tp):
    """Every layer's states, the last hidden state and the CTC logits of a padded batch with its mask, on every
    rank, over every frame: the padded ones are part of what the next block's conv reads, so they must match too.
    That padding moves the real frames (unlike Wav2Vec2's) is transformers' own doing, and checked here."""
    hf = build(position)
    out = tmp_path / "out"
    convert(save(tmp_path / "src", hf, mask=True), out, Options(tp=tp), progress=False)
    x, mask = waves()
    with torch.no_grad():
        want = hf(x, attention_mask=mask, output_hidden_states=True)
        base = hf.wav2vec2_conformer(x, attention_mask=mask, output_hidden_states=True)
        alone = hf.wav2vec2_conformer(x[1:, :2600]).last_hidden_state[0]
    real = hf._get_feature_vector_attention_mask(base.last_hidden_state.shape[1], mask).bool()
    assert not real.all() and tiny.rel(alone, base.last_hidden_state[1, :alone.shape[0]]) > 1e-3

    def run(m):
        h, states = m.hidden(x, attention_mask=mask, output_hidden_states=True)
        return h, states, head_logits(m, h, None, m.frames), m.frames
    for h, states, logits, frames in tiny.on_ranks(out, tp, run):
        assert torch.equal(frames, real)
        assert tiny.rel(h, base.last_hidden_state) < 1e-5
        # transformers: the first block's input, then each block's output (before the encoder's LayerNorm)
        assert len(states) == len(base.hidden_states) == 3
        assert all(tiny.rel(a, b) < 1e-5 for a, b in zip(states, base.hidden_states))
        assert tiny.rel(logits, want.logits) < 1e-5


def test_int8_stays_close(tmp_path):
    """int8 (every linear of the block, the conv module's pointwise convs included) at tp 2, against the float
    model; its frames' characters mostly agree."""
    hf = build("relative", seed=1)
    out = tmp_path / "out"
    convert(save(tmp_path / "src", hf, mask=True), out, Options(tp=2, int8=True, group_size=16), progress=False)
    m = json.loads((out / "manifest.json").read_text())
    int8 = {k.split(".", 2)[2] for k, t in m["ranks"][1]["tensors"].items() if t["dtype"] == "int8"}
    assert {"macaron_in.weight", "macaron_out.weight", "conv_in.weight", "conv_out.weight", "qkv.weight"} <= int8
    tiny.ctc_close(out, 2, hf, *waves(seed=4), 0.05, 0.9)


def test_cli_transcribe_as_the_asr_pipeline(tmp_path):
    """`fmconvert transcribe` of files of three lengths reads what transformers' pipeline reads of each alone (the
    runtime batches a Conformer's clips one length a batch, as padding would move their frames); `inspect` names
    the positions."""
    from click.testing import CliRunner
    from transformers import Wav2Vec2FeatureExtractor, pipeline

    from fmconvert.cli import cli
    from fmconvert.runtime.audio import load_audio
    hf = build("rotary", seed=2)
    src = save(tmp_path / "src", hf, mask=True)
    out = tmp_path / "out"
    runner = CliRunner()
    assert runner.invoke(cli, ["convert", str(src), str(out), "-q"]).exit_code == 0
    x, _ = waves((4000, 6000, 5000, 4000), seed=7)
    files = [write_wav(tmp_path / f"{i}.wav", x[i, :n]) for i, n in enumerate((4000, 6000, 5000, 4000))]
    asr = pipeline("automatic-speech-recognition", model=hf, tokenizer=tokenizer(tmp_path),
                   feature_extractor=Wav2Vec2FeatureExtractor(return_attention_mask=True))
    want = [asr(load_audio(f, 16000).numpy())["text"] for f in files]
    assert len(set(want)) > 2 and all(want)
    r = runner.invoke(cli, ["transcribe", str(out), *map(str, files)])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == [f"{f}\t{w}" for f, w in zip(files, want)]
    r = runner.invoke(cli, ["inspect", str(out)], env={"COLUMNS": "250"})
    assert "positions from the Conformer blocks' attention (rotary)" in r.output, r.output


@pytest.mark.parametrize("cls", ["Wav2Vec2ConformerForSequenceClassification",
                                 "Wav2Vec2ConformerForAudioFrameClassification"])
def test_classifiers_match_transformers(tmp_path, cls):
    """A clip's labels (every layer's states weighted by softmax(layer_weights)) and a frame's, at tp 2."""
    hf = build("relative", model=cls, num_labels=3, classifier_proj_size=8, use_weighted_layer_sum=True)
    with torch.no_grad():
        hf.layer_weights.copy_(torch.tensor([0.5, -1.0, 2.0]))
    out = tmp_path / "out"
    convert(save(tmp_path / "src", hf, mask=True), out, Options(tp=2), progress=False)
    heads_match(out, hf, *waves())


def test_reassembles_every_source_tensor(tmp_path):
    """tp 2: every tensor of the source back bit for bit (masked_spec_embed aside, which the table ignores): the
    BatchNorm's statistics and batch counter, rotary's inv_freq, the positional conv transformers builds but never
    runs, relative attention's biases."""
    for position in ("rotary", "relative"):
        src = save(tmp_path / f"src_{position}", build(position, mask_time_prob=0.05), mask=True)
        out = tmp_path / f"out_{position}"
        convert(src, out, Options(tp=2), progress=False)
        names = " ".join(tiny.gives_back(src, out))
        assert "num_batches_tracked" in names and "pos_conv_embed" in names
        assert ("inv_freq" in names) == (position == "rotary") and ("pos_bias_u" in names) == (position == "relative")


def test_verify_passes_and_a_changed_tensor_fails(tmp_path):
    """`fmconvert verify` passes a clean conversion (tp 2 emulated, int8 too), each layer compared; one rank's
    slice of a BatchNorm's running variance changed (hashes fixed) fails it, named."""
    src = save(tmp_path / "src", build("relative", seed=3), mask=True)
    for int8 in (False, True):
        out = tmp_path / f"out{int8}"
        convert(src, out, Options(tp=2, int8=int8), progress=False)
        r = verify(src, out)
        assert r["passed"], r["failures"]
        e = r["end_to_end"]
        assert [x["name"] for x in e["layers"]] == ["embeddings", "layer 0", "layer 1", "final norm"]
        assert e["rel_rms"] < (0.04 if int8 else 1e-5) and e["classifier"]["name"] == "CTC"
    r = verify(src, tiny.retouched(out.parent / "outFalse", 1, "layers.1.conv_bn.var", 3))
    assert not r["passed"] and r["integrity"]["passed"]
    assert "\n".join(r["tensors"]["failures"]).startswith("layers.1.conv_bn.var") and not r["end_to_end"]["passed"]


@pytest.mark.parametrize("overrides,match", [
    (dict(add_adapter=True), r"this config uses a variant fmconvert does not support \(add_adapter\)"),
    (dict(position_embeddings_type="alibi"), "position_embeddings_type must be rotary, relative or null"),
])
def test_unsupported_configs_are_refused_in_one_line(tmp_path, overrides, match):
    import transformers
    tiny.config_refused(tmp_path, transformers.Wav2Vec2ConformerConfig(**SMALL), "Wav2Vec2ConformerForCTC", match,
                        **overrides)
