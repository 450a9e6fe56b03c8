"""The batched data path: uint8 batches from the store, resize + augmentation on the device.

Why: the item path (:class:`kacl_cli.training.loader.StoreDataset` through a DataLoader)
resizes and augments image by image in worker processes, collates, and re-creates its
workers every epoch; on a GPU it cannot feed the model, and on the CPU it costs a large
share of a small net's step. Here

- a DataLoader's workers (or the main process) read **whole batches**: the batch's store
  rows in ascending order (one chunk read each, following the file), uint8, with labels,
  rows, indices and every per-image ``extras`` array of the dataset (box coordinates, masks,
  radiomics vectors: whatever ``StoreDataset(extras=...)`` holds comes through unchanged,
  except ``box``: GT boxes in store pixels, moved through the first view's affine into the
  training image's pixels, as the item path does; :mod:`kacl_cli.training.box_targets`);
- the workers are persistent across epochs (each batch key carries its epoch), so an epoch
  starts without spawning processes;
- the uint8 batch goes to the device (pinned, non-blocking on CUDA: 4x fewer bytes than
  float), where :func:`kacl_cli.training.gpu_augment.augment_batch` resizes and augments it
  in a few batched kernels. On the CPU with workers the same function runs in the workers
  instead, overlapping the model's step; the pixels are the same either way.

Each batch is ``{"image", "labels", "row", "index", "affine", *extras, ["image2",
"affine2"]}``: ``image`` B x 1 x s x s float in 0..1 (what ``preprocess`` takes),
``affine`` the B x 2 x 3 forward matrices (store pixels -> augmented pixels) for box terms.
An epoch's images depend only on (seed, epoch, index, view): not on the worker count, the
batch size or the device placement of the augmentation (tested).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, Subset

from kacl_cli.training.box_targets import BOX_KEY, to_input_frame
from kacl_cli.training.gpu_augment import augment_batch, draw_params
from kacl_cli.training.loader import StoreDataset


def unwrap(dataset: Dataset) -> StoreDataset | None:
    """The :class:`StoreDataset` behind ``dataset`` (a ``Subset`` of one is sliced), or None."""
    if isinstance(dataset, StoreDataset):
        return dataset
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, StoreDataset):
        base, idx = dataset.dataset, np.asarray(dataset.indices, dtype=np.int64)
        sub = StoreDataset(base.reader.path, base.rows[idx], base.labels[idx],
                           augment=base.augment,
                           extras={k: v[idx] for k, v in base.extras.items()},
                           views=base.views, image_size=base.image_size, seed=base.seed,
                           augment_config=base.augment_config)
        sub.epoch = base.epoch
        return sub
    return None


class BatchReader(Dataset):
    """Map-style dataset whose keys are lists of item indices: one whole batch per call.

    With ``augment_here`` (CPU workers) the batch is also resized and augmented in the
    worker; otherwise it leaves as uint8 for the device.
    """

    def __init__(self, dataset: StoreDataset, augment_here: bool = False):
        self.dataset = dataset
        self.augment_here = augment_here

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, Any]) -> dict[str, torch.Tensor]:
        epoch, indices = key
        ds = self.dataset
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        rows = ds.rows[idx]
        batch: dict[str, torch.Tensor] = {
            "image": torch.from_numpy(ds.reader.batch(rows)),  # ascending-row chunk reads
            "labels": torch.from_numpy(ds.labels[idx]),
            "row": torch.from_numpy(rows),
            "index": torch.from_numpy(idx),
        }
        for key, arr in ds.extras.items():
            batch[key] = torch.as_tensor(arr[idx])
        if self.augment_here:
            batch = finish_batch(batch, ds, epoch)
        return batch


def finish_batch(batch: dict[str, torch.Tensor], ds: StoreDataset, epoch: int,
                 idx: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """Resize + augment ``batch["image"]`` (uint8, on its device) into the training views.

    ``idx``: the batch's item indices on the host (reading them back from the GPU would
    wait for the previous step's kernels)."""
    raw = batch["image"]
    if raw.dtype != torch.uint8:  # already finished (in a worker)
        return batch
    side = int(ds.image_size or raw.shape[-1])
    idx = batch["index"].cpu().numpy() if idx is None else idx
    for view, (key, akey) in enumerate((("image", "affine"), ("image2", "affine2"))[: ds.views]):
        params = (draw_params(ds.seed, epoch, idx, view, side, ds.augment_config)
                  if ds.augment else None)
        batch[key], batch[akey] = augment_batch(raw, params, side)
    if BOX_KEY in batch:  # GT boxes follow the first view's warp (kacl_cli.training.box_targets)
        batch[BOX_KEY] = to_input_frame(batch[BOX_KEY], batch["affine"])
    return batch


class _EpochBatches(Sampler[tuple[int, list[int]]]):
    """Batches of item indices, each keyed with the epoch: persistent workers that augment
    learn the epoch from the key, not from a dataset attribute frozen at their start."""

    def __init__(self, order: Any, batch_size: int, drop_last: bool):
        self.batches = BatchSampler(order, batch_size, drop_last)
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        return ((self.epoch, b) for b in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class DeviceBatches:
    """Iterable over one epoch's device batches of a :class:`StoreDataset`; reusable.

    ``sampler`` gives the item order (an :class:`EpochSampler` or its distributed twin; call
    its ``set_epoch`` and this object's :meth:`set_epoch` before iterating).
    """

    def __init__(self, dataset: StoreDataset, sampler: Sampler[int] | None, batch_size: int,
                 device: torch.device, workers: int = 0, drop_last: bool = False):
        self.dataset = dataset
        self.device = device
        self.epoch = 0
        order = sampler if sampler is not None else range(len(dataset))
        self.batch_sampler = _EpochBatches(order, batch_size, drop_last)
        # On the CPU, workers also augment (overlapping the model); on CUDA they only read.
        self.reader = BatchReader(dataset, augment_here=device.type == "cpu" and workers > 0)
        self.workers = workers
        self._loader: DataLoader | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.batch_sampler.epoch = int(epoch)
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def _make_loader(self) -> DataLoader:
        return DataLoader(
            self.reader, sampler=self.batch_sampler, batch_size=None,
            num_workers=self.workers, pin_memory=self.device.type == "cuda",
            persistent_workers=self.workers > 0,
            prefetch_factor=4 if self.workers else None,
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._loader is None:
            self._loader = self._make_loader()
        for batch in self._loader:
            idx = batch["index"].numpy()
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            yield finish_batch(batch, self.dataset, self.epoch, idx)


def device_batches(dataset: Dataset, sampler: Sampler[int] | None, batch_size: int,
                   device: torch.device, workers: int = 0, drop_last: bool = False
                   ) -> DeviceBatches | None:
    """A :class:`DeviceBatches` when ``dataset`` is (a subset of) a StoreDataset, else None
    (the caller keeps its item DataLoader)."""
    base = unwrap(dataset)
    if base is None:
        return None
    return DeviceBatches(base, sampler, batch_size, device, workers, drop_last)
