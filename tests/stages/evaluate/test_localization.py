"""Localization across stages with a known answer: the real cam stage, then evaluate.

A hand-set net (``tests/square_model.py``) lights map cells x 2-3, y 3-4 for Atelectasis,
Cardiomegaly and Effusion on images that are bright there, so every predicted box is known in
each image's ORIGINAL pixels. The images' original sizes are non-square and differ, so a frame
mismatch between cam (map -> original) and evaluate (GT in original pixels), a swapped axis or
a box left in store pixels changes the hits below. Unlike the other evaluate tests, no cam
row is written by hand.
"""

from __future__ import annotations

import numpy as np
import pytest

from kacl_cli.boxes import iobb, iou
from kacl_cli.findings import BOX_FINDINGS, FINDINGS
from kacl_cli.stages.evaluate.metrics import IOBB_THRESHOLDS, IOU_THRESHOLDS
from kacl_cli.stages.evaluate.stage import evaluate_round

LIT = [0, 1, 2]                                   # Atelectasis, Cardiomegaly, Effusion
SIZES = [(1000, 600), (480, 900), (700, 701)]     # original (width, height), by test image


@pytest.fixture
def evaluated(tiny_workspace, square):
    ws = tiny_workspace(n=12, size=64)            # splits cycle train/train/val/test
    images = np.stack([square.square_image(64, 64) for _ in range(12)])
    ws.store.write_images(0, images, 64)
    test = [r[0] for r in ws.catalog.query(
        "SELECT image_id FROM images WHERE split = 'test' ORDER BY row")]
    assert len(test) == len(SIZES)
    want = {image_id: square.expected_box(w, h) for image_id, (w, h) in zip(test, SIZES,
                                                                             strict=True)}
    a, c, e = test
    w2, h2 = SIZES[2]
    x, y, bw, bh = want[c]
    gt = [
        (a, "Atelectasis", *want[a]),                    # the predicted box: IoU 1
        (c, "Cardiomegaly", x + bw / 2, y, bw, bh),      # shifted half a width: IoU 1/3
        (e, "Effusion", 0.0, 0.0, w2 / 10, h2 / 10),     # the opposite corner: IoU 0
        (a, "Mass", *want[a]),                           # Mass is not lit: no box, wrong
        (c, "Atelectasis", x, y, bw / 2, bh / 2),        # inside the predicted box
    ]
    with ws.catalog.connect() as con:
        for image_id, (w, h) in zip(test, SIZES, strict=True):
            con.execute("UPDATE images SET orig_width = ?, orig_height = ? WHERE image_id = ?",
                        [w, h, image_id])
        con.execute("DELETE FROM gt_boxes")
        con.executemany("INSERT INTO gt_boxes VALUES (?, ?, ?, ?, ?, ?)", gt)
    square.save_square_checkpoint(ws.checkpoint_dir(0), lit=LIT)
    doc = evaluate_round(ws, 0, n_boot=0, overlays=0, device="cpu")
    return ws, doc, want, gt


def test_cam_boxes_are_the_lit_square_in_original_pixels(evaluated) -> None:
    ws, _, want, _ = evaluated
    rows = ws.catalog.query(
        "SELECT image_id, finding, x, y, w, h, reason FROM cam_boxes WHERE round = 0")
    assert {r[0] for r in rows} == set(want)  # evaluate ran the cam stage on the test split
    assert len(rows) == len(want) * len(FINDINGS)
    for image_id, finding, x, y, w, h, reason in rows:
        if FINDINGS.index(finding) in LIT:
            assert (x, y, w, h) == pytest.approx(want[image_id]), (image_id, finding)
            assert reason is None
        else:
            assert x is None and reason


def test_evaluate_scores_the_known_boxes(evaluated) -> None:
    _, doc, want, gt = evaluated
    loc = {r["finding"]: r for r in doc["localization"]["findings"]}
    assert doc["localization"]["n_pairs"] == len(gt)
    assert doc["localization"]["n_missing_pred"] == 1           # Mass
    # by hand: Atelectasis pairs IoU 1 and 1/4 (a quarter-size box in the corner), IoBB 1, 1/4
    at = loc["Atelectasis"]
    assert at["n"] == 2 and at["mean_iou"] == pytest.approx((1 + 0.25) / 2)
    assert at["mean_iobb"] == pytest.approx((1 + 0.25) / 2)
    assert at["acc_iou"] == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5])
    assert at["acc_iobb"] == pytest.approx([1.0, 0.5, 0.5, 0.5, 0.5])
    # Cardiomegaly: shifted by half a width -> IoU 1/3, IoBB exactly 1/2 (not > 0.5)
    ca = loc["Cardiomegaly"]
    assert ca["mean_iou"] == pytest.approx(1 / 3) and ca["mean_iobb"] == pytest.approx(0.5)
    assert ca["acc_iou"] == pytest.approx([1, 1, 1, 0, 0, 0, 0])
    assert ca["acc_iobb"] == pytest.approx([1, 1, 0, 0, 0])
    ef = loc["Effusion"]
    assert ef["mean_iou"] == 0.0 and ef["acc_iou"] == [0.0] * len(IOU_THRESHOLDS)
    ma = loc["Mass"]
    assert ma["n_missing"] == 1 and ma["acc_iobb"] == [0.0] * len(IOBB_THRESHOLDS)
    for f in BOX_FINDINGS:
        if f not in ("Atelectasis", "Cardiomegaly", "Effusion", "Mass"):
            assert loc[f]["n"] == 0 and loc[f]["acc_iou"] == [None] * len(IOU_THRESHOLDS)
    # the means over the four findings with pairs
    per = np.array([at["acc_iou"], ca["acc_iou"], ef["acc_iou"], ma["acc_iou"]])
    assert doc["localization"]["mean_acc_iou"] == pytest.approx(per.mean(axis=0).tolist())
    assert doc["headline"]["mean_loc_acc"] == pytest.approx(per.mean())
    # every image gets the same probabilities (one square), so each AUC is exactly 0.5
    assert doc["headline"]["mean_auc"] == pytest.approx(0.5)


def test_the_hand_numbers_are_the_geometry(square) -> None:
    """The overlaps used above, recomputed from the boxes (guards the test's arithmetic)."""
    x, y, w, h = pred = square.expected_box(480, 900)
    assert pred == (120.0, 337.5, 120.0, 225.0)
    np.testing.assert_allclose(iou(np.array(pred), np.array([x, y, w / 2, h / 2])), 0.25)
    np.testing.assert_allclose(iobb(np.array(pred), np.array([x, y, w / 2, h / 2])), 0.25)
    np.testing.assert_allclose(iou(np.array(pred), np.array([x + w / 2, y, w, h])), 1 / 3)
    np.testing.assert_allclose(iobb(np.array(pred), np.array([x + w / 2, y, w, h])), 0.5)
