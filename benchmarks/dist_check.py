"""One-rank check of kacl's torchrun code path: process group (NCCL on CUDA, gloo on the CPU),
DDP wrapping with :class:`DistBatchNorm`, the collectives, AMP, and the batched data path.

A one-process ``torchrun`` job has WORLD_SIZE 1, where kacl's distributed helpers are
no-ops (nothing to synchronise). This check forces them on, so one GPU runs the same NCCL
calls a multi-GPU job makes (NCCL refuses two ranks on one GPU). Run:

    torchrun --standalone --nproc-per-node 1 -m benchmarks.dist_check --device cuda
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch

from kacl_cli.device import resolve_device
from kacl_cli.findings import FINDINGS
from kacl_cli.models.checkpoint import model_meta, preprocess
from kacl_cli.models.image_net import GRAY_MEAN, GRAY_STD, build_image_net
from kacl_cli.models.losses import ClassificationObjective
from kacl_cli.training import distributed
from kacl_cli.training.fit import TrainStep
from kacl_cli.training.gpu_augment import augment_batch, draw_params


@dataclass(frozen=True)
class _Forced(distributed.DistContext):
    """A context that counts as distributed even with one rank."""

    @property
    def active(self) -> bool:
        return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backbone", default="densenet121")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--store-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    env = distributed.from_env()
    device = resolve_device(args.device)
    ctx = _Forced(env.rank, env.world_size, env.local_rank)
    distributed.setup(ctx, device)
    backend = torch.distributed.get_backend()
    total = distributed.all_reduce_sum(torch.ones(1, device=device), ctx)
    y, p, loss = distributed.gather_eval(np.zeros((2, 14)), np.ones((2, 14)), 0.5, ctx)
    assert float(total) == env.world_size and len(y) == 2 * env.world_size

    torch.manual_seed(0)
    model = build_image_net(args.backbone).to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    step_module = TrainStep(model, ClassificationObjective()).to(device)
    trained = distributed.wrap(step_module, ctx, device)
    opt = torch.optim.AdamW(step_module.parameters(), lr=1e-4)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    meta = model_meta(args.backbone, args.size, args.store_size, GRAY_MEAN, GRAY_STD, 0, "check")
    raw = torch.randint(0, 256, (args.batch, 1, args.store_size, args.store_size),
                        dtype=torch.uint8)
    labels = (torch.rand(args.batch, len(FINDINGS)) < 0.3).float().to(device)
    data_s = 0.0
    t0 = time.perf_counter()
    for step in range(args.steps + 1):
        if step == 1:  # the first step (cudnn autotune, NCCL set-up) is not timed
            if cuda:
                torch.cuda.synchronize()
            t0, data_s = time.perf_counter(), 0.0
        td = time.perf_counter()
        x = raw.to(device, non_blocking=True)
        params = draw_params(0, 0, np.arange(args.batch) + step * args.batch, 0, args.size)
        x = preprocess(augment_batch(x, params, args.size)[0], meta)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
            torch.cuda.synchronize()
        data_s += time.perf_counter() - td
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            loss_t, _ = trained({"image": x, "labels": labels})
        loss_t.backward()
        opt.step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    rate = args.batch * args.steps / seconds
    distributed.barrier(ctx)
    if ctx.is_main:
        print(f"dist_check: {backend} x{env.world_size} on {device}, {args.backbone} "
              f"{args.size} px, DDP + DistBatchNorm + AMP {cuda}: {rate:.0f} img/s, data path "
              f"{100 * data_s / seconds:.0f}% of step time, loss {float(loss_t.detach()):.4f}",
              flush=True)
    distributed.teardown()


if __name__ == "__main__":
    main()
