"""The papers' metrics (stages/evaluate/metrics.py, pure) against hand-computed cases and
sklearn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from kacl_cli.stages.evaluate.metrics import (
    IOU_THRESHOLDS,
    accuracy_at,
    bootstrap_aucs,
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
