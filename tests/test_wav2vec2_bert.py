"""Wav2Vec2-BERT (configs/wav2vec2_bert.toml) against transformers on tiny random models, with relative_key (Shaw),
rotary, Transformer-XL relative and no positions: every layer's states and the CTC logits of a padded batch of
SeamlessM4TFeatureExtractor's features at tp 1 and 2 and in int8; `fmconvert transcribe` as the ASR pipeline reads;
a clip classifier, a frame classifier and an x-vector; `fmconvert verify` passing, and failing on a changed
tensor; every source tensor back from `reassemble`; unsupported configs refused in one line. The adapter
(add_adapter: strided conv-and-attention layers after the blocks, the CTC head reading their fewer frames) in each
of these where transformers allows it."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.classify import head_logits
from fmconvert.verify import verify
from test_wav2vec2 import VOCAB, heads_match, tokenizer, waves, write_wav

# relative_key's clamp well inside the clips' 11-19 frames, and an eps the blocks' LayerNorms must take too
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
             vocab_size=len(VOCAB), pad_token_id=0, conv_depthwise_kernel_size=5, layer_norm_eps=1e-3,
             left_max_position_embeddings=4, right_max_position_embeddings=2)
LENGTHS = (6400, 4000)       # 19 and 11 frames


def build(position="relative_key", model="Wav2Vec2BertForCTC", seed=0, **overrides):
    """transformers' model with every parameter (norms, biases, distance embeddings, pos_bias_u/v) moved off its
    init, so a misplaced or unused one shows."""
    import transformers
    torch.manual_seed(seed)
    config = transformers.Wav2Vec2BertConfig(**{**SMALL, "position_embeddings_type": position, **overrides})
    m = getattr(transformers, model)(config).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        if hasattr(m, "lm_head"):
            m.lm_head.weight.mul_(5)      # decisive characters, so argmax ties do not decide a test
    return m


def extractor():
    from transformers import SeamlessM4TFeatureExtractor
    return SeamlessM4TFeatureExtractor()


def save(path, hf):
    path.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(path)
    tokenizer(path).save_pretrained(path)
    extractor().save_pretrained(path)
    return path


def features(lengths=LENGTHS, seed=3):
    """The clips through the feature extractor: rows [B, frames, 160] and the frame mask [B, frames]."""
    x, _ = waves(lengths, seed)
    out = extractor()([x[b, :n].numpy() for b, n in enumerate(lengths)], sampling_rate=16000, return_tensors="pt")
    return out.input_features, out.attention_mask


@pytest.mark.parametrize("position,tp", [("relative_key", 1), ("relative_key", 2), ("rotary", 2), ("relative", 2),
                                         (None, 1)])
def test_matches_transformers(tmp_path, position, tp):
    """Every layer's states, the last hidden state and the CTC logits of a padded batch with its mask, on every
    rank, over every frame (padded ones too); the frame mask is the extractor's. A shorter clip's real frames are
    what it gives alone: the causal conv modules read no padding."""
    hf = build(position)
    out = tmp_path / "out"
    convert(save(tmp_path / "src", hf), out, Options(tp=tp), progress=False)
    x, mask = features()
    with torch.no_grad():
        want = hf(x, attention_mask=mask, output_hidden_states=True)
        base = hf.wav2vec2_bert(x, attention_mask=mask, output_hidden_states=True)
    n = int(mask[1].sum())
    assert not mask.all()

    def run(m):
        h, states = m.hidden(x, attention_mask=mask, output_hidden_states=True)
        alone = m.hidden(x[1:, :n], attention_mask=mask[1:, :n])
        return h, states, head_logits(m, h, None, m.frames), alone
    for h, states, logits, alone in tiny.on_ranks(out, tp, run):
        assert tiny.rel(h, base.last_hidden_state) < 1e-5
        assert tiny.rel(alone[0], h[1, :n]) < 1e-5
        # transformers: the first block's input, then each block's output (no closing LayerNorm)
        assert len(states) == len(base.hidden_states) == 3
        assert all(tiny.rel(a, b) < 1e-5 for a, b in zip(states, base.hidden_states))
        assert tiny.rel(logits, want.logits) < 1e-5


def test_int8_stays_close(tmp_path):
    """int8 (every linear of the block, the conv module's pointwise convs included) at tp 2, against the float
    model; its frames' characters mostly agree."""
    hf = build(seed=1)
    out = tmp_path / "out"
    convert(save(tmp_path / "src", hf), out, Options(tp=2, int8=True, group_size=16), progress=False)
    m = json.loads((out / "manifest.json").read_text())
    int8 = {k.split(".", 2)[2] for k, t in m["ranks"][1]["tensors"].items() if t["dtype"] == "int8"}
    assert {"macaron_in.weight", "macaron_out.weight", "conv_in.weight", "conv_out.weight", "qkv.weight"} <= int8
    tiny.ctc_close(out, 2, hf, *features(seed=4), 0.05, 0.9)


def converted_with_files(tmp_path, hf, lengths) -> tuple:
    """hf saved and converted through the CLI, WAV files of these lengths, transformers' ASR pipeline over hf ->
    (the CLI runner, the conversion, the files, the pipeline)."""
    from click.testing import CliRunner
    from transformers import pipeline

    from fmconvert.cli import cli
    out = tmp_path / "out"
    runner = CliRunner()
    assert runner.invoke(cli, ["convert", str(save(tmp_path / "src", hf)), str(out), "-q"]).exit_code == 0
    x, _ = waves(lengths, seed=7)
    files = [write_wav(tmp_path / f"{i}.wav", x[i, :n]) for i, n in enumerate(lengths)]
    asr = pipeline("automatic-speech-recognition", model=hf, tokenizer=tokenizer(tmp_path),
                   feature_extractor=extractor())
    return runner, out, files, asr


def long_file_as_the_pipeline(tmp_path, runner, out, asr):
    """`fmconvert transcribe` of a long file in chunks with strides prints what the pipeline's chunk_length_s reads."""
    from fmconvert.cli import cli
    from fmconvert.runtime.audio import load_audio
    x, _ = waves((15000,), seed=9)
    long = write_wav(tmp_path / "long.wav", x[0])
    want = asr(load_audio(long, 16000).numpy(), chunk_length_s=0.5, stride_length_s=0.1)["text"]
    r = runner.invoke(cli, ["transcribe", str(out), str(long), "--chunk-length", "0.5", "--stride-length", "0.1"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == want and want


def test_cli_transcribe_as_the_asr_pipeline(tmp_path):
    """`fmconvert transcribe` of files of three lengths, batched together, reads what transformers' pipeline
    reads of each alone, and a long one in strided chunks as the pipeline chunks it; `inspect` names the front
    end."""
    from fmconvert.cli import cli
    from fmconvert.runtime.audio import load_audio
    runner, out, files, asr = converted_with_files(tmp_path, build(seed=2), (6400, 9000, 4000, 6400))
    want = [asr(load_audio(f, 16000).numpy())["text"] for f in files]
    assert len(set(want)) > 2 and all(want)
    r = runner.invoke(cli, ["transcribe", str(out), *map(str, files)])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == [f"{f}\t{w}" for f, w in zip(files, want)]
    long_file_as_the_pipeline(tmp_path, runner, out, asr)
    r = runner.invoke(cli, ["inspect", str(out)], env={"COLUMNS": "250"})
    assert "160-wide feature rows" in r.output, r.output


def test_clip_classifier_matches_transformers(tmp_path):
    """A clip's labels (every layer's states weighted by softmax(layer_weights), the real frames' mean) at tp 2."""
    hf = build(model="Wav2Vec2BertForSequenceClassification", num_labels=3, classifier_proj_size=8,
               use_weighted_layer_sum=True)
    with torch.no_grad():
        hf.layer_weights.copy_(torch.tensor([0.5, -1.0, 2.0]))
    out = tmp_path / "out"
    convert(save(tmp_path / "src", hf), out, Options(tp=2), progress=False)
    heads_match(out, hf, *features())


def test_reassembles_every_source_tensor(tmp_path):
    """tp 2: every tensor of the source back bit for bit (masked_spec_embed aside, which the table ignores): the
    distance embeddings, the depthwise LayerNorms split by channel, relative attention's biases."""
    for position in ("relative_key", "relative"):
        src = save(tmp_path / f"src_{position}", build(position, mask_time_prob=0.05))
        out = tmp_path / f"out_{position}"
        convert(src, out, Options(tp=2), progress=False)
        names = " ".join(tiny.gives_back(src, out))
        assert "depthwise_layer_norm" in names
        assert ("distance_embedding" in names) == (position == "relative_key")


def test_verify_passes_and_a_changed_tensor_fails(tmp_path):
    """`fmconvert verify` passes a clean conversion (tp 2 emulated, int8 too), each layer compared; one rank's
    slice of a depthwise LayerNorm's weight changed (hashes fixed) fails it, named."""
    src = save(tmp_path / "src", build(seed=3))
    for int8 in (False, True):
        out = tmp_path / f"out{int8}"
        convert(src, out, Options(tp=2, int8=int8), progress=False)
        r = verify(src, out)
        assert r["passed"], r["failures"]
        e = r["end_to_end"]
        assert [x["name"] for x in e["layers"]] == ["embeddings", "layer 0", "layer 1"]
        assert e["rel_rms"] < (0.04 if int8 else 1e-5) and e["classifier"]["name"] == "CTC"
    r = verify(src, tiny.retouched(out.parent / "outFalse", 1, "layers.1.conv_dw_norm.weight", 3))
    assert not r["passed"] and r["integrity"]["passed"]
    assert "\n".join(r["tensors"]["failures"]).startswith("layers.1.conv_dw_norm.weight")
    assert not r["end_to_end"]["passed"]


@pytest.mark.parametrize("overrides,match", [
    (dict(add_adapter=True, architectures=["Wav2Vec2BertForXVector"]),
     r"this config uses a variant fmconvert does not support \(add_adapter with a classifier head\)"),
    (dict(position_embeddings_type="alibi"), "position_embeddings_type"),     # transformers' own refusal
])
def test_unsupported_configs_are_refused_in_one_line(tmp_path, overrides, match):
    import transformers
    tiny.config_refused(tmp_path, transformers.Wav2Vec2BertConfig(**SMALL), "Wav2Vec2BertForCTC", match, **overrides)


# the adapters: one layer at the blocks' width, two narrower ones after the feed-forward transformers can put
# before them (use_intermediate_ffn_before_adapter); a gelu in their feed-forwards
ADAPTERS = {"one": dict(add_adapter=True, adapter_act="gelu"),
            "two": dict(add_adapter=True, num_adapter_layers=2, output_hidden_size=24,
                        use_intermediate_ffn_before_adapter=True),
            # the convs pad stride // 2 = 1 a side, transformers' count of the frames kernel // 2 = 2
            "odd": dict(add_adapter=True, adapter_kernel_size=5, adapter_stride=3)}


@pytest.mark.parametrize("adapter,tp", [("one", 1), ("one", 2), ("two", 2), ("odd", 2)])
def test_adapter_matches_transformers(tmp_path, adapter, tp):
    """add_adapter: the blocks' states over the extractor's frames, then the adapter's last hidden state and CTC
    logits over its own (stride 2 a layer: 19 and 11 frames -> 10 and 6 -> 5 and 3), every frame, on every rank;
    the frame mask is transformers' for them; the manifest records the adapter. Where the convs' padding and
    transformers' count disagree (odd: kernel 5, stride 3), the count says 7 and 4 frames of the convs' 6, and a
    clip alone has what its convs make of it (3 frames of the shorter), as the pipeline reads it."""
    hf = build(seed=5, **ADAPTERS[adapter])
    out = tmp_path / "out"
    convert(save(tmp_path / "src", hf), out, Options(tp=tp), progress=False)
    ad = json.loads((out / "manifest.json").read_text())["model"]["adapter"]
    assert ad == {"layers": hf.config.num_adapter_layers, "kernel": hf.config.adapter_kernel_size,
                  "stride": hf.config.adapter_stride, "act": hf.config.adapter_act,
                  "width": hf.config.output_hidden_size, "ffn": adapter == "two"}
    x, mask = features()
    with torch.no_grad():
        want = hf(x, attention_mask=mask)
        base = hf.wav2vec2_bert(x, attention_mask=mask, output_hidden_states=True)
    T = want.logits.shape[1]
    assert T == {"one": 10, "two": 5, "odd": 6}[adapter]
    assert base.last_hidden_state.shape[-1] == hf.config.output_hidden_size
    # the adapter attention's own mask (transformers' _get_feature_vector_attention_mask fails where the count
    # passes the convs' frames)
    n = hf._get_feat_extract_output_lengths(mask.sum(-1))
    real = torch.arange(T) < n.unsqueeze(-1)
    assert not real.all() and n.tolist() == {"one": [10, 6], "two": [5, 3], "odd": [7, 4]}[adapter]

    def run(m):
        h, states = m.hidden(x, attention_mask=mask, output_hidden_states=True)
        return h, states, head_logits(m, h, None, m.frames), m.frames, int(m.clip_frames(LENGTHS[1]))
    for h, states, logits, frames, alone in tiny.on_ranks(out, tp, run):
        assert len(states) == len(base.hidden_states) == 3
        assert all(tiny.rel(a, b) < 1e-5 for a, b in zip(states, base.hidden_states))
        assert tiny.rel(h, base.last_hidden_state) < 1e-5
        assert tiny.rel(logits, want.logits) < 1e-5
        assert torch.equal(frames, real) and alone == (3 if adapter == "odd" else int(real[1].sum()))


def test_adapter_int8_stays_close(tmp_path):
    """int8 blocks (the adapter stays float, replicated) at tp 2: its frames' characters mostly agree."""
    hf = build(seed=6, **ADAPTERS["two"])
    out = tmp_path / "out"
    convert(save(tmp_path / "src", hf), out, Options(tp=2, int8=True, group_size=16), progress=False)
    tiny.ctc_close(out, 2, hf, *features(seed=4), 0.05, 0.8)


def test_adapter_cli_transcribe_as_the_asr_pipeline(tmp_path):
    """With the adapter (a frame each 40 ms): `fmconvert transcribe` of files of four lengths, batched, reads
    what the pipeline reads of each alone; word timestamps are the pipeline's; a long file in strided chunks
    (the pipeline's inputs_to_logits_ratio, 640 samples) as the pipeline chunks it."""
    from fmconvert.cli import cli
    from fmconvert.runtime.audio import load_audio
    runner, out, files, asr = converted_with_files(tmp_path, build(seed=2, **ADAPTERS["one"]),
                                                   (6400, 9000, 4000, 6720))
    got = [asr(load_audio(f, 16000).numpy(), return_timestamps="word") for f in files]
    want = [g["text"] for g in got]
    assert len(set(want)) > 2 and all(want)
    r = runner.invoke(cli, ["transcribe", str(out), *map(str, files)])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == [f"{f}\t{w}" for f, w in zip(files, want)]
    r = runner.invoke(cli, ["transcribe", str(out), *map(str, files), "--format", "json"])
    assert r.exit_code == 0, r.output
    for line, g in zip(r.stdout.splitlines(), got):
        assert [(w["text"], w["start"], w["end"]) for w in json.loads(line)["words"]] == \
            [(c["text"], round(c["timestamp"][0], 3), round(c["timestamp"][1], 3)) for c in g["chunks"]]
    long_file_as_the_pipeline(tmp_path, runner, out, asr)
    r = runner.invoke(cli, ["inspect", str(out)], env={"COLUMNS": "250"})
    assert "1 layer after the blocks" in r.output and "a frame every 640 samples" in r.output, r.output


def test_adapter_verify_reassemble(tmp_path):
    """The adapter's tensors back from `reassemble` bit for bit (tp 2); `verify` passes, and fails on one
    adapter tensor changed (hashes fixed), naming it."""
    src = save(tmp_path / "src", build(seed=3, **ADAPTERS["two"]))
    out = tmp_path / "out"
    convert(src, out, Options(tp=2), progress=False)
    assert any(k.startswith("wav2vec2_bert.adapter.layers.1.") for k in tiny.gives_back(src, out))
    r = verify(src, out)
    assert r["passed"], r["failures"]
    e = r["end_to_end"]
    assert [x["name"] for x in e["layers"]] == ["embeddings", "layer 0", "layer 1"]
    assert e["rel_rms"] < 1e-5 and e["classifier"]["name"] == "CTC"
    r = verify(src, tiny.retouched(out, 1, "adapter1.res_conv.weight", 3))
    assert not r["passed"] and r["integrity"]["passed"]
    assert "\n".join(r["tensors"]["failures"]).startswith("adapter1.res_conv.weight")


def test_frame_classifier_matches_transformers(tmp_path):
    """*ForAudioFrameClassification: labels per frame from every layer's weighted states, over the real frames of
    a padded batch, at tp 2."""
    hf = build(model="Wav2Vec2BertForAudioFrameClassification", num_labels=3, use_weighted_layer_sum=True)
    with torch.no_grad():
        hf.layer_weights.copy_(torch.tensor([0.5, -1.0, 2.0]))
    out = tmp_path / "out"
    convert(save(tmp_path / "src", hf), out, Options(tp=2), progress=False)
    x, mask = features()
    heads_match(out, hf, x, mask, real=mask.bool())


XVECTOR = dict(tdnn_dim=(16, 16, 24), tdnn_kernel=(5, 3, 1), tdnn_dilation=(1, 2, 1), xvector_output_dim=12,
               num_labels=3)


@pytest.mark.parametrize("weighted", [False, True])
def test_xvector_matches_transformers(tmp_path, weighted):
    """*ForXVector: the projector, dilated TDNN layers, the mean and standard deviation over each clip's frames
    (transformers' count of them) and the feature extractor: its embeddings at tp 2."""
    hf = build(model="Wav2Vec2BertForXVector", use_weighted_layer_sum=weighted, **XVECTOR)
    out = tmp_path / "out"
    convert(save(tmp_path / "src", hf), out, Options(tp=2), progress=False)
    want = heads_match(out, hf, *features(), "embeddings")
    assert want.shape == (2, 12)
