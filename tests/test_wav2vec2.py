"""Wav2Vec2, HuBERT, UniSpeech-SAT (configs/wav2vec2.toml), Data2Vec-Audio and WavLM: raw waveforms through the
conv stack, against transformers on tiny random models: the encoder's states and the heads' logits (CTC per frame,
classification pooled over the real frames) with padding masked, post-LN and stable pre-LN, at tp 1 and 2 and in
int8; `fmconvert transcribe` against transformers' ASR pipeline (chunked, with word timestamps) and `classify
--audio` against the model; bad input refused in one line."""

from __future__ import annotations

import json
import math
import struct
import wave

import pytest
import torch

import tiny
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.classify import head_logits

VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, **{c: i + 5 for i, c in enumerate("ETAONIHS")}}
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16, 16),
             conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=16,
             num_conv_pos_embedding_groups=4, vocab_size=len(VOCAB), pad_token_id=0)
# name -> (config class, model class, overrides): the base layout (GroupNorm on the first conv, post-LN), the stable
# one (LayerNorm after every conv, conv biases, pre-LN), HuBERT without the features' norm, UniSpeech-SAT
KINDS = {
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2ForCTC", {}),
    "wav2vec2_stable": ("Wav2Vec2Config", "Wav2Vec2ForCTC", dict(feat_extract_norm="layer", do_stable_layer_norm=True,
                                                                  conv_bias=True, num_conv_pos_embeddings=15)),
    "hubert": ("HubertConfig", "HubertForCTC", dict(feat_proj_layer_norm=False, do_stable_layer_norm=True,
                                                    feat_extract_norm="layer")),
    "unispeech_sat": ("UniSpeechSatConfig", "UniSpeechSatForCTC", {}),
    # WavLM: the gated relative-position bias (16 buckets out to 40 frames: the far ones log-spaced)
    "wavlm": ("WavLMConfig", "WavLMForCTC", dict(num_buckets=16, max_bucket_distance=40)),
    "wavlm_stable": ("WavLMConfig", "WavLMForCTC", dict(num_buckets=16, max_bucket_distance=40,
                                                        do_stable_layer_norm=True, feat_extract_norm="layer")),
    # Data2Vec-Audio: LayerNormed convs, and a stack of two plain positional convs (an even kernel: one frame trimmed)
    "data2vec_audio": ("Data2VecAudioConfig", "Data2VecAudioForCTC", dict(num_conv_pos_embeddings=2,
                                                                          conv_pos_kernel_size=4, conv_bias=True)),
}


def build(kind: str = "wav2vec2", model: str | None = None, seed: int = 0, **overrides):
    import transformers
    conf, cls, extra = KINDS[kind]
    torch.manual_seed(seed)
    m = getattr(transformers, model or cls)(getattr(transformers, conf)(**{**SMALL, **extra, **overrides})).eval()
    with torch.no_grad():
        for p in m.parameters():    # away from init's zeros and ones, so every tensor's placement matters
            p.add_(torch.randn_like(p) * 0.05)
        if hasattr(m, "lm_head"):
            m.lm_head.weight.mul_(20)      # decisive characters, so argmax ties do not decide a test
        for name, p in m.named_parameters():    # WavLM: a position bias, and gates, that move the states
            if name.endswith("rel_attn_embed.weight"):
                p.mul_(40)
            elif name.endswith("gru_rel_pos_const"):
                p.uniform_(-1.0, 3.0)
    return m


def tokenizer(path):
    from transformers import Wav2Vec2CTCTokenizer
    (path / "vocab.json").write_text(json.dumps(VOCAB))
    return Wav2Vec2CTCTokenizer(str(path / "vocab.json"))


def save(path, hf, mask: bool):
    from transformers import Wav2Vec2FeatureExtractor
    path.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(path)
    tokenizer(path).save_pretrained(path)
    Wav2Vec2FeatureExtractor(return_attention_mask=mask).save_pretrained(path)
    return path


def waves(lengths=(4000, 2600), seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Gliding tones over noise, zero-padded to the longest, with their sample mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    x, mask = torch.zeros(len(lengths), T), torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        t = torch.arange(n) / 16000
        x[b, :n] = torch.sin(2 * math.pi * (180 + 90 * b + 400 * t) * t) + 0.1 * torch.randn(n, generator=g)
        mask[b, :n] = 1
    return x, mask


@pytest.mark.parametrize("k,stride,cin,bias", [(10, 5, 1, False), (3, 2, 7, True), (2, 2, 5, False),
                                                 (2, 5, 3, True), (7, 3, 4, True), (1, 1, 6, False)])
def test_the_strided_conv_is_conv1d(k, stride, cin, bias):
    """The front end's conv as matmuls over runs of taps (channels last, no copy of its input) against F.conv1d,
    over kernels shorter than, equal to and not a multiple of the stride, a batch of 3 and odd widths."""
    from fmconvert.runtime.model import _conv_blocks, _strided_conv
    g = torch.Generator().manual_seed(k * 31 + stride)
    x, w = torch.randn(3, cin, 61, generator=g), torch.randn(11, cin, k, generator=g)
    b = torch.randn(11, generator=g) if bias else None
    want = torch.nn.functional.conv1d(x, w, b, stride=stride).transpose(1, 2)
    got = _strided_conv(x.transpose(1, 2), _conv_blocks(w, stride), k, stride, b)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,tp", [("wav2vec2", 1), ("wav2vec2", 2), ("wav2vec2_stable", 1),
                                     ("wav2vec2_stable", 2), ("hubert", 1), ("unispeech_sat", 1),
                                     ("data2vec_audio", 1), ("data2vec_audio", 2), ("wavlm", 1), ("wavlm", 2),
                                     ("wavlm_stable", 2)])
def test_matches_transformers(tmp_path, kind, tp):
    """The last hidden state and the CTC logits of a padded batch, on every rank, as transformers computes them
    (the padded row's real frames; its padding is not compared)."""
    hf = build(kind)
    src = save(tmp_path / "src", hf, mask=True)
    out = tmp_path / "out"
    convert(src, out, Options(tp=tp), progress=False)
    x, mask = waves()
    with torch.no_grad():
        want = hf(x, attention_mask=mask, output_hidden_states=True)
        base = getattr(hf, hf.base_model_prefix)(x, attention_mask=mask).last_hidden_state
    real = hf._get_feature_vector_attention_mask(base.shape[1], mask).bool()
    assert not real.all()       # the second row is padded

    def run(m):
        h, pooled = m(x, attention_mask=mask)
        return h, head_logits(m, h, pooled, m.frames), m.frames
    for h, logits, frames in tiny.on_ranks(out, tp, run):
        assert torch.equal(frames, real)
        assert tiny.rel(h[real], base[real]) < 1e-5
        assert tiny.rel(logits[real], want.logits[real]) < 1e-5


def test_without_a_mask_and_in_int8(tmp_path):
    """A batch without a mask (wav2vec2-base's feature extractor gives none: padding is read as silence), exactly;
    int8 stays close to it."""
    hf = build("wav2vec2", seed=1)
    src = save(tmp_path / "src", hf, mask=False)
    x, _ = waves(seed=5)
    with torch.no_grad():
        want = hf(x).logits
    for opts, bound in [(Options(), 1e-5), (Options(int8=True, group_size=16), 0.05)]:
        out = tmp_path / f"out{int(opts.int8)}"
        convert(src, out, opts, progress=False)
        (logits,) = tiny.on_ranks(out, 1, lambda m: head_logits(m, *m(x), m.frames))
        assert tiny.rel(logits, want) < bound


def test_reassembles_both_spellings_of_the_weight_norm(tmp_path):
    """A float conversion at tp 2 gives back every source tensor bit for bit (the training-only masked_spec_embed
    left out), under transformers 5's parametrizations names or the older weight_g / weight_v, which it keeps."""
    from safetensors.torch import load_file, save_file
    src = save(tmp_path / "src", build("wav2vec2_stable"), mask=True)
    old = tmp_path / "old"
    old.mkdir()
    for f in src.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    new = load_file(src / "model.safetensors")
    renamed = {k.replace("parametrizations.weight.original0", "weight_g")
               .replace("parametrizations.weight.original1", "weight_v"): v for k, v in new.items()}
    assert renamed.keys() != new.keys()
    save_file(renamed, old / "model.safetensors")
    x, mask = waves()
    for s in (src, old):
        out = tmp_path / f"out_{s.name}"
        convert(s, out, Options(tp=2), progress=False)
        tiny.gives_back(s, out)
        h = tiny.on_ranks(out, 2, lambda m: m(x, attention_mask=mask)[0])[0]
        if s is src:
            first = h
    assert torch.equal(h, first)        # the same weight made of either


def converted_at_tp2(tmp_path, hf):
    """hf saved with a masking feature extractor and converted at tp 2, a padded batch, and hf's logits for it:
    (source, output, waves, their mask, logits)."""
    src = save(tmp_path / "src", hf, mask=True)
    out = tmp_path / "out"
    convert(src, out, Options(tp=2), progress=False)
    x, mask = waves()
    with torch.no_grad():
        return src, out, x, mask, hf(x, attention_mask=mask).logits


def heads_on_ranks(out, tp: int, x, mask) -> list:
    """Each rank's head logits for the batch (every layer's states passed, for a layer_sum head)."""
    def run(m):
        h, states = m.hidden(x, attention_mask=mask, output_hidden_states=True)
        return head_logits(m, h, None, m.frames, states=states)
    return tiny.on_ranks(out, tp, run)


def heads_match(out, hf, x, mask, output: str = "logits", real=None):
    """transformers' head output for the batch (hf's `output`) -> it, each of the tp 2 conversion's ranks within 1e-5
    of it (over the frames `real` only, where given)."""
    with torch.no_grad():
        want = getattr(hf(x, attention_mask=mask), output)
    for got in heads_on_ranks(out, 2, x, mask):
        assert tiny.rel(got, want) < 1e-5 if real is None else tiny.rel(got[real], want[real]) < 1e-5
    return want


@pytest.mark.parametrize("kind,weighted", [("hubert", False), ("wav2vec2", True), ("wav2vec2_stable", True),
                                           ("data2vec_audio", False), ("wavlm_stable", True)])
def test_audio_classifier_matches_transformers(tmp_path, kind, weighted):
    """*ForSequenceClassification: the projector and classifier over the mean of each clip's real frames, the
    frames being the last layer's states, or (use_weighted_layer_sum, the superb models) every layer's weighted by
    softmax(layer_weights)."""
    import transformers
    cls = KINDS[kind][1].replace("ForCTC", "ForSequenceClassification")
    hf = build(kind, model=cls, num_labels=3, classifier_proj_size=8, use_weighted_layer_sum=weighted)
    if weighted:
        with torch.no_grad():
            hf.layer_weights.copy_(torch.tensor([0.5, -1.0, 2.0]))
    src, out, x, mask, want = converted_at_tp2(tmp_path, hf)
    with torch.no_grad():
        plain = getattr(transformers, cls).from_pretrained(src, use_weighted_layer_sum=False)(x, attention_mask=mask)
    assert weighted == (tiny.rel(plain.logits, want) > 1e-3)   # the weighting changes the result

    for logits in heads_on_ranks(out, 2, x, mask):
        assert tiny.rel(logits, want) < 1e-5


@pytest.mark.parametrize("kind,weighted", [("wav2vec2", False), ("wavlm_stable", True)])
def test_frame_classifier_matches_transformers(tmp_path, kind, weighted):
    """*ForAudioFrameClassification (speaker diarization): labels per frame from the classifier (of every layer's
    weighted states, with use_weighted_layer_sum), over the real frames of a padded batch at tp 2; `classify --audio`
    gives each label's spans of frames whose sigmoid is at least 0.5, as transformers' logits make them."""
    from click.testing import CliRunner
    from transformers import Wav2Vec2FeatureExtractor

    from fmconvert.cli import cli
    from fmconvert.runtime.audio import load_audio
    from fmconvert.runtime.ctc import active_spans
    cls = KINDS[kind][1].replace("ForCTC", "ForAudioFrameClassification")
    hf = build(kind, model=cls, num_labels=3, use_weighted_layer_sum=weighted,
               id2label={0: "spk0", 1: "spk1", 2: "spk2"}, label2id={"spk0": 0, "spk1": 1, "spk2": 2})
    with torch.no_grad():
        hf.classifier.weight.mul_(30)       # spans that come and go within a second
    src, out, x, mask, want = converted_at_tp2(tmp_path, hf)
    real = hf._get_feature_vector_attention_mask(want.shape[1], mask).bool()
    for logits in heads_on_ranks(out, 2, x, mask):
        assert tiny.rel(logits[real], want[real]) < 1e-5
    convert(src, tmp_path / "one", Options(), progress=False)
    f = write_wav(tmp_path / "a.wav", x[0, :4000])
    r = CliRunner().invoke(cli, ["classify", str(tmp_path / "one"), "--audio", str(f)])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)["segments"]
    with torch.no_grad():
        fe = Wav2Vec2FeatureExtractor(return_attention_mask=True)
        ref = hf(fe(load_audio(f, 16000).numpy(), sampling_rate=16000, return_tensors="pt").input_values).logits[0]
    assert got == active_spans(torch.sigmoid(ref), ["spk0", "spk1", "spk2"], 20 / 16000)
    assert len(got) > 3 and {g["label"] for g in got} == {"spk0", "spk1", "spk2"}, got


XVECTOR = dict(tdnn_dim=(16, 16, 24), tdnn_kernel=(5, 3, 1), tdnn_dilation=(1, 2, 1), xvector_output_dim=12,
               num_labels=3)


@pytest.mark.parametrize("kind,weighted", [("wav2vec2", False), ("wavlm_stable", True)])
def test_xvector_matches_transformers(tmp_path, kind, weighted):
    """*ForXVector (speaker verification): the projector, dilated TDNN layers, the mean and standard deviation over
    each clip's frames (transformers' count of them) and the feature extractor: its embeddings, on every rank."""
    hf = build(kind, model=KINDS[kind][1].replace("ForCTC", "ForXVector"), use_weighted_layer_sum=weighted, **XVECTOR)
    src = save(tmp_path / "src", hf, mask=True)
    out = tmp_path / "out"
    convert(src, out, Options(tp=2), progress=False)
    want = heads_match(out, hf, *waves(), "embeddings")
    assert want.shape == (2, 12)


def test_cli_embeds_audio(tmp_path, capsys):
    """`embed --audio`: an x-vector model's speaker embeddings, unit length (as transformers' model card compares
    them), or raw with --no-normalize; any other speech encoder's mean over its real frames; refusals in one line."""
    from click.testing import CliRunner
    from corpus import run_main
    from transformers import Wav2Vec2FeatureExtractor

    from fmconvert.cli import cli
    from fmconvert.runtime.audio import load_audio
    runner, fe = CliRunner(), Wav2Vec2FeatureExtractor(return_attention_mask=True)
    hf = build("wav2vec2_stable", model="Wav2Vec2ForXVector", **XVECTOR)
    ctc = build("wav2vec2_stable", seed=4)
    for name, model in (("xv", hf), ("ctc", ctc)):
        assert runner.invoke(cli, ["convert", str(save(tmp_path / name, model, mask=True)), str(tmp_path / f"{name}_out"),
                                   "-q"]).exit_code == 0
    x, _ = waves((3000, 5000), seed=11)
    files = [write_wav(tmp_path / f"{i}.wav", x[i, :n]) for i, n in enumerate((3000, 5000))]
    inputs = [fe(load_audio(f, 16000).numpy(), sampling_rate=16000, return_tensors="pt").input_values for f in files]
    with torch.no_grad():
        emb = torch.cat([hf(v).embeddings for v in inputs])
        mean = torch.cat([ctc.wav2vec2(v).last_hidden_state.mean(1) for v in inputs])
    args = [a for f in files for a in ("--audio", str(f))]
    for out, extra, want in (("xv_out", [], torch.nn.functional.normalize(emb, dim=-1)), ("xv_out", ["--no-normalize"], emb),
                             ("ctc_out", [], mean)):
        r = runner.invoke(cli, ["embed", str(tmp_path / out), *args, *extra])
        assert r.exit_code == 0, r.output
        got = torch.tensor([json.loads(line) for line in r.stdout.splitlines()])
        assert got.shape == want.shape and tiny.rel(got, want) < 1e-4, (out, extra)
    for argv, match in ((["classify", str(tmp_path / "xv_out"), *args], "it embeds speakers, use `fmconvert embed"),
                        (["embed", str(tmp_path / "xv_out"), *args, "-t", "hi"], "--audio embeds sound"),
                        (["generate", str(tmp_path / "xv_out"), "-p", "hi"], "use `fmconvert embed")):
        code, stdout, err = run_main(capsys, *argv)
        assert code != 0 and match in err and len(err.strip().splitlines()) == 1, err


def test_a_pretraining_checkpoint_converts_as_its_encoder(tmp_path, capsys):
    """Wav2Vec2ForPreTraining (wav2vec2-base, XLS-R as released): the quantizer and the contrastive projections are
    left out, the encoder runs as transformers' Wav2Vec2Model does, and verify passes against it."""
    import transformers

    from fmconvert.verify import verify
    cfg = transformers.Wav2Vec2Config(**{**SMALL, **KINDS["wav2vec2_stable"][2]}, codevector_dim=8,
                                      proj_codevector_dim=8, num_codevectors_per_group=4, num_codevector_groups=2)
    torch.manual_seed(0)
    hf = transformers.Wav2Vec2ForPreTraining(cfg).eval()
    src = save(tmp_path / "src", hf, mask=True)
    out = tmp_path / "out"
    convert(src, out, Options(), progress=False)
    x, mask = waves()
    with torch.no_grad():
        want = hf.wav2vec2(x, attention_mask=mask).last_hidden_state
    (got,) = tiny.on_ranks(out, 1, lambda model: (model(x, attention_mask=mask)[0], model.frames))
    real = got[1]
    assert tiny.rel(got[0][real], want[real]) < 1e-5
    assert verify(src, out)["passed"]
    assert json.loads((out / "manifest.json").read_text())["model"]["classifier"] is None
    from corpus import run_main         # a text verb on a headless speech encoder points at embed --audio
    code, stdout, err = run_main(capsys, "generate", str(out), "-p", "hi")
    assert code != 0 and f"use `fmconvert embed {out} --audio AUDIO.wav`" in err and len(err.splitlines()) == 1


def test_active_spans_by_hand():
    """Each label's runs of frames from 0.5 up, in seconds, ordered by start; a run to the last frame is closed."""
    from fmconvert.runtime.ctc import active_spans
    p = torch.tensor([[0.9, 0.1], [0.5, 0.2], [0.4, 0.7], [0.6, 0.7], [0.1, 0.8]])
    assert active_spans(p, ["a", "b"], 0.02) == [{"label": "a", "start": 0.0, "end": 0.04},
                                                  {"label": "b", "start": 0.04, "end": 0.1},
                                                  {"label": "a", "start": 0.06, "end": 0.08}]


def write_wav(path, samples: torch.Tensor):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(struct.pack(f"<{samples.numel()}h", *(samples.clamp(-1, 1) * 20000).round().int().tolist()))
    return path


def test_cli_transcribe_as_the_asr_pipeline(tmp_path):
    """`fmconvert transcribe` prints what transformers' ASR pipeline reads (the same tokenizer's decode): short
    files batched, a long one in chunks with strides (chunk_length_s), word timestamps as its "word" chunks; the
    subtitles and JSON carry those words."""
    from click.testing import CliRunner
    from transformers import Wav2Vec2FeatureExtractor, pipeline

    from fmconvert.cli import cli
    from fmconvert.runtime.audio import load_audio
    hf = build("wav2vec2_stable", seed=2)
    src = save(tmp_path / "src", hf, mask=True)
    out = tmp_path / "out"
    runner = CliRunner()
    assert runner.invoke(cli, ["convert", str(src), str(out), "-q"]).exit_code == 0
    x, _ = waves((4000, 6000, 15000), seed=7)
    files = [write_wav(tmp_path / f"{n}.wav", x[i, :k]) for i, (n, k) in enumerate([("a", 4000), ("b", 6000),
                                                                                     ("long", 15000)])]
    asr = pipeline("automatic-speech-recognition", model=hf, tokenizer=tokenizer(tmp_path),
                   feature_extractor=Wav2Vec2FeatureExtractor(return_attention_mask=True))
    audio = [load_audio(f, 16000).numpy() for f in files]
    want = [asr(a, chunk_length_s=0.5, stride_length_s=0.1) for a in audio]
    words = [asr(a, chunk_length_s=0.5, stride_length_s=0.1, return_timestamps="word") for a in audio]
    assert len({w["text"] for w in want}) == 3 and all(w["text"] for w in want)
    args = ["transcribe", str(out), *map(str, files), "--chunk-length", "0.5", "--stride-length", "0.1"]
    r = runner.invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == [f"{f}\t{w['text']}" for f, w in zip(files, want)]
    assert "3 files" in r.stderr and "CTC" in r.stderr
    r = runner.invoke(cli, [*args, "--format", "json"])
    assert r.exit_code == 0, r.output
    for line, w in zip(r.stdout.splitlines(), words):
        got = json.loads(line)
        assert got["text"] == w["text"]
        assert [(x["text"], x["start"], x["end"]) for x in got["words"]] == \
            [(c["text"], round(c["timestamp"][0], 3), round(c["timestamp"][1], 3)) for c in w["chunks"]]
        assert " ".join(s["text"] for s in got["segments"]) == " ".join(c["text"] for c in w["chunks"])
    r = runner.invoke(cli, ["inspect", str(out)], env={"COLUMNS": "250"})
    assert "16 kHz waveform through 3 convs (a LayerNorm after each; gelu)" in r.output, r.output
    assert "a weight-normed grouped conv (kernel 15, 4 groups)" in r.output and "`fmconvert transcribe`" in r.output
    r = runner.invoke(cli, [*args[:3], "--format", "srt", "--chunk-length", "0.5"])
    assert r.exit_code == 0 and r.stdout.startswith("1\n00:00:00,"), r.output
    # windows without strides: a last one too short for the conv stack (10 samples) is left out, so the file reads as
    # its first 8000 samples do
    cut = [write_wav(tmp_path / "cut.wav", x[2, :8000]), write_wav(tmp_path / "tail.wav", x[2, :8010])]
    got = [runner.invoke(cli, ["transcribe", str(out), str(f), "--chunk-length", "0.25", "--stride-length", "0"])
           for f in cut]
    assert all(g.exit_code == 0 for g in got) and got[0].stdout == got[1].stdout != "\n", [g.output for g in got]


def test_cli_classify_audio(tmp_path):
    """`classify --audio` prints each file's label and probabilities, from transformers' logits."""
    from click.testing import CliRunner
    from transformers import Wav2Vec2FeatureExtractor

    from fmconvert.cli import cli
    from fmconvert.runtime.audio import load_audio
    hf = build("wav2vec2", model="Wav2Vec2ForSequenceClassification", num_labels=3, classifier_proj_size=8,
               id2label={0: "yes", 1: "no", 2: "up"}, label2id={"yes": 0, "no": 1, "up": 2})
    src = save(tmp_path / "src", hf, mask=False)
    out = tmp_path / "out"
    runner = CliRunner()
    assert runner.invoke(cli, ["convert", str(src), str(out), "-q"]).exit_code == 0
    x, _ = waves((3000, 5000), seed=9)
    files = [write_wav(tmp_path / f"{i}.wav", x[i, :n]) for i, n in enumerate((3000, 5000))]
    fe = Wav2Vec2FeatureExtractor(return_attention_mask=False)
    r = runner.invoke(cli, ["classify", str(out), *(a for f in files for a in ("--audio", str(f)))])
    assert r.exit_code == 0, r.output
    for f, line in zip(files, r.stdout.splitlines()):
        got = json.loads(line)
        with torch.no_grad():
            p = hf(fe(load_audio(f, 16000).numpy(), sampling_rate=16000, return_tensors="pt").input_values
                   ).logits.softmax(-1)[0]
        assert got["file"] == str(f) and got["label"] == ["yes", "no", "up"][int(p.argmax())]
        assert [got["scores"][k] for k in ("yes", "no", "up")] == pytest.approx(p.tolist(), abs=1e-5)


def test_bad_input_is_refused_in_one_line(tmp_path, capsys):
    """Variants fmconvert does not run, Whisper's options, text verbs and audio too short for the conv stack: one
    line each, nothing written."""
    from click.testing import CliRunner
    from corpus import run_main

    from fmconvert.cli import cli
    hf = build("wav2vec2")
    src = save(tmp_path / "src", hf, mask=False)
    out = tmp_path / "out"
    runner = CliRunner()
    assert runner.invoke(cli, ["convert", str(src), str(out), "-q"]).exit_code == 0
    wav = write_wav(tmp_path / "a.wav", waves((3000,))[0][0])
    tiny_wav = write_wav(tmp_path / "short.wav", torch.zeros(12))
    for args, match in [
        (["transcribe", str(out), str(wav), "--language", "fr"], "--language: Whisper's"),
        (["transcribe", str(out), str(tiny_wav)], "short.wav: 12 samples at 16 kHz is too short: Wav2Vec2ForCTC needs at least 40"),
        (["transcribe", str(out), str(wav), "--chunk-length", "0.01", "--stride-length", "0.005"],
         "leaves nothing between its strides"),
        (["generate", str(out), "-p", "hi"], "it reads audio; use `fmconvert transcribe"),
        (["classify", str(out), "-t", "hi"], "it reads audio; use `fmconvert transcribe"),
        (["classify", str(out), "--audio", str(wav)], "no audio classifier: use `fmconvert transcribe"),
        (["embed", str(out), "-t", "hi"], "it reads audio"),
    ]:
        code, stdout, err = run_main(capsys, *args)
        assert code != 0 and "Traceback" not in err and not stdout, err
        assert match in err and len(err.strip().splitlines()) == 1, err
    for edit, match in [({"adapter_attn_dim": 16}, "adapter_attn_dim"), ({"add_adapter": True}, "add_adapter"),
                        ({"conv_stride": [5, 2, 0]}, "one per conv layer"),
                        ({"feat_extract_norm": "batch"}, "feat_extract_norm must be group or layer"),
                        ({"num_conv_pos_embedding_groups": 5}, "num_conv_pos_embedding_groups")]:
        tiny.refuses(save(tmp_path / f"src{len(edit)}{match[:4]}", hf, mask=False), tmp_path / "no", match, **edit)


@pytest.mark.parametrize("key,value,match", [
    ("kernel", [10, 3], "model.wave must be null or the waveform front end's"),
    ("stride", [5, 2, 0], "model.wave must be"),
    ("norm", "batch", "model.wave must be"),
    ("pos_groups", 5, "tensor pos_conv.v has shape [32, 8, 16], but the model spec and layout imply [32, 6, 16]"),
    ("pos_layers", 3, "has no tensor pos_conv0.bias"),
])
def test_a_manifest_whose_front_end_lies_is_refused(tmp_path, key, value, match):
    """A manifest's wave edited out of line with itself or with the shards: refused at load, in one line."""
    from fmconvert.errors import FmError
    from fmconvert.runtime.load import load
    out = tmp_path / "out"
    convert(save(tmp_path / "src", build("wav2vec2"), mask=False), out, Options(), progress=False)
    m = json.loads((out / "manifest.json").read_text())
    m["model"]["wave"][key] = value
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FmError) as e:
        load(out)
    assert match in str(e.value) and "\n" not in str(e.value)


def test_recognize_reports_its_progress(tmp_path):
    """recognize's on_progress: each short file once when its batch is done, a long one window group by window
    group, never going back, ending at every file's samples; the text is what it is without the callback."""
    from transformers import Wav2Vec2FeatureExtractor

    from fmconvert.runtime.ctc import recognize
    from fmconvert.runtime.load import load
    src = save(tmp_path / "src", build("wav2vec2_stable", seed=2), mask=True)
    convert(src, tmp_path / "out", Options(), progress=False)
    m, tok = load(tmp_path / "out"), tokenizer(tmp_path)
    x, _ = waves((4000, 15000), seed=7)
    clips = [x[0, :4000], x[1]]
    fe = Wav2Vec2FeatureExtractor(return_attention_mask=True)
    seen = []
    got = recognize(m, tok, fe, clips, 2, 0.25, 0.05, on_progress=lambda i, n: seen.append((i, n)))
    assert [r.text for r in got] == [r.text for r in recognize(m, tok, fe, clips, 2, 0.25, 0.05)]
    assert seen[0] == (0, 4000) and seen[-1] == (1, 15000) and len(seen) > 2
    long = [n for i, n in seen if i == 1]
    assert long == sorted(long)
