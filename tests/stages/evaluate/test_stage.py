"""The papers' metrics against hand-computed cases and sklearn, and the evaluate stage's data
rules (box-supervised images excluded, each GT box one pair, missing predictions wrong)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from kacl_cli.errors import NotReadyError
from kacl_cli.findings import BOX_FINDINGS, FINDINGS
from kacl_cli.stages.evaluate.stage import (
    IOBB_THRESHOLDS,
    IOU_THRESHOLDS,
    accuracy_at,
    bootstrap_aucs,
    compute_metrics,
    evaluate_round,
    headline,
    load_eval_data,
    pair_overlaps,
    percentile_ci,
    roc_auc,
    weighted_auc,
)


# -- geometry and the threshold rule ------------------------------------------------------------
def test_iou_and_iobb_hand_computed() -> None:
    gt = np.array([[5, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], float)
    pred = np.array([
        [0, 0, 10, 10],        # overlap 5 x 10 = 50; union 150; pred area 100
        [2, 2, 4, 4],          # inside the GT box: IoU 16/100, IoBB 1
        [20, 20, 5, 5],        # disjoint
        [np.nan] * 4,          # no predicted box
    ])
    iou, iobb = pair_overlaps(pred, gt)
    np.testing.assert_allclose(iou[:3], [50 / 150, 16 / 100, 0.0])
    np.testing.assert_allclose(iobb[:3], [0.5, 1.0, 0.0])
    assert np.isnan(iou[3]) and np.isnan(iobb[3])


def test_threshold_rule_is_strict_and_missing_prediction_is_wrong() -> None:
    overlaps = np.array([0.5, 0.2, np.nan, 0.7])
    acc = accuracy_at(overlaps, (0.1, 0.2, 0.5, 0.7))
    # T=0.1: 0.5, 0.2, 0.7 are > 0.1; T=0.2: 0.2 is not > 0.2; T=0.7: 0.7 is not > 0.7
    np.testing.assert_allclose(acc, [3 / 4, 2 / 4, 1 / 4, 0.0])
    # a box shifted by half its width has IoBB exactly 0.5: not a hit at T(IoBB) = 0.5, even
    # when floating-point round-off lands a hair above 0.5
    gt = np.array([[0.1, 0.3, 0.7, 0.9]])
    pred = gt + np.array([[0.35, 0, 0, 0]])
    _, iobb = pair_overlaps(pred, gt)
    assert iobb[0] == pytest.approx(0.5)
    assert accuracy_at(iobb, (0.25, 0.5)).tolist() == [1.0, 0.0]
    # no pairs: undefined, not 0
    assert np.isnan(accuracy_at(np.array([]), IOU_THRESHOLDS)).all()


# -- AUC and the bootstrap ------------------------------------------------------------------------
def test_auc_matches_sklearn_and_is_nan_with_one_class() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    s = np.round(y + rng.normal(0, 1, 200), 1)  # rounding makes ties
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert math.isnan(roc_auc(np.zeros(10, bool), rng.random(10)))
    s_nan = s.copy()
    s_nan[:20] = np.nan  # missing probabilities are left out
    assert roc_auc(y, s_nan) == pytest.approx(roc_auc_score(y[20:], s[20:]))


def test_weighted_auc_equals_sklearn_on_the_resample_it_stands_for() -> None:
    rng = np.random.default_rng(1)
    y = rng.random(60) < 0.4
    s = np.round(y * 0.5 + rng.random(60), 1)
    weights = rng.integers(0, 4, size=(5, 60))
    got = weighted_auc(y, s, weights)
    for b in range(5):
        expect = roc_auc_score(np.repeat(y, weights[b]), np.repeat(s, weights[b]))
        assert got[b] == pytest.approx(expect)
    one_class = weighted_auc(y, s, np.where(y, 0, 1)[None, :])
    assert np.isnan(one_class[0])


def test_bootstrap_ci_contains_estimate_and_is_seeded() -> None:
    rng = np.random.default_rng(2)
    n = 300
    y = rng.random((n, 3)) < np.array([0.1, 0.3, 0.5])
    s = y * 0.8 + rng.normal(0, 1, (n, 3))
    boot = bootstrap_aucs(y, s, 400, seed=7)
    assert boot.shape == (400, 3)
    for j in range(3):
        point = roc_auc(y[:, j], s[:, j])
        lo, hi = percentile_ci(boot[:, j])
        assert lo < point < hi
        assert hi - lo < 0.3
    np.testing.assert_array_equal(boot, bootstrap_aucs(y, s, 400, seed=7))
    assert not np.array_equal(boot, bootstrap_aucs(y, s, 400, seed=8))
    assert percentile_ci(np.array([np.nan])) != percentile_ci(boot[:, 0])


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
