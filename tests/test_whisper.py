"""Whisper (configs/whisper_seq2seq.toml with configs/whisper.toml): WhisperForConditionalGeneration against
transformers at tp 1 and 2: the audio encoder's states, teacher-forced logits, a decode a step at a time through the
cache, and transformers' generate() token for token, with the language detected, given, and with a task; int8 within
its error; the tensors back under their names without the zero biases; the CLI's transcribe from WAV files and
verify; bad input refused in one line."""

from __future__ import annotations

import json
import math
import struct
import wave

import pytest
import torch

import tiny
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.speech import prompt_tokens, transcribe

MELS, FRAMES = 16, 100            # 1 s of 16 kHz audio at a hop of 160: the tiny feature extractor's chunk
LANGS = {"<|en|>": 101, "<|fr|>": 102, "<|de|>": 103}
# ids past <|notimestamps|> are timestamps, which transformers cuts a transcript at (and seeks from): suppressed, as
# the released models never choose one after <|notimestamps|>
GEN = dict(decoder_start_token_id=100, eos_token_id=99, pad_token_id=99, suppress_tokens=[3, 7, 11, *range(108, 120)],
           begin_suppress_tokens=[99, 5], lang_to_id=LANGS, task_to_id={"transcribe": 105, "translate": 104},
           no_timestamps_token_id=107, is_multilingual=True, max_length=40, forced_decoder_ids=[[1, None], [2, 105]])
SETTINGS = [dict(), dict(language="en"), dict(language="German", task="translate"), dict(task="translate")]


def build(**overrides):
    """transformers' Whisper with random weights large enough that greedy decoding wanders (init_std 0.5), norms
    and biases randomized so that a wrong one shows; its generation config as the released checkpoints'."""
    import transformers
    config = transformers.WhisperConfig(**{**dict(
        vocab_size=120, num_mel_bins=MELS, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_source_positions=FRAMES // 2,
        max_target_positions=40, init_std=0.5, decoder_start_token_id=100, pad_token_id=99, eos_token_id=99,
        bos_token_id=99), **overrides})
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layer_norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.generation_config = transformers.GenerationConfig(**GEN)
    return model


def tokenizer():
    """A word-level tokenizer over the tiny vocab, Whisper's special tokens in their places."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    special = {99: "<|endoftext|>", 100: "<|startoftranscript|>", 101: "<|en|>", 102: "<|fr|>", 103: "<|de|>",
               104: "<|translate|>", 105: "<|transcribe|>", 107: "<|notimestamps|>"}
    vocab = {special.get(i, f"w{i}"): i for i in range(120)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=[v for k, v in special.items() if k != 99])


def feature_extractor():
    from transformers import WhisperFeatureExtractor
    return WhisperFeatureExtractor(feature_size=MELS, sampling_rate=16000, hop_length=160, chunk_length=1, n_fft=400)


def save(src, hf=None):
    """A checkpoint directory as the Hub has them: the model (build()'s unless given), its tokenizer, its feature
    extractor."""
    (hf or build()).save_pretrained(src)
    tokenizer().save_pretrained(src)
    feature_extractor().save_pretrained(src)
    return src


def stamped(tmp_path):
    """transformers' model with timestamps allowed (STAMPS), saved and converted: (model, its conversion)."""
    import transformers
    hf = build()
    hf.generation_config = transformers.GenerationConfig(**STAMPS)
    convert(save(tmp_path / "src", hf), tmp_path / "out", Options(), progress=False)
    return hf, tmp_path / "out"


def long_form_input(wav):
    """A WAV file's features as transformers' long-form input: every frame, unpadded."""
    from fmconvert.runtime.audio import load_audio
    return feature_extractor()(load_audio(wav).numpy(), sampling_rate=16000, truncation=False, padding="longest",
                               return_tensors="pt").input_features


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save(tmp_path_factory.mktemp("whisper") / "src")


def features(B=2, seed=4):      # seed 4: a language detected for each row (fr, de)
    return torch.randn(B, MELS, FRAMES, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tp", [1, 2])
def test_matches_transformers(saved, tmp_path, tp):
    """On every rank: the encoder's states, teacher-forced logits, the same logits a step at a time, and for each
    setting (language detected per row, given by code or by name, with a task, a task alone) generate()'s tokens."""
    out = tmp_path / "out"
    convert(saved, out, Options(tp=tp), progress=False)
    hf, feats = build(), features()
    target = torch.tensor([[100, 101, 105, 107, 9, 13, 21], [100, 102, 104, 107, 50, 3, 0]])
    with torch.no_grad():
        want = hf(input_features=feats, decoder_input_ids=target)
        greedy = [hf.generate(input_features=feats, max_new_tokens=12, **kw).tolist() for kw in SETTINGS]

    def run(m):
        enc = m.source_encoder.hidden(feats)
        m.attach(enc)
        whole = m(target)
        cache = m.new_cache(2, target.shape[1])
        steps = torch.cat([m(target[:, j:j + 1], cache) for j in range(target.shape[1])], 1)
        return enc, whole, steps, [[t.tokens for t in transcribe(m, feats, GEN, max_new_tokens=12, eos_token_id=99,
                                                                  **kw)[0]] for kw in SETTINGS]
    for enc, whole, steps, tokens in tiny.on_ranks(out, tp, run):
        assert tiny.rel(enc, want.encoder_last_hidden_state) < 1e-5
        assert tiny.rel(whole, want.logits) < 1e-5
        assert tiny.rel(steps, want.logits) < 1e-5
        for got, ref in zip(tokens, greedy):       # transformers pads a finished row with its pad token
            assert got == [row[:row.index(99)] if 99 in row else row for row in ref]
    assert len({str(g) for g in greedy}) == len(greedy)        # each setting changes the tokens


def test_the_graph_safe_decode_step_matches_the_eager_forward(saved, tmp_path):
    """The decoder's graph-safe step (what a CUDA graph captures on a card) over the audio source's keys and values
    gives each teacher-forced step's logits, the prompt's steps included."""
    from fmconvert.runtime.load import load
    convert(saved, tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    target = torch.cat([torch.tensor([[100, 102, 105, 107]] * 2), tiny.ids(20, 5, B=2).remainder(98)], 1)
    m.attach(m.source_encoder.hidden(features()))
    want = m(target)
    cache = m.new_cache(2, target.shape[1] + 3)
    got = []
    for j in range(target.shape[1]):
        got.append(m.decode_step(target[:, j:j + 1], cache, torch.tensor([j])))
        cache.length += 1
    assert tiny.rel(torch.stack(got, 1), want) < 1e-5


def test_the_prompt_as_transformers_builds_it():
    """The decoder's prompt: the language from forced_decoder_ids, given or detected; the task given or forced;
    <|notimestamps|>; an English-only model takes neither."""
    assert prompt_tokens(GEN) is None                                      # detect first
    assert prompt_tokens(GEN, detected=[103, 101]) == [[100, 103, 105, 107], [100, 101, 105, 107]]
    assert prompt_tokens(GEN, "fr") == [[100, 102, 105, 107]]
    assert prompt_tokens(GEN, "<|de|>", "translate") == [[100, 103, 104, 107]]
    assert prompt_tokens({**GEN, "forced_decoder_ids": [[1, 101], [2, 104]]}) == [[100, 101, 104, 107]]
    english = {k: v for k, v in GEN.items() if k not in ("lang_to_id", "task_to_id")}
    english.update(is_multilingual=False, forced_decoder_ids=[[1, 107]])
    assert prompt_tokens(english) == [[100, 107]]
    from fmconvert.errors import FmError
    with pytest.raises(FmError, match="English-only"):
        prompt_tokens(english, "fr")
    with pytest.raises(FmError, match="no language 'klingon'"):
        prompt_tokens(GEN, "klingon")


def test_suppressed_tokens_are_never_chosen(saved, tmp_path):
    """Without the generation config's suppressed tokens greedy decoding picks some of them (so the ban is seen);
    with it none, and the first token is never a begin-suppressed one."""
    from fmconvert.runtime.load import load
    out = tmp_path / "out"
    convert(saved, out, Options(), progress=False)
    m = load(out)
    feats = features(4, seed=3)
    free = {**GEN, "suppress_tokens": [], "begin_suppress_tokens": []}
    loose = [t.tokens for t in transcribe(m, feats, free, "en", max_new_tokens=12)[0]]
    chosen = sorted({t for row in loose for t in row})
    banned = {**GEN, "suppress_tokens": chosen[:3], "begin_suppress_tokens": [r[0] for r in loose]}
    strict = [t.tokens for t in transcribe(m, feats, banned, "en", max_new_tokens=12)[0]]
    assert not {t for row in strict for t in row} & set(chosen[:3])
    assert all(r[0] not in banned["begin_suppress_tokens"] for r in strict)


# timestamps allowed (ids 108..119: <|0.00|> to <|0.22|>), the first one no later than <|0.08|>
STAMPS = {**GEN, "suppress_tokens": [3, 7, 11], "max_initial_timestamp_index": 4}


def long_features(seconds: float = 3.7):
    """A tone over noise, `seconds` long, as transformers' long-form input: every frame, unpadded."""
    n = int(16000 * seconds)
    t = torch.arange(n) / 16000
    wave = torch.sin(2 * math.pi * 300 * t) * 0.3 + 0.05 * torch.randn(n, generator=torch.Generator().manual_seed(0))
    return feature_extractor()(wave.numpy(), sampling_rate=16000, truncation=False, padding="longest",
                               return_tensors="pt").input_features


def test_timestamps_and_long_form_as_transformers(saved, tmp_path):
    """With timestamps, a batch of one window each (a window cut at a pair of timestamps is read again from there),
    and audio of several windows (transformers' long-form generate(), the language detected or given): the same
    tokens as transformers, and the same segments, start and end."""
    import transformers

    from fmconvert.runtime.load import load
    out = tmp_path / "out"
    convert(saved, out, Options(), progress=False)
    m = load(out)
    hf = build()
    hf.generation_config = transformers.GenerationConfig(**STAMPS)
    feats = features()
    with torch.no_grad():
        want = hf.generate(input_features=feats, return_timestamps=True, language="de").tolist()
    got = transcribe(m, feats, STAMPS, "de", eos_token_id=99, timestamps=True)[0]
    assert [t.tokens for t in got] == [row[:row.index(99)] if 99 in row else row for row in want]
    assert any(len(t.segments) > 1 for t in got)
    feats = long_features()
    assert feats.shape[-1] > FRAMES
    for kw in (dict(), dict(language="fr")):
        with torch.no_grad():
            want = hf.generate(input_features=feats, return_segments=True, **kw)
        got = transcribe(m, feats, STAMPS, eos_token_id=99, **kw)[0][0]
        assert got.tokens == want["sequences"][0].tolist()
        assert [(round(g.start, 6), round(g.end, 6), g.tokens) for g in got.segments] == \
            [(round(float(w["start"]), 6), round(float(w["end"]), 6), w["tokens"].tolist())
             for w in want["segments"][0]]
        assert len(got.segments) >= 4


def test_int8_stays_close_and_reassembles(saved, tmp_path):
    """int8 at tp 2 keeps the logits close (this model's weights are large: init_std 0.5); a float conversion gives back every source tensor bit for bit (the
    zero k biases left out again)."""
    from safetensors.torch import load_file

    from fmconvert.reassemble import canonical, reassemble
    out = tmp_path / "int8"
    convert(saved, out, Options(tp=2, int8=True), progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert "layers.0.cross_kv.weight" in m["quantization"]["tensors"]
    enc = json.loads((out / "encoder" / "manifest.json").read_text())
    assert enc["model"]["architecture"] == "WhisperEncoder" and enc["model"]["audio_mels"] == MELS
    hf, feats = build(), features()
    target = torch.tensor([[100, 101, 105, 107, 9, 13, 21]] * 2)
    with torch.no_grad():
        want = hf(input_features=feats, decoder_input_ids=target).logits

    def run(m):
        m.attach(m.source_encoder.hidden(feats))
        return m(target)
    for got in tiny.on_ranks(out, 2, run):
        assert tiny.rel(got, want) < 0.1
    convert(saved, tmp_path / "fp", Options(tp=2), progress=False)
    got = reassemble(tmp_path / "fp")[1]
    want = load_file(saved / "model.safetensors")
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    qkv = canonical(tmp_path / "fp")[1]["layers.0.qkv.bias"]      # q's, zeros in k's place, v's
    assert qkv.shape == (96,) and not qkv[32:64].any() and qkv[:32].all() and qkv[64:].all()


def write_wav(path, seconds: float, rate: int, channels: int = 1, freq: float = 440.0):
    """A 16-bit PCM WAV through the standard library: a tone, the same in every channel."""
    n = int(seconds * rate)
    samples = [int(12000 * math.sin(2 * math.pi * freq * i / rate)) for i in range(n)]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"".join(struct.pack("<" + "h" * channels, *([s] * channels)) for s in samples))
    return path


def test_cli_transcribe_as_transformers(saved, tmp_path):
    """`fmconvert transcribe` on WAV files (resampled, stereo mixed down) prints transformers' text: one file
    streamed, several as FILE<TAB>text in order; verify passes, through the feature extractor's synthetic audio."""
    from click.testing import CliRunner

    from fmconvert.cli import cli
    from fmconvert.runtime.audio import load_audio
    out = tmp_path / "out"
    runner = CliRunner()
    assert runner.invoke(cli, ["convert", str(saved), str(out)]).exit_code == 0
    assert (out / "preprocessor_config.json").is_file()
    files = [write_wav(tmp_path / "a.wav", 0.8, 22050, 2, 440.0), write_wav(tmp_path / "b.wav", 0.5, 8000, 1, 1300.0)]
    hf, fe, tok = build(), feature_extractor(), tokenizer()
    want = []
    for f in files:
        feats = fe(load_audio(f, 16000).numpy(), sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            ids = hf.generate(input_features=feats, language="fr", max_new_tokens=10)[0]
        want.append(tok.decode(ids, skip_special_tokens=True).strip())
    assert want[0] != want[1]
    r = runner.invoke(cli, ["transcribe", str(out), str(files[0]), "-l", "fr", "-n", "10"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == want[0] and "1 file, 0.8 s of audio" in r.stderr
    r = runner.invoke(cli, ["transcribe", str(out), *map(str, files), "-l", "fr", "-n", "10", "--batch-size", "2"])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == [f"{f}\t{w}" for f, w in zip(files, want)]
    r = runner.invoke(cli, ["verify", str(saved), str(out)])
    assert r.exit_code == 0 and "PASSED" in r.output, r.output
    assert "encoder's output" in r.output


def test_cli_long_audio_with_timestamps(tmp_path):
    """A file of several windows prints transformers' long-form segments, a line each with its times; without
    --timestamps their text on one line."""
    from click.testing import CliRunner

    from fmconvert.cli import cli
    hf, out = stamped(tmp_path)
    runner = CliRunner()
    wav = write_wav(tmp_path / "long.wav", 2.6, 16000, 1, 300.0)
    feats = long_form_input(wav)
    with torch.no_grad():
        segs = hf.generate(input_features=feats, language="en", return_segments=True)["segments"][0]
    tok = tokenizer()
    text = [tok.decode([t for t in s["tokens"].tolist() if t < 108], skip_special_tokens=True).strip() for s in segs]
    r = runner.invoke(cli, ["transcribe", str(out), str(wav), "-l", "en", "--timestamps"])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == [f"[{float(s['start']):.2f} -> {float(s['end']):.2f}] {t}"
                                     for s, t in zip(segs, text)]
    assert len(segs) >= 3
    r = runner.invoke(cli, ["transcribe", str(out), str(wav), "-l", "en"])
    assert r.exit_code == 0 and r.stdout.strip() == " ".join(t for t in text if t), r.output


def test_cli_bad_input_is_one_line(saved, tmp_path, capsys):
    """A file that is not WAV, an unknown language, text verbs on a speech model or its encoder, transcribe on the
    encoder alone: each one line, a non-zero exit, no traceback."""
    from corpus import run_main
    out = tmp_path / "out"
    convert(saved, out, Options(), progress=False)
    mp3 = tmp_path / "x.mp3"
    mp3.write_bytes(b"ID3\x03\x00" + bytes(200))
    ok = write_wav(tmp_path / "ok.wav", 0.3, 16000)
    for args, match in [(["transcribe", str(out), str(mp3)], "x.mp3"),
                        (["transcribe", str(out), str(ok), "-l", "klingon"], "no language 'klingon'"),
                        (["generate", str(out), "-p", "hi"], f"fmconvert transcribe {out} AUDIO.wav"),
                        (["embed", str(out / "encoder"), "-t", "hi"], f"fmconvert transcribe {out} AUDIO.wav"),
                        (["classify", str(out), "-t", "hi"], "it reads audio"),
                        (["transcribe", str(out / "encoder"), str(ok)], "the directory above it")]:
        code, stdout, err = run_main(capsys, *args)
        assert code != 0 and "Traceback" not in err and not stdout, err
        assert match in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("edit,match", [
    (dict(suppress_tokens=5), "suppress_tokens must be a list"),
    (dict(lang_to_id={"<|en|>": 500}), "token id 500 is not one of the model's 120"),
    (dict(forced_decoder_ids=[[1]]), "forced_decoder_ids must be"),
    (dict(max_initial_timestamp_index="x"), "max_initial_timestamp_index"),
    (dict(task_to_id={"transcribe": 105}), "no task 'translate'"),
])
def test_a_malformed_generation_config_is_refused_in_one_line(saved, tmp_path, edit, match):
    from fmconvert.errors import FmError
    from fmconvert.runtime.load import load
    out = tmp_path / "out"
    convert(saved, out, Options(), progress=False)
    with pytest.raises(FmError, match=match):
        transcribe(load(out), features(), {**GEN, **edit}, task="translate", timestamps=True)


def test_cli_subtitles_and_json(tmp_path, capsys):
    """--format srt and vtt: a cue a segment of transformers' long-form segments, times as SubRip and WebVTT write
    them; json: a line a file with its detected language, text and segments; -o writes a file each; subtitles of
    several files without -o, and two files of one name, are refused in one line."""
    from corpus import run_main
    from fmconvert.cli import _cue_time
    hf, out = stamped(tmp_path)
    wav = write_wav(tmp_path / "talk.wav", 2.6, 16000, 1, 300.0)
    feats = long_form_input(wav)
    with torch.no_grad():
        segs = hf.generate(input_features=feats, language="en", return_segments=True)["segments"][0]
    tok = tokenizer()
    cues = [(float(s["start"]), float(s["end"]), tok.decode([t for t in s["tokens"].tolist() if t < 108],
                                                               skip_special_tokens=True).strip()) for s in segs]
    cues = [c for c in cues if c[2]]
    assert len(cues) >= 3 and _cue_time(3725.5, ",") == "01:02:05,500"
    code, stdout, err = run_main(capsys, "transcribe", out, wav, "-l", "en", "--format", "srt")
    assert code == 0, err
    assert stdout == "".join(f"{i}\n{_cue_time(a, ',')} --> {_cue_time(b, ',')}\n{t}\n\n"
                             for i, (a, b, t) in enumerate(cues, 1))
    other = write_wav(tmp_path / "other.wav", 0.5, 16000, 1, 900.0)
    code, _, err = run_main(capsys, "transcribe", out, wav, other, "--format", "vtt", "-o", tmp_path / "subs")
    assert code == 0, err
    vtt = (tmp_path / "subs" / "talk.vtt").read_text()
    assert vtt.startswith("WEBVTT\n\n") and f"{_cue_time(cues[0][0], '.')} --> {_cue_time(cues[0][1], '.')}" in vtt
    assert (tmp_path / "subs" / "other.vtt").is_file()
    code, stdout, err = run_main(capsys, "transcribe", out, wav, other, "--format", "json", "--timestamps", "-l", "en")
    assert code == 0, err
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [r["file"] for r in rows] == [str(wav), str(other)] and rows[0]["language"] == "en"
    assert [(s["start"], s["end"], s["text"]) for s in rows[0]["segments"]] == [(round(a, 3), round(b, 3), t)
                                                                              for a, b, t in cues]
    code, stdout, err = run_main(capsys, "transcribe", out, other, "--format", "json")        # detected
    assert code == 0 and json.loads(stdout)["language"] in ("en", "fr", "de"), err
    (tmp_path / "x").mkdir()
    twin = write_wav(tmp_path / "x" / "talk.wav", 0.3, 16000)
    for args, match in [((wav, other, "--format", "srt"), "need --output-dir"),
                        ((wav, twin, "-o", tmp_path / "o2"), "two files are named 'talk'")]:
        code, stdout, err = run_main(capsys, "transcribe", out, *args)
        assert code != 0 and match in err and len(err.strip().splitlines()) == 1, err
