"""transformers' logits processors that change which token wins, for greedy decoding, sampling and beam search, in
transformers' order: repetition penalty, n-gram ban, bad words, minimum lengths, forced first and last tokens, then
suppressed tokens and Whisper's timestamp rules. Each reads the sequences so far (a decoder's prompt included; an encoder-decoder's decoder tokens from
its start token on) and the step's scores [B, V] (float32: logits when decoding greedily, log probabilities in beam
search, as transformers)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def only(scores: torch.Tensor, ids) -> torch.Tensor:
    """scores [B, V] with every token but ids (an id or a list) at -inf and those at 0, as transformers' forced-token
    processors leave them."""
    out = torch.full_like(scores, float("-inf"))
    out[:, torch.tensor(ids if isinstance(ids, (list, tuple)) else [ids], device=scores.device)] = 0.0
    return out


@dataclass
class Processors:
    eos: tuple = ()                  # the end tokens the minimum lengths hold back
    repetition_penalty: float = 1.0  # a token already in the sequence: its score / penalty (score * penalty if < 0)
    no_repeat_ngram: int = 0         # no n-gram twice in a sequence: a token that would repeat one is banned
    bad_words: tuple = ()            # token sequences never completed (bad_words_ids; Marian bans its pad token)
    min_length: int = 0              # no end token while the sequence (prompt included) is shorter
    min_new_tokens: int = 0          # nor before this many new tokens
    prompt: int = 0                  # the sequence's tokens before the first new one
    forced_bos: int | None = None    # the token of a one-token sequence's next step (an encoder-decoder's first)
    forced_eos: object = None        # an id or ids: the only choice for the last token the length limit allows
    max_length: int = 0              # that limit (the whole sequence's length)
    suppress: tuple = ()             # tokens never chosen (Whisper's suppress_tokens)
    begin_suppress: tuple = ()       # tokens not chosen first (Whisper's begin_suppress_tokens: a blank, the end)
    timestamps: dict | None = None   # Whisper's timestamp rules: {begin: the first timestamp id, none:
    #                                  <|notimestamps|>, text_end: ids below it are text, max_initial: the latest
    #                                  first timestamp, or None, by_mass: whether the timestamps' summed probability
    #                                  beating the likeliest text token forces one}

    def __bool__(self) -> bool:
        return bool(self.repetition_penalty != 1.0 or self.no_repeat_ngram or self.bad_words or self.min_length or
                    self.min_new_tokens or self.forced_bos is not None or self.forced_eos is not None or
                    self.suppress or self.begin_suppress or self.timestamps)

    @property
    def reads_tokens(self) -> bool:
        """Whether the processors need the sequences' tokens (else their lengths will do)."""
        return (self.repetition_penalty != 1.0 or self.no_repeat_ngram > 0 or self.timestamps is not None
                or any(len(w) > 1 for w in self.bad_words))

    def __call__(self, seqs: torch.Tensor | None, length: int, scores: torch.Tensor) -> torch.Tensor:
        """seqs [B, length] (may be None when not reads_tokens) -> the processed scores [B, V]."""
        if self.repetition_penalty != 1.0:
            seen = scores.gather(1, seqs)
            seen = torch.where(seen < 0, seen * self.repetition_penalty, seen / self.repetition_penalty)
            scores = scores.scatter(1, seqs, seen)
        n = self.no_repeat_ngram
        if n and length + 1 >= n:
            scores = scores.clone()
            for b, row in enumerate(seqs.tolist()):
                tail = tuple(row[length - n + 1:]) if n > 1 else ()
                banned = {row[i + n - 1] for i in range(length - n + 1) if tuple(row[i:i + n - 1]) == tail}
                if banned:
                    scores[b, sorted(banned)] = float("-inf")
        if self.bad_words:
            scores = self._ban_words(seqs, length, scores)
        if self.eos and (length < self.min_length or length - self.prompt < self.min_new_tokens):
            scores = scores.clone()
            scores[:, list(self.eos)] = float("-inf")
        if self.forced_bos is not None and length == 1:
            scores = only(scores, self.forced_bos)
        if self.forced_eos is not None and length == self.max_length - 1:
            scores = only(scores, self.forced_eos)
        if self.suppress or (self.begin_suppress and length == self.prompt):     # after the others, as transformers
            scores = scores.clone()
            ids = list(self.suppress) + (list(self.begin_suppress) if length == self.prompt else [])
            scores[:, [i for i in ids if i < scores.shape[-1]]] = float("-inf")     # ids past the vocab: none
        if self.timestamps is not None:
            scores = self._timestamp_rules(seqs, length, scores)
        return scores

    def _ban_words(self, seqs, length: int, scores):
        """transformers' NoBadWordsLogitsProcessor: a one-token bad word is never chosen; a longer one's last token
        not where the sequence ends with the rest of it (a lone end token is never banned: transformers drops it)."""
        scores = scores.clone()
        ones = [w[0] for w in self.bad_words if len(w) == 1 and w[0] not in self.eos]
        if ones:
            scores[:, ones] = float("-inf")
        longer = [w for w in self.bad_words if len(w) > 1]
        if longer:
            rows = seqs.tolist()
            for b, row in enumerate(rows):
                banned = [w[-1] for w in longer if len(w) - 1 <= length and tuple(row[length - len(w) + 1:length])
                          == tuple(w[:-1])]
                if banned:
                    scores[b, banned] = float("-inf")
        return scores

    def _timestamp_rules(self, seqs, length: int, scores):
        """transformers' WhisperTimeStampLogitsProcessor: no <|notimestamps|>; timestamps come in pairs (after a
        lone one, no text; after a pair, no timestamp), never decreasing; the first token is a timestamp no later
        than max_initial; and where the timestamps together outweigh the likeliest text token, a timestamp."""
        ts = self.timestamps
        begin = ts["begin"]
        scores = scores.clone()
        scores[:, ts["none"]] = float("-inf")
        floor = []
        for k, row in enumerate(seqs.tolist()):
            new = row[self.prompt:]
            last = len(new) >= 1 and new[-1] >= begin
            before = len(new) < 2 or new[-2] >= begin
            if last:
                if before:
                    scores[k, begin:] = float("-inf")
                else:
                    scores[k, :ts["text_end"]] = float("-inf")
            stamps = [t for t in new if t >= begin]
            floor.append(begin if not stamps else stamps[-1] if last and not before else stamps[-1] + 1)
        ids = torch.arange(scores.shape[-1], device=scores.device)
        scores.masked_fill_((ids >= begin) & (ids < torch.tensor(floor, device=scores.device)[:, None]),
                            float("-inf"))
        if length == self.prompt:
            scores[:, :begin] = float("-inf")
            if ts["max_initial"] is not None:
                scores[:, begin + ts["max_initial"] + 1:] = float("-inf")
        if ts.get("by_mass", True):
            logp = torch.log_softmax(scores.float(), -1)
            stamp = logp[:, begin:].logsumexp(-1) > logp[:, :begin].max(-1).values
            scores[:, :begin].masked_fill_(stamp[:, None], float("-inf"))
        return scores
