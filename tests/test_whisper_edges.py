"""Whisper edges a review found broken (each test failed before its fix): the generation config's language, task,
num_beams, max_new_tokens, default max_length, return_timestamps and end token as transformers' defaults; a
mismatched preprocessor_config.json; a top-level tied proj_out.weight; segment ends rounded as transformers rounds
them; the count a too-long -n error advises; streamed text with characters split across tokens; the generation
config's top_k and top_p when a temperature is given."""

from __future__ import annotations

import json

import pytest
import torch

from fmconvert.pipeline import Options, convert
from fmconvert.runtime.speech import transcribe
from test_whisper import GEN, STAMPS, build, feature_extractor, features, save, tokenizer, write_wav


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    src = save(tmp_path_factory.mktemp("whisper_edges") / "src")
    convert(src, src.parent / "out", Options(), progress=False)
    return src.parent / "out"


@pytest.fixture(scope="module")
def model(out):
    from fmconvert.runtime.load import load
    return load(out)


def hf_with(gc: dict):
    import transformers
    hf = build()
    hf.generation_config = transformers.GenerationConfig(**gc)
    return hf


def strip(rows, end=99):
    return [r[:r.index(end)] if end in r else r for r in rows]


@pytest.mark.parametrize("setting", [dict(language="de"), dict(language="german", task="translate"),
                                     dict(task="translate"),
                                     # the recipe's own: forced_decoder_ids cleared, language and task set
                                     dict(language="fr", task="transcribe", forced_decoder_ids=None)])
def test_generation_config_language_and_task_are_the_defaults(model, setting):
    """Fine-tuned Whispers (the Hugging Face fine-tuning recipe) save generation_config.json with "language" and
    "task" set; transformers' generate() then uses them as if passed, and so does speech.transcribe (and
    `fmconvert transcribe` without --language/--task) rather than detect the language."""
    gc = {**GEN, **setting}
    feats = features()
    with torch.no_grad():
        want = strip(hf_with(gc).generate(input_features=feats, max_new_tokens=12).tolist())
    got = [t.tokens for t in transcribe(model, feats, gc, max_new_tokens=12, eos_token_id=99)[0]]
    assert got == want


NO_MAX_LENGTH = {k: v for k, v in GEN.items() if k != "max_length"}


@pytest.mark.parametrize("gc,language,seed", [
    ({**GEN, "num_beams": 3}, "en", 5),             # searches with the config's beams
    ({**GEN, "max_new_tokens": 5}, "en", 4),        # fine-tuned Whispers save one: each row stops there
    (NO_MAX_LENGTH, "en", 4),                       # saved configs drop a max_length equal to the default, 20
    ({**STAMPS, "return_timestamps": True}, "de", 4),       # no <|notimestamps|>: timestamps by default
])
def test_generation_config_settings_are_the_defaults(model, gc, language, seed):
    """What generation_config.json sets and the call leaves out is what transformers' Whisper generate() uses:
    num_beams, max_new_tokens, max_length's default of 20 (not the decoder's whole position table) and
    return_timestamps; speech.transcribe (and `fmconvert transcribe` without the flags) gives its tokens."""
    feats = features(2, seed)
    with torch.no_grad():
        want = strip(hf_with(gc).generate(input_features=feats, language=language).tolist())
    got = [t.tokens for t in transcribe(model, feats, gc, language, eos_token_id=99)[0]]
    assert got == want


def test_transcribe_stops_at_the_generation_configs_end_token(tmp_path):
    """speech.transcribe(model, feats, gc) without eos_token_id stops at gc's eos_token_id, as transformers reads
    it from the same config."""
    from test_whisper_beam import ending

    from fmconvert.runtime.load import load
    hf = ending()
    src = tmp_path / "src"
    hf.save_pretrained(src)
    convert(src, tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    feats = features(2, 3)
    with torch.no_grad():
        want = strip(hf.generate(input_features=feats, language="en", max_new_tokens=12).tolist())
    assert any(len(r) < 12 for r in want)          # a row ended
    got = [t.tokens for t in transcribe(m, feats, GEN, "en", max_new_tokens=12)[0]]
    assert got == want


def test_cli_mismatched_preprocessor_config_is_one_clear_line(out, tmp_path, capsys):
    """A preprocessor_config.json whose feature_size is not the encoder's num_mel_bins (early whisper-large-v3
    fine-tunes shipped the 80-mel one): one line that says so, not an internal error."""
    import shutil

    from corpus import run_main
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    pc = json.loads((bad / "preprocessor_config.json").read_text())
    pc["feature_size"] = 8
    (bad / "preprocessor_config.json").write_text(json.dumps(pc))
    wav = write_wav(tmp_path / "a.wav", 0.5, 16000)
    code, stdout, err = run_main(capsys, "transcribe", bad, wav, "-l", "en")
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "internal error" not in err, err


def test_sampling_takes_the_generation_configs_top_k_when_a_temperature_is_given():
    """generate --generation-config --temperature 0.7 on a config with top_k 20 (no do_sample): as transformers'
    generate(do_sample=True, temperature=0.7), the config's top_k and top_p stand."""
    from fmconvert.cli import _sampling
    assert _sampling({"top_k": 20, "top_p": 0.9}, 0.7, None, None) == (0.7, 20, 0.9)


def test_segment_end_of_an_uncut_window_as_transformers():
    """A window with no pair of timestamps whose only timestamp is <|0.00|> ends at the window's end, in
    timestamp steps: transformers computes int(seek_num_frames * 0.01 / 0.02) on a torch tensor (float32), and so
    does speech (in Python floats the truncation differs by one step, 0.02 s, for some window lengths)."""
    from transformers.models.whisper.generation_whisper import WhisperGenerationMixin

    from fmconvert.runtime.speech import _segments
    begin = 108
    seq = [begin, 5, 6]
    bad = []
    for w in range(1, 3001):
        segs, step = _segments(seq, begin, 0.0, w)
        ref, off = WhisperGenerationMixin._retrieve_segment(
            seek_sequence=torch.tensor(seq), seek_outputs=[{}], time_offset=torch.zeros(1, dtype=torch.float64),
            timestamp_begin=begin, seek_num_frames=torch.tensor([w]), time_precision=0.02,
            time_precision_features=0.01, input_stride=2, prev_idx=0, idx=0, return_token_timestamps=False,
            decoder_input_ids=torch.zeros(1, 3, dtype=torch.long))
        if round(segs[0].end, 6) != round(float(ref[0]["end"]), 6):
            bad.append((w, segs[0].end, float(ref[0]["end"])))
    assert not bad, bad[:5]


def test_a_tied_checkpoint_that_stores_proj_out_converts(tmp_path):
    """Whisper checkpoints saved as pytorch_model.bin (openai's own, and most fine-tunes of 2022-23) hold
    proj_out.weight beside the embeddings it is tied to, outside the model. prefix: the table's `ignore_head`
    leaves it out, and the conversion runs as transformers does."""
    import tiny
    hf = build()
    src = tmp_path / "src"
    hf.save_pretrained(src)
    (src / "model.safetensors").unlink()
    sd = hf.state_dict()
    assert "proj_out.weight" in sd
    torch.save(sd, src / "pytorch_model.bin")
    convert(src, tmp_path / "out", Options(allow_pickle=True), progress=False)
    from fmconvert.runtime.load import load
    m = load(tmp_path / "out")
    feats, target = features(), torch.tensor([[100, 101, 105, 107, 9, 13, 21]] * 2)
    with torch.no_grad():
        want = hf(input_features=feats, decoder_input_ids=target).logits
    m.attach(m.source_encoder.hidden(feats))
    assert tiny.rel(m(target), want) < 1e-5


def test_the_error_for_too_many_new_tokens_names_a_count_that_fits(model):
    """-n past the decoder's positions: the refusal counts the whole prompt (not 1 token, before the language is
    detected), so the count it advises is accepted."""
    from fmconvert.errors import FmError
    with pytest.raises(FmError) as e:
        transcribe(model, features(), GEN, "en", eos_token_id=99, max_new_tokens=100)
    n = int(str(e.value).split("at most ")[1].split()[0])
    transcribe(model, features(), GEN, "en", eos_token_id=99, max_new_tokens=n)


def byte_tokenizer():
    """test_whisper's tokenizer with byte-level text tokens: each word id decodes to one byte of UTF-8 (continuation
    bytes and the lead bytes of two- and three-byte characters), as Whisper's byte-level BPE splits CJK and Devanagari
    characters across tokens."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    char = {b: chr(c) for b, c in zip(bs, cs)}           # GPT-2's bytes_to_unicode
    # what the tiny model says for write_wav's tone: 91 93 93 93 93 77 93 ...; 91 and 77 lead two-byte characters
    # (0xC3, 0xC5) that 93 (0xA9) completes: "é", "ũ"
    fixed = {91: 0xC3, 93: 0xA9, 77: 0xC5}
    rest = iter(b for b in [*range(0x80, 0xF0), *b"abcdefghijklmnopqrstuvwxyz"] if b not in fixed.values())
    special = {99: "<|endoftext|>", 100: "<|startoftranscript|>", 101: "<|en|>", 102: "<|fr|>", 103: "<|de|>",
               104: "<|translate|>", 105: "<|transcribe|>", 107: "<|notimestamps|>"}
    vocab = {special[i] if i in special else char[fixed[i] if i in fixed else next(rest)]: i for i in range(120)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=[v for k, v in special.items() if k != 99])


def test_cli_streamed_text_keeps_characters_split_across_tokens(tmp_path, capsys):
    """One file streams its text token by token; a character whose UTF-8 bytes span two tokens first decodes to
    U+FFFD, so the stream waits for its last byte: the streamed line is the transcript decoded whole (what several
    files print)."""
    from corpus import run_main
    src, out = tmp_path / "src", tmp_path / "out"
    build().save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    feature_extractor().save_pretrained(src)
    convert(src, out, Options(), progress=False)
    wav = write_wav(tmp_path / "a.wav", 0.8, 16000)
    code, whole, err = run_main(capsys, "transcribe", out, wav, wav, "-l", "en", "-n", "12")
    assert code == 0, err
    want = whole.splitlines()[0].split("\t", 1)[1]
    code, streamed, err = run_main(capsys, "transcribe", out, wav, "-l", "en", "-n", "12")
    assert code == 0, err
    assert "é" in want
    assert streamed.strip() == want


def test_a_wav_with_an_absurd_sample_rate_is_refused(tmp_path):
    """A corrupt header's sample rate (4 GHz) is refused in one line before any resampling filter is built."""
    from fmconvert.errors import FmError
    from fmconvert.runtime.audio import load_audio
    wav = bytearray(write_wav(tmp_path / "a.wav", 0.1, 16000).read_bytes())
    wav[24:28] = (0xFFFFFFF0).to_bytes(4, "little")
    (tmp_path / "b.wav").write_bytes(bytes(wav))
    with pytest.raises(FmError, match="sample rate of 4294967280 Hz"):
        load_audio(tmp_path / "b.wav")


def test_without_a_generation_config_config_json_stands_in(out, tmp_path, capsys):
    """An old checkpoint without generation_config.json: transcribe takes the generation keys of config.json (here
    suppressed tokens the model would otherwise say), as transformers' generate() does (an out-of-vocabulary
    begin_suppress_tokens id ignored, as there), and prints transformers' text."""
    import shutil

    from transformers import GenerationConfig, WhisperConfig

    from corpus import run_main
    from fmconvert.runtime.audio import load_audio
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "generation_config.json").unlink()
    cfg = json.loads((old / "config.json").read_text())
    wav = write_wav(tmp_path / "a.wav", 0.6, 16000)
    feats = feature_extractor()(load_audio(wav).numpy(), sampling_rate=16000, return_tensors="pt").input_features
    hf, tok = build(), tokenizer()

    def theirs(c):
        hf.generation_config = GenerationConfig.from_model_config(WhisperConfig(**{
            k: v for k, v in c.items() if k not in ("architectures", "transformers_version")}))
        with torch.no_grad():
            return hf.generate(input_features=feats, max_new_tokens=10)[0].tolist()
    plain = theirs({**cfg, "suppress_tokens": None, "begin_suppress_tokens": None})
    cfg.update(suppress_tokens=sorted(set(plain))[:2], begin_suppress_tokens=[plain[0], 50256])
    (old / "config.json").write_text(json.dumps(cfg))
    want = theirs(cfg)
    assert want != plain
    code, stdout, err = run_main(capsys, "transcribe", old, wav, "-n", "10")
    assert code == 0, err
    assert stdout.strip() == tok.decode(want, skip_special_tokens=True).strip()
