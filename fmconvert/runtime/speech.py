"""Whisper speech recognition over a converted WhisperForConditionalGeneration, as transformers' generate() does it:
the log-mel features (transformers' WhisperFeatureExtractor, from the conversion's preprocessor_config.json) through
the audio encoder, then the decoder from its prompt

    <|startoftranscript|> <|language|> <|transcribe|> or <|translate|> <|notimestamps|>

with the generation config's suppressed tokens banned at every step and its begin_suppress_tokens (a blank, the end
token) at the first. A multilingual model with no language given detects it first, as transformers does: the
likeliest language token after <|startoftranscript|>. With timestamps (and for audio past one 30 s window, always)
the prompt leaves out <|notimestamps|>, transformers' timestamp rules apply, and each window's text is cut into
segments at its timestamps, the next window starting where the last whole segment ended. Everything here reads
generation_config.json, never the modelling code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import FmError
from .beam import beam_search
from .generate import GenStats, generate, positions_left, stop_tokens
from .processors import Processors

SAMPLE_RATE = 16000          # what every Whisper feature extractor is configured for
FEATURE_STEP = 0.01          # seconds a log-mel frame moves (hop 160 at 16 kHz)
TIME_STEP = 0.02             # seconds a timestamp token counts (one encoder position)
INPUT_STRIDE = 2             # frames an encoder position reads (conv2's stride)


def _lang_token(gc: dict, language: str) -> str:
    """A language as the user wrote it (en, English, <|en|>) -> its token's text, as transformers accepts it."""
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE
    low = language.lower()
    token = low if low in gc["lang_to_id"] else f"<|{TO_LANGUAGE_CODE[low]}|>" if low in TO_LANGUAGE_CODE else \
        f"<|{low}|>"
    if token not in gc["lang_to_id"]:
        known = sorted(t.strip("<|>") for t in gc["lang_to_id"])
        raise FmError(f"this model has no language {language!r} (it knows {', '.join(known[:12])}"
                      f"{', ...' if len(known) > 12 else ''})")
    return token


def prompt_tokens(gc: dict, language: str | None = None, task: str | None = None,
                  detected: list[int] | None = None, timestamps: bool = False) -> list[list[int]] | None:
    """The decoder's first tokens for each row, as transformers builds them from the generation config (gc):
    the start token; the language (given, detected, or forced_decoder_ids'); the task (given, forced_decoder_ids', or
    transcribe when a language is given); <|notimestamps|> unless timestamps are wanted. None when the language
    must be detected first (a multilingual model, none given, detected None)."""
    multilingual = gc.get("is_multilingual", "lang_to_id" in gc)
    if (language or task) and not multilingual:
        raise FmError("this is an English-only Whisper: it takes no --language or --task")
    # a fine-tuned model's config names its own (transformers' recipe saves them), which stand unless given
    language, task = language or gc.get("language"), task or gc.get("task")
    if language and "lang_to_id" not in gc:
        raise FmError("generation_config.json has no lang_to_id: the model cannot be told a --language")
    if task and task not in gc.get("task_to_id", {}):
        raise FmError(f"generation_config.json has no task {task!r} (task_to_id: "
                      f"{', '.join(gc.get('task_to_id', {})) or 'none'})")
    init = [gc["decoder_start_token_id"]]
    if language is None and task is None:       # the checkpoints' older spelling: positions 1, 2, ... forced
        forced = gc.get("forced_decoder_ids") or []
        if forced and forced[0][0] == 1:
            if [at for at, _ in forced] != list(range(1, len(forced) + 1)):
                raise FmError(f"generation_config.json: forced_decoder_ids {forced} leave a position out; transformers "
                              f"refuses them too")
            init += [tok for _, tok in forced]
    lang = gc["lang_to_id"][_lang_token(gc, language)] if language else None
    if lang is None and "lang_to_id" in gc and (len(init) < 2 or init[1] is None):
        if detected is None:
            return None
    rows = []
    for b in range(len(detected) if detected is not None else 1):
        row = list(init)
        pick = lang if lang is not None else detected[b] if detected is not None else None
        if pick is not None:
            row[1:2] = [pick]
        if task:
            row.append(gc["task_to_id"][task])
        elif language and "task_to_id" in gc and not set(row) & set(gc["task_to_id"].values()):
            row.append(gc["task_to_id"]["transcribe"])
        no_ts = gc.get("no_timestamps_token_id")
        if no_ts is not None and row[-1] != no_ts and not timestamps:
            row.append(no_ts)
        elif timestamps and row[-1] == no_ts:
            row.pop()
        rows.append([t for t in row if t is not None])
    return rows


@torch.inference_mode()
def detect_language(model, gc: dict) -> list[int]:
    """Each attached source's language token: the decoder's likeliest after the start token, over the languages."""
    B = next(iter(model.cross.values()))[0].shape[0]
    start = torch.full((B, 1), gc["decoder_start_token_id"], dtype=torch.long, device=model.device)
    logits = model(start)[:, -1].float()
    langs = torch.tensor(sorted(gc["lang_to_id"].values()), device=logits.device)
    return langs[logits[:, langs].argmax(-1)].tolist()


def check_ids(gc: dict, vocab: int):
    """The generation config's token ids this module reads must be ids of this vocabulary, in the shapes
    transformers writes them."""
    def ids_of(key, kind):
        v = gc.get(key)
        if v is not None and not isinstance(v, kind):
            raise FmError(f"generation_config.json: {key} must be a {kind.__name__}, got {type(v).__name__}")
    for key, kind in (("suppress_tokens", list), ("begin_suppress_tokens", list), ("lang_to_id", dict),
                      ("task_to_id", dict), ("forced_decoder_ids", list)):
        ids_of(key, kind)
    if any(not isinstance(p, list) or len(p) != 2 or type(p[0]) is not int for p in gc.get("forced_decoder_ids") or ()):
        raise FmError("generation_config.json: forced_decoder_ids must be [position, token id] pairs")
    first = gc.get("max_initial_timestamp_index")
    if first is not None and (type(first) is not int or first < 0):
        raise FmError(f"generation_config.json: max_initial_timestamp_index must be a non-negative integer, got "
                      f"{first!r}")
    ids = [gc.get("decoder_start_token_id"), gc.get("no_timestamps_token_id"),
           *(gc.get("lang_to_id") or {}).values(), *(gc.get("task_to_id") or {}).values(),
           *(t for _, t in gc.get("forced_decoder_ids") or ())]
    bad = [i for i in ids if i is not None and (type(i) is not int or not 0 <= i < vocab)]
    # suppressed ids past the vocabulary are ignored, as transformers ignores them
    bad += [i for i in (*(gc.get("suppress_tokens") or ()), *(gc.get("begin_suppress_tokens") or ()))
            if type(i) is not int or i < 0]
    if gc.get("decoder_start_token_id") is None:
        raise FmError("generation_config.json: Whisper needs a decoder_start_token_id")
    if bad:
        raise FmError(f"generation_config.json: token id {bad[0]!r} is not one of the model's {vocab}")


def _setting(gc: dict, key: str, given, default, kind):
    """A decoding setting: given, else the generation config's (checked), else the default."""
    if given is not None:
        return given
    v = gc.get(key)
    if v is None:
        return default
    if type(v) not in (kind if isinstance(kind, tuple) else (kind,)) or v < 0:
        raise FmError(f"generation_config.json: {key} must be a non-negative number, got {v!r}")
    return v


@dataclass
class Segment:
    start: float             # seconds from the audio's start
    end: float
    tokens: list             # its tokens, timestamps included where there are any
    # its window's last decode: the temperature it was read at, its tokens' mean log probability (with the end token;
    # None unless a log-probability threshold asks for it), their compression ratio, <|nospeech|>'s probability
    temperature: float = 0.0
    avg_logprob: float | None = None
    compression_ratio: float | None = None
    no_speech_prob: float | None = None
    token_times: list | None = None     # each token's time in seconds (word timestamps: cross-attention and DTW)


@dataclass
class Transcript:
    tokens: list = field(default_factory=list)       # every new token, as transformers' generate() returns them
    segments: list = field(default_factory=list)     # Segment: one per 30 s window without timestamps
    language: str | None = None                      # its language's code (en), given or detected; None: not said
    redecoded: int = 0                                # windows decoded again hotter (temperature fallback)
    skipped: int = 0                                  # windows skipped as silence
    words: list | None = None                         # its words with their times, where a caller groups them


def _segments(seq: list, begin: int, offset: float, window: int) -> tuple[list, int]:
    """transformers' cut of one window's tokens (its end token removed) at its timestamps -> (segments, frames to
    seek on). Each pair of timestamps side by side ends one segment and starts the next; a window that ends on a
    lone timestamp has been read to its end; one cut short (by the token limit, mid-segment) is read again from its
    last whole segment's end. Without timestamps the window is one segment."""
    stamp = [t >= begin for t in seq]
    single_end = stamp[-2:] == [False, True]
    cuts = [i + 1 for i in range(len(stamp) - 1) if stamp[i] and stamp[i + 1]]
    if not cuts:
        at = [i for i, t in enumerate(stamp) if t]
        end = int(torch.tensor(window) * FEATURE_STEP / TIME_STEP)       # in float32, as transformers rounds it
        if at and seq[at[-1]] != begin:
            end = seq[at[-1]] - begin
        return [Segment(offset, offset + end * TIME_STEP, seq)], window
    cuts = cuts + [len(seq)] if single_end else cuts[:-1] + [cuts[-1] + 1]
    out, last = [], 0
    for i, cut in enumerate(cuts):
        piece = seq[last:cut]
        closing = piece[-1 if i < len(cuts) - 1 or single_end else -2]
        out.append(Segment(offset + (piece[0] - begin) * TIME_STEP, offset + (closing - begin) * TIME_STEP, piece))
        last = cut
    return out, window if single_end else (seq[last - 2] - begin) * INPUT_STRIDE


def compression_ratio(tokens: list, vocab: int) -> float:
    """transformers' repetition measure of a window's tokens: their bytes (each little-endian, as wide as the
    vocabulary needs) over those bytes zlib-compressed. A loop of one phrase compresses well, so scores high."""
    import zlib
    width = int(math.log2(vocab) / 8) + 1
    raw = b"".join(t.to_bytes(width, "little") for t in tokens)
    return len(raw) / len(zlib.compress(raw))


@dataclass
class Fallback:
    """transformers' long-form heuristics (Whisper paper, 3.8), each None when not used: a window is decoded again at
    the next temperature while its tokens' compression ratio is above compression_ratio, or their mean log
    probability below logprob; it is skipped as silence where that mean is below logprob and the no-speech token's
    probability above no_speech."""
    temperatures: tuple = (None,)
    compression_ratio: float | None = None
    logprob: float | None = None
    no_speech: float | None = None
    top_k: int = 50             # what sampling keeps (transformers' defaults unless the generation config says)
    top_p: float = 1.0

    def verdict(self, tokens: list, avg_logprob: float, no_speech_prob: float, vocab: int) -> tuple[bool, bool]:
        """-> (decode again hotter, skip as silence), as transformers' _need_fallback decides."""
        again = self.compression_ratio is not None and compression_ratio(tokens, vocab) > self.compression_ratio
        again = again or (self.logprob is not None and avg_logprob < self.logprob)
        if self.no_speech is not None and avg_logprob < self.logprob and no_speech_prob > self.no_speech:
            return False, True
        return again, False


def fallback_of(gc: dict, temperature=None, compression_ratio_threshold: float | None = None,
                logprob_threshold: float | None = None, no_speech_threshold: float | None = None) -> Fallback:
    """The heuristics as given, else as the generation config sets them (transformers reads its thresholds there,
    never its temperature: Whisper decodes greedily unless one is passed)."""
    temps = tuple(temperature) if isinstance(temperature, (list, tuple)) else (temperature,)
    if not temps or any(t is not None and (not isinstance(t, (int, float)) or t < 0) for t in temps):
        raise FmError(f"temperatures must be numbers of at least 0, got {temperature!r}")

    def threshold(key, given):
        v = gc.get(key) if given is None else given
        if v is not None and (type(v) not in (int, float) or not math.isfinite(v)):
            raise FmError(f"{key} must be a number, got {v!r}")
        return v
    fb = Fallback(temps, threshold("compression_ratio_threshold", compression_ratio_threshold),
                  threshold("logprob_threshold", logprob_threshold), threshold("no_speech_threshold",
                                                                               no_speech_threshold),
                  _setting(gc, "top_k", None, 50, int), float(_setting(gc, "top_p", None, 1.0, (int, float))))
    if fb.no_speech is not None and fb.logprob is None:
        raise FmError("a no-speech threshold needs a log-probability threshold: a window is silence when its tokens' "
                      "mean log probability is below that one too")
    return fb


def _history(segments: list, cut: int, begin: int) -> list:
    """The tokens of the segments so far that a window is conditioned on: each segment's (one of a closing pair of
    timestamps dropped), joined, the last `cut` of them."""
    out = []
    for s in segments:
        out += s[:-1] if len(s) > 2 and s[-2] >= begin else s
    return out[-cut:]


def transcribe(model, features: torch.Tensor, gc: dict, language: str | None = None, task: str | None = None,
               max_new_tokens: int | None = None, eos_token_id=None, on_token=None,
               cuda_graph: bool | None = None, timestamps: bool | None = None, num_beams: int | None = None,
               length_penalty: float | None = None, prompt_ids: list | None = None,
               prompt_condition_type: str | None = None, condition_on_prev_tokens: bool | None = None,
               fallback: Fallback | None = None, seed: int = 0, frames: list | None = None,
               word_timestamps: bool = False, median_width: int = 7,
               on_window=None) -> tuple[list[Transcript], GenStats]:
    """features [B, mels, frames] -> each row's Transcript and the stats, greedy, as transformers' generate()
    decodes Whisper. One window of 2 * max_source_positions frames (30 s) is one pass unless timestamps are asked
    for; longer features (one row), or timestamps, take transformers' sequential long-form path: each window's
    text is cut at its timestamps, and the next window starts where its last whole segment ended. num_beams > 1:
    transformers' beam search in each window (nothing streamed to on_token). What is not given (None) is the
    generation config's, as in transformers: language, task, return_timestamps, num_beams, length_penalty,
    max_new_tokens (else max_length), eos_token_id, repetition_penalty, no_repeat_ngram_size,
    condition_on_prev_tokens and the thresholds.

    prompt_ids: <|startofprev|> and a text's tokens (the tokenizer's get_prompt_ids) put before the decoder's prompt,
    of the first window only ("first-segment", the default) or of every one ("all-segments", with
    condition_on_prev_tokens). condition_on_prev_tokens: each window after the first starts from <|startofprev|> and
    the last max_target_positions // 2 - 1 tokens read so far. fallback (fallback_of): temperature fallback and
    silence skipping; sampling draws from one generator seeded with seed, carried through every window. frames:
    each row's frames of audio, as the feature extractor's attention mask counts them (past them a clip of one
    window is padded to 30 s, longer ones with zeros, as `long_features` gives them): long rows decode side by side,
    each seeking on its own, and word timestamps read no further. word_timestamps: each segment's token_times, from
    the cross-attention of the generation config's alignment_heads (runtime/alignment.py), median-filtered over
    median_width positions (the model config's median_filter_width). on_window(row, its new segments, seconds of
    it read so far) is called as each window of a row is done."""
    check_ids(gc, model.spec["vocab_size"])
    timestamps = bool(gc.get("return_timestamps")) if timestamps is None else timestamps
    num_beams = _setting(gc, "num_beams", num_beams, 1, int)
    length_penalty = _setting(gc, "length_penalty", length_penalty, 1.0, (int, float))
    eos_token_id = gc.get("eos_token_id") if eos_token_id is None else eos_token_id
    fb = fallback or fallback_of(gc)
    if num_beams > 1 and on_token is not None:
        raise FmError("beam search knows its tokens only at the end: it streams none")
    if len(fb.temperatures) > 1 and on_token is not None:
        raise FmError("with temperature fallback a window's tokens are known once it is kept: none are streamed")
    cond = bool(gc.get("condition_on_prev_tokens")) if condition_on_prev_tokens is None else condition_on_prev_tokens
    prompt_condition_type = prompt_condition_type or "first-segment"
    if prompt_condition_type not in ("first-segment", "all-segments"):
        raise FmError(f"prompt_condition_type is first-segment or all-segments, not {prompt_condition_type!r}")
    if prompt_condition_type == "all-segments" and not cond:
        raise FmError("a prompt for every window (all-segments) needs condition_on_prev_tokens")
    B, _, total = features.shape
    chunk = 2 * model.source_encoder.spec["max_positions"]
    if total > chunk:
        timestamps = True               # as transformers: past one window only timestamps say where to go on
    elif total != chunk:
        raise FmError(f"the features hold {total} frames; Whisper reads {chunk} (30 s, padded), or more")
    real = None if frames is None else [int(f) for f in frames]
    if real is not None and (len(real) != B or any(not 0 < f <= total for f in real)):
        raise FmError(f"frames must give each of the {B} rows its frames of audio, 1 to {total}")
    lengths = real if real is not None and total > chunk else [total] * B      # one window: all of it is read
    if word_timestamps:
        from .alignment import alignment_heads, token_timestamps
        alignment_heads(gc, model)
    if timestamps and gc.get("no_timestamps_token_id") is None:
        raise FmError("generation_config.json has no no_timestamps_token_id: this model gives no timestamps")
    if fb.no_speech is not None and gc.get("no_timestamps_token_id") is None:
        raise FmError("generation_config.json has no no_timestamps_token_id: the no-speech token is the one before it")
    vocab = model.spec["vocab_size"]
    begin = gc["no_timestamps_token_id"] + 1 if gc.get("no_timestamps_token_id") is not None else vocab + 1
    prev_sot = gc.get("prev_sot_token_id")
    if prev_sot is None and len(gc.get("suppress_tokens") or ()) >= 2:
        prev_sot = gc["suppress_tokens"][-2]        # where transformers finds <|startofprev|> without it
    prompt_ids = list(prompt_ids) if prompt_ids is not None else None
    if prompt_ids is not None and any(type(t) is not int or not 0 <= t < vocab for t in prompt_ids):
        raise FmError(f"the prompt's token ids must be ids of the model's {vocab}")
    eos = set(stop_tokens(eos_token_id))
    rows = prompt_tokens(gc, language, task, timestamps=timestamps)
    # the prompt's length, its language detected or not
    init_len = len(rows[0]) if rows else len(prompt_tokens(gc, language, task, [0], timestamps)[0])
    limit = model.spec["max_positions"]
    cut = limit // 2 - 1                # the most earlier tokens a window is conditioned on
    length = _setting(gc, "max_length", None, 20, int)
    max_new_tokens = _setting(gc, "max_new_tokens", max_new_tokens, None, int)
    procs = Processors(suppress=tuple(gc.get("suppress_tokens") or ()),
                       begin_suppress=tuple(gc.get("begin_suppress_tokens") or ()),
                       repetition_penalty=float(_setting(gc, "repetition_penalty", None, 1.0, (int, float))),
                       no_repeat_ngram=_setting(gc, "no_repeat_ngram_size", None, 0, int))
    if timestamps:
        end = gc.get("eos_token_id") or gc.get("bos_token_id")       # transformers' "text ends here" id
        end = end if type(end) is int else min(eos) if eos else gc["no_timestamps_token_id"]
        procs.timestamps = dict(begin=begin, none=gc["no_timestamps_token_id"], text_end=end,
                                max_initial=gc.get("max_initial_timestamp_index"),
                                by_mass=gc.get("_detect_timestamp_from_logprob", True) is not False)
    known = {}                       # the prompt of each row, once its language is known

    def init_rows(m, active):
        if "rows" not in known:      # detected from the first window, as transformers does
            known["rows"] = rows or prompt_tokens(gc, language, task, detect_language(m, gc), timestamps)
            if len(known["rows"]) == 1:
                known["rows"] = known["rows"] * B
        return [known["rows"][i] for i in active]
    results = [Transcript() for _ in range(B)]
    # what each row's windows are conditioned on: the prompt's text first (first-segment), then every segment's
    history = [[prompt_ids[1:] if prompt_ids[0] == prev_sot else prompt_ids] if prompt_ids and
               prompt_condition_type == "first-segment" else [] for _ in range(B)]
    conditioned = [cond] * B         # a row's next window is conditioned (not after a hot fallback)
    gen = torch.Generator().manual_seed(seed)
    total = GenStats()
    seek = [0] * B                   # each row's first frame still to read
    while any(s < f for s, f in zip(seek, lengths)):
        active = [i for i in range(B) if seek[i] < lengths[i]]
        window = {i: min(lengths[i] - seek[i], chunk) for i in active}
        segs = {i: torch.nn.functional.pad(features[i, :, seek[i]:seek[i] + window[i]], (0, chunk - window[i]))
                for i in active}
        # transformers looks at the first row's history only
        if any(conditioned[i] for i in active) and history[0]:
            bos = prompt_ids if prompt_ids and prompt_condition_type == "all-segments" else \
                [prev_sot] if prev_sot is not None else []
            before = {i: bos + (_history(history[i], cut, begin) if conditioned[i] and history[i] else [])
                      for i in active}
        else:
            before = {i: list(prompt_ids or ()) for i in active}
        if len({len(v) for v in before.values()}) > 1:
            raise FmError("the windows' earlier text differs in length across the batch: decode them one at a time")
        P = init_len + len(before[active[0]])
        if max_new_tokens is not None and max_new_tokens + P > limit:
            raise FmError(f"the decoder's prompt is {P} tokens (its prompt and the text before) and -n is "
                          f"{max_new_tokens}: more than Whisper's {limit} positions; ask for at most {limit - P}")
        length = min(length + min(cut, P), limit)     # transformers' limit per window grows by its prompt
        new = max_new_tokens if max_new_tokens is not None else length - P
        positions_left(model, 0, new, P)        # before generate, which sees a prompt of one token until detection
        no_speech = {}

        def decoder_prompt(m, todo):
            x = [before[i] + r for i, r in zip(todo, init_rows(m, todo))]
            if len({len(r) for r in x}) != 1:
                raise FmError("the decoder's prompts differ in length across the batch")
            x = torch.tensor(x, dtype=torch.long)
            if fb.no_speech is not None and todo[0] not in no_speech:     # once a window: every try reads the same
                at = len(before[todo[0]])          # the start token's logits: how likely <|nospeech|> comes next
                probs = m(x.to(m.device))[:, at].float().softmax(-1)
                for i, p in zip(todo, probs[:, begin - 2].tolist()):
                    no_speech[i] = p
            return x
        todo, kept = list(active), {}
        for attempt, t in enumerate(fb.temperatures):
            hot = t is not None and t > 0.0
            seg = torch.stack([segs[i] for i in todo])
            if num_beams > 1 and not hot:       # each row's best hypothesis, padded with the end token
                out, st = beam_search(model, seg, num_beams, new, eos_token_id, length_penalty, processors=procs,
                                      decoder_prompt=lambda m, todo=todo: decoder_prompt(m, todo))
            else:
                out, st = generate(model, seg, new, temperature=t if hot else 0.0, top_p=fb.top_p, top_k=fb.top_k,
                                   eos_token_id=eos_token_id, on_token=on_token, cuda_graph=cuda_graph,
                                   processors=procs, decoder_prompt=lambda m, todo=todo: decoder_prompt(m, todo),
                                   generator=gen, logprobs=fb.logprob is not None)
            # read while this try's source is attached; in seconds from the window's start
            times = token_timestamps(model, gc, out, P, None if real is None else [real[i] - seek[i] for i in todo],
                                     median_width) if word_timestamps else None
            total.prompt_tokens += st.prompt_tokens
            total.new_tokens += st.new_tokens
            total.prefill_s += st.prefill_s
            total.decode_s += st.decode_s
            again = []
            for j, (i, row) in enumerate(zip(todo, out[:, P:].tolist())):
                results[i].redecoded += attempt == 1
                stop = next((k for k, tok in enumerate(row) if tok in eos), None)
                row = row if stop is None else row[:stop + 1]     # the end token counts in both measures
                if st.sequence_scores is not None:
                    mean = st.sequence_scores[j]
                elif st.logprobs is not None and row:
                    mean = float(st.logprobs[j, :len(row)].sum()) / len(row)
                else:
                    mean = None
                ratio = compression_ratio(row, vocab) if row else None
                retry, skip = fb.verdict(row, mean, no_speech.get(i), vocab) if row else (False, False)
                kept[i] = (row[:-1] if stop is not None else row, skip,
                           dict(temperature=t or 0.0, avg_logprob=mean, compression_ratio=ratio,
                                no_speech_prob=no_speech.get(i)),
                           None if times is None else times[j, P:] + seek[i] * FEATURE_STEP)
                conditioned[i] = cond and (t is None or t < 0.5)
                if retry:
                    again.append(i)
            todo = again
            if not todo:
                break
        for i in active:
            row, skip, measures, times = kept[i]
            if skip:                    # silence: nothing read, on to the next window
                results[i].skipped += 1
                seek[i] += window[i]
                if on_window is not None:
                    on_window(i, [], min(seek[i], lengths[i]) * FEATURE_STEP)
                continue
            # cut at timestamps even when none were asked for, as transformers: a model may still say a pair
            pieces, step = _segments(row, begin, seek[i] * FEATURE_STEP, window[i])
            step = step if step > 0 else window[i]   # no timestamp past 0: never (the rules forbid it), but never loop
            at = 0
            for p in pieces:
                p.__dict__.update(measures)
                if times is not None:       # the pieces run on through the row, each its tokens' times
                    p.token_times = times[at:at + len(p.tokens)].tolist()
                    at += len(p.tokens)
                results[i].tokens += p.tokens
                history[i].append(p.tokens)
            results[i].segments += pieces
            seek[i] += step
            if on_window is not None:
                on_window(i, pieces, min(seek[i], lengths[i]) * FEATURE_STEP)
    codes = {v: k.strip("<|>") for k, v in (gc.get("lang_to_id") or {}).items()}
    for r, row in zip(results, known.get("rows") or []):
        r.language = next((codes[t] for t in row if t in codes), None)
    total.tokens = results[0].tokens
    return results, total


def feature_extractor(out_dir, encoder: dict | None = None):
    """The conversion's WhisperFeatureExtractor (preprocessor_config.json), at the rate Whisper reads; checked
    against the encoder's spec (its mel bins and 30 s of frames) when given."""
    from transformers import WhisperFeatureExtractor
    try:
        fe = WhisperFeatureExtractor.from_pretrained(str(out_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise FmError(f"{out_dir}: cannot load the feature extractor from preprocessor_config.json "
                      f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if fe.sampling_rate != SAMPLE_RATE:
        raise FmError(f"{out_dir}: preprocessor_config.json's sampling_rate is {fe.sampling_rate}, not {SAMPLE_RATE}")
    if encoder is not None and (fe.feature_size, fe.nb_max_frames) != (encoder["audio_mels"],
                                                                       2 * encoder["max_positions"]):
        raise FmError(f"{out_dir}: preprocessor_config.json gives {fe.feature_size} mel bins x {fe.nb_max_frames} "
                      f"frames, but the encoder reads {encoder['audio_mels']} x {2 * encoder['max_positions']}: "
                      f"it belongs to another Whisper")
    return fe


def long_features(fe, waves: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Clips past one window, each through the feature extractor alone (so its features never depend on what it is
    batched with), zero-padded to the longest -> (features [B, mels, frames], each clip's frames)."""
    feats = [features_of(fe, [w]) for w in waves]
    most = max(f.shape[-1] for f in feats)
    return (torch.cat([torch.nn.functional.pad(f, (0, most - f.shape[-1])) for f in feats]),
            [f.shape[-1] for f in feats])


def features_of(fe, waves: list[torch.Tensor]) -> torch.Tensor:
    """16 kHz mono waveforms -> log-mel features [B, mels, frames] by the feature extractor fe: clips of up to its
    chunk (30 s) padded to it, or one longer clip whole (transformers' long-form input)."""
    if len(waves) == 1 and waves[0].numel() > fe.n_samples:
        return fe(waves[0].numpy(), sampling_rate=SAMPLE_RATE, truncation=False, padding="longest",
                  return_tensors="pt").input_features
    if any(w.numel() > fe.n_samples for w in waves):
        raise FmError("audio longer than one window is transcribed one file at a time")
    return fe([w.numpy() for w in waves], sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
