"""Beam search over a FusedModel (a decoder, or an encoder-decoder's decoder), one prompt at a time.

The search is transformers' own (its `generate(num_beams=k)`), so a converted model gives the tokens the original
does: each step keeps the best 2k (more with several stop tokens) continuations of the k live beams by summed log
probability; those that end on a stop token, or at the length limit, compete for the k finished hypotheses with
their sum divided by (new tokens) ** length_penalty, the others for the k live beams; the search stops when no live
beam can still beat the worst finished one (a heuristic that assumes the score cannot grow, as transformers'
early_stopping=False does; True stops once k hypotheses are finished, "never" waits for the length limit when the
penalty favours length). The KV cache is reordered in place after every step to follow its beams.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from ..errors import FmError
from .generate import GenStats, generate, positions_left, warm_up, with_forced
from .processors import Processors
from .model import FusedModel, KVCache

NEG = -1.0e9            # a score no candidate can win with


def reorder(cache: KVCache, idx: torch.Tensor, batch: int):
    """Every per-sequence tensor of the cache (keys, values, conv tails, recurrent states, ...) takes rows idx, in
    place, so views of them (a latent cache's values) stay valid."""
    def walk(x):
        if isinstance(x, torch.Tensor):
            if x.dim() and x.shape[0] == batch and x.numel():
                x.copy_(x.index_select(0, idx))
        elif isinstance(x, (list, tuple)):
            for y in x:
                walk(y)
        elif isinstance(x, dict):
            for y in x.values():
                walk(y)
    seen = set()
    for name, x in vars(cache).items():
        if name == "v" and all(isinstance(t, torch.Tensor) and t._base is not None for t in x if t is not None):
            continue            # views of the keys (latent attention): reordered with them
        if id(x) not in seen:
            seen.add(id(x))
            walk(x)


@torch.inference_mode()
def beam_search(model: FusedModel, input_ids: torch.Tensor, num_beams: int, max_new_tokens: int = 64,
                eos_token_id=None, length_penalty: float = 1.0, early_stopping: bool | str = False,
                source_mask: torch.Tensor | None = None, forced_bos: int | None = None, forced_eos=None,
                on_done=None, processors: Processors | None = None) -> tuple[torch.Tensor, GenStats]:
    """input_ids [1, T] -> the best hypothesis [1, T + new] (new up to and with its stop token) and its stats. An
    encoder-decoder reads input_ids as its source, and its output starts from the decoder's start token."""
    if input_ids.shape[0] != 1:
        raise FmError("beam search takes one prompt at a time")
    if num_beams < 1 or max_new_tokens < 1:
        raise FmError("beam search needs at least one beam and one new token")
    if model.spec["kind"] != "decoder" or model.spec["headless"]:
        raise FmError("beam search needs a decoder with its language-model head")
    if num_beams == 1:          # as transformers: one beam is greedy decoding (no length penalty, no early stop)
        out, st = generate(model, input_ids, max_new_tokens, eos_token_id=eos_token_id, source_mask=source_mask,
                           forced_bos=forced_bos, forced_eos=forced_eos, processors=processors)
        if on_done is not None:
            on_done(st.tokens)
        return out, st
    positions_left(model, input_ids.shape[1], max_new_tokens)
    warm_up(model)
    dev, k = model.device, num_beams
    eos = torch.tensor(sorted(set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else
                                  [] if eos_token_id is None else [eos_token_id])), dtype=torch.long, device=dev)
    keep = max(2, 1 + len(eos)) * k
    stats = GenStats(prompt_tokens=input_ids.shape[1])
    t0 = time.perf_counter()
    if model.spec.get("encoder"):       # every beam reads the same source
        src = input_ids.to(dev)
        mask = None if source_mask is None else source_mask.to(dev)
        h = model.source_encoder.hidden(src, attention_mask=mask)
        model.attach(h.expand(k, -1, -1), None if mask is None else mask.expand(k, -1))
        input_ids = torch.full((1, 1), model.spec["decoder_start_token_id"], dtype=torch.long, device=dev)
    T = input_ids.shape[1]
    limit = T + max_new_tokens
    procs = replace(with_forced(processors, forced_bos, forced_eos, eos_token_id), prompt=T, max_length=limit)
    running = torch.zeros(k, limit, dtype=torch.long, device=dev)
    running[:, :T] = input_ids.to(dev)
    run_scores = torch.full((k,), NEG, device=dev)
    run_scores[0] = 0.0
    done_seqs, done_scores = running.clone(), torch.full((k,), NEG, device=dev)
    done = torch.zeros(k, dtype=torch.bool, device=dev)
    first_k = torch.arange(keep, device=dev) < k
    improvable = True
    cache = model.new_cache(k, limit)
    logits = model(running[:, :T], cache)[:, -1]
    stats.prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cur = T
    while True:
        logp = torch.log_softmax(logits.float(), -1)
        if procs:       # on the log probabilities, as transformers' beam search
            logp = procs(running[:, :cur] if procs.reads_tokens else None, cur, logp)
        V = logp.shape[-1]
        top_lp, top_idx = torch.topk((logp + run_scores[:, None]).view(-1), keep)
        top_idx = model.comm.broadcast(top_idx.contiguous(), 0)     # every rank follows rank 0's beams
        top_lp = model.comm.broadcast(top_lp.contiguous(), 0)
        beam_of, tok = top_idx // V, top_idx % V
        cand = running[beam_of]
        cand[:, cur] = tok
        hits = torch.isin(tok, eos) | (cur + 1 >= limit)
        # the live beams: the best k candidates that did not stop
        live_lp = top_lp + hits.float() * NEG
        nxt = torch.topk(live_lp, k).indices
        running, run_scores, src_beam = cand[nxt], live_lp[nxt], beam_of[nxt]
        # the finished hypotheses: the best k of those so far and the top-k candidates that stopped now
        fin_lp = top_lp / float(cur + 1 - T) ** length_penalty
        if early_stopping is True and bool(done.all()):
            fin_lp = fin_lp + NEG
        if not improvable:
            fin_lp = fin_lp + NEG
        fin_lp = fin_lp + (~(hits & first_k)).float() * NEG
        best = torch.topk(torch.cat([done_scores, fin_lp]), k).indices
        done_seqs = torch.cat([done_seqs, cand])[best]
        done_scores = torch.cat([done_scores, fin_lp])[best]
        done = torch.cat([done, hits & first_k])[best]
        stats.new_tokens += 1
        cur += 1
        length = (limit - T) if early_stopping == "never" and length_penalty > 0.0 else (cur - T)
        worst = done_scores.min() if bool(done.all()) else torch.tensor(NEG, device=dev)
        improvable = improvable and bool(run_scores[0] / float(length) ** length_penalty > worst)
        if not improvable or (bool(done.all()) and early_stopping is True) or bool(hits.all()):
            break
        reorder(cache, src_beam, k)
        logits = model(running[:, cur - 1:cur], cache)[:, -1]
    if dev.type == "cuda":
        torch.cuda.synchronize()
    stats.decode_s = time.perf_counter() - t0
    seq = done_seqs[0, :cur]
    new = seq[T:].tolist()
    cut = next((j + 1 for j, t in enumerate(new) if t in set(eos.tolist())), len(new))
    stats.tokens = new[:cut]
    stats.new_tokens = cut
    if on_done is not None:
        on_done(stats.tokens)
    return seq[:T + cut].unsqueeze(0), stats
