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
from .generate import GenStats, generate, positions_left, stop_tokens, warm_up, with_forced
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
                on_done=None, processors: Processors | None = None,
                decoder_prompt=None) -> tuple[torch.Tensor, GenStats]:
    """input_ids [B, T] -> each row's best hypothesis [B, T + new] (new up to and with its stop token; shorter rows
    padded with it) and the stats (`tokens`: row 0's). An encoder-decoder reads input_ids as its sources (padded
    where source_mask is 0), and its output starts from the decoder's start token, or from decoder_prompt [B, P]
    (Whisper's <|startoftranscript|> <|en|> <|transcribe|> <|notimestamps|>; a function of the model gives it once
    the sources are attached, one row per source: Whisper's language detection), as in generate; input_ids is then
    the encoder's input (Whisper's log-mel features [B, mels, frames]). A decoder's prompts must be of one length.
    The rows search side by side, as transformers' batched beam search."""
    if num_beams < 1 or max_new_tokens < 1:
        raise FmError("beam search needs at least one beam and one new token")
    if model.spec["kind"] != "decoder" or model.spec["headless"]:
        raise FmError("beam search needs a decoder with its language-model head")
    encoder = bool(model.spec.get("encoder"))
    if decoder_prompt is not None and not encoder:
        raise FmError("a decoder prompt is an encoder-decoder's: a decoder's prompt is its input_ids")
    if num_beams == 1:          # as transformers: one beam is greedy decoding (no length penalty, no early stop)
        out, st = generate(model, input_ids, max_new_tokens, eos_token_id=eos_token_id, source_mask=source_mask,
                           forced_bos=forced_bos, forced_eos=forced_eos, processors=processors,
                           decoder_prompt=decoder_prompt)
        if on_done is not None:
            on_done(st.tokens)
        return out, st
    P = decoder_prompt.shape[1] if isinstance(decoder_prompt, torch.Tensor) else 1     # a function's: checked later
    positions_left(model, input_ids.shape[1], max_new_tokens, P)
    warm_up(model)
    dev, k, B = model.device, num_beams, input_ids.shape[0]
    eos = torch.tensor(sorted(set(stop_tokens(eos_token_id))), dtype=torch.long, device=dev)
    keep = max(2, 1 + len(eos)) * k
    stats = GenStats(prompt_tokens=input_ids.shape[1])
    t0 = time.perf_counter()
    if encoder:         # every beam of a row reads that row's source
        src = input_ids.to(dev)
        mask = None if source_mask is None else source_mask.to(dev)
        h = model.source_encoder.hidden(src, attention_mask=mask)
        start = torch.full((B, 1), model.spec["decoder_start_token_id"], dtype=torch.long, device=dev)
        if callable(decoder_prompt):    # detection reads one row per source, so it runs before the beams' copies
            model.attach(h, mask)
            decoder_prompt = decoder_prompt(model)
        if decoder_prompt is not None:
            if decoder_prompt.dim() != 2 or decoder_prompt.shape[0] not in (1, B):
                raise FmError(f"the decoder prompt is {list(decoder_prompt.shape)}: give [{B}, P] for {B} sources")
            start = decoder_prompt.to(dev).expand(B, -1)
            positions_left(model, 0, max_new_tokens, start.shape[1])
        model.attach(h.repeat_interleave(k, 0), None if mask is None else mask.repeat_interleave(k, 0))
        input_ids = start
        if model.source_encoder.spec["audio_mels"]:     # Whisper's features: always its 30 s of positions
            stats.prompt_tokens = model.source_encoder.spec["max_positions"]
    T = input_ids.shape[1]
    limit = T + max_new_tokens
    procs = replace(with_forced(processors, forced_bos, forced_eos, eos_token_id), prompt=T, max_length=limit)
    running = torch.zeros(B, k, limit, dtype=torch.long, device=dev)
    running[:, :, :T] = input_ids.to(dev).unsqueeze(1)
    run_scores = torch.full((B, k), NEG, device=dev)
    run_scores[:, 0] = 0.0
    done_seqs, done_scores = running.clone(), torch.full((B, k), NEG, device=dev)
    done = torch.zeros(B, k, dtype=torch.bool, device=dev)
    first_k = torch.arange(keep, device=dev) < k
    improvable = torch.ones(B, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev).unsqueeze(1)
    cache = model.new_cache(B * k, limit)
    logits = model(running[:, :, :T].reshape(B * k, T), cache)[:, -1]
    stats.prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cur = T
    while True:
        logp = torch.log_softmax(logits.float(), -1)
        if procs:       # on the log probabilities, as transformers' beam search
            logp = procs(running[:, :, :cur].reshape(B * k, cur) if procs.reads_tokens else None, cur, logp)
        V = logp.shape[-1]
        top_lp, top_idx = torch.topk((logp.view(B, k, V) + run_scores.unsqueeze(-1)).view(B, k * V), keep)
        top_idx = model.comm.broadcast(top_idx.contiguous(), 0)     # every rank follows rank 0's beams
        top_lp = model.comm.broadcast(top_lp.contiguous(), 0)
        beam_of, tok = top_idx // V, top_idx % V                    # (B, keep)
        cand = running[rows, beam_of]                               # (B, keep, limit)
        cand[:, :, cur] = tok
        hits = torch.isin(tok, eos) | (cur + 1 >= limit)
        # the live beams: each row's best k candidates that did not stop
        live_lp = top_lp + hits.float() * NEG
        nxt = torch.topk(live_lp, k).indices
        running, run_scores, src_beam = cand[rows, nxt], live_lp.gather(1, nxt), beam_of.gather(1, nxt)
        # the finished hypotheses: each row's best k of those so far and of its top-k candidates that stopped now
        fin_lp = top_lp / float(cur + 1 - T) ** length_penalty
        closed = (done.all(-1) & (early_stopping is True)) | ~improvable
        fin_lp = fin_lp + closed.float().unsqueeze(-1) * NEG + (~(hits & first_k)).float() * NEG
        best = torch.topk(torch.cat([done_scores, fin_lp], 1), k).indices
        done_seqs = torch.cat([done_seqs, cand], 1)[rows, best]
        done_scores = torch.cat([done_scores, fin_lp], 1).gather(1, best)
        done = torch.cat([done, hits & first_k], 1).gather(1, best)
        cur += 1
        length = (limit - T) if early_stopping == "never" and length_penalty > 0.0 else (cur - T)
        worst = torch.where(done.all(-1), done_scores.min(-1).values, torch.full_like(done_scores[:, 0], NEG))
        improvable = improvable & (run_scores[:, 0] / float(length) ** length_penalty > worst)
        if not bool(improvable.any()) or (bool(done.all()) and early_stopping is True) or bool(hits.all()):
            break
        reorder(cache, (rows * k + src_beam).view(-1), B * k)
        logits = model(running[:, :, cur - 1:cur].reshape(B * k, 1), cache)[:, -1]
    if dev.type == "cuda":
        torch.cuda.synchronize()
    stats.decode_s = time.perf_counter() - t0
    stops = set(eos.tolist())
    outs = []
    for b in range(B):
        new = done_seqs[b, 0, T:cur].tolist()
        outs.append(new[:next((j + 1 for j, t in enumerate(new) if t in stops), len(new))])
    width = max(len(o) for o in outs)
    fill = int(eos[0]) if len(eos) else 0
    seq = torch.full((B, T + width), fill, dtype=torch.long, device=dev)
    seq[:, :T] = input_ids.to(dev)
    for b, o in enumerate(outs):
        seq[b, T:T + len(o)] = torch.tensor(o, dtype=torch.long, device=dev)
    stats.tokens = outs[0]
    stats.sequence_scores = done_scores[:, 0].tolist()      # transformers' sequences_scores
    stats.new_tokens = sum(len(o) for o in outs)
    if on_done is not None:
        on_done(stats.tokens)
    return seq, stats
