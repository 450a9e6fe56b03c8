"""The papers' metrics (stages/evaluate/metrics.py, pure) against hand-computed cases and
sklearn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from kacl_cli.findings import FINDINGS
from kacl_cli.stages.evaluate.metrics import (
    IOU_THRESHOLDS,
    accuracy_at,
    bootstrap_aucs,
    compute_metrics,
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
    assert all(math.isnan(v) for v in percentile_ci(np.array([np.nan, np.inf])))
    # NaN resamples are left out, not counted as 0 or 1
    with_nan = np.concatenate([boot[:, 0], np.full(100, np.nan)])
    assert percentile_ci(with_nan) == percentile_ci(boot[:, 0])
    assert percentile_ci(np.arange(101.0)) == pytest.approx((2.5, 97.5))
    assert percentile_ci(np.arange(101.0), level=0.9) == pytest.approx((5.0, 95.0))


def _naive_bootstrap(labels: np.ndarray, probs: np.ndarray, n_boot: int, seed: int,
                     included: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The textbook bootstrap, one resample at a time: draw n image indices with replacement
    (the seeded Generator's ``integers(0, n, (n_boot, n))``, the draw the stage documents),
    sklearn's AUC of each finding on the drawn images that have a probability (NaN when the
    resample lacks a class), and the mean over ``included`` findings, NaN when any of them is
    NaN in that resample (such a resample has no mean AUC and leaves the mean's CI)."""
    n, n_f = labels.shape
    draws = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    aucs = np.full((n_boot, n_f), np.nan)
    for b, idx in enumerate(draws):
        for j in range(n_f):
            keep = idx[np.isfinite(probs[idx, j])]
            y = labels[keep, j]
            if y.any() and not y.all():
                aucs[b, j] = roc_auc_score(y, probs[keep, j])
    means = np.array([np.mean(r[included]) if np.isfinite(r[included]).all() else np.nan
                      for r in aucs])
    return aucs, means


def test_bootstrap_cis_equal_a_naive_resampling_reference() -> None:
    from kacl_cli.stages.evaluate.data import EvalData

    rng = np.random.default_rng(11)
    n, n_boot, seed = 40, 150, 5
    prevalence = np.linspace(0.1, 0.5, len(FINDINGS))
    labels = rng.random((n, len(FINDINGS))) < prevalence
    labels[:, 0] = False
    labels[[3, 17], 0] = True              # 2 positives: ~13% of resamples lack one
    labels[:, 6:] = False                  # no positive: AUC n/a, out of the mean
    probs = 1 / (1 + np.exp(-(labels * 1.2 + rng.normal(0, 1, labels.shape))))
    probs = np.round(probs, 2)             # ties
    probs[[5, 9, 30], 4] = np.nan          # no probability for one finding: left out of it
    probs[21, :] = np.nan                  # no cam rows at all for one image
    data = EvalData(round=0, split="test", image_ids=np.array([f"{i}.png" for i in range(n)]),
                    rows=np.arange(n), orig_size=np.full((n, 2), 256.0), labels=labels,
                    probs=probs, pred=np.full((n, len(FINDINGS), 4), np.nan))
    doc = compute_metrics(data, n_boot=n_boot, seed=seed)
    cls = doc["classification"]
    included = list(range(6))
    aucs, means = _naive_bootstrap(labels, probs, n_boot, seed, included)
    assert 0.05 * n_boot < np.isnan(aucs[:, 0]).sum() < 0.3 * n_boot  # the rule is exercised
    for j, row in enumerate(cls["findings"]):
        keep = np.isfinite(probs[:, j])
        if j >= 6:
            assert row["auc"] is None and row["ci_low"] is None and row["ci_high"] is None
            continue
        assert row["auc"] == pytest.approx(roc_auc_score(labels[keep, j], probs[keep, j]))
        finite = aucs[:, j][np.isfinite(aucs[:, j])]
        assert row["n_boot_valid"] == len(finite)
        lo, hi = np.percentile(finite, [2.5, 97.5])
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((lo, hi), abs=1e-12), FINDINGS[j]
        assert row["ci_low"] <= row["auc"] <= row["ci_high"]
    assert cls["excluded_findings"] == list(FINDINGS[6:]) and cls["n_findings_in_mean"] == 6
    assert cls["mean_auc"] == pytest.approx(np.mean([cls["findings"][j]["auc"]
                                                      for j in included]))
    valid = means[np.isfinite(means)]
    assert cls["mean_auc_boot_valid"] == len(valid) < np.isfinite(aucs[:, 0]).sum()
    assert cls["mean_auc_ci"] == pytest.approx(list(np.percentile(valid, [2.5, 97.5])),
                                               abs=1e-12)
    # the rule matters: averaging whatever findings a resample has would give another CI
    nanmeans = np.nanmean(aucs[:, included], axis=1)
    assert cls["mean_auc_ci"] != pytest.approx(list(np.percentile(nanmeans, [2.5, 97.5])),
                                               abs=1e-4)
