"""Whisper's token and word timestamps from its cross-attention, as transformers' generate(return_token_timestamps=
True) and its speech pipeline's return_timestamps="word" give them.

The decoder's cross-attention probabilities at the generation config's alignment_heads ([decoder layer, head]
pairs) are read in one teacher-forced pass over the tokens a window's decode fed (causality makes each row the one
that step saw), then per head normalized over the tokens, median-filtered over the audio positions, averaged over
the heads, and aligned to the audio by dynamic time warping: each token's time is where its row first lands on the
path. Words are the tokenizer's text split at spaces (or unicode characters), punctuation merged into its
neighbour, each from its first token's start to its last token's end.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import FmError

# the pipeline's defaults: marks joined to the word after them, and to the word before them
PREPEND = "\"'“¡¿([{-"
APPEND = "\"'.。,，!！?？:：”)]}、"
PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
UNSPACED = {"chinese", "japanese", "thai", "lao", "myanmar", "cantonese"}       # words split at characters
WINDOW_POSITIONS = 1500         # encoder positions of a 30 s window: where the pipeline's times wrap


def alignment_heads(gc: dict, model) -> list[tuple[int, int]]:
    """The generation config's alignment_heads as (decoder layer, head) pairs, checked against the model."""
    heads = gc.get("alignment_heads")
    if not heads:
        raise FmError("generation_config.json has no alignment_heads: this model gives no token or word timestamps")
    if not isinstance(heads, list) or any(not isinstance(p, (list, tuple)) or len(p) != 2
                                          or any(type(x) is not int for x in p) for p in heads):
        raise FmError(f"generation_config.json: alignment_heads must be [layer, head] pairs, got {heads!r}"[:200])
    layers = len(model.blocks)
    for layer, head in heads:
        n = model.blocks[layer].heads * model.tp if 0 <= layer < layers else 0
        if not 0 <= layer < layers or not 0 <= head < n:
            raise FmError(f"generation_config.json: alignment head [{layer}, {head}] is not in this decoder "
                          f"({layers} layers of {model.blocks[0].heads * model.tp} heads)")
    return [(layer, head) for layer, head in heads]


@torch.inference_mode()
def cross_weights(model, tokens: torch.Tensor, heads: list[tuple[int, int]]) -> torch.Tensor:
    """tokens [B, T] (what the decoder was fed: the prompt and every new token but the last) -> the cross-attention
    probabilities [B, len(heads), T, S] (float32) of those (layer, head) pairs over the attached source, the same
    on every rank (each calls it: the pass all-reduces). A source attached once per beam (beam search's B * beams
    rows) is read once per row."""
    if model.cross is None:
        raise FmError("cross_weights reads the attached source: decode the window first")
    B, T = tokens.shape
    cross, mask = model.cross, model.cross_mask
    R, _, S, _ = next(iter(cross.values()))[0].shape
    if R % B:
        raise FmError(f"the attached source has {R} rows and the tokens {B}")
    k = R // B
    local, lo = model.blocks[0].heads, model.rank * model.blocks[0].heads
    mine: dict[int, list] = {}          # layer -> (slot in the output, this rank's index of the head)
    for n, (layer, head) in enumerate(heads):
        if lo <= head < lo + local:
            mine.setdefault(layer, []).append((n, head - lo))
    out = torch.zeros(B, len(heads), T, S, dtype=torch.float32, device=model.device)

    def probe(i, q, keys):
        if i not in mine:
            return
        slots, hs = map(list, zip(*mine[i]))
        s = torch.matmul(q[:, hs].float(), keys[:, hs].float().transpose(-1, -2)) * model.scale   # [B, h, T, S]
        if model.cross_mask is not None:
            s = s.masked_fill(~model.cross_mask[:, None, None, :], float("-inf"))
        out[:, slots] = s.softmax(-1)
    if k > 1:       # each beam's copy is the same source: the first one of each row
        model.cross = {i: (kk[::k], vv[::k]) for i, (kk, vv) in cross.items()}
        model.cross_mask = None if mask is None else mask[::k]
    model.cross_probe = probe
    try:
        model.hidden(tokens.to(model.device))
    finally:
        model.cross_probe = None
        model.cross, model.cross_mask = cross, mask
    return model.comm.all_reduce(out)


def median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    """The running median of `width` (odd) values along the last dim, its ends mirrored (reflect padding, no
    repeated edge); a row no longer than width // 2 is left as it is."""
    if width <= 0 or width % 2 != 1:
        raise FmError(f"the median filter's width must be odd, got {width}")
    half, n = width // 2, x.shape[-1]
    if n <= half:
        return x
    idx = torch.cat([torch.arange(half, 0, -1), torch.arange(n), torch.arange(n - 2, n - 2 - half, -1)])
    return x.index_select(-1, idx.to(x.device)).unfold(-1, width, 1).sort()[0][..., half]


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotonic path through cost [N, M] (float64) from its first cell to its last -> (row, column)
    indices of each step. transformers' recurrence (float32 running costs; a diagonal step, or one from above, only
    where strictly cheapest, any tie from the left), an anti-diagonal at a time: its cells depend on the two before."""
    N, M = cost.shape
    acc = np.full((N + 1, M + 1), np.inf, dtype=np.float32)
    acc[0, 0] = 0
    trace = np.full((N + 1, M + 1), -1, dtype=np.int8)
    for d in range(2, N + M + 1):
        i = np.arange(max(1, d - M), min(N, d - 1) + 1)
        j = d - i
        c0, c1, c2 = acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]   # diagonal, from above, from the left
        diag = (c0 < c1) & (c0 < c2)
        up = ~diag & (c1 < c0) & (c1 < c2)
        best = np.where(diag, c0, np.where(up, c1, c2))
        acc[i, j] = cost[i - 1, j - 1] + best.astype(np.float64)
        trace[i, j] = np.where(diag, 0, np.where(up, 1, 2))
    trace[0, :] = 2
    trace[:, 0] = 1
    rows, cols = [], []
    i, j = N, M
    while i > 0 or j > 0:
        rows.append(i - 1)
        cols.append(j - 1)
        t = trace[i, j]
        if t == 0:
            i, j = i - 1, j - 1
        elif t == 1:
            i -= 1
        else:
            j -= 1
    return np.array(rows[::-1]), np.array(cols[::-1])


def _smoothed(w: torch.Tensor, width: int) -> torch.Tensor:
    """[..., heads, T, S] -> [..., T, S]: each head normalized over the tokens, median-filtered, then averaged."""
    std = torch.std(w, dim=-2, keepdim=True, unbiased=False)
    w = (w - w.mean(dim=-2, keepdim=True)) / std
    return median_filter(w, width).mean(dim=-3)


def token_times(weights: torch.Tensor, num_input_ids: int, num_frames=None, median_width: int = 7,
                time_precision: float = 0.02) -> torch.Tensor:
    """weights [B, heads, T, S] (cross_weights over the T tokens fed) -> each token's time in seconds [B, T + 1]
    (float32), as transformers' _extract_token_timestamps: 0 for the num_input_ids prompt tokens, then where the DTW
    path over the rest enters each row, the last token repeating the one before. num_frames: the log-mel frames
    that hold audio (an int for every row, or one per row; None: all S positions), which keeps the first
    num_frames // 2 positions; a list normalizes each row alone, as transformers does."""
    B, _, T, _ = weights.shape
    times = torch.zeros(B, T + 1, dtype=torch.float32)
    w = weights.float()
    per_row = num_frames is not None and not isinstance(num_frames, int)
    if isinstance(num_frames, int):
        w = w[..., :num_frames // 2]
    w = w[:, :, num_input_ids:]
    if w.shape[2] == 0:         # one new token: no row of its own to align
        return times
    if per_row:
        frames = [int(f) for f in (num_frames.tolist() if isinstance(num_frames, torch.Tensor) else num_frames)]
        if len(frames) != B:
            raise FmError(f"num_frames gives {len(frames)} rows for a batch of {B}")
        mats = [_smoothed(w[b, ..., :f // 2], median_width) for b, f in enumerate(frames)]
    else:
        mats = _smoothed(w, median_width)
    for b in range(B):
        rows, cols = dtw(-mats[b].double().cpu().numpy())
        jumps = np.diff(rows, prepend=rows[0] - 1) != 0         # the first step is always a jump
        at = torch.from_numpy(cols[jumps] * time_precision)
        times[b] = torch.cat([torch.zeros(num_input_ids, dtype=torch.float64), at, at[-1:]])
    return times


def decoder_inputs(sequences: torch.Tensor, prompt_len: int, eos_token_id, pad_token_id: int) -> torch.Tensor:
    """A window's decode, sequences [B, P + N] (the prompt of prompt_len tokens, then the new ones) -> the tokens
    transformers' decode fed [B, P + N - 1]: each row's new tokens up to and with its first end token (an id or a
    list), then pad_token_id where it went on (fmconvert's decode lets a finished row run free), the last dropped."""
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or ()), dtype=torch.long)
    seq = sequences.clone().cpu()
    new = seq[:, prompt_len:]
    hit = torch.isin(new, eos).int()
    new[hit.cumsum(1) - hit > 0] = pad_token_id
    return seq[:, :-1]


def token_timestamps(model, gc: dict, sequences: torch.Tensor, prompt_len: int, num_frames=None,
                     median_width: int = 7) -> torch.Tensor:
    """A window's decode, sequences [B, P + N] (generate's or beam_search's output: the prompt of prompt_len tokens,
    then the new ones) -> each token's time in seconds within the window [B, P + N], as transformers'
    generate(return_token_timestamps=True) gives them; the model still attached to the window's source.
    num_frames: as token_times. The end and pad tokens are the generation config's (gc)."""
    heads = alignment_heads(gc, model)
    if sequences.shape[1] <= prompt_len + 1:
        return torch.zeros(sequences.shape, dtype=torch.float32)
    eos = gc.get("eos_token_id")
    pad = gc.get("pad_token_id")
    fed = decoder_inputs(sequences, prompt_len, eos, pad if pad is not None else
                         eos if isinstance(eos, int) else eos[0])
    return token_times(cross_weights(model, fed, heads), prompt_len, num_frames, median_width)


def _decode(tokenizer, ids: list) -> str:
    return tokenizer.decode(ids) if ids else ""


def _by_character(tokenizer, tokens: list) -> list[list[int]]:
    """Positions of tokens grouped where their decoded text ends on a whole character (a token of half a UTF-8
    character waits for the next)."""
    full, bad = _decode(tokenizer, tokens), "\ufffd"
    groups, cur, at = [], [], 0
    for n in range(len(tokens)):
        cur.append(n)
        text = _decode(tokenizer, [tokens[c] for c in cur])
        k = text.find(bad)
        if k < 0 or at + k >= len(full) or full[at + k] == bad:
            groups.append(cur)
            cur, at = [], at + len(text)
    return groups


def _group(tokenizer, tokens: list, language: str | None, eos: int) -> list[tuple[str, list[int]]]:
    """transformers' split of tokens into words -> each word's text and token positions: at characters for the
    unspaced languages, else at a leading space, a punctuation mark or a special token; then the opening marks
    joined to the word after them and the closing ones to the word before."""
    pieces = _by_character(tokenizer, tokens)
    texts = [_decode(tokenizer, [tokens[n] for n in p]) for p in pieces]
    if language not in UNSPACED:
        words, wt = [], []
        for p, t in zip(pieces, texts):
            if tokens[p[0]] >= eos or t.startswith(" ") or t.strip() in PUNCTUATION or not words:
                words.append(list(p))
                wt.append(t)
            else:
                words[-1] += p
                wt[-1] += t
        pieces, texts = words, wt
    j = len(texts) - 1
    for i in range(len(texts) - 2, -1, -1):
        if texts[i].startswith(" ") and texts[i].strip() in PREPEND:
            texts[j], pieces[j] = texts[i] + texts[j], pieces[i] + pieces[j]
            texts[i], pieces[i] = "", []
        else:
            j = i
    i = 0
    for j in range(1, len(texts)):
        if not texts[i].endswith(" ") and texts[j] in APPEND:
            texts[i], pieces[i] = texts[i] + texts[j], pieces[i] + pieces[j]
            texts[j], pieces[j] = "", []
        else:
            i = j
    return [(t, p) for p, t in zip(pieces, texts) if t and p]


def words(tokenizer, tokens: list, times: list, language: str | None = None, time_precision: float = 0.02) -> list:
    """A transcript's tokens (every window's new tokens, timestamps included, end tokens left out) and each one's
    time in seconds from the audio's start -> its words as the speech pipeline's return_timestamps="word" chunks:
    [{"text": word, "timestamp": (start, end)}], a token running from the time of the token before it to its own.
    Words do not cross a pair of timestamp tokens (the pipeline's segments). language (a code or a name): Chinese,
    Japanese, Thai, Lao, Burmese and Cantonese split at characters (the pipeline does only with return_language;
    else the tokenizer's language or spaces)."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES
    if len(tokens) != len(times):
        raise FmError(f"words: {len(tokens)} tokens but {len(times)} times")
    begin = tokenizer.convert_tokens_to_ids("<|notimestamps|>") + 1
    special = set(tokenizer.all_special_ids)
    eos = tokenizer.eos_token_id
    language = LANGUAGES.get(language, language) if language else getattr(tokenizer, "language", None) or "english"
    times = [float(t) for t in times]
    chunks, cur = [], []            # each chunk: ([(token, (start, end))], its language)
    start, top, before, shift = None, 0.0, 0.0, 0.0
    for n, tok in enumerate(tokens):
        if tok in special:
            name = _decode(tokenizer, [tok])[2:-2]
            language = LANGUAGES.get(name, language)
        elif tok >= begin:
            # the pipeline's running time, only to tell a segment's end from a repeated start
            stamp = (tok - begin) * time_precision
            if stamp < top:         # a new window
                if n >= 2 and not (tokens[n - 1] >= begin and tokens[n - 2] >= begin):
                    shift += time_precision * WINDOW_POSITIONS
                else:
                    top = before
                    shift += before
            before, top = top, stamp
            at = round((tok - begin) * time_precision + shift, 2)
            if start is None:
                start = at
            elif at != start:
                chunks.append((cur, language))
                cur, start = [], None
        else:
            cur.append((tok, (round(times[n - 1], 2) if n else 0.0, round(times[n], 2))))
    if cur:
        chunks.append((cur, language))
    out = []
    for chunk, lang in chunks:
        for text, word in _group(tokenizer, [t for t, _ in chunk], lang, eos):
            out.append({"text": text, "timestamp": (chunk[word[0]][1][0], chunk[word[-1]][1][1])})
    return out
