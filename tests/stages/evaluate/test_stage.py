"""The evaluate stage's data rules on a tiny workspace (box-supervised images excluded, each GT
box one pair, missing predictions wrong), its metrics table, skip and force."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from kacl_cli.errors import NotReadyError
from kacl_cli.findings import BOX_FINDINGS, FINDINGS
from kacl_cli.stages.evaluate.data import load_eval_data
from kacl_cli.stages.evaluate.metrics import (
    IOBB_THRESHOLDS,
    IOU_THRESHOLDS,
    compute_metrics,
)
from kacl_cli.stages.evaluate.stage import evaluate_round, headline


# -- the stage's data rules on a tiny workspace --------------------------------------------------
@pytest.fixture
def evaluated(tiny_workspace, fakes):
    """A tiny workspace with one fake round, a duplicate GT box and one box-supervised image."""
    ws = tiny_workspace(n=48, size=32)
    kinds = fakes.write_fake_round(ws, 0)
    test_gt = ws.catalog.query(
        "SELECT g.image_id, g.finding, g.x, g.y, g.w, g.h FROM gt_boxes g JOIN images i "
        "USING (image_id) WHERE i.split = 'test' ORDER BY g.image_id, g.finding")
    dup_image, dup_finding = test_gt[0][:2]          # a second, far-away box: IoU 0 with pred
    supervised = test_gt[-1][0]
    with ws.catalog.connect() as con:
        con.execute("INSERT INTO gt_boxes VALUES (?, ?, 250, 250, 5, 5)", [dup_image, dup_finding])
        con.execute("INSERT INTO box_supervision VALUES (?, 0, 0.8, 'test')", [supervised])
    return ws, kinds, test_gt, (dup_image, dup_finding), supervised


def test_localization_pairs_and_accuracy_by_hand(evaluated) -> None:
    ws, kinds, test_gt, dup, supervised = evaluated
    data = load_eval_data(ws, 0, "test")
    doc = compute_metrics(data, n_boot=0)
    kept = [(i, f) for i, f, *_ in test_gt if i != supervised]
    n_sup_boxes = sum(1 for i, *_ in test_gt if i == supervised)
    loc = doc["localization"]
    assert loc["n_pairs"] == len(kept) + 1           # every GT box is a pair (+ the duplicate)
    assert loc["n_excluded_images"] == 1 and loc["n_excluded_pairs"] == n_sup_boxes
    for row in loc["findings"]:
        pairs = [kinds[p] for p in kept if p[1] == row["finding"]]
        extra = 1 if row["finding"] == dup[1] else 0  # the far-away duplicate: always wrong
        n = len(pairs) + extra
        assert row["n"] == n
        if n == 0:
            assert all(a is None for a in row["acc_iou"])
            continue
        exact, shift = pairs.count("exact"), pairs.count("shift")
        assert row["n_missing"] == pairs.count("none")
        # exact: IoU 1 (a hit at every T); shifted by half a width: IoU 1/3, IoBB 1/2
        expect_iou = [(exact + shift * (t < 1 / 3)) / n for t in IOU_THRESHOLDS]
        expect_iobb = [(exact + shift * (t < 0.5)) / n for t in IOBB_THRESHOLDS]
        np.testing.assert_allclose(row["acc_iou"], expect_iou)
        np.testing.assert_allclose(row["acc_iobb"], expect_iobb)
        assert row["mean_iou"] == pytest.approx((exact + shift / 3) / n)
    per_t = [np.mean([r["acc_iou"][t] for r in loc["findings"] if r["n"]])
             for t in range(len(IOU_THRESHOLDS))]
    assert loc["mean_loc_acc"] == pytest.approx(np.mean(per_t))
    assert any("box_supervision" in note for note in doc["notes"])


def test_auc_from_cam_boxes_probabilities(evaluated) -> None:
    ws = evaluated[0]
    doc = compute_metrics(load_eval_data(ws, 0, "test"), n_boot=0)
    rows = ws.catalog.query(
        "SELECT c.finding, c.probability, l.* FROM cam_boxes c JOIN images i USING (image_id) "
        "JOIN labels l USING (image_id) WHERE i.split = 'test' AND c.round = 0 "
        "AND i.image_id NOT IN (SELECT image_id FROM box_supervision) ORDER BY c.image_id")
    assert doc["n_images"] == len({r[2] for r in rows})  # the supervised image is out
    cols = ["finding", "p", "image_id", *FINDINGS]
    defined = []
    for c in doc["classification"]["findings"]:
        sel = [r for r in rows if r[0] == c["finding"]]
        y = np.array([r[cols.index(c["finding"])] for r in sel], bool)
        p = np.array([r[1] for r in sel])
        if y.all() or not y.any():
            assert c["auc"] is None
            assert c["finding"] in doc["classification"]["excluded_findings"]
        else:
            assert c["auc"] == pytest.approx(roc_auc_score(y, p))
            defined.append(c["auc"])
    assert doc["classification"]["mean_auc"] == pytest.approx(np.mean(defined))
    assert headline(ws, 0, "test") == pytest.approx(doc["headline"])


def test_stage_writes_metrics_replaces_them_and_skips(evaluated, fakes) -> None:
    ws = evaluated[0]
    doc = evaluate_round(ws, 0, n_boot=20, overlays=0)
    assert not doc["skipped"]
    n_rows = ws.catalog.count("metrics", "round = 0 AND split = 'test'")
    n_auc = ws.catalog.count("metrics", "metric = 'auc'")
    n_iou = ws.catalog.count("metrics", "metric = 'loc_acc_iou'")
    assert (n_auc, n_iou) == (len(FINDINGS), len(BOX_FINDINGS) * len(IOU_THRESHOLDS))
    (value,), = ws.catalog.query("SELECT value FROM metrics WHERE metric = 'mean_loc_acc'")
    assert value == pytest.approx(doc["headline"]["mean_loc_acc"])
    assert evaluate_round(ws, 0, n_boot=20, overlays=0)["skipped"]
    again = evaluate_round(ws, 0, n_boot=20, overlays=0, force=True)
    assert not again["skipped"]
    assert ws.catalog.count("metrics", "round = 0 AND split = 'test'") == n_rows
    assert ws.catalog.count("metrics", "run_id = ?", [again["run_id"]]) == n_rows
    # new probabilities (a re-trained round's cam run) change the fingerprint: re-evaluated
    fakes.write_fake_round(ws, 0, seed=5)
    assert not evaluate_round(ws, 0, n_boot=20, overlays=0)["skipped"]


def test_missing_cams_without_checkpoint_is_a_clear_error(tiny_workspace) -> None:
    ws = tiny_workspace(n=8, size=32)
    with pytest.raises(NotReadyError, match="no cam_boxes for round 3"):
        evaluate_round(ws, 3, n_boot=0)


def test_images_without_cam_rows_are_left_out_and_said(tiny_workspace, fakes) -> None:
    ws = tiny_workspace(n=48, size=32)
    fakes.write_fake_round(ws, 0, with_cams=False)
    (gone,), = ws.catalog.query("SELECT min(image_id) FROM images WHERE split = 'test'")
    ws.catalog.execute("DELETE FROM cam_boxes WHERE image_id = ?", [gone])
    data = load_eval_data(ws, 0, "test")
    doc = compute_metrics(data, n_boot=0)
    assert data.n_missing_cam_images == 1
    assert all(c["n"] == doc["n_images"] - 1 for c in doc["classification"]["findings"])
    assert any("no cam_boxes rows" in note for note in doc["notes"])


def test_every_image_of_a_box_supervision_patient_leaves_evaluation(evaluated) -> None:
    """The leak: a follow-up (no boxes) of a supervised patient must leave the AUC set too."""
    ws, _kinds, test_gt, _dup, supervised = evaluated
    before = load_eval_data(ws, 0, "test")
    boxed = {i for i, *_ in test_gt}
    follow_up = next(i for i in before.image_ids.tolist() if i not in boxed)
    with ws.catalog.connect() as con:
        con.execute("UPDATE images SET patient_id = (SELECT patient_id FROM images WHERE "
                    "image_id = ?) WHERE image_id = ?", [supervised, follow_up])
    after = load_eval_data(ws, 0, "test")
    assert follow_up not in after.image_ids.tolist()
    assert len(after.image_ids) == len(before.image_ids) - 1
    assert after.n_excluded_images == before.n_excluded_images + 1 == 2
    doc = compute_metrics(after, n_boot=0)
    assert any(n.startswith("2 image(s)") and "chosen patients" in n for n in doc["notes"])
    # the grid ceiling sits beside the mean IoU of every finding with pairs
    rows = [r for r in doc["localization"]["findings"] if r["n"]]
    assert rows and all(r["ceiling_iou"] is not None and r["ceiling_iou"] >= 0 for r in rows)
