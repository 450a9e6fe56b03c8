"""Paired bootstrap (kacl compare / kacl study) against a naive per-resample sklearn reference."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from kacl_cli.findings import BOX_FINDINGS, FINDINGS
from kacl_cli.stages.evaluate.data import EvalData
from kacl_cli.stages.evaluate.metrics import IOU_THRESHOLDS
from kacl_cli.stages.evaluate.paired import (
    CompareError,
    Paired,
    excludes_zero,
    pair_eval,
    paired_bootstrap,
    pooled_bootstrap,
)


def _paired(n: int = 60, seed: int = 0, shift: float = 0.0) -> Paired:
    rng = np.random.default_rng(seed)
    F = len(FINDINGS)
    labels = rng.random((n, F)) < 0.3
    labels[0], labels[1] = True, False  # both classes in every finding
    pa = labels * 0.4 + rng.random((n, F))
    pb = labels * (0.4 + shift) + rng.random((n, F))
    m = 25
    pi = rng.integers(0, n, m)
    pf = rng.integers(0, len(BOX_FINDINGS), m)
    ia = rng.random(m)
    ib = rng.random(m)
    ia[3] = np.nan  # a missing prediction counts as 0 / wrong
    return Paired(np.array([f"i{k}" for k in range(n)], dtype=object), labels, pa, pb, pi, pf,
                  ia, ib)


def _naive(p: Paired, n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """sklearn's AUC on index copies of each resample, drawn exactly as bootstrap_weights."""
    n = len(p.image_ids)
    rng = np.random.default_rng(seed)
    idx_all = rng.integers(0, n, size=(n_boot, n))
    out: dict[str, list[float]] = {"mean_auc": [], "mean_iou": [], "loc_acc": []}
    for idx in idx_all:
        deltas = []
        for j in range(len(FINDINGS)):
            y = p.labels[idx, j]
            if y.all() or not y.any():
                deltas.append(np.nan)
                continue
            deltas.append(roc_auc_score(y, p.probs_a[idx, j]) - roc_auc_score(y, p.probs_b[idx, j]))
        out["mean_auc"].append(np.mean(deltas))
        counts = np.bincount(idx, minlength=n)
        w = counts[p.pair_image].astype(float)
        ia, ib = np.nan_to_num(p.iou_a), np.nan_to_num(p.iou_b)
        out["mean_iou"].append((w @ ia - w @ ib) / w.sum())
        accs = []
        for iou in (p.iou_a, p.iou_b):
            o = np.nan_to_num(iou, nan=-np.inf)
            per = []
            for k in range(len(BOX_FINDINGS)):
                sel = p.pair_finding == k
                if not sel.any():
                    continue
                if w[sel].sum() == 0:
                    per.append(np.nan)
                    continue
                per.append(np.mean([(w[sel] * (o[sel] > t + 1e-9)).sum() / w[sel].sum()
                                    for t in IOU_THRESHOLDS]))
            accs.append(np.nanmean(per))
        out["loc_acc"].append(accs[0] - accs[1])
    return {k: np.asarray(v) for k, v in out.items()}


def test_paired_ci_matches_naive_sklearn_reference() -> None:
    p = _paired()
    res = paired_bootstrap(p, n_boot=40, seed=3)
    ref = _naive(p, 40, 3)
    for key in ("mean_auc", "mean_iou", "loc_acc"):
        x = ref[key][np.isfinite(ref[key])]
        lo, hi = np.percentile(x, [2.5, 97.5])
        assert res[key]["ci"] == pytest.approx([lo, hi], abs=1e-12), key
    # point estimate = the full-sample difference
    full = np.mean([roc_auc_score(p.labels[:, j], p.probs_a[:, j])
                    - roc_auc_score(p.labels[:, j], p.probs_b[:, j]) for j in range(len(FINDINGS))])
    assert res["mean_auc"]["delta"] == pytest.approx(full, abs=1e-12)


def test_paired_detects_a_real_difference_and_not_a_null_one() -> None:
    better = paired_bootstrap(_paired(n=300, shift=-0.3), n_boot=300)  # B weaker -> A - B > 0
    assert better["mean_auc"]["delta"] > 0 and excludes_zero(better["mean_auc"]["ci"])
    p = _paired(n=300)
    same = Paired(p.image_ids, p.labels, p.probs_a, p.probs_a, p.pair_image, p.pair_finding,
                  p.iou_a, p.iou_a)
    null = paired_bootstrap(same, n_boot=100)
    assert null["mean_auc"]["delta"] == 0 and null["mean_auc"]["ci"] == [0.0, 0.0]


def test_pooled_over_identical_seeds_equals_single_without_seed_resampling() -> None:
    p = _paired()
    one = paired_bootstrap(p, n_boot=150, seed=1)
    two = pooled_bootstrap([p, p], n_boot=150, seed=1, resample_seeds=False)
    assert two["mean_auc"]["ci"] == pytest.approx(one["mean_auc"]["ci"])
    # resampling seeds widens the interval when seeds disagree
    q = _paired(seed=0, shift=-0.2)
    wide = pooled_bootstrap([p, q], n_boot=300, seed=1)
    narrow = pooled_bootstrap([p, q], n_boot=300, seed=1, resample_seeds=False)
    assert np.diff(wide["mean_auc"]["ci"])[0] > np.diff(narrow["mean_auc"]["ci"])[0]


def _eval(ids: list[str]) -> EvalData:
    n = len(ids)
    return EvalData(round=0, split="test", image_ids=np.array(ids, dtype=object),
                    rows=np.arange(n), orig_size=np.ones((n, 2)),
                    labels=np.zeros((n, len(FINDINGS)), bool),
                    probs=np.zeros((n, len(FINDINGS))),
                    pred=np.full((n, len(FINDINGS), 4), np.nan))


def test_pair_eval_refuses_other_images_or_labels() -> None:
    with pytest.raises(CompareError, match="test images differ"):
        pair_eval(_eval(["a", "b"]), _eval(["a", "c"]))
    a, b = _eval(["a", "b"]), _eval(["a", "b"])
    b.labels[0, 0] = True
    with pytest.raises(CompareError, match="other labels"):
        pair_eval(a, b)
    assert pair_eval(_eval(["a", "b"]), _eval(["a", "b"])).labels.shape == (2, len(FINDINGS))
