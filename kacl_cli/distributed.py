"""DistributedDataParallel hooks for the one training loop (``torchrun`` launches it).

Under ``torchrun`` (env ``WORLD_SIZE`` > 1) each process trains on its own shard of every
epoch (:class:`~torch.utils.data.distributed.DistributedSampler`, same seed and epoch on every
rank), gradients are averaged by DDP (gloo on CPU, nccl on CUDA), and only rank 0 writes the
catalog, the per-epoch resume state and the final checkpoint (``ws.writes`` is False
elsewhere). Outside torchrun every function here is a no-op, so ``fit`` has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Sampler


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> DistContext:
    """The process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""
    return DistContext(
        rank=int(os.environ.get("RANK", "0") or 0),
        world_size=int(os.environ.get("WORLD_SIZE", "1") or 1),
        local_rank=int(os.environ.get("LOCAL_RANK", "0") or 0),
    )


def setup(ctx: DistContext, device: torch.device) -> None:
    """Join the process group (env:// rendezvous from torchrun) once per process."""
    if ctx.active and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def wrap(module: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """DDP-wrap the trainable module (model + objective) when running distributed."""
    if not ctx.active:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)


class EpochSampler(Sampler[int]):
    """A permutation seeded by (seed, epoch): the same order after a resume."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n = n
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def train_sampler(dataset: Dataset, ctx: DistContext, seed: int) -> Sampler[int]:
    """Shuffling sampler for the train split; rank-sharded under DDP (both have set_epoch)."""
    if ctx.active:
        from torch.utils.data.distributed import DistributedSampler

        return DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank,
                                  shuffle=True, seed=seed, drop_last=True)
    return EpochSampler(len(dataset), seed)


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a tensor over ranks (epoch loss totals), identity when not distributed."""
    if ctx.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sync_buffers(module: nn.Module, ctx: DistContext) -> None:
    """Give every rank rank 0's buffers (BatchNorm running stats drift apart per rank after
    the last step), so validation, and with it the best-epoch choice, agree on all ranks."""
    if ctx.active:
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()
