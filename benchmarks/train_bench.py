"""Training throughput: pretrain's real loop (``fit``: HDF5 store -> augmentation -> model ->
optimizer) against the model's pure forward+backward rate on random tensors.

The gap between the two is the data path's overhead (reading/decoding the store, per-item
augmentation, collation, host->device copies). Run:

    .venv/bin/python -m benchmarks.train_bench     # CPU: tiny 64 px, resnet18 128 px, 3 runs
    .venv/bin/python -m benchmarks.train_bench --device cuda --cases densenet121:224 \
        --batch 64 --batches 30 --workers 8

Each run prints side by side: the loader alone at 224 px on one core (item path vs batched
path), and per case the model alone (forward + focal loss + backward + AdamW on tensors
already on the device) against pretrain's loop on both data paths, as ratios of that run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from kacl_cli.device import resolve_device
from kacl_cli.findings import FINDINGS, LABEL_COLUMNS
from kacl_cli.models.checkpoint import model_meta
from kacl_cli.models.image_net import GRAY_MEAN, GRAY_STD, build_image_net
from kacl_cli.models.losses import ClassificationObjective
from kacl_cli.training.augment import augment_image, item_generator
from kacl_cli.training.batches import DeviceBatches
from kacl_cli.training.config import TrainConfig
from kacl_cli.training.distributed import EpochSampler
from kacl_cli.training.fit import fit
from kacl_cli.training.loader import StoreDataset, load_split
from kacl_cli.workspace import Workspace


class LegacyDataset(StoreDataset):
    """The item path as it was before the batched path (per-item float resize and
    torchvision affine in the workers): the baseline of the "today" ratios."""

    def _resized(self, pixels: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(pixels)).unsqueeze(0)
        if self.image_size and x.shape[-1] != self.image_size:
            x = F.interpolate(x[None].float(), size=(self.image_size,) * 2, mode="bilinear",
                              antialias=True, align_corners=False)[0]
            x = x.round_().clamp_(0, 255).to(torch.uint8)
        return x

    def _view(self, x: torch.Tensor, index: int, view: int) -> torch.Tensor:
        if not self.augment:
            return x
        g = item_generator(self.seed, self.epoch, index, view)
        return augment_image(x.float() / 255.0, g, self.augment_config)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        x = self._resized(self.reader[self.rows[index]])
        return {"image": self._view(x, index, 0), "labels": torch.from_numpy(self.labels[index]),
                "row": torch.tensor(int(self.rows[index]))}


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
              amp: bool, channels_last: bool = True) -> float:
    """Images/s of forward + focal loss + backward + AdamW step on tensors already on device,
    in the memory format ``fit`` uses (``TrainConfig.channels_last``)."""
    torch.manual_seed(0)
    model = build_image_net(backbone).to(device).train()
    cuda = device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if cuda:
        torch.backends.cudnn.benchmark = True
    obj = ClassificationObjective()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, size, size, device=device)
    if channels_last:
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
             device: str, workers: int, amp: bool, data_path: str = "batched",
             channels_last: bool = True) -> tuple[float, float]:
    """Images/s of pretrain's loop over the store (train part of each epoch, val excluded):
    (first epoch, second epoch)."""
    with tempfile.TemporaryDirectory() as tmp:
        # The loop's own figure (epochs.images_per_s): train seconds of the epoch, including
        # the first batch's start-up, excluding validation and checkpoint writing. Two epochs:
        # the second is the steady state that pure_rate (after its warm-up step) measures;
        # the first adds one-off costs (first oneDNN kernels, AdamW's state) that a real
        # epoch of thousands of batches amortises and a 6-batch one does not.
        ws = make_workspace(Path(tmp) / "ws", batch * batches, 2 * batch, store_size)
        tr, va = load_split(ws, "train"), load_split(ws, "val")
        cfg = TrainConfig(epochs=2, batch_size=batch, image_size=size, workers=workers,
                          device=device, amp=amp, seed=0, data_path=data_path,
                          channels_last=channels_last)
        meta = model_meta(backbone, size, store_size, GRAY_MEAN, GRAY_STD, 0, "bench")
        torch.manual_seed(0)
        kind = LegacyDataset if data_path == "items" else StoreDataset
        summary = fit(
            ws=ws, run=None, stage="bench", round_=0, model=build_image_net(backbone),
            objective=ClassificationObjective(),
            train_set=kind(ws.store.path, tr.rows, tr.labels, augment=True, image_size=size),
            val_set=kind(ws.store.path, va.rows, va.labels, augment=False, image_size=size),
            cfg=cfg, meta=meta, resume=False,
        )
        first, second = summary["epoch_images_per_s"]
        return float(first), float(second)


def loader_rates(size: int, store_size: int, batch: int, n: int, device: torch.device
                 ) -> tuple[float, float]:
    """(item path as before, batched path) images/s of the augmenting loader alone, in this
    process (no workers): store read, resize to ``size``, augmentation, collation, device
    copy."""
    with tempfile.TemporaryDirectory() as tmp:
        ws = make_workspace(Path(tmp) / "ws", n, 0, store_size)
        tr = load_split(ws, "train")
        sampler = EpochSampler(len(tr), 0)
        rates = []
        for path in ("items", "batched"):
            kind = LegacyDataset if path == "items" else StoreDataset
            ds = kind(ws.store.path, tr.rows, tr.labels, augment=True, image_size=size)
            ds.reader.batch(tr.rows[:2])  # open the file outside the timing
            if path == "items":
                it = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=0)
            else:
                it = DeviceBatches(ds, sampler, batch, device)
            t0 = time.perf_counter()
            for b in it:
                b["image"].to(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates.append(n / (time.perf_counter() - t0))
        return rates[0], rates[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--cases", default="tiny:64,resnet18:128",
                    help="backbone:size pairs for the model-only vs pretrain comparison")
    ap.add_argument("--loader-size", type=int, default=224, help="loader-only resolution")
    ap.add_argument("--store-size", type=int, default=256, help="store image side")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-amp", action="store_true")
    ap.add_argument("--memory-format", choices=("channels_last", "contiguous", "both"),
                    default="channels_last",
                    help="of the model and its inputs, in both columns (fit's default is "
                         "channels_last on every device); both: each case in each format")
    args = ap.parse_args()
    os.environ.setdefault("KACL_NO_PROGRESS", "1")
    device = resolve_device(args.device)
    amp = not args.no_amp
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads)"
    print(f"train_bench: {name}, store {args.store_size} px, batch {args.batch}, "
          f"{args.batches} batches, workers {args.workers}, amp {amp and device.type == 'cuda'}, "
          f"load {os.getloadavg()[0]:.1f}")
    threads = torch.get_num_threads()
    for r in range(args.repeats):
        # Loader alone, one core (one thread, no workers): the per-core rate.
        torch.set_num_threads(1)
        items, batched = loader_rates(args.loader_size, args.store_size, args.batch,
                                      args.batch * args.batches, device)
        torch.set_num_threads(threads)
        print(f"run {r + 1} loader {args.loader_size} px, 1 core: before {items:7.0f} img/s  "
              f"batched {batched:7.0f} img/s  batched/before {batched / items:5.2f}x", flush=True)
        formats = (["channels_last", "contiguous"] if args.memory_format == "both"
                   else [args.memory_format])
        for case, fmt in ((c, f) for c in args.cases.split(",") for f in formats):
            backbone, size = case.split(":")
            last = fmt == "channels_last"
            pure = pure_rate(backbone, int(size), args.batch, args.batches, device, amp, last)
            # The store holds the training size, as in the demo (`prepare --size 64`).
            loops = {p: fit_rate(backbone, int(size), int(size), args.batch, args.batches,
                                 args.device, args.workers, amp, p, last)
                     for p in ("items", "batched")}
            (_, before), (first, batched) = loops["items"], loops["batched"]
            print(f"run {r + 1} {backbone:<11} {size:>4} px {fmt:<13}: model {pure:7.1f} img/s  "
                  "pretrain (epoch 2) "
                  f"before {before:7.1f} ({before / pure:4.2f}x)  batched "
                  f"{batched:7.1f} ({batched / pure:4.2f}x of model; data "
                  f"path {100 * max(0.0, 1 - batched / pure):.0f}% of step time; epoch 1 "
                  f"{first / pure:4.2f}x)", flush=True)


if __name__ == "__main__":
    main()
