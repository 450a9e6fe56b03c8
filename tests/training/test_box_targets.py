"""GT boxes as a training extra: catalog -> store pixels, and through each view's warp on
both data paths (items and batched), flips included."""

from __future__ import annotations

import numpy as np
import torch

from kacl_cli.findings import FINDINGS
from kacl_cli.training.augment import AugmentConfig
from kacl_cli.training.batches import DeviceBatches
from kacl_cli.training.box_targets import BOX_KEY, gt_box_array, to_input_frame
from kacl_cli.training.loader import StoreDataset, load_split

CPU = torch.device("cpu")
FLIP_ONLY = AugmentConfig(rotate_deg=0.0, scale=(1.0, 1.0), translate=0.0, brightness=0.0,
                          contrast=0.0, hflip_p=1.0)


def test_gt_box_array_scales_to_store_pixels_and_skips_unsupervised(tiny_workspace) -> None:
    ws = tiny_workspace(n=16, size=32, orig=256)
    rows = ws.catalog.query("SELECT image_id, finding, x, y, w, h FROM gt_boxes ORDER BY 1, 2")
    ids = sorted({r[0] for r in rows})
    chosen, other = ids[0], ids[1]
    arr = gt_box_array(ws, [other, chosen, "nope.png"], 32, {chosen})
    assert arr.shape == (3, len(FINDINGS), 4) and arr.dtype == np.float32
    assert np.isnan(arr[0]).all() and np.isnan(arr[2]).all()  # not supervised / no such id
    mine = [r for r in rows if r[0] == chosen]
    for _, finding, x, y, w, h in mine:
        np.testing.assert_allclose(arr[1, FINDINGS.index(finding)],
                                   np.array([x, y, w, h]) * 32 / 256, rtol=1e-5)
    assert np.isfinite(arr[1]).all(-1).sum() == len(mine)


def test_gt_box_array_merges_two_boxes_of_a_finding_into_their_envelope(tiny_workspace) -> None:
    ws = tiny_workspace(n=4, size=32, orig=256)
    with ws.catalog.connect() as con:
        con.execute("DELETE FROM gt_boxes")
        con.execute("INSERT INTO gt_boxes VALUES ('00000000_000.png', 'Mass', 8, 16, 8, 8), "
                    "('00000000_000.png', 'Mass', 64, 0, 16, 32)")
    arr = gt_box_array(ws, ["00000000_000.png"], 32, {"00000000_000.png"})
    np.testing.assert_allclose(arr[0, FINDINGS.index("Mass")], [1, 0, 9, 4])


def _bright_rect_dataset(ws, side: int, box: tuple[float, float, float, float],
                         cfg: AugmentConfig, augment: bool = True) -> StoreDataset:
    """Every train image black with a white rectangle at ``box`` (store pixels); the same box
    as finding 0's extra, NaN for the others."""
    split = load_split(ws, "train")
    size = ws.store.image_size()
    img = np.zeros((len(split.rows) * 4, size, size), np.uint8)  # every store row
    x, y, w, h = (int(v) for v in box)
    img[:, y:y + h, x:x + w] = 255
    ws.store.write_images(0, img[: ws.catalog.count("images")], size)
    boxes = np.full((len(split.rows), len(FINDINGS), 4), np.nan, np.float32)
    boxes[:, 0] = box
    return StoreDataset(ws.store.path, split.rows, split.labels, augment=augment,
                        extras={BOX_KEY: boxes}, image_size=side, seed=1, augment_config=cfg)


def _bright_bbox(image: torch.Tensor) -> list[float]:
    ys, xs = np.nonzero(image.squeeze().numpy() > 0.5)
    return [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]


def test_a_flipped_image_has_its_box_flipped_on_both_data_paths(tiny_workspace) -> None:
    ws = tiny_workspace(n=8, size=32)
    ds = _bright_rect_dataset(ws, 16, (4, 8, 8, 6), FLIP_ONLY)
    # store 32 -> 16 px halves the box (2, 4, 4, 3); the flip mirrors x: 16 - 2 - 4 = 10
    want = torch.tensor([10.0, 4.0, 4.0, 3.0])
    item = ds[0]
    torch.testing.assert_close(item[BOX_KEY][0], want)
    assert torch.isnan(item[BOX_KEY][1:]).all()
    assert _bright_bbox(item["image"]) == want.tolist()  # the pixels moved the same way
    batches = DeviceBatches(ds, None, 3, CPU, workers=0)
    batches.set_epoch(0)
    seen = 0
    for b in batches:
        for k in range(len(b["index"])):
            torch.testing.assert_close(b[BOX_KEY][k, 0], want)
            assert _bright_bbox(b["image"][k]) == want.tolist()
            seen += 1
    assert seen == len(ds)


def test_without_augmentation_boxes_only_follow_the_resize(tiny_workspace) -> None:
    ws = tiny_workspace(n=8, size=32)
    ds = _bright_rect_dataset(ws, 16, (4, 8, 8, 6), FLIP_ONLY, augment=False)
    torch.testing.assert_close(ds[1][BOX_KEY][0], torch.tensor([2.0, 4.0, 4.0, 3.0]))


def test_items_and_batches_give_the_same_boxes_under_full_augmentation(tiny_workspace) -> None:
    ws = tiny_workspace(n=16, size=32)
    cfg = AugmentConfig(rotate_deg=20.0, translate=0.1, hflip_p=0.5)
    ds = _bright_rect_dataset(ws, 24, (6, 10, 10, 8), cfg)
    ds.set_epoch(3)
    batches = DeviceBatches(ds, None, 4, CPU, workers=0)
    batches.set_epoch(3)
    flipped = 0
    for b in batches:
        for k, i in enumerate(b["index"].tolist()):
            item_box = ds[i][BOX_KEY][0]
            torch.testing.assert_close(b[BOX_KEY][k, 0], item_box)
            # the warped rectangle's pixels lie inside the warped box (one pixel of slack)
            x, y, w, h = _bright_bbox(b["image"][k])
            bx, by, bw, bh = item_box.tolist()
            assert bx - 1 <= x and by - 1 <= y and x + w <= bx + bw + 1 and y + h <= by + bh + 1
            flipped += int(b["affine"][k, 0, 0] < 0)
    assert 0 < flipped < len(ds)  # both orientations were exercised


def test_to_input_frame_keeps_nan_boxes_nan() -> None:
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.0], [float("nan")] * 4])
    affine = torch.tensor([[-1.0, 0.0, 10.0], [0.0, 1.0, 0.0]])
    out = to_input_frame(boxes, affine)
    torch.testing.assert_close(out[0], torch.tensor([6.0, 2.0, 3.0, 4.0]))
    assert torch.isnan(out[1]).all()
