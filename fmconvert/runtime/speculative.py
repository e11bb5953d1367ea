"""Speculative decoding: a small draft model proposes k tokens one at a time (or, with prompt lookup, the tokens
that followed the text's last n-gram where it last occurred earlier), the target checks them all in one forward of
k + 1 positions, and the longest prefix it agrees with is kept, plus the target's own next token.

Decode reads every weight once a step whatever the batch, so the target's k + 1 positions cost about one step and
each accepted draft token is a target step saved. Greedy decoding keeps exactly the target's greedy tokens; sampling
keeps the target's distribution (a draft token x is accepted with probability min(1, p(x) / q(x)), a rejected one
replaced by a draw from max(p - q, 0), renormalized: Leviathan et al., 2023). Both caches are rolled back by
their length after each check, so only models whose caches are plain keys and values (no sliding-window ring, no
recurrent or convolution state) can take part.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from ..errors import FmError
from .generate import GenStats, positions_left, stop_tokens, warm_up, warp, with_forced
from .processors import Processors


def caches(model, draft, max_len: int, batch: int = 1) -> tuple:
    """Each model's cache for max_len positions -> (target's, draft's: None without a draft model); a target and
    draft that cannot decode together refused in one line. batch 0: the check alone, nothing allocated."""
    out = []
    for name, m in (("the target", model), ("the draft", draft)):
        if m is None:
            out.append(None)
            continue
        if m.spec["kind"] != "decoder" or m.spec["headless"]:
            raise FmError(f"speculative decoding needs decoders with their language-model heads; {name} is "
                          f"{m.spec['architecture']}")
        if m.spec.get("encoder") and draft is not None:
            raise FmError(f"{m.spec['architecture']} is an encoder-decoder: it takes prompt lookup (over its source "
                          f"and its output), not a draft model")
        c = m.new_cache(batch, max_len)
        if any(c.ring) or any(x is not None for x in c.conv) or any(x is not None for x in c.state) or \
                any(x is not None for x in c.index_k) or m.spec.get("loop"):
            raise FmError(f"{name} ({m.spec['architecture']}) keeps a sliding window shorter than the text, a "
                          f"recurrent state or an index in its cache: rejected draft tokens cannot be taken back out")
        out.append(c)
    if draft is None:
        return tuple(out)
    if model.spec["vocab_size"] != draft.spec["vocab_size"]:
        raise FmError(f"the draft's vocabulary has {draft.spec['vocab_size']} tokens and the target's "
                      f"{model.spec['vocab_size']}: a draft must share the target's tokenizer")
    if model.tp != draft.tp:
        raise FmError(f"the draft was converted for tp={draft.tp} and the target for tp={model.tp}: convert the draft "
                      f"with --tp {model.tp}")
    return tuple(out)


def lookup(seq: list, ngram: int, n: int) -> list:
    """Prompt lookup (transformers' prompt_lookup_num_tokens): the n tokens that followed the earliest earlier
    occurrence of the text's last `ngram` tokens (else of its last ngram - 1, ... 1), [] where none occurs."""
    for size in range(min(ngram, len(seq) - 1), 0, -1):
        tail = seq[-size:]
        for i in range(len(seq) - size):
            if seq[i:i + size] == tail:
                return seq[i + size:i + size + n]
    return []


def accept(p: torch.Tensor, q: torch.Tensor | None, token: int, gen: torch.Generator) -> int | None:
    """One draft token checked by sampling: p, q [V] the target's and the draft's probabilities at its position
    (q None: a proposal made for sure, prompt lookup's) -> None when it stands (probability min(1, p/q)), else the
    token drawn in its place from max(p - q, 0)."""
    if q is None:
        q = torch.zeros_like(p)
        q[token] = 1.0
    if torch.rand((), generator=gen).item() * float(q[token]) < float(p[token]):
        return None
    rest = (p - q).clamp(min=0)
    rest = rest if float(rest.sum()) > 0 else p
    return int(torch.multinomial(rest / rest.sum(), 1, generator=gen))


@torch.inference_mode()
def speculative_generate(model, draft, input_ids: torch.Tensor, max_new_tokens: int = 64, k: int = 4,
                         temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                         eos_token_id=None, on_token=None, processors: Processors | None = None,
                         ngram: int = 2, forced_bos: int | None = None,
                         forced_eos=None) -> tuple[torch.Tensor, GenStats]:
    """input_ids [1, T] -> [1, T + new], as generate() decodes with the target (greedy: its tokens exactly;
    sampled: its distribution), the draft proposing up to k tokens at a time: a draft model, or None for prompt
    lookup (the k tokens after the earliest earlier occurrence of the text's last `ngram` tokens; none where it
    has not occurred, and the step is a plain one). on_token(ids [1]) is called for each new token.
    stats.drafted and stats.accepted count the proposals and those the target kept. An encoder-decoder (prompt
    lookup only) reads input_ids as its source, looked up with its output, and returns its decoder's tokens
    [1, 1 + new] from the start token on, as generate() does; forced_bos and forced_eos as generate()'s."""
    if input_ids.shape[0] != 1:
        raise FmError("speculative decoding reads one prompt at a time")
    if k < 1:
        raise FmError("speculative decoding drafts at least one token a step")
    B, T = input_ids.shape
    encoder = bool(model.spec.get("encoder"))
    positions_left(model, T, max_new_tokens, 1)
    if draft is not None:
        positions_left(draft, T, max_new_tokens)
        warm_up(draft)
    warm_up(model)
    eos = set(stop_tokens(eos_token_id))
    gen = torch.Generator().manual_seed(seed)
    dev = model.device
    source = input_ids[0].tolist() if encoder else []       # what prompt lookup reads before the output
    stats = GenStats(prompt_tokens=T)
    t0 = time.perf_counter()
    if encoder:         # the source once through the encoder; the decoder starts from its start token
        model.attach(model.source_encoder.hidden(input_ids.to(dev)), None)
        input_ids = torch.tensor([[model.spec["decoder_start_token_id"]]])
    P = input_ids.shape[1]
    procs = replace(with_forced(processors, forced_bos, forced_eos, eos_token_id), prompt=P,
                    max_length=P + max_new_tokens)
    tc, dc = caches(model, draft, P + max_new_tokens + 1)
    seq = input_ids[0].tolist()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def scores(logits, ctx):
        """A model's scores for the token after ctx, processed as generate() processes them, then warped (the
        draft's too: the closer its choices to the target's, the more stand)."""
        s = logits.float().unsqueeze(0)
        if procs:
            s = procs(torch.tensor([ctx], device=s.device) if procs.reads_tokens else None, len(ctx), s)
        return s[0] if temperature <= 0 else torch.softmax(warp(s, temperature, top_p, top_k), -1)[0].cpu()

    def choose(s) -> int:
        return int(s.argmax()) if temperature <= 0 else int(torch.multinomial(s, 1, generator=gen))

    def shared(tokens: list) -> list:
        """Rank 0's tokens on every rank, so the ranks never drift apart."""
        t = torch.tensor(tokens + [-1] * (k + 1 - len(tokens)), dtype=torch.long, device=dev)
        return [x for x in model.comm.broadcast(t, 0).tolist() if x >= 0]

    new = shared([choose(scores(model(input_ids.to(dev), tc)[0, -1], seq))])
    sync()
    stats.prefill_s, t0 = time.perf_counter() - t0, time.perf_counter()
    stats.target_steps = 1
    while True:
        done = False
        for tok in new:             # emitted in order, up to the limit and the first end token
            seq.append(tok)
            stats.new_tokens += 1
            if on_token is not None:
                on_token(torch.tensor([tok], device=dev))
            if tok in eos or stats.new_tokens == max_new_tokens:
                done = True
                break
        if done:
            break
        n_draft = min(k, max_new_tokens - stats.new_tokens)
        proposals, qs = [], []
        if draft is None:
            proposals = shared(lookup(source + seq, ngram, n_draft))
            n_draft, qs = len(proposals), [None] * len(proposals)
        else:       # catch up on what the draft has not read (its cache holds a prefix of seq), then one at a time
            feed = seq[dc.length:]
            for _ in range(n_draft):
                q = scores(draft(torch.tensor([feed], device=draft.device), dc)[0, -1], seq + proposals)
                qs.append(q)
                proposals.append(choose(q))
                proposals = shared(proposals)
                feed = proposals[-1:]
        # the target: the last emitted token and the proposals, k + 1 positions in one forward
        base = len(seq) - 1                     # what the target's cache holds: seq but its last token
        logits = model(torch.tensor([seq[-1:] + proposals], device=dev), tc)[0]
        kept, ctx = [], list(seq)
        for i in range(n_draft + 1):
            s = scores(logits[i], ctx)
            if i == n_draft:
                kept.append(choose(s))          # every proposal stood: the target's next token as a bonus
                break
            if temperature <= 0:
                tok = choose(s)
                if tok != proposals[i]:
                    kept.append(tok)
                    break
            else:
                tok = accept(s, qs[i], proposals[i], gen)
                if tok is not None:
                    kept.append(tok)
                    break
            kept.append(proposals[i])
            ctx.append(proposals[i])
        new = shared(kept)
        stats.drafted += n_draft
        stats.accepted += len(new) - 1
        stats.target_steps += 1
        tc.length = base + len(new)             # the target keeps seq's last token and the proposals that stood
        if dc is not None:
            dc.length = min(dc.length, base + len(new))
    sync()
    stats.decode_s = time.perf_counter() - t0
    stats.tokens = seq[P:]
    return torch.tensor([seq], dtype=torch.long), stats
