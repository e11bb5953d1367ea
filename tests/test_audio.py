"""runtime/audio.py: WAV files of every sample format written here byte by byte (and 16-bit PCM also by the stdlib
`wave` module, as an independent writer) read back to the samples written; stereo averaged; EXTENSIBLE headers;
unknown and odd-sized chunks skipped; a cut-short file read as far as it goes. Resampling checked against the
analytic signal at the new rate: sines from 8, 11.025, 22.05, 44.1, 44.101 and 48 kHz; a tone just under the new
Nyquist kept and ones above it removed; upsampling; lengths; equal rates; batches; speed. Every bad file raises an
FmError that names it on one line."""

from __future__ import annotations

import math
import struct
import wave

import numpy as np
import pytest
import torch

from fmconvert.errors import FmError
from fmconvert.runtime.audio import load_audio, read_audio, resample

GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


def chunk(cid: bytes, body: bytes, size: int | None = None) -> bytes:
    pad = b"\0" if len(body) % 2 else b""
    return cid + struct.pack("<I", len(body) if size is None else size) + body + pad


def fmt_body(tag: int, channels: int, rate: int, bits: int, extensible: bool = False, align: int | None = None,
             sub: bytes | None = None) -> bytes:
    align = channels * (bits // 8) if align is None else align
    head = (0xFFFE if extensible else tag, channels, rate, rate * align, align, bits)
    if not extensible:
        return struct.pack("<HHIIHH", *head)
    sub = struct.pack("<H", tag) + GUID_TAIL if sub is None else sub
    return struct.pack("<HHIIHHHHI", *head, 22, bits, 0) + sub


def riff(*chunks: bytes) -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


# format -> (tag, bits, encode float [T, C] -> (bytes, the exact values those bytes stand for), tolerance against
# the float samples: half a quantisation step, plus float32 rounding)
def _ints(x, bits):
    q = np.clip(np.round(x * 2.0 ** (bits - 1)), -2 ** (bits - 1), 2 ** (bits - 1) - 1).astype(np.int64)
    return q, q / 2.0 ** (bits - 1)


def enc_pcm8(x):
    q, exact = _ints(x, 8)
    return (q + 128).astype(np.uint8).tobytes(), exact


def enc_pcm16(x):
    q, exact = _ints(x, 16)
    return q.astype("<i2").tobytes(), exact


def enc_pcm24(x):
    q, exact = _ints(x, 24)
    return q.astype("<i4").view(np.uint8).reshape(*q.shape, 4)[..., :3].tobytes(), exact


def enc_pcm32(x):
    q, exact = _ints(x, 32)
    return q.astype("<i4").tobytes(), exact


FORMATS = {
    "pcm8": (1, 8, enc_pcm8, 2 ** -8),
    "pcm16": (1, 16, enc_pcm16, 2 ** -16),
    "pcm24": (1, 24, enc_pcm24, 2 ** -24 + 1e-7),
    "pcm32": (1, 32, enc_pcm32, 1e-7),
    "float32": (3, 32, lambda x: (x.astype("<f4").tobytes(), x.astype("<f4").astype(np.float64)), 1e-7),
    "float64": (3, 64, lambda x: (x.astype("<f8").tobytes(), x), 1e-7),
}


def samples(frames: int, channels: int, seed: int = 0) -> np.ndarray:
    """Float samples [frames, channels] in [-1, 1), with both extremes (sign extension and scale show there)."""
    x = np.random.default_rng(seed).uniform(-1, 1, (frames, channels))
    x[0], x[1] = -1.0, 127 / 128            # 127/128: the top value of even 8-bit
    return x


@pytest.mark.parametrize("extensible", [False, True], ids=["plain", "extensible"])
@pytest.mark.parametrize("channels", [1, 2, 3])
@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_reads_back(tmp_path, name, channels, extensible):
    tag, bits, encode, tol = FORMATS[name]
    x = samples(501, channels)
    data, exact = encode(x)
    path = tmp_path / f"{name}.wav"
    path.write_bytes(riff(chunk(b"fmt ", fmt_body(tag, channels, 22050, bits, extensible)), chunk(b"data", data)))
    got, rate = read_audio(path)
    assert rate == 22050 and got.dtype == torch.float32 and got.shape == (501,)
    # channels averaged; the exact values the bytes hold, up to float32 rounding
    assert np.abs(got.numpy() - exact.mean(1)).max() < 1e-7
    assert np.abs(got.numpy() - x.mean(1)).max() <= tol
    assert got.abs().max() <= 1.0


def test_stdlib_wave_writer_agrees(tmp_path):
    x = samples(1000, 2, seed=1)
    q = np.clip(np.round(x * 32768), -32768, 32767).astype("<i2")
    path = tmp_path / "stdlib.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44100)
        w.writeframes(q.tobytes())
    got, rate = read_audio(path)
    assert rate == 44100
    assert np.abs(got.numpy() - q.astype(np.float64).mean(1) / 32768).max() < 1e-7
    assert got[0] == -1.0 and got[1] == 127 / 128          # both channels carry the extremes


def test_stereo_channels_are_averaged(tmp_path):
    left, right = np.full(64, 0.5), np.linspace(-1, 0.75, 64)
    data, _ = enc_pcm16(np.stack([left, right], 1))
    path = tmp_path / "stereo.wav"
    path.write_bytes(riff(chunk(b"fmt ", fmt_body(1, 2, 16000, 16)), chunk(b"data", data)))
    got, _ = read_audio(path)
    assert torch.allclose(got, torch.tensor((left + right) / 2, dtype=torch.float32), atol=2 ** -15)


def test_unknown_and_odd_sized_chunks_are_skipped(tmp_path):
    x = samples(300, 1)
    data, exact = enc_pcm24(x)
    fmt = fmt_body(1, 1, 8000, 24)
    path = tmp_path / "chunky.wav"
    # An odd-sized chunk before fmt and one between fmt and data (each followed by its pad byte, which a reader
    # that forgot it would take as the next chunk's id), and a LIST chunk after the data.
    path.write_bytes(riff(chunk(b"junk", b"abc"), chunk(b"fmt ", fmt), chunk(b"bext", b"x" * 7),
                          chunk(b"data", data), chunk(b"LIST", b"INFOISFT\x05\0\0\0Lavf\0")))
    got, rate = read_audio(path)
    assert rate == 8000 and np.abs(got.numpy() - exact[:, 0]).max() < 1e-7


def test_odd_sized_data_then_a_chunk_and_a_float_fmt_with_extension(tmp_path):
    # 8-bit mono with 5 frames: an odd data chunk, then a LIST chunk after its pad byte. fmt has the 18-byte form.
    x = samples(5, 1)
    data, exact = enc_pcm8(x)
    fmt = fmt_body(1, 1, 11025, 8) + b"\0\0"
    path = tmp_path / "odd.wav"
    path.write_bytes(riff(chunk(b"fmt ", fmt), chunk(b"data", data), chunk(b"LIST", b"INFO")))
    got, _ = read_audio(path)
    assert got.shape == (5,) and np.abs(got.numpy() - exact[:, 0]).max() < 1e-7


@pytest.mark.parametrize("claimed", [10_000, 0xFFFFFFFF])
def test_a_cut_short_file_reads_what_is_there(tmp_path, claimed):
    # The header promises more than follows: the whole frames present are read, the partial last one dropped.
    x = samples(40, 2)
    data, exact = enc_pcm16(x)
    path = tmp_path / "cut.wav"
    path.write_bytes(riff(chunk(b"fmt ", fmt_body(1, 2, 16000, 16)))
                     + b"data" + struct.pack("<I", claimed) + data[:-3])
    got, _ = read_audio(path)
    assert got.shape == (39,) and np.abs(got.numpy() - exact[:39].mean(1)).max() < 1e-7


def _bad(tmp_path, name: str, content: bytes | None):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    return path


FMT16 = chunk(b"fmt ", fmt_body(1, 1, 16000, 16))
DATA = chunk(b"data", b"\1\0\2\0\3\0")
BAD = {
    "missing": (None, "no such file"),
    "flac": (b"fLaC\0\0\0\x22" + bytes(40), "FLAC"),
    "mp3_id3": (b"ID3\x04\0\0\0\0\0\0" + bytes(40), "MP3"),
    "mp3_bare": (b"\xff\xfb\x90\x64" + bytes(40), "MP3"),
    "ogg": (b"OggS\0\2" + bytes(40), "OGG"),
    "text": (b"hello, this is not audio\n", "not a RIFF/WAVE"),
    "empty": (b"", "not a RIFF/WAVE"),
    "riff_not_wave": (b"RIFF\4\0\0\0AVI ", "not a RIFF/WAVE"),
    "adpcm": (riff(chunk(b"fmt ", fmt_body(2, 1, 16000, 4, align=256)), DATA), "ADPCM"),
    "pcm12": (riff(chunk(b"fmt ", fmt_body(1, 1, 16000, 12, align=2)), DATA), "12-bit integer PCM"),
    "float16": (riff(chunk(b"fmt ", fmt_body(3, 1, 16000, 16)), DATA), "16-bit float"),
    "ext_unknown_guid": (riff(chunk(b"fmt ", fmt_body(1, 1, 16000, 16, True, sub=bytes(16))), DATA), "sub-format"),
    "ext_alaw": (riff(chunk(b"fmt ", fmt_body(6, 1, 16000, 8, True)), DATA), "A-law"),
    "ext_short": (riff(chunk(b"fmt ", fmt_body(1, 1, 16000, 16, True)[:30]), DATA), "EXTENSIBLE"),
    "zero_channels": (riff(chunk(b"fmt ", fmt_body(1, 0, 16000, 16)), DATA), "0 channels"),
    "zero_rate": (riff(chunk(b"fmt ", fmt_body(1, 1, 0, 16)), DATA), "sample rate of 0"),
    "bad_align": (riff(chunk(b"fmt ", fmt_body(1, 2, 16000, 16, align=6)), DATA), "inconsistent"),
    "empty_data": (riff(FMT16, chunk(b"data", b"")), "no samples"),
    "partial_frame": (riff(FMT16, chunk(b"data", b"\1")), "no samples"),
    "no_data": (riff(FMT16, chunk(b"LIST", b"INFO")), "no data chunk"),
    "no_fmt": (riff(DATA), "no fmt chunk"),
    "short_fmt": (riff(chunk(b"fmt ", b"\1\0\1\0\x80\x3e\0\0"), DATA), "fmt chunk is 8 bytes"),
    "nan": (riff(chunk(b"fmt ", fmt_body(3, 1, 16000, 32)), chunk(b"data", np.array([0, np.nan], "<f4").tobytes())),
            "NaN"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_raise_an_error_naming_them(tmp_path, case):
    content, words = BAD[case]
    path = _bad(tmp_path, f"clip_{case}.wav", content)
    with pytest.raises(FmError) as e:
        read_audio(path)
    msg = str(e.value)
    assert str(path) in msg and words in msg and "\n" not in msg
    if case.startswith(("flac", "mp3", "ogg", "text", "adpcm")):
        assert "ffmpeg -i in.mp3 -ar 16000 -ac 1 out.wav" in msg
    with pytest.raises(FmError, match=case):        # load_audio goes the same way
        load_audio(path)


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(FmError, match="directory") as e:
        read_audio(tmp_path)
    assert str(tmp_path) in str(e.value)


def sine(freqs, rate: int, seconds: float) -> torch.Tensor:
    t = torch.arange(round(rate * seconds), dtype=torch.float64) / rate
    return sum(torch.sin(2 * math.pi * f * t + i) for i, f in enumerate(freqs))


def interior(y: torch.Tensor, rate: int) -> torch.Tensor:
    return y[rate // 20: -rate // 20]                # the filter sees zeros past the ends: skip 50 ms each side


@pytest.mark.parametrize("orig", [44100, 48000, 8000, 22050, 11025, 44101])
def test_a_440_hz_sine_resamples_to_the_analytic_one(orig):
    y = resample(sine([440], orig, 0.5).float(), orig, 16000)
    want = sine([440], 16000, 0.5)
    assert y.dtype == torch.float32 and len(y) == len(want)
    assert (interior(y, 16000) - interior(want, 16000)).abs().max() < 1e-4


@pytest.mark.parametrize("orig,new,freqs", [(8000, 16000, [440, 1000, 3300]), (16000, 44100, [250, 5000, 7000]),
                                            (22050, 48000, [60, 9000]), (44100, 16000, [100, 2500, 6500])])
def test_several_tones_pass_unchanged(orig, new, freqs):
    y = resample(sine(freqs, orig, 0.4).float(), orig, new)
    want = sine(freqs, new, 0.4)
    assert len(y) == len(want)
    assert (interior(y, new) - interior(want, new)).abs().max() < 3e-3


def test_a_7_khz_tone_survives_48k_to_16k():
    y = resample(sine([7000], 48000, 0.5).float(), 48000, 16000)
    assert (interior(y, 16000) - interior(sine([7000], 16000, 0.5), 16000)).abs().max() < 5e-3


@pytest.mark.parametrize("orig,freq", [(48000, 11000), (48000, 8500), (44100, 9000), (44100, 20000), (44101, 12000)])
def test_tones_above_the_new_nyquist_are_removed(orig, freq):
    # Unfiltered, 11 kHz would fold to 5 kHz at full amplitude.
    y = resample(sine([freq], orig, 0.5).float(), orig, 16000)
    assert interior(y, 16000).abs().max() < 1e-3               # -60 dB at least (measured near -95)


def test_a_constant_stays_constant_whatever_the_phase():
    # Every phase of the bank has unit gain at DC, including the 16000 phases of 44101 -> 16000.
    for orig in (44100, 44101, 8000):
        y = resample(torch.ones(orig // 2), orig, 16000)
        assert (interior(y, 16000) - 1).abs().max() < 1e-6          # the raw phase sums differ by up to 2.5e-6


@pytest.mark.parametrize("T", [0, 1, 2, 3, 999, 1000, 44101])
@pytest.mark.parametrize("orig,new", [(48000, 16000), (44100, 16000), (8000, 16000), (16000, 44100), (44101, 16000),
                                      (22050, 16000), (3, 2)])
def test_output_length_is_the_ceiling(T, orig, new):
    y = resample(torch.randn(T), orig, new)
    assert y.shape == (-(-T * new // orig),) and torch.isfinite(y).all()


def test_equal_rates_return_the_input():
    x = torch.randn(1234)
    assert resample(x, 16000, 16000) is x


def test_leading_dims_resample_row_by_row():
    x = torch.randn(2, 3, 4410)
    y = resample(x, 44100, 16000)
    assert y.shape == (2, 3, 1600)
    assert torch.allclose(y[1, 2], resample(x[1, 2], 44100, 16000), atol=1e-6)


def test_integer_samples_come_out_float():
    x = (sine([440], 8000, 0.5) * 1000).round().to(torch.int16)
    y = resample(x, 8000, 16000)
    assert y.dtype == torch.float32
    # Away from the ends, the even outputs fall on the inputs (up to the rounding noise the low-pass trims).
    assert torch.allclose(interior(y, 16000)[::2], interior(x.float(), 8000), atol=1.0)


@pytest.mark.parametrize("orig,new", [(0, 16000), (16000, -1), (44100.5, 16000)])
def test_bad_rates_are_refused(orig, new):
    with pytest.raises(FmError, match="cannot resample"):
        resample(torch.zeros(10), orig, new)


def test_load_audio_reads_and_resamples(tmp_path):
    x = sine([440], 48000, 0.5).numpy()[:, None] * 0.5
    data, _ = enc_pcm16(np.concatenate([x, x], 1))
    path = tmp_path / "a48k.wav"
    path.write_bytes(riff(chunk(b"fmt ", fmt_body(1, 2, 48000, 16)), chunk(b"data", data)))
    y = load_audio(path)
    want = sine([440], 16000, 0.5) * 0.5
    assert y.dtype == torch.float32 and y.shape == want.shape
    assert (interior(y, 16000) - interior(want, 16000)).abs().max() < 1e-4
    assert torch.equal(load_audio(path, sr=48000), read_audio(path)[0])
