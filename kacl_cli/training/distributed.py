"""Multi-process training and inference under ``torchrun`` (DistributedDataParallel).

``torchrun --nproc-per-node N kacl pretrain ...`` starts N copies of the command with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set. Outside torchrun
(``WORLD_SIZE`` unset or 1) every function here is a no-op, so the training loop and the
stages keep one code path.

Semantics (docs/scale-out.md):

- Training (``pretrain``, ``contrast``): each rank trains on its slice of every epoch
  (:class:`DistributedEpochSampler`, the same seeded permutation as a single process), DDP
  averages gradients, and BatchNorm statistics are synchronised across ranks
  (:func:`convert_batchnorm`), so N ranks x batch B train like one process with batch N x B.
  Validation is split across ranks and the predictions are all-gathered
  (:func:`gather_eval`): every rank computes the same AUC and keeps the same best epoch.
- Writes: only rank 0 writes checkpoints, the catalog and the store (``Workspace.writes`` is
  False elsewhere). DuckDB admits one writing process and no readers beside it, so the other
  ranks do all their catalog reads *before* rank 0 starts writing (``ws.stage_run(...,
  device=...)`` in :mod:`kacl_cli.runs`: barrier, rank 0 records the run, the run id is
  broadcast).
- Backends: NCCL for CUDA tensors (DDP), gloo on the CPU. Host-side coordination (barriers,
  object broadcasts) always runs on a gloo group, so a rank waiting for rank 0's long catalog
  merge blocks in a socket, not a GPU kernel, and the timeout (``KACL_DIST_TIMEOUT_S``,
  default 6 h) covers stages that keep rank 0 busy for hours on the full NIH set.
- Output: non-zero ranks print nothing on stdout and show no progress bars (their errors
  still go to stderr), so a torchrun job reports once.
"""

from __future__ import annotations

import atexit
import datetime as dt
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Sampler, Subset
from torch.utils.data.distributed import DistributedSampler

from kacl_cli.errors import KaclError

TIMEOUT_ENV = "KACL_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 6 * 3600


@dataclass(frozen=True)
class DistContext:
    """This process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "") or str(default)
    try:
        return int(value)
    except ValueError:
        raise KaclError(f"environment variable {name}={value!r} is not an integer "
                        "(set by torchrun; unset it for a single-process run)") from None


def from_env() -> DistContext:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (torchrun's variables); one-line error if malformed."""
    ctx = DistContext(rank=_env_int("RANK", 0), world_size=_env_int("WORLD_SIZE", 1),
                      local_rank=_env_int("LOCAL_RANK", 0))
    if ctx.world_size < 1 or not 0 <= ctx.rank < ctx.world_size or ctx.local_rank < 0:
        raise KaclError(f"inconsistent torchrun environment: RANK={ctx.rank} "
                        f"WORLD_SIZE={ctx.world_size} LOCAL_RANK={ctx.local_rank}")
    if ctx.active and not os.environ.get("MASTER_ADDR"):
        raise KaclError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun "
                        "(or set MASTER_ADDR/MASTER_PORT for env:// rendezvous)")
    return ctx


def is_main() -> bool:
    """True on rank 0 and in every single-process run: the process that writes and reports."""
    return from_env().is_main


def rank() -> int:
    return from_env().rank


def world_size() -> int:
    return from_env().world_size


def local_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device of this rank: ``auto``/``cuda`` pick GPU ``LOCAL_RANK`` (see device.py)."""
    from kacl_cli.device import resolve_device

    return resolve_device(spec)


# -- process group ---------------------------------------------------------------------------
_COORD: dict[str, Any] = {"group": None, "torn_down": False}


def _timeout() -> dt.timedelta:
    return dt.timedelta(seconds=_env_int(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


def setup(ctx: DistContext, device: torch.device) -> None:
    """Join the process group (env:// rendezvous) once per process; idempotent.

    NCCL when this rank computes on CUDA, else gloo; plus a gloo group for host-side
    coordination (see module docstring). Non-zero ranks are silenced on stdout.
    """
    if not ctx.active or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend=backend, timeout=_timeout())
    except (RuntimeError, ValueError) as exc:
        raise KaclError(f"cannot join the torchrun process group ({backend}): "
                        f"{str(exc).splitlines()[0]}") from None
    _COORD["group"] = (dist.new_group(backend="gloo", timeout=_timeout())
                       if backend != "gloo" else None)
    _COORD["torn_down"] = False
    atexit.register(teardown)
    if not ctx.is_main:
        quiet()


def init(device: str | torch.device | None = "auto") -> DistContext:
    """Context from the environment, joining the process group when launched by torchrun."""
    ctx = from_env()
    if ctx.active:
        setup(ctx, local_device(device))
    return ctx


def quiet() -> None:
    """No stdout and no progress bars on this process (a non-zero rank: rank 0 reports)."""
    os.environ["KACL_NO_PROGRESS"] = "1"
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process


def teardown() -> None:
    """Leave the process group cleanly (also registered at exit; safe to call twice)."""
    if _COORD["torn_down"] or not dist.is_available() or not dist.is_initialized():
        return
    _COORD["torn_down"] = True
    try:
        if _COORD["group"] is not None:
            dist.destroy_process_group(_COORD["group"])
        dist.destroy_process_group()
    finally:
        _COORD["group"] = None


def _ready(ctx: DistContext | None) -> bool:
    ctx = ctx or from_env()
    return ctx.active and dist.is_available() and dist.is_initialized()


# -- collectives -----------------------------------------------------------------------------
def barrier(ctx: DistContext | None = None) -> None:
    """Wait for every rank (host-side, gloo); no-op outside a torchrun job."""
    if _ready(ctx):
        dist.barrier(group=_COORD["group"])


def broadcast_object(obj: Any, ctx: DistContext | None = None, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if not _ready(ctx):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_COORD["group"])
    return box[0]


def all_gather_object(obj: Any, ctx: DistContext | None = None) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` outside torchrun)."""
    if not _ready(ctx):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_COORD["group"])
    return out


def all_reduce_sum(t: torch.Tensor, ctx: DistContext | None = None) -> torch.Tensor:
    """Sum a tensor over ranks in place (epoch loss totals), identity when not distributed."""
    if _ready(ctx):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sync_buffers(module: nn.Module, ctx: DistContext | None = None) -> None:
    """Give every rank rank 0's buffers (BatchNorm running stats drift apart per rank after
    the last step), so validation, and with it the best-epoch choice, agree on all ranks."""
    if _ready(ctx):
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce: the gradient of a sum over ranks is the sum of gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 that sends each rank's slice of the gradient back to it."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.rank, ctx.n = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_reduce_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks that autograd can differentiate (synchronised BatchNorm statistics)."""
    if not _ready(None):
        return t
    return _AllReduceSum.apply(t)


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` (same shape on all ranks) along dim 0, with gradient.

    For objectives whose loss couples samples across the global batch (NT-Xent negatives):
    gather the embeddings, compute the loss over the global batch, DDP averages the rest.
    """
    if not _ready(None):
        return t
    return _GatherWithGrad.apply(t)


# -- data ------------------------------------------------------------------------------------
class EpochSampler(Sampler[int]):
    """A permutation seeded by (seed, epoch): the same order after a resume."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n = n
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_order(self.n, self.seed, self.epoch, self.shuffle))

    def __len__(self) -> int:
        return self.n


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The sample order of an epoch, shared by the single-process and the DDP samplers."""
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class DistributedEpochSampler(DistributedSampler):
    """:class:`DistributedSampler` over the single-process order (:func:`epoch_order`).

    Rank r takes positions r, r + N, r + 2N, ... of the epoch's permutation (the tail that
    does not fill a step on every rank is dropped), so step k of the N ranks together covers
    exactly positions k*N*B .. (k+1)*N*B - 1 of the permutation: the batch a single process
    with batch N*B sees at step k.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int = 0,
                 shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=True)

    def __iter__(self) -> Iterator[int]:
        order = epoch_order(len(self.dataset), self.seed, self.epoch, self.shuffle)  # type: ignore[arg-type]
        return iter(order[: self.total_size][self.rank:self.total_size:self.num_replicas])


def train_sampler(dataset: Dataset, ctx: DistContext, seed: int) -> Sampler[int]:
    """Shuffling sampler for the train split; rank-sharded under DDP (both have set_epoch)."""
    if ctx.active:
        if len(dataset) < ctx.world_size:  # type: ignore[arg-type]
            raise KaclError(f"the train split has {len(dataset)} images, fewer than the "  # type: ignore[arg-type]
                            f"{ctx.world_size} torchrun processes")
        return DistributedEpochSampler(dataset, ctx.world_size, ctx.rank, seed)
    return EpochSampler(len(dataset), seed)  # type: ignore[arg-type]


def shard_indices(n: int, ctx: DistContext | None = None) -> range:
    """Positions of ``n`` items this rank evaluates: rank, rank + N, ... (all when alone)."""
    ctx = ctx or from_env()
    return range(ctx.rank, n, ctx.world_size) if ctx.active else range(n)


def shard_dataset(dataset: Dataset, ctx: DistContext | None = None) -> Dataset:
    """This rank's slice of an evaluation set (see :func:`shard_indices`)."""
    ctx = ctx or from_env()
    if not ctx.active:
        return dataset
    return Subset(dataset, list(shard_indices(len(dataset), ctx)))  # type: ignore[arg-type]


def gather_eval(labels: np.ndarray, probs: np.ndarray, mean_loss: float,
                ctx: DistContext | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """All ranks' (labels, probabilities, mean loss) of an evaluation: concatenated arrays and
    the sample-weighted mean loss, identical on every rank."""
    if not _ready(ctx):
        return labels, probs, mean_loss
    parts = all_gather_object((labels, probs, float(mean_loss), len(labels)), ctx)
    n = sum(p[3] for p in parts)
    loss = sum(p[2] * p[3] for p in parts if p[3]) / n if n else float("nan")
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            float(loss))


# -- model -----------------------------------------------------------------------------------
class DistBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the global batch of all ranks.

    Works on any backend (gloo on the CPU, where ``nn.SyncBatchNorm`` refuses to run): per
    channel sum and sum of squares are all-reduced with a differentiable all-reduce, so the
    forward pass and the gradients equal those of one process holding the whole batch.
    Outside training (or outside torchrun) it is plain BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _ready(None)):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        channels = x.shape[1]
        xf = x.float()
        count = torch.full((1,), float(xf.numel() // channels), device=x.device)
        stats = all_reduce_with_grad(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        n = stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels:2 * channels] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
                m = (self.momentum if self.momentum is not None
                     else 1.0 / float(self.num_batches_tracked))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * n / torch.clamp(n - 1, min=1.0)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)  # type: ignore[union-attr]
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Swap every BatchNorm for a synchronised one (torch's SyncBatchNorm on CUDA, else
    :class:`DistBatchNorm`), keeping parameters, buffers and state-dict keys."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, (DistBatchNorm, nn.SyncBatchNorm)):
        new = DistBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, device=device)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        swapped = convert_batchnorm(child, device)
        if swapped is not child:
            setattr(module, name, swapped)
    return module


def wrap(module: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """DDP-wrap the trainable module (model + objective) when running distributed.

    BatchNorm layers become synchronised first (see :func:`convert_batchnorm`). Every
    parameter gets a gradient in every step (the contrastive loss stays connected to its
    heads even when a batch has no positive pair), so DDP needs no unused-parameter search.
    """
    if not ctx.active:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    setup(ctx, device)
    convert_batchnorm(module, device)
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)


def check_world(n_items: int, what: str, ctx: DistContext | None = None) -> None:
    """Refuse a job with more ranks than items (a rank with nothing to do would hang DDP)."""
    ctx = ctx or from_env()
    if ctx.active and n_items < ctx.world_size:
        raise KaclError(f"{what}: {n_items} item(s) for {ctx.world_size} torchrun processes")


def ranks_summary(values: Sequence[float]) -> dict[str, float]:
    """min/max/sum of a per-rank number (e.g. images per second), for run summaries."""
    return {"min": float(min(values)), "max": float(max(values)), "sum": float(sum(values))}
