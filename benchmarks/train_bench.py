"""Training throughput: pretrain's real loop (``fit``: HDF5 store -> augmentation -> model ->
optimizer) against the model's pure forward+backward rate on random tensors.

The gap between the two is the data path's overhead (reading/decoding the store, per-item
augmentation, collation, host->device copies). Run:

    .venv/bin/python -m benchmarks.train_bench                 # CPU, 224 px, batch 8, 3 batches
    .venv/bin/python -m benchmarks.train_bench --device cuda --batch 64 --batches 30 --workers 8
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kacl_cli.device import resolve_device
from kacl_cli.findings import FINDINGS, LABEL_COLUMNS
from kacl_cli.models.checkpoint import model_meta
from kacl_cli.models.image_net import GRAY_MEAN, GRAY_STD, build_image_net
from kacl_cli.models.losses import ClassificationObjective
from kacl_cli.training.config import TrainConfig
from kacl_cli.training.fit import fit
from kacl_cli.training.loader import StoreDataset, load_split
from kacl_cli.workspace import Workspace


def make_workspace(root: Path, n_train: int, n_val: int, size: int) -> Workspace:
    """Random images and labels written straight through the store and catalog."""
    rng = np.random.default_rng(0)
    ws = Workspace(root)
    ws.init()
    n = n_train + n_val
    ws.store.write_images(0, rng.integers(0, 256, (n, size, size), dtype=np.uint8), size)
    with ws.catalog.connect() as con:
        for i in range(n):
            iid = f"{i:08d}_000.png"
            con.execute(
                "INSERT INTO images VALUES (?, ?, ?, ?, 0, 'PA', 50, 'M', ?, ?, NULL, NULL, NULL)",
                [iid, i, str(i), "train" if i < n_train else "val", size, size],
            )
            labels = [bool(rng.random() < 0.3) for _ in LABEL_COLUMNS]
            labels[i % len(FINDINGS)] = True
            con.execute(f"INSERT INTO labels VALUES (?{', ?' * len(LABEL_COLUMNS)})",
                        [iid, *labels])
    return ws


def pure_rate(backbone: str, size: int, batch: int, batches: int, device: torch.device,
              amp: bool) -> float:
    """Images/s of forward + focal loss + backward + AdamW step on tensors already on device."""
    torch.manual_seed(0)
    model = build_image_net(backbone).to(device).train()
    cuda = device.type == "cuda"
    if cuda:
        model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    obj = ClassificationObjective()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, size, size, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, len(FINDINGS), device=device) < 0.3).float()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype, enabled=cuda and amp):
            loss, _ = obj(model, {"image": x, "labels": y})
        loss.backward()
        opt.step()

    for _ in range(2 if cuda else 1):  # warm-up (cudnn autotune, allocator)
        step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(batches):
        step()
    if cuda:
        torch.cuda.synchronize()
    return batch * batches / (time.perf_counter() - t0)


def fit_rate(backbone: str, size: int, store_size: int, batch: int, batches: int,
             device: str, workers: int, amp: bool) -> float:
    """Images/s of pretrain's loop over the store (train part of one epoch, val excluded)."""
    with tempfile.TemporaryDirectory() as tmp:
        # The loop's own figure (epochs.images_per_s): train seconds of the epoch, including
        # the first batch's start-up, excluding validation and checkpoint writing.
        ws = make_workspace(Path(tmp) / "ws", batch * batches, 2 * batch, store_size)
        tr, va = load_split(ws, "train"), load_split(ws, "val")
        cfg = TrainConfig(epochs=1, batch_size=batch, image_size=size, workers=workers,
                          device=device, amp=amp, seed=0)
        meta = model_meta(backbone, size, store_size, GRAY_MEAN, GRAY_STD, 0, "bench")
        torch.manual_seed(0)
        summary = fit(
            ws=ws, run=None, stage="bench", round_=0, model=build_image_net(backbone),
            objective=ClassificationObjective(),
            train_set=StoreDataset(ws.store.path, tr.rows, tr.labels, augment=True,
                                   image_size=size),
            val_set=StoreDataset(ws.store.path, va.rows, va.labels, augment=False,
                                 image_size=size),
            cfg=cfg, meta=meta, resume=False,
        )
        return float(summary["images_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--backbones", default="densenet121,resnet18")
    ap.add_argument("--size", type=int, default=224, help="training resolution")
    ap.add_argument("--store-size", type=int, default=256, help="store image side")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--no-amp", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("KACL_NO_PROGRESS", "1")
    device = resolve_device(args.device)
    amp = not args.no_amp
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads)"
    print(f"train_bench: {name}, {args.size} px (store {args.store_size}), batch {args.batch}, "
          f"{args.batches} batches, workers {args.workers}, amp {amp and device.type == 'cuda'}")
    print(f"{'backbone':<12} {'fwd+bwd img/s':>14} {'fit img/s':>10} {'data overhead':>14}")
    for backbone in args.backbones.split(","):
        pure = pure_rate(backbone, args.size, args.batch, args.batches, device, amp)
        loop = fit_rate(backbone, args.size, args.store_size, args.batch, args.batches,
                        args.device, args.workers, amp)
        # On a shared CPU the two rates carry a few % of noise: a small negative overhead
        # means "no measurable data-path cost", not a faster loop.
        overhead = 100.0 * (1.0 - loop / pure)
        print(f"{backbone:<12} {pure:>14.1f} {loop:>10.1f} {overhead:>13.0f}%", flush=True)


if __name__ == "__main__":
    main()
