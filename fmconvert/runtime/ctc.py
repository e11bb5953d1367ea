"""Speech recognition by CTC (Wav2Vec2, HuBERT, UniSpeech, WavLM, Data2Vec-Audio: `*ForCTC`), as transformers' ASR
pipeline runs it, and the same encoders' other heads: a label a clip (`*ForSequenceClassification`), labels a frame
(`*ForAudioFrameClassification`: diarization), a speaker embedding a clip (`*ForXVector`), or a bare encoder's mean
frame.

The encoder reads the raw 16 kHz waveform, normalized by the conversion's feature extractor (preprocessor_config.json:
zero mean and unit variance per clip), or (Wav2Vec2-BERT) the rows of log-mel features its SeamlessM4TFeatureExtractor
makes of it, and gives each frame (320 samples, 20 ms, in the released models) a
distribution over the characters. The transcript is the likeliest character of each frame, repeats merged and the
blank (the pad token) dropped, with "|" between words: what the tokenizer's decode does.

A file longer than the chunk is read as transformers' ASR pipeline reads it with `chunk_length_s`: windows of the
chunk's length, each overlapping the next by a stride either side, whose frames inside the strides are dropped
before the frames of all windows are joined and decoded once. A shorter file is one window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import FmError
from ..policy import audio_front
from .classify import head_logits

SAMPLE_RATE = 16000


@dataclass
class Word:
    text: str
    start: float          # seconds from the audio's start
    end: float


@dataclass
class Recognized:
    text: str
    words: list = field(default_factory=list)      # Word, each with its first and last frame's times


def feature_extractor(out_dir, spec: dict):
    """The conversion's feature extractor (preprocessor_config.json) for a speech encoder (spec: the manifest's
    model section), or where there is none transformers' defaults for its front end: a waveform encoder's
    Wav2Vec2FeatureExtractor (16 kHz, normalized, an attention mask for the models whose convs are LayerNormed:
    those trained with padding masked), a feature encoder's SeamlessM4TFeatureExtractor (`features_extractor`)."""
    from pathlib import Path

    from transformers import Wav2Vec2FeatureExtractor
    if spec.get("features"):
        return features_extractor(out_dir, spec["features"])
    wave = spec["wave"]
    if not (Path(out_dir) / "preprocessor_config.json").is_file():
        return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                        do_normalize=True, return_attention_mask=wave["norm"] == "layer")
    try:
        fe = Wav2Vec2FeatureExtractor.from_pretrained(str(out_dir), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise FmError(f"{out_dir}: cannot load the feature extractor from preprocessor_config.json "
                      f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if fe.sampling_rate != SAMPLE_RATE or fe.feature_size != 1:
        raise FmError(f"{out_dir}: preprocessor_config.json reads {fe.feature_size} channel(s) at {fe.sampling_rate} "
                      f"Hz; a waveform encoder reads one at {SAMPLE_RATE}")
    return fe


def features_extractor(out_dir, features: dict):
    """Wav2Vec2-BERT's SeamlessM4TFeatureExtractor (preprocessor_config.json, else its defaults: 80 mel bins, two
    frames a row), refused in one line where its rows are not the width the model reads."""
    from pathlib import Path

    from transformers import SeamlessM4TFeatureExtractor
    try:
        fe = SeamlessM4TFeatureExtractor.from_pretrained(str(out_dir), local_files_only=True) \
            if (Path(out_dir) / "preprocessor_config.json").is_file() else SeamlessM4TFeatureExtractor()
    except (OSError, ValueError, TypeError) as e:
        raise FmError(f"{out_dir}: cannot load the feature extractor from preprocessor_config.json "
                      f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if fe.sampling_rate != SAMPLE_RATE or fe.num_mel_bins * fe.stride != features["dim"] \
            or fe.stride != features["stride"][-1]:
        raise FmError(f"{out_dir}: preprocessor_config.json makes rows of {fe.num_mel_bins} mel bins x {fe.stride} "
                      f"frames at {fe.sampling_rate} Hz; the model reads {features['dim']}-wide rows of "
                      f"{features['stride'][-1]} frames at {SAMPLE_RATE} Hz")
    return fe


def inputs_of(fe, waves: list[torch.Tensor], mask: bool | None = None):
    """16 kHz mono waveforms -> what the encoder reads: (values [B, samples], sample mask [B, samples] or None),
    padded to the longest and normalized as the feature extractor does, or (Wav2Vec2-BERT) (feature rows
    [B, frames, dim], frame mask [B, frames]). mask: ask for the mask (None: as the extractor is set)."""
    out = fe([w.numpy() for w in waves], sampling_rate=SAMPLE_RATE, padding=True, return_tensors="pt",
             **({} if mask is None else {"return_attention_mask": mask}))
    return out[fe.model_input_names[0]], out.get("attention_mask")


def batches(fe, waves: list[torch.Tensor], idx: list[int], batch_size: int, same_length: bool = False
            ) -> list[list[int]]:
    """The clips idx in batches of batch_size. A feature extractor without a mask (wav2vec2-base's: its model reads
    zeros as silence) would have the padding change a shorter clip's result, so then (or with same_length) a batch
    holds one length only."""
    if fe.return_attention_mask and not same_length:
        return [idx[j:j + batch_size] for j in range(0, len(idx), batch_size)]
    by_len: dict[int, list[int]] = {}
    for i in idx:
        by_len.setdefault(waves[i].numel(), []).append(i)
    return [g[j:j + batch_size] for g in by_len.values() for j in range(0, len(g), batch_size)]


def padding_leaks(model) -> bool:
    """Whether a clip's result would depend on the padding it is batched with, masked or not: Wav2Vec2-Conformer's
    convolution modules read the padded frames (transformers zeroes them before the first block only). Such a
    model's batches then hold one length only (`batches`' same_length). Wav2Vec2-BERT's (causal) zero them and look
    only back: its padding leaks nowhere, but for its adapter's strided convs, which read the blocks' output at the
    padded frames past a clip's last."""
    cf = model.spec.get("conformer")
    return bool(model.spec.get("adapter")) or bool(cf) and not cf.get("causal")


def ratio(front: dict) -> int:
    """Samples per frame (config.inputs_to_logits_ratio): the product of the conv strides (`audio_front`'s, with
    Wav2Vec2-BERT's adapter's)."""
    n = 1
    for s in front["stride"]:
        n *= s
    return n


def windows(n: int, chunk: int, left: int, right: int) -> list[tuple[int, int, int, int]]:
    """transformers' chunk_iter: (start, end, left stride, right stride) in samples for a clip of n samples: windows
    of `chunk` samples a step of chunk - left - right apart, the first without a left stride, the last (the one that
    reaches the end) without a right one; a window no longer than its left stride is left out."""
    out, step = [], chunk - left - right
    for start in range(0, n, step):
        end = min(start + chunk, n)
        sl, last = (0 if start == 0 else left), start + chunk >= n
        if end - start > sl:
            out.append((start, end, sl, 0 if last else right))
        if last:
            break
    return out


def forward(model, values: torch.Tensor, mask: torch.Tensor | None):
    """A batch of `inputs_of` (normalized waveforms and their real samples, or feature rows and their real frames)
    through the encoder -> (the last hidden state,
    every layer's states where the head sums them (layer_sum) else None, the real frames [B, frames]: all of them
    without a mask)."""
    mask = None if mask is None else mask.to(model.device)
    if (model.spec.get("classifier") or {}).get("layer_sum"):
        hidden, states = model.hidden(values.to(model.device), attention_mask=mask, output_hidden_states=True)
    else:
        hidden, states = model.hidden(values.to(model.device), attention_mask=mask), None
    frames = model.frames if model.frames is not None else torch.ones(hidden.shape[:2], dtype=torch.bool,
                                                                      device=hidden.device)
    return hidden, states, frames


def head_of(model, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The head's output in fp32 for a batch of normalized waveforms: logits [B, frames, labels] (CTC, frame
    classifiers), [B, labels] (clip classifiers), or embeddings [B, dim] (x-vectors)."""
    hidden, states, frames = forward(model, values, mask)
    return head_logits(model, hidden, None, frames, states=states)


def check_lengths(model, waves: list[torch.Tensor], names=None):
    """Refuse, in one line, a clip too short for the conv stack to make a frame of (names: what to call each;
    default "audio 1", "audio 2", ...)."""
    least = model.min_samples()
    for i, w in enumerate(waves):
        if w.numel() < least:
            name = names[i] if names is not None else f"audio {i + 1}"
            raise FmError(f"{name}: {w.numel()} samples at 16 kHz is too short: {model.spec['architecture']} needs "
                          f"at least {least} ({least / SAMPLE_RATE * 1000:.1f} ms)")


def head_kind(spec: dict) -> str | None:
    """What a waveform encoder's head does: "ctc" (a character a frame), "frames" (labels a frame: diarization),
    "clips" (a label a clip), "xvector" (a speaker embedding a clip), or None (a bare encoder, or no waveform
    encoder)."""
    head = spec.get("classifier")
    if not audio_front(spec) or head is None:
        return None
    return {"mean": "clips", "xvector": "xvector"}.get(head["pool"]) or \
        ("ctc" if spec["architecture"].endswith("ForCTC") else "frames")


def _check_ctc(model):
    if head_kind(model.spec) != "ctc":
        raise FmError(f"{model.spec['architecture']} has no CTC head: convert a *ForCTC checkpoint")


def recognize(model, tok, fe, waves: list[torch.Tensor], batch_size: int = 8, chunk_s: float = 30.0,
              stride_s: float | None = None, words: bool = False, on_file=None,
              on_progress=None) -> list[Recognized]:
    """Each 16 kHz waveform's transcript (and, with words, each word's time span). Files of up to chunk_s seconds go
    batch_size at a time (`batches`), padded as the feature extractor pads them, each decoded over its own frames; a
    longer file goes window by window (stride_s a side, default chunk_s / 6), its full windows batched (a last window
    too short for the conv stack to make a frame of is left out). on_file(i, Recognized) is called as each file is
    done, on_progress(i, samples of it read) as each batch or window is."""
    _check_ctc(model)
    align = ratio(audio_front(model.spec))
    chunk = int(round(chunk_s * SAMPLE_RATE / align) * align)
    stride = chunk_s / 6 if stride_s is None else stride_s
    side = int(round(stride * SAMPLE_RATE / align) * align)
    if chunk < 2 * side or chunk - 2 * side < align:
        raise FmError(f"a chunk of {chunk_s} s leaves nothing between its strides of {stride} s")
    shortest = model.min_samples()
    out: list[Recognized | None] = [None] * len(waves)

    def finish(i: int, ids: torch.Tensor):
        r = _decoded(tok, ids, align, words)
        out[i] = r
        if on_file is not None:
            on_file(i, r)

    check_lengths(model, waves)
    short = [i for i, w in enumerate(waves) if w.numel() <= chunk]
    for idx in batches(fe, waves, short, batch_size, padding_leaks(model)):
        ids = head_of(model, *inputs_of(fe, [waves[i] for i in idx])).argmax(-1).cpu()
        for k, i in enumerate(idx):     # its own frames: those of the padding (masked or not) say nothing of it
            finish(i, ids[k, :int(model.clip_frames(waves[i].numel()))])
            if on_progress is not None:
                on_progress(i, waves[i].numel())
    for i in (i for i in range(len(waves)) if waves[i].numel() > chunk):
        spans = [s for s in windows(waves[i].numel(), chunk, side, side) if s[1] - s[0] >= shortest]
        full = [s for s in spans if s[1] - s[0] == chunk]
        pieces = []
        # windows of one length batch without padding; the last, shorter one goes alone. Each is normalized on its
        # own and masked (all ones), as the pipeline's chunks are
        groups = [full[j:j + batch_size] for j in range(0, len(full), batch_size)] + \
            [[s] for s in spans if s[1] - s[0] != chunk]
        for group in groups:
            batch = inputs_of(fe, [waves[i][a:b] for a, b, _, _ in group], mask=True)
            ids = head_of(model, *batch).argmax(-1).cpu()
            for k, (a, b, sl, sr) in enumerate(group):
                total = int(round((b - a) / align))        # the pipeline's rescale_stride, in frames
                left, right = int(round(sl / (b - a) * total)), int(round(sr / (b - a) * total))
                pieces.append((a, ids[k, left:total - right]))
            if on_progress is not None:
                on_progress(i, max(b for _, b, _, _ in group))
        finish(i, torch.cat([p for _, p in sorted(pieces, key=lambda p: p[0])]))
    return out


def _decoded(tok, ids: torch.Tensor, align: int, words: bool) -> Recognized:
    """Frame ids -> text (repeats merged, blanks dropped, word delimiters as spaces), and with words each word's
    span: its first frame's start to its last frame's end, in seconds, as the pipeline's word timestamps."""
    ids = ids.tolist()
    if not words:
        return Recognized(tok.decode(ids))
    got = tok.decode(ids, output_word_offsets=True)
    return Recognized(got.text, [Word(w["word"], w["start_offset"] * align / SAMPLE_RATE,
                                      w["end_offset"] * align / SAMPLE_RATE) for w in got.word_offsets])


def cues(words: list, pause: float = 0.5, longest: float = 6.0, most: int = 12) -> list[tuple[float, float, str]]:
    """Subtitle cues of words: a cue ends at a pause of at least `pause` seconds before the next word, or when it
    would pass `longest` seconds or `most` words."""
    out, cur = [], []
    for w in words:
        if cur and (w.start - cur[-1].end >= pause or w.end - cur[0].start > longest or len(cur) >= most):
            out.append((cur[0].start, cur[-1].end, " ".join(x.text for x in cur)))
            cur = []
        cur.append(w)
    if cur:
        out.append((cur[0].start, cur[-1].end, " ".join(x.text for x in cur)))
    return out


def classify_audio(model, fe, waves: list[torch.Tensor], batch_size: int = 8) -> list[torch.Tensor]:
    """Each file's logits: [labels] from an audio classifier (*ForSequenceClassification: the mean of the real
    frames, or of the layers' weighted sum, through its projector and classifier), [its frames, labels] from a frame
    classifier (*ForAudioFrameClassification); batch_size files a forward."""
    kind = head_kind(model.spec)
    if kind not in ("clips", "frames"):
        raise FmError(f"{model.spec['architecture']} has no audio classification head: convert a "
                      f"*ForSequenceClassification or *ForAudioFrameClassification checkpoint")
    check_lengths(model, waves)
    rows: list[torch.Tensor | None] = [None] * len(waves)
    for idx in batches(fe, waves, list(range(len(waves))), batch_size, padding_leaks(model)):
        for i, row in zip(idx, head_of(model, *inputs_of(fe, [waves[i] for i in idx])).cpu()):
            rows[i] = row if kind == "clips" else row[:int(model.clip_frames(waves[i].numel()))]
    return rows


def embed_audio(model, fe, waves: list[torch.Tensor], batch_size: int = 8, normalize: bool = False) -> list:
    """A vector a file: an x-vector head's speaker embedding, else the mean of the last hidden state over the real
    frames; scaled to unit length with normalize. Batched as `batches` says; an x-vector's batches hold one length
    only, as transformers' count of a padded clip's frames after dilated TDNN layers reaches into its padding (so a
    clip's embedding there would depend on what it was batched with)."""
    xvector = head_kind(model.spec) == "xvector"
    check_lengths(model, waves)
    rows: list[torch.Tensor | None] = [None] * len(waves)
    for idx in batches(fe, waves, list(range(len(waves))), batch_size,
                       same_length=xvector or padding_leaks(model)):
        hidden, states, frames = forward(model, *inputs_of(fe, [waves[i] for i in idx]))
        if xvector:
            vec = head_logits(model, hidden, None, frames, states=states)
        else:
            m = frames.unsqueeze(-1).to(hidden.dtype)
            vec = ((hidden * m).sum(1) / m.sum(1).clamp(min=1)).float()
        if normalize:
            vec = torch.nn.functional.normalize(vec, dim=-1)
        for i, v in zip(idx, vec.cpu()):
            rows[i] = v
    return rows


def active_spans(probs: torch.Tensor, names: list[str], frame_s: float, threshold: float = 0.5) -> list[dict]:
    """A frame classifier's probabilities [frames, labels] -> each label's runs of frames at or above threshold, as
    {label, start, end} in seconds (frame_s a frame), ordered by start: the diarization recipe of transformers'
    docs (a sigmoid a speaker, active from 0.5)."""
    out = []
    for j, name in enumerate(names):
        start = None
        for i, on in enumerate((probs[:, j] >= threshold).tolist() + [False]):
            if on and start is None:
                start = i
            elif not on and start is not None:
                out.append({"label": name, "start": round(start * frame_s, 3), "end": round(i * frame_s, 3)})
                start = None
    return sorted(out, key=lambda d: (d["start"], d["end"], d["label"]))
