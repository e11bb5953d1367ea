"""Token generation over a FusedModel: prefill once, then one-token decode steps against the KV cache.

Every rank runs the same loop; rank 0 samples and broadcasts the token so ranks can never drift apart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from ..errors import FmError
from ..manifest import position_limit
from .model import FusedModel
from .processors import Processors


@dataclass
class GenStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    tokens: list = field(default_factory=list)
    logprobs: torch.Tensor | None = None    # [B, new]: each chosen token's log probability, when asked for
    sequence_scores: list | None = None     # beam search: each row's best hypothesis's score
    drafted: int = 0                        # speculative decoding: tokens the draft proposed
    accepted: int = 0                       # and those the target kept
    target_steps: int = 0                   # and the target's forwards (its prefill, then one a check)

    @property
    def decode_tok_s(self) -> float:
        steps = max(self.new_tokens - 1, 0)   # the first new token comes from the prefill
        return steps / self.decode_s if self.decode_s > 0 else 0.0


def _nbytes(t) -> int:
    from .ops import Int8Weight
    if isinstance(t, list):             # a mixture's experts: counted in weight_bytes by the share a token reads
        return sum(_nbytes(x) for x in t)
    if isinstance(t, Int8Weight):
        return t.q.numel() + t.scale.numel() * t.scale.element_size()
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def weight_bytes(model: FusedModel) -> int:
    """Bytes of weights one decode step reads on this rank (what bandwidth figures are counted against).
    An untied embedding table is gathered from, not streamed, so it is left out."""
    share = model.spec["experts_per_token"] / max(1, model.spec["num_experts"])
    total = sum(_nbytes(t) for t in model.g.values()) + sum(
        int(_nbytes(v) * share) if isinstance(v, list) else _nbytes(v) for b in model.blocks for v in b.t.values())
    if not model.spec["tied_embeddings"] and "embed.weight" in model.g:
        total -= _nbytes(model.g["embed.weight"])
    return total


def copy_bandwidth(device: torch.device, mbytes: int = 256) -> float:
    """Measured device copy bandwidth in bytes/s (read + write), the ceiling decode is compared against."""
    x = torch.empty(mbytes << 18, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    y.copy_(x)
    sync()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        y.copy_(x)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * x.numel() * 4 / best


def warp(logits: torch.Tensor, temperature: float, top_p: float, top_k: int = 0) -> torch.Tensor:
    """logits [B, V] -> the float32 scores sampling draws from, as transformers' warpers leave them, in their order:
    divided by the temperature, then all but the top_k likeliest at -inf (0: none cut), then all but the smallest
    set holding top_p of the mass."""
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_s, idx = scores.sort(dim=-1, descending=True)
        sorted_p = sorted_s.softmax(-1)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p       # never the most likely token
        scores = scores.scatter(-1, idx, sorted_s.masked_fill(drop, float("-inf")))
    return scores


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None,
           top_k: int = 0, warped: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. temperature 0 is greedy; otherwise a draw from the warped scores' softmax
    (`warped`, where the caller has them already)."""
    if temperature <= 0:
        return logits.argmax(-1)
    warped = warp(logits, temperature, top_p, top_k) if warped is None else warped
    return torch.multinomial(torch.softmax(warped, dim=-1).cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


# A model this small decodes on CPU with one intra-op thread: its ops are far below the size worth splitting, and
# a second thread only adds a barrier to every op, one that stalls whenever the other core is busy. Same results.
SMALL_MODEL_BYTES = 32 << 20


def packed_int8(model: FusedModel) -> list:
    """The weights this rank decodes through the CPU int8 GEMV (kernels/int8_gemv_cpu.py)."""
    from .ops import Int8Weight
    tensors = list(model.g.values()) + [v for b in model.blocks for v in b.t.values()]
    return [t.packed for t in tensors if isinstance(t, Int8Weight) and t.packed is not None]


def warm_up(model: FusedModel) -> int:
    """Build the CPU int8 kernels this model needs (seconds the first time in a process; none on CUDA)."""
    from ..kernels import int8_gemv_cpu
    packed = packed_int8(model)
    if not packed or not int8_gemv_cpu.usable():
        return 0
    with torch.inference_mode():
        return int8_gemv_cpu.warm_up(packed)


def stop_tokens(eos_token_id) -> tuple:
    """An end-token setting (an id, a list of ids, or None) as a tuple of ids."""
    return tuple(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else () if eos_token_id is None else \
        (eos_token_id,)


def with_forced(processors: Processors | None, forced_bos, forced_eos, eos_token_id) -> Processors:
    """The processors with these forced tokens (where given) and stop tokens."""
    p = processors or Processors()
    return replace(p, forced_bos=p.forced_bos if forced_bos is None else forced_bos,
                   forced_eos=p.forced_eos if forced_eos is None else forced_eos, eos=stop_tokens(eos_token_id))


def positions_left(model: FusedModel, prompt: int, new: int, decoder_prompt: int = 1):
    """Refuse, in one line, a generation that would read past a position table (GPT-2's, BART's, Marian's): the
    prompt and the new tokens must fit; an encoder-decoder's source must fit its encoder's table (Whisper's audio
    encoder checks its features itself), and the decoder's prompt (its start token) and the new tokens the
    decoder's. RoPE, ALiBi and T5's buckets have no such end."""
    if model.spec.get("encoder"):
        enc = position_limit(model.source_encoder.spec)
        if enc is not None and prompt > enc and not model.source_encoder.spec["audio_mels"]:
            raise FmError(f"the source is {prompt} tokens, but {model.spec['architecture']}'s encoder reads at most "
                          f"{enc}: shorten it")
        prompt = decoder_prompt
    limit = position_limit(model.spec)
    if limit is not None and prompt + new > limit:
        raise FmError(f"{prompt} tokens of prompt and {new} new ones need {prompt + new} positions, but "
                      f"{model.spec['architecture']} has {limit}: ask for at most {max(limit - prompt, 0)} new tokens")


def generate(model: FusedModel, input_ids: torch.Tensor, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, eos_token_id=None, on_token=None,
             cuda_graph: bool | None = None, source_mask: torch.Tensor | None = None,
             forced_bos: int | None = None, forced_eos=None,
             processors: Processors | None = None, decoder_prompt=None,
             top_k: int = 0, generator: torch.Generator | None = None,
             logprobs: bool = False) -> tuple[torch.Tensor, GenStats]:
    """input_ids [B, T] -> [B, T + new]. `on_token(ids [B])` is called as each step's tokens are chosen.
    On CUDA the decode step is replayed from a CUDA graph unless cuda_graph=False. The CPU int8 kernels are built
    first (`warm_up`), outside the timings in GenStats.

    An encoder-decoder (T5) reads input_ids [B, S] (padded where source_mask [B, S] is 0) as the source, and
    returns its decoder's tokens [B, 1 + new], from the start token on; its prefill is the encoder and the first
    decoder step; its decode steps replay a CUDA graph captured for this source. forced_bos: the first new token,
    whatever the logits say (mBART-50's and NLLB's target language, generation_config.json's forced_bos_token_id).
    forced_eos (an id or ids: BART's and Marian's forced_eos_token_id): the last token max_new_tokens allows is one
    of them, as transformers forces it. processors: transformers' other logits processors (repetition penalty,
    n-gram ban, minimum lengths; runtime/processors.py). decoder_prompt: an encoder-decoder's first decoder tokens
    [B, P] in place of its start token (Whisper's <|startoftranscript|> <|en|> <|transcribe|> <|notimestamps|>), or
    a function of the model, called once the source is attached, that gives them (Whisper's language detection);
    input_ids is then the encoder's input (Whisper's log-mel features [B, mels, frames]). generator: the random
    numbers to sample with, carried on from an earlier call (else a fresh one from seed). logprobs: stats.logprobs
    holds each chosen token's log probability under the scores it was chosen from (processed and, when sampling,
    warped), as transformers' Whisper averages them."""
    procs = with_forced(processors, forced_bos, forced_eos, eos_token_id)
    P = decoder_prompt.shape[1] if isinstance(decoder_prompt, torch.Tensor) else 1    # a function's: checked later
    positions_left(model, input_ids.shape[1], max_new_tokens, P)
    warm_up(model)
    if model.spec.get("encoder"):
        return _generate_seq2seq(model, input_ids, source_mask, max_new_tokens, temperature, top_p, seed,
                                 eos_token_id, on_token, procs, cuda_graph, decoder_prompt, top_k=top_k,
                                 generator=generator, logprobs=logprobs)
    threads = torch.get_num_threads()
    single = model.device.type == "cpu" and threads > 1 and weight_bytes(model) < SMALL_MODEL_BYTES
    if single:
        torch.set_num_threads(1)
    try:
        return _generate(model, input_ids, max_new_tokens, temperature, top_p, seed, eos_token_id, on_token,
                         cuda_graph, procs, top_k=top_k, generator=generator, logprobs=logprobs)
    finally:
        if single:
            torch.set_num_threads(threads)


@torch.inference_mode()
def _generate_seq2seq(model, source, source_mask, max_new_tokens, temperature, top_p, seed, eos_token_id, on_token,
                      procs, cuda_graph=None, decoder_prompt=None, top_k: int = 0, generator=None,
                      logprobs: bool = False):
    dev = model.device
    source = source.to(dev)
    mask = None if source_mask is None else source_mask.to(dev)
    t0 = time.perf_counter()
    model.attach(model.source_encoder.hidden(source, attention_mask=mask), mask)
    start = torch.full((source.shape[0], 1), model.spec["decoder_start_token_id"], dtype=torch.long, device=dev)
    if decoder_prompt is not None:
        start = (decoder_prompt(model) if callable(decoder_prompt) else decoder_prompt).to(dev)
        positions_left(model, 0, max_new_tokens, start.shape[1])
    # the decoder's steps replay a CUDA graph captured over this source's keys and values
    out, stats = _generate(model, start, max_new_tokens, temperature, top_p, seed, eos_token_id, on_token, cuda_graph,
                           procs, top_k=top_k, generator=generator, logprobs=logprobs)
    enc = model.source_encoder.spec
    stats.prompt_tokens = enc["max_positions"] if enc["audio_mels"] else source.shape[1]     # Whisper: 30 s
    stats.prefill_s = time.perf_counter() - t0 - stats.decode_s      # the encoder, then the first decoder step
    return out, stats


@torch.inference_mode()
def _generate(model, input_ids, max_new_tokens, temperature, top_p, seed, eos_token_id, on_token, cuda_graph,
              procs: Processors, top_k: int = 0, generator=None, logprobs: bool = False):
    if model.spec["kind"] != "decoder":
        raise ValueError("generate needs a decoder; use embed for encoders")
    B, T = input_ids.shape
    dev = model.device
    ids = input_ids.to(dev)
    procs = replace(procs, prompt=T, max_length=T + max_new_tokens)
    from .model import _decode_graph_safe
    graph_safe = _decode_graph_safe(model)
    if cuda_graph is None:
        cuda_graph = dev.type == "cuda" and graph_safe
    if cuda_graph and not graph_safe:
        raise ValueError("this mixture-of-experts model routes tokens on the host (float experts, or a backend "
                         "without device-side routing): no CUDA-graph decode; convert with --int8 and run on CUDA")
    if cuda_graph:
        from .cuda_graph import GraphDecoder
        runner = GraphDecoder(model, B, T + max_new_tokens)
        first, advance = runner.prefill, runner.step
    else:
        cache = model.new_cache(B, T + max_new_tokens)
        first = lambda x: model(x, cache)[:, -1]              # noqa: E731
        advance = lambda tok: model(tok.unsqueeze(1), cache)[:, -1]  # noqa: E731
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    chosen = []
    eos = set(stop_tokens(eos_token_id))
    stats = GenStats(prompt_tokens=T)
    out = [ids]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    logits = first(ids)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    for step in range(max_new_tokens):
        if procs:       # on float32 scores, as transformers
            seqs = torch.cat(out, dim=1) if procs.reads_tokens else None
            logits = procs(seqs, T + step, logits.float())
        warped = warp(logits, temperature, top_p, top_k) if logprobs and temperature > 0 else None
        tok = sample(logits, temperature, top_p, gen, top_k, warped)
        tok = model.comm.broadcast(tok.contiguous(), 0)
        if logprobs:        # transformers' recipe: the warped scores times the temperature, log-softmaxed
            s = warped * temperature if warped is not None else logits.float()
            chosen.append(torch.log_softmax(s, -1).gather(1, tok.unsqueeze(1)).squeeze(1))
        if step == 0:
            sync()
            stats.prefill_s = time.perf_counter() - t0
            t0 = time.perf_counter()
        out.append(tok.unsqueeze(1))
        stats.new_tokens += 1
        if on_token is not None:
            on_token(tok)
        if eos:
            done |= torch.isin(tok, torch.tensor(sorted(eos), device=dev))
            if bool(done.all()):
                break
        if step + 1 == max_new_tokens:
            break
        logits = advance(tok)
    sync()
    stats.decode_s = time.perf_counter() - t0
    result = torch.cat(out, dim=1)
    stats.tokens = result[0, T:].tolist()
    if logprobs:
        stats.logprobs = torch.stack(chosen, 1).cpu() if chosen else torch.zeros(B, 0)
    return result, stats
