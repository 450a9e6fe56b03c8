"""Torch datasets over the workspace: split lists from the catalog, pixels from ``store.h5``.

Items are read through :class:`kacl_cli.store.ImageReader`, which opens the HDF5 file once per
worker process. Augmentation (:mod:`kacl_cli.training.gpu_augment`) is seeded by
(seed, epoch, index, view), so an epoch's images do not depend on the number of workers and
a resumed run sees exactly the images an uninterrupted one would. Training uses the batched
path over the same dataset (:mod:`kacl_cli.training.batches`); items serve ``cam``, tests
and ``TrainConfig(data_path="items")``, with the same pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from kacl_cli.catalog import quote_ident
from kacl_cli.findings import FINDINGS
from kacl_cli.store import ImageReader
from kacl_cli.training.augment import AugmentConfig
from kacl_cli.training.box_targets import BOX_KEY, to_input_frame
from kacl_cli.training.gpu_augment import augment_batch, draw_params, forward_affine, resize_batch

SPLITS = ("train", "val", "test")


@dataclass
class SplitData:
    """Images of one or more splits, in store-row order."""

    image_ids: list[str]
    rows: np.ndarray  # int64 [n], store rows
    labels: np.ndarray  # float32 [n, len(FINDINGS)], model-head order

    def __len__(self) -> int:
        return len(self.image_ids)


def load_split(ws, split: str | Sequence[str]) -> SplitData:
    """Image ids, store rows and 14-finding labels of ``split`` (one name or several)."""
    splits = [split] if isinstance(split, str) else list(split)
    cols = ", ".join(f"l.{quote_ident(f)}" for f in FINDINGS)
    marks = ", ".join("?" * len(splits))
    data = ws.catalog.query_df(
        f"SELECT i.image_id, i.row, {cols} FROM images i JOIN labels l USING (image_id) "
        f"WHERE i.split IN ({marks}) ORDER BY i.row",
        splits,
    )
    ids = [str(x) for x in data["image_id"]]
    labels = np.stack([np.asarray(data[f], dtype=np.float32) for f in FINDINGS], axis=1) \
        if ids else np.zeros((0, len(FINDINGS)), np.float32)
    return SplitData(ids, np.asarray(data["row"], dtype=np.int64), labels)


class StoreDataset(Dataset):
    """Items ``{"image", "labels", "row", *extras, ["image2"]}`` for rows of the store.

    ``image`` is 1 x S x S: uint8 without augmentation (cheap to move), float in 0..1 with it
    (what :func:`kacl_cli.models.checkpoint.preprocess` takes either way). ``image_size``
    resizes in the worker (antialiased) so augmentation runs at the training size, not the
    store's. ``views=2`` adds ``image2``, an independently augmented second view.
    Call :meth:`set_epoch` before each epoch's DataLoader iterator is created.
    """

    def __init__(
        self,
        store_path: Path | str,
        rows: np.ndarray,
        labels: np.ndarray,
        *,
        augment: bool,
        extras: dict[str, np.ndarray] | None = None,
        views: int = 1,
        image_size: int | None = None,
        seed: int = 0,
        augment_config: AugmentConfig | None = None,
    ):
        self.reader = ImageReader(Path(store_path))
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.float32)
        if len(self.labels) != len(self.rows):
            raise ValueError("rows and labels differ in length")
        self.extras = {k: np.asarray(v) for k, v in (extras or {}).items()}
        for key, arr in self.extras.items():
            if len(arr) != len(self.rows):
                raise ValueError(f"extra {key!r} has {len(arr)} rows, expected {len(self.rows)}")
        if views not in (1, 2):
            raise ValueError("views must be 1 or 2")
        self.augment = augment
        self.views = views
        self.image_size = image_size
        self.seed = seed
        self.epoch = 0
        self.augment_config = augment_config or AugmentConfig()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def _view(self, raw: torch.Tensor, index: int, view: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """One view of a 1 x S x S uint8 image and its 2 x 3 forward affine: the batched
        path's function on a batch of one (so items and batches hold the same pixels)."""
        side = int(self.image_size or raw.shape[-1])
        if not self.augment:
            return (resize_batch(raw[None], side)[0],
                    torch.from_numpy(forward_affine(None, 1, raw.shape[-1], side)[0]).float())
        params = draw_params(self.seed, self.epoch, [index], view, side, self.augment_config)
        image, affine = augment_batch(raw[None], params, side)
        return image[0], affine[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        raw = torch.from_numpy(np.ascontiguousarray(self.reader[self.rows[index]])).unsqueeze(0)
        image, affine = self._view(raw, index, 0)
        item = {
            "image": image,
            "labels": torch.from_numpy(self.labels[index]),
            "row": torch.tensor(int(self.rows[index])),
        }
        if self.views == 2:
            item["image2"] = self._view(raw, index, 1)[0]
        for key, arr in self.extras.items():
            item[key] = torch.as_tensor(arr[index])
        if BOX_KEY in item:  # store pixels -> this view's pixels (kacl_cli.training.box_targets)
            item[BOX_KEY] = to_input_frame(item[BOX_KEY], affine)
        return item


def data_fingerprint(ws, splits: Sequence[str] = ("train", "val")) -> str:
    """Identity of the training data: ids, rows, splits and labels of ``splits`` plus the
    store's image shape. Not the store file's size or mtime: ``cam`` adds maps to the same
    file, and that must not make a finished ``pretrain`` look stale.
    """
    import hashlib

    cols = ", ".join(f"l.{quote_ident(f)}" for f in FINDINGS)
    marks = ", ".join("?" * len(splits))
    rows = ws.catalog.query(
        f"SELECT i.image_id, i.row, i.split, {cols} FROM images i JOIN labels l "
        f"USING (image_id) WHERE i.split IN ({marks}) ORDER BY i.row",
        list(splits),
    )
    h = hashlib.sha256()
    for r in rows:
        h.update(("|".join(str(v) for v in r) + "\n").encode())
    with ws.store.open("r") as f:
        shape = tuple(f["images"].shape) if "images" in f else ()
    h.update(str(shape).encode())
    return f"n={len(rows)};shape={'x'.join(map(str, shape))};sha={h.hexdigest()[:16]}"
