"""Collectives behind one small interface, so a block never knows how its ranks talk.

SingleComm (tp=1), DistComm (torch.distributed: gloo on CPU, NCCL on CUDA, launched by torchrun) and ThreadComm
(every rank as a thread of one process: exact emulation of tp>1 on one machine, used by verify and tests).
"""

from __future__ import annotations

import os
import threading

import torch


class SingleComm:
    rank, world = 0, 1

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        return t


class DistComm:
    def __init__(self):
        import torch.distributed as dist
        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def all_reduce(self, t):
        self.dist.all_reduce(t)
        return t

    def all_gather(self, t, dim):
        parts = [torch.empty_like(t) for _ in range(self.world)]
        self.dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=dim)

    def broadcast(self, t, src=0):
        self.dist.broadcast(t, src)
        return t


class ThreadGroup:
    """Shared state of `world` ThreadComms: a barrier and one mailbox slot per rank."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list = [None] * world

    def comm(self, rank: int) -> "ThreadComm":
        return ThreadComm(self, rank)


class ThreadComm:
    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank, self.world = group, rank, group.world

    def _exchange(self, t):
        g = self.group
        g.slots[self.rank] = t
        g.barrier.wait()
        parts = list(g.slots)
        g.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return parts

    def all_reduce(self, t):
        parts = self._exchange(t)
        out = parts[0].clone()
        for p in parts[1:]:  # rank order: every rank gets bit-identical sums
            out += p
        return out

    def all_gather(self, t, dim):
        return torch.cat(self._exchange(t), dim=dim)

    def broadcast(self, t, src=0):
        return self._exchange(t)[src].clone()


def init_distributed() -> DistComm | SingleComm:
    """Join the torchrun group when launched by torchrun; otherwise a single rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SingleComm()
    import torch.distributed as dist
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return DistComm()


def shutdown():
    """Leave the torchrun group cleanly: a barrier first, so no rank tears down gloo while a peer still talks."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
