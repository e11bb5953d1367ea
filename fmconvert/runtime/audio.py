"""Audio in for speech recognition: a WAV file in, mono float32 at the rate Whisper's feature extractor wants out.

Only WAV is read, and the RIFF chunks are walked here rather than by the stdlib `wave` module, which refuses float
samples: integer PCM of 8 (unsigned), 16, 24 and 32 bits, IEEE float of 32 and 64 bits, each also behind a
WAVE_FORMAT_EXTENSIBLE header. Channels are averaged; integers are scaled by 2^(bits-1) into [-1, 1), floats are
passed through as stored (clipping them would distort a file with headroom). Compressed files (FLAC, MP3, OGG, ADPCM,
A-law, ...) are refused with the ffmpeg command that converts them.

A file cut short is read as far as it goes: a data chunk whose header promises more bytes than follow (a recording
stopped mid-write, or a streaming writer's 0xFFFFFFFF placeholder) yields the frames that are there, and a partial
last frame is dropped. Only a file with no whole frame at all is an error.

Resampling is band-limited and rational: the ratio new_sr / orig_sr is reduced to up / down, and output n sits at
input time n * down / up, where a Kaiser-windowed sinc with its cutoff just under the lower of the two Nyquist
frequencies weighs the input samples around it. Only `up` distinct fractional positions occur, so the filter is
tabulated once per phase (a polyphase bank) and run as strided conv1d calls.
"""

from __future__ import annotations

import math
import struct
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import EXIT_IO, FmError

WHISPER_SR = 16000
MAX_RATE = 768000            # the highest rate audio interfaces record at

# Filter design. ZEROS sinc zero crossings each side, counted at the lower rate; ROLLOFF puts the cutoff at 95% of
# the lower Nyquist so the transition band (~0.88 to ~1.03 of it with these values) lies mostly below it; BETA gives
# a stopband near -95 dB. Measured 48k -> 16k: 7 kHz keeps 99.9% of its amplitude, 8.3 kHz and up is gone.
ZEROS = 32
ROLLOFF = 0.95
BETA = 9.0

CONVERT_HINT = "convert it with `ffmpeg -i in.mp3 -ar 16000 -ac 1 out.wav`"
# Leading bytes of the formats people most often hand over instead of WAV.
MAGIC = ((b"fLaC", "FLAC"), (b"ID3", "MP3"), (b"OggS", "OGG"), (b"RIFX", "big-endian RIFX"), (b"RF64", "RF64"),
         (b"FORM", "AIFF"), (b"\x1aE\xdf\xa3", "Matroska/WebM"), (b"#!AMR", "AMR"))

PCM, FLOAT, EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
SUPPORTED = {(PCM, 8), (PCM, 16), (PCM, 24), (PCM, 32), (FLOAT, 32), (FLOAT, 64)}     # (format tag, bits)
# Format tags met in the wild that we do not decode, named so the message says what the file is.
TAG_NAMES = {0x0002: "MS ADPCM", 0x0006: "A-law", 0x0007: "mu-law", 0x0011: "IMA ADPCM", 0x0031: "GSM 6.10",
             0x0050: "MPEG", 0x0055: "MP3", 0x00FF: "AAC", 0x1610: "AAC", 0xF1AC: "FLAC"}
# A KSDATAFORMAT_SUBTYPE GUID is the format tag followed by these 14 bytes.
GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


def _fmt(path, body: bytes) -> tuple[int, int, int, int, int]:
    """A fmt chunk's body -> (format tag with EXTENSIBLE unwrapped, channels, rate, block align, bits per sample)."""
    if len(body) < 16:
        raise FmError(f"{path}: fmt chunk is {len(body)} bytes, shorter than the 16 a WAV header needs")
    tag, channels, rate, _, align, bits = struct.unpack_from("<HHIIHH", body)
    if tag == EXTENSIBLE:
        if len(body) < 40:
            raise FmError(f"{path}: WAVE_FORMAT_EXTENSIBLE fmt chunk is {len(body)} bytes, needs 40")
        # The container size stays `bits`; the valid bits (body[18:20]) sit left-justified in it, so decoding the
        # container is right whatever they are.
        guid = body[24:40]
        if guid[2:] != GUID_TAIL:
            raise FmError(f"{path}: WAVE_FORMAT_EXTENSIBLE with unknown sub-format {guid.hex()}; {CONVERT_HINT}")
        tag = struct.unpack_from("<H", guid)[0]
    return tag, channels, rate, align, bits


def _chunks(path, data: bytes):
    """Walk the RIFF chunks -> (fmt body, data chunk as a memoryview), the data chunk clamped to what is there."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        kind = next((name for magic, name in MAGIC if data.startswith(magic)), None)
        if kind is None and len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0:
            kind = "MP3"                                    # an MPEG audio frame sync with no ID3 tag before it
        what = f"looks like {kind}, not a RIFF/WAVE file" if kind else "not a RIFF/WAVE file"
        raise FmError(f"{path}: {what}; only WAV is read (FLAC, MP3, OGG and others are not): {CONVERT_HINT}")
    fmt = samples = None
    pos, view = 12, memoryview(data)
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        start = pos + 8
        end = min(start + size, len(data))                  # a size past the end: the file was cut short
        if cid == b"fmt " and fmt is None:
            fmt = bytes(data[start:end])
        elif cid == b"data" and samples is None:
            samples = view[start:end]
        pos = start + size + (size & 1)                     # odd-sized chunks are followed by a pad byte
    if fmt is None:
        raise FmError(f"{path}: WAV file has no fmt chunk")
    if samples is None:
        raise FmError(f"{path}: WAV file has no data chunk, so no samples")
    return fmt, samples


def _decode(path, tag: int, bits: int, raw: np.ndarray) -> np.ndarray:
    """Raw sample bytes (uint8 [frames, channels, width]) -> float32 [frames, channels]."""
    n, ch, width = raw.shape
    if tag == PCM and bits == 8:
        return (raw[..., 0].astype(np.float32) - 128.0) / 128.0     # 8-bit WAV alone is unsigned
    if tag == PCM and bits in (16, 24, 32):
        # Left-justify each sample in 4 bytes so every width reads as int32; little-endian: pad at the low end.
        wide = np.zeros((n, ch, 4), np.uint8)
        wide[..., 4 - width:] = raw
        return wide.view("<i4")[..., 0].astype(np.float32) * np.float32(2.0 ** -31)     # a power of two: exact
    x = np.ascontiguousarray(raw).view("<f4" if bits == 32 else "<f8")[..., 0]   # FLOAT, 32 or 64 bits
    if not np.isfinite(x).all():
        raise FmError(f"{path}: float samples include NaN or infinity")
    return x.astype(np.float32)


def read_audio(path) -> tuple[torch.Tensor, int]:
    """A WAV file -> (mono float32 samples [T], sample rate). Bad or unsupported files raise FmError naming them."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FmError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FmError(f"{path}: is a directory, not an audio file") from None
    except OSError as e:
        raise FmError(f"{path}: cannot read it ({e.strerror or e})", EXIT_IO) from None
    fmt, samples = _chunks(path, data)
    tag, channels, rate, align, bits = _fmt(path, fmt)
    if channels == 0:
        raise FmError(f"{path}: WAV header says 0 channels")
    if rate == 0:
        raise FmError(f"{path}: WAV header says a sample rate of 0 Hz")
    if rate > MAX_RATE:         # a corrupt header: its resampling filter bank would not fit in memory
        raise FmError(f"{path}: WAV header says a sample rate of {rate} Hz, past any audio's ({MAX_RATE} Hz)")
    if (tag, bits) not in SUPPORTED:
        kind = {PCM: f"{bits}-bit integer PCM", FLOAT: f"{bits}-bit float"}.get(tag)
        if kind is None:
            kind = f"format tag 0x{tag:04X}" + (f" ({TAG_NAMES[tag]})" if tag in TAG_NAMES else "")
        raise FmError(f"{path}: unsupported sample format {kind} (read: 8/16/24/32-bit PCM, 32/64-bit float); "
                      f"{CONVERT_HINT}")
    width = bits // 8
    if align != channels * width:
        raise FmError(f"{path}: WAV header is inconsistent: {channels} channels of {bits} bits but "
                      f"{align} bytes per frame")
    frames = len(samples) // align                          # a partial last frame is dropped
    if frames == 0:
        raise FmError(f"{path}: WAV data chunk holds no samples ({len(samples)} bytes, {align} per frame)")
    raw = np.frombuffer(samples, np.uint8, frames * align).reshape(frames, channels, width)
    x = _decode(path, tag, bits, raw)                       # [T, C]
    mono = x[:, 0] if channels == 1 else x.mean(axis=1, dtype=np.float64).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(mono)), rate


@lru_cache(maxsize=16)      # rates sharing no factor (44101 -> 16000) need 16000 phases: 0.3 s, more than resampling
def _bank(up: int, down: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """The polyphase filter bank -> (taps [up, 2L+1], L): row p weighs input samples i - L .. i + L for an output at
    input time i + p / up."""
    cutoff = ROLLOFF * min(1.0, up / down)                  # a fraction of the input's Nyquist frequency
    half = ZEROS / cutoff                                    # the window's half width, in input samples
    L = math.ceil(half)
    t = torch.arange(-L, L + 1, dtype=torch.float64) - torch.arange(up, dtype=torch.float64)[:, None] / up  # [up, K]
    inside = t.abs() < half
    window = torch.i0(BETA * torch.sqrt((1 - (t / half) ** 2).clamp(min=0))) / torch.i0(torch.tensor(BETA))
    taps = torch.where(inside, torch.sinc(cutoff * t) * window, torch.zeros(()))
    # Unit DC gain for every phase: the raw sums differ by up to ~1e-6, which would modulate a constant.
    return (taps / taps.sum(1, keepdim=True)).to(dtype), L


def resample(wave: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Samples [..., T] at orig_sr -> [..., ceil(T * new_sr / orig_sr)] at new_sr, band-limited to the lower Nyquist.
    Equal rates return `wave` itself."""
    if int(orig_sr) != orig_sr or int(new_sr) != new_sr or orig_sr <= 0 or new_sr <= 0:
        raise FmError(f"cannot resample from {orig_sr} Hz to {new_sr} Hz: rates must be positive whole numbers")
    if orig_sr == new_sr:
        return wave
    g = math.gcd(int(orig_sr), int(new_sr))
    up, down = int(new_sr) // g, int(orig_sr) // g
    dtype = wave.dtype if wave.is_floating_point() else torch.float32
    lead, T = wave.shape[:-1], wave.shape[-1]
    N = -(-T * up // down)                                   # ceil
    if T == 0:
        return wave.new_zeros(*lead, 0, dtype=dtype)
    frames = -(-N // up)                                     # output n = f * up + j, f a frame, j its phase
    taps, L = _bank(up, down, dtype)
    taps = taps.to(wave.device)
    # Output f*up + j reads input f*down + off[j] - L .. + L with the taps of phase (j*down) % up; off[j] only grows.
    j = torch.arange(up)
    off, phase = (j * down) // up, (j * down) % up
    # Zero-pad so every frame's window lies inside: L before, and up to frames*down + L after.
    x = wave.reshape(-1, 1, T).to(dtype)                     # [B, 1, T]
    x = F.pad(x, (L, frames * down + L + 1 - T))
    out = torch.empty(x.shape[0], up, frames, dtype=dtype, device=wave.device)   # [B, up, frames]
    # Phases whose offsets lie within `span` of each other share one conv1d, each padded to the group's reach: one
    # call per group, at most twice the arithmetic of the bare taps.
    span = 2 * L + 1
    a = 0
    while a < up:
        b = int(torch.searchsorted(off, off[a] + span, right=True))
        reach = int(off[b - 1] - off[a]) + 2 * L + 1
        k = torch.zeros(b - a, 1, reach, dtype=dtype, device=wave.device)    # [P, 1, reach]
        rows = torch.arange(b - a)[:, None]
        cols = (off[a:b] - off[a])[:, None] + torch.arange(2 * L + 1)
        k[rows, 0, cols] = taps[phase[a:b]]
        seg = x[..., int(off[a]):]
        if reach <= down:
            # Windows that do not overlap: unfold copies at most the input once, where conv1d would copy the whole
            # input per call (ruinous with many groups, as when the rates share no factor).
            out[:, a:b] = (seg[:, 0].unfold(-1, reach, down)[:, :frames] @ k[:, 0].T).transpose(1, 2)
        else:
            out[:, a:b] = F.conv1d(seg, k, stride=down)[..., :frames]
        a = b
    return out.transpose(1, 2).reshape(*lead, frames * up)[..., :N]


def load_audio(path, sr: int = WHISPER_SR) -> torch.Tensor:
    """A WAV file -> mono float32 samples [T] at sr (16 kHz, what WhisperFeatureExtractor expects)."""
    wave, rate = read_audio(path)
    return resample(wave, rate, sr)
