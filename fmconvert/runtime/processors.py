"""transformers' logits processors that change which token wins, for greedy decoding, sampling and beam search, in
transformers' order: Whisper's suppressed tokens, repetition penalty, n-gram ban, minimum lengths, forced first and
last tokens. Each reads the sequences so far (a decoder's prompt included; an encoder-decoder's decoder tokens from
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
    min_length: int = 0              # no end token while the sequence (prompt included) is shorter
    min_new_tokens: int = 0          # nor before this many new tokens
    prompt: int = 0                  # the sequence's tokens before the first new one
    forced_bos: int | None = None    # the token of a one-token sequence's next step (an encoder-decoder's first)
    forced_eos: object = None        # an id or ids: the only choice for the last token the length limit allows
    max_length: int = 0              # that limit (the whole sequence's length)
    suppress: tuple = ()             # tokens never chosen (Whisper's suppress_tokens)
    begin_suppress: tuple = ()       # tokens not chosen first (Whisper's begin_suppress_tokens: a blank, the end)

    def __bool__(self) -> bool:
        return bool(self.repetition_penalty != 1.0 or self.no_repeat_ngram or self.min_length or
                    self.min_new_tokens or self.forced_bos is not None or self.forced_eos is not None or
                    self.suppress or self.begin_suppress)

    @property
    def reads_tokens(self) -> bool:
        """Whether the processors need the sequences' tokens (else their lengths will do)."""
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram > 0

    def __call__(self, seqs: torch.Tensor | None, length: int, scores: torch.Tensor) -> torch.Tensor:
        """seqs [B, length] (may be None when not reads_tokens) -> the processed scores [B, V]."""
        if self.suppress or (self.begin_suppress and length == self.prompt):     # Whisper puts these first
            scores = scores.clone()
            scores[:, list(self.suppress) + (list(self.begin_suppress) if length == self.prompt else [])] = \
                float("-inf")
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
        if self.eos and (length < self.min_length or length - self.prompt < self.min_new_tokens):
            scores = scores.clone()
            scores[:, list(self.eos)] = float("-inf")
        if self.forced_bos is not None and length == 1:
            scores = only(scores, self.forced_bos)
        if self.forced_eos is not None and length == self.max_length - 1:
            scores = only(scores, self.forced_eos)
        return scores
