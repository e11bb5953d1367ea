"""Whisper speech recognition over a converted WhisperForConditionalGeneration, as transformers' generate() does it
for clips of up to 30 s: the log-mel features (transformers' WhisperFeatureExtractor, from the conversion's
preprocessor_config.json) through the audio encoder, then the decoder from its prompt

    <|startoftranscript|> <|language|> <|transcribe|> or <|translate|> <|notimestamps|>

with the generation config's suppressed tokens banned at every step and its begin_suppress_tokens (a blank, the end
token) at the first. A multilingual model with no language given detects it first, as transformers does: the
likeliest language token after <|startoftranscript|>. Everything here reads generation_config.json, never the
modelling code.
"""

from __future__ import annotations

import torch

from ..errors import FmError
from .generate import GenStats, generate
from .processors import Processors

SAMPLE_RATE = 16000          # what every Whisper feature extractor is configured for


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
                  detected: list[int] | None = None) -> list[list[int]] | None:
    """The decoder's first tokens for each row, as transformers builds them from the generation config (gc):
    the start token; the language (given, detected, or forced_decoder_ids'); the task (given, forced_decoder_ids', or
    transcribe when a language is given); <|notimestamps|>. None when the language must be detected first (a
    multilingual model, none given, detected None)."""
    multilingual = gc.get("is_multilingual", "lang_to_id" in gc)
    if (language or task) and not multilingual:
        raise FmError("this is an English-only Whisper: it takes no --language or --task")
    if language and "lang_to_id" not in gc:
        raise FmError("generation_config.json has no lang_to_id: the model cannot be told a --language")
    if task and task not in gc.get("task_to_id", {}):
        raise FmError(f"generation_config.json has no task {task!r} (task_to_id: "
                      f"{', '.join(gc.get('task_to_id', {})) or 'none'})")
    init = [gc["decoder_start_token_id"]]
    if language is None and task is None:       # the checkpoints' older spelling: positions 1, 2, ... forced
        forced = gc.get("forced_decoder_ids") or []
        for i, (at, tok) in enumerate(forced, start=1):
            if at != i:
                break
            init.append(tok)
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
        if no_ts is not None and row[-1] != no_ts:
            row.append(no_ts)
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


def new_token_limit(model, gc: dict, prompt: int) -> int:
    """transformers' default for Whisper: max_length (raised by the prompt's length) up to the decoder's positions,
    less the prompt."""
    limit = model.spec["max_positions"]
    length = gc.get("max_length")
    return (min(length + prompt, limit) if type(length) is int and length > 0 else limit) - prompt


def check_ids(gc: dict, vocab: int):
    """The generation config's token ids this module reads must be ids of this vocabulary."""
    ids = [gc.get("decoder_start_token_id"), gc.get("no_timestamps_token_id"),
           *(gc.get("suppress_tokens") or ()), *(gc.get("begin_suppress_tokens") or ()),
           *(gc.get("lang_to_id") or {}).values(), *(gc.get("task_to_id") or {}).values(),
           *(t for _, t in gc.get("forced_decoder_ids") or ())]
    bad = [i for i in ids if i is not None and (type(i) is not int or not 0 <= i < vocab)]
    if gc.get("decoder_start_token_id") is None:
        raise FmError("generation_config.json: Whisper needs a decoder_start_token_id")
    if bad:
        raise FmError(f"generation_config.json: token id {bad[0]!r} is not one of the model's {vocab}")


def transcribe(model, features: torch.Tensor, gc: dict, language: str | None = None, task: str | None = None,
               max_new_tokens: int | None = None, eos_token_id=None, on_token=None,
               cuda_graph: bool | None = None) -> tuple[list[list[int]], GenStats]:
    """features [B, mels, frames] -> each row's new tokens (after the decoder's prompt, up to and with its end
    token) and the stats. Greedy, as transformers' default for Whisper."""
    check_ids(gc, model.spec["vocab_size"])
    rows = prompt_tokens(gc, language, task)
    if max_new_tokens is None:
        max_new_tokens = new_token_limit(model, gc, len(rows[0]) if rows else 4)

    def prompt(m):
        r = rows or prompt_tokens(gc, language, task, detect_language(m, gc))
        if len({len(x) for x in r}) != 1:
            raise FmError("the decoder's prompts differ in length across the batch")
        return torch.tensor(r if len(r) == features.shape[0] else r * features.shape[0], dtype=torch.long)
    procs = Processors(suppress=tuple(gc.get("suppress_tokens") or ()),
                       begin_suppress=tuple(gc.get("begin_suppress_tokens") or ()))
    out, stats = generate(model, features, max_new_tokens, eos_token_id=eos_token_id, on_token=on_token,
                          cuda_graph=cuda_graph, processors=procs, decoder_prompt=prompt)
    P = out.shape[1] - stats.new_tokens
    eos = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else () if eos_token_id is None
              else (eos_token_id,))
    tokens = []
    for row in out[:, P:].tolist():
        cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
        tokens.append(row[:cut])
    return tokens, stats


def feature_extractor(out_dir):
    """The conversion's WhisperFeatureExtractor (preprocessor_config.json), at the rate Whisper reads."""
    from transformers import WhisperFeatureExtractor
    try:
        fe = WhisperFeatureExtractor.from_pretrained(str(out_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise FmError(f"{out_dir}: cannot load the feature extractor from preprocessor_config.json "
                      f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if fe.sampling_rate != SAMPLE_RATE:
        raise FmError(f"{out_dir}: preprocessor_config.json's sampling_rate is {fe.sampling_rate}, not {SAMPLE_RATE}")
    return fe


def features_of(fe, waves: list[torch.Tensor], names: list[str]) -> torch.Tensor:
    """16 kHz mono waveforms -> log-mel features [B, mels, frames] by the feature extractor fe, padded to its chunk
    (30 s). A clip longer than that is refused, naming it."""
    for w, name in zip(waves, names):
        if w.numel() > fe.n_samples:
            raise FmError(f"{name}: {w.numel() / SAMPLE_RATE:.1f} s of audio; Whisper reads {fe.chunk_length} s at "
                          f"a time: split it")
    return fe([w.numpy() for w in waves], sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
