"""Decode as one CUDA graph: the whole model's single-token step is captured once per batch size over a static
KV cache, then replayed. Replaying removes the per-kernel launch cost that otherwise dominates batch-1 decode."""

from __future__ import annotations

import torch

from .model import FusedModel, KVCache


class GraphDecoder:
    def __init__(self, model: FusedModel, batch: int, max_len: int, warmup: int = 2):
        dev = model.device
        if dev.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model = model
        self.cache: KVCache = model.new_cache(batch, max_len)
        if model.rope is not None:  # tables must cover every position before capture: no resizing inside a graph
            model.rope_for(torch.tensor([max_len - 1], device=dev))
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile and autotune every kernel outside the capture
            for _ in range(warmup):
                model.decode_step(self.ids, self.cache, self.pos)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.decode_step(self.ids, self.cache, self.pos)
        self.cache.reset()

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Eager prefill into the graph's cache; returns the last position's logits [B, vocab]."""
        self.cache.reset()
        return self.model(ids, self.cache)[:, -1]

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        """Feed tokens [B] at the next position; returns logits [B, vocab] (a view reused by the next step)."""
        if self.cache.length >= self.cache.max_len:
            raise ValueError("KV cache is full")
        self.ids.copy_(tok.view(-1, 1))
        self.pos.fill_(self.cache.length)
        self.graph.replay()
        self.cache.length += 1
        return self.logits
