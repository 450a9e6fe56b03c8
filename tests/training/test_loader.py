"""Split loading, the store dataset, augmentation determinism and the data fingerprint."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from kacl_cli.findings import FINDINGS
from kacl_cli.training.augment import AugmentConfig, augment_image, item_generator
from kacl_cli.training.loader import StoreDataset, data_fingerprint, load_split


def test_load_split_matches_catalog(tiny_workspace) -> None:
    ws = tiny_workspace(n=16, size=32)
    train = load_split(ws, "train")
    assert list(train.rows) == [i for i in range(16) if i % 4 in (0, 1)]
    assert train.labels.shape == (8, 14) and train.labels.dtype == np.float32
    for row, lab in zip(train.rows, train.labels, strict=True):
        assert lab[row % 14] == 1
        assert lab[FINDINGS.index("Effusion")] == (1 if row % 3 == 0 or row % 14 == 2 else 0)
    both = load_split(ws, ["train", "val"])
    assert len(both) == 12 and list(both.rows) == sorted(both.rows)
    assert len(load_split(ws, "nosuchsplit")) == 0


def test_dataset_items(tiny_workspace) -> None:
    ws = tiny_workspace(n=8, size=32)
    split = load_split(ws, "train")
    extras = {"radiomics": np.arange(len(split) * 3, dtype=np.float32).reshape(-1, 3)}
    ds = StoreDataset(ws.store.path, split.rows, split.labels, augment=False, extras=extras)
    item = ds[1]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (1, 32, 32)
    assert np.array_equal(item["image"][0].numpy(), ws.store.read_images([split.rows[1]])[0])
    assert int(item["row"]) == split.rows[1]
    assert torch.equal(item["labels"], torch.from_numpy(split.labels[1]))
    assert torch.equal(item["radiomics"], torch.tensor([3.0, 4.0, 5.0]))
    small = StoreDataset(ws.store.path, split.rows, split.labels, augment=False, image_size=16)
    assert small[0]["image"].shape == (1, 16, 16)


def test_augmentation_is_seeded_by_epoch_and_index(tiny_workspace) -> None:
    ws = tiny_workspace(n=8, size=32)
    split = load_split(ws, "train")
    ds = StoreDataset(ws.store.path, split.rows, split.labels, augment=True, views=2, seed=5)
    a = ds[0]
    assert a["image"].dtype == torch.float32 and 0 <= a["image"].min() <= a["image"].max() <= 1
    assert torch.equal(ds[0]["image"], a["image"])  # same epoch, same item: same pixels
    assert not torch.equal(a["image"], a["image2"])  # two independent views
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], a["image"])


def test_workers_do_not_change_the_batches(tiny_workspace) -> None:
    ws = tiny_workspace(n=8, size=32)
    split = load_split(ws, "train")
    ds = StoreDataset(ws.store.path, split.rows, split.labels, augment=True, seed=1)
    ds.set_epoch(3)
    inproc = next(iter(DataLoader(ds, batch_size=4)))["image"]
    workers = next(iter(DataLoader(ds, batch_size=4, num_workers=2)))["image"]
    assert torch.equal(inproc, workers)


def test_zero_strength_augmentation_is_identity() -> None:
    x = torch.rand(1, 24, 24)
    cfg = AugmentConfig(rotate_deg=0, scale=(1, 1), translate=0, brightness=0, contrast=0)
    torch.testing.assert_close(augment_image(x, item_generator(0, 0, 0), cfg), x)


def test_default_augmentation_never_flips() -> None:
    """A left-heavy image stays left-heavy under every default augmentation."""
    x = torch.zeros(1, 32, 32)
    x[:, :, :10] = 1.0
    for i in range(20):
        y = augment_image(x, item_generator(0, 0, i))
        assert y[..., :16].sum() > 3 * y[..., 16:].sum()


def test_fingerprint_tracks_labels_not_cams(tiny_workspace) -> None:
    ws = tiny_workspace(n=8, size=32)
    fp = data_fingerprint(ws)
    ws.store.write_cams(0, np.arange(8), np.zeros((8, 14, 4, 4)), 8)
    assert data_fingerprint(ws) == fp
    ws.catalog.execute('UPDATE labels SET "Hernia" = NOT "Hernia" WHERE image_id = ?',
                       ["00000000_000.png"])
    assert data_fingerprint(ws) != fp
