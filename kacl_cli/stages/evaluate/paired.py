"""Paired comparison of two models on the same test images (``kacl compare``, ``kacl study``).

Why paired: two settings trained on the same data and scored on the same images share most of
their errors (hard images are hard for both). Resampling the *images* once and scoring both
models on each resample measures the difference itself, whose spread is far smaller than the
seed-to-seed spread of either model's AUC. The comparison is A - B per metric:

- ``mean_auc``: mean over the findings whose AUC is defined for both on the full sample;
- ``auc/<finding>``: per-finding AUC;
- ``mean_iou``: mean IoU over ground-truth boxes (a missing prediction counts as 0);
- ``loc_acc``: localization accuracy averaged over T(IoU) 0.1..0.7 and the box findings that
  have ground truth (``evaluate.headline``'s ``mean_loc_acc``).

Percentile bootstrap CIs (95%). Several pairs (one per training seed, all on the same test
images) are pooled by :func:`pooled_bootstrap`: each resample draws the images once (shared by
all seeds, keeping the pairing) *and* the seeds with replacement, so the interval holds both
test-sample and training-seed variation. Pure numpy on top of the evaluate stage's weighted
AUC (integer bootstrap weights instead of index copies; tested against sklearn per resample).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kacl_cli.errors import KaclError
from kacl_cli.findings import BOX_FINDINGS, FINDINGS
from kacl_cli.stages.evaluate.data import EvalData
from kacl_cli.stages.evaluate.metrics import (
    CI_LEVEL,
    IOU_THRESHOLDS,
    TIE_EPS,
    _WeightedAuc,
    bootstrap_weights,
    pair_overlaps,
    percentile_ci,
)

METRICS = ("mean_auc", "mean_iou", "loc_acc")


class CompareError(KaclError):
    """Two results that cannot be compared image by image."""


@dataclass
class Paired:
    """Scores of A and B on the same n images (one training seed)."""

    image_ids: np.ndarray  # n
    labels: np.ndarray  # n x F bool
    probs_a: np.ndarray  # n x F (NaN: no score)
    probs_b: np.ndarray
    pair_image: np.ndarray  # m, index into the n images
    pair_finding: np.ndarray  # m, index into BOX_FINDINGS
    iou_a: np.ndarray  # m (NaN: no prediction)
    iou_b: np.ndarray


def pair_eval(a: EvalData, b: EvalData) -> Paired:
    """Pair two evaluations; one-line refusal when they are not on the same images/labels."""
    if len(a.image_ids) != len(b.image_ids) or not np.array_equal(a.image_ids, b.image_ids):
        raise CompareError(
            f"the test images differ ({len(a.image_ids)} vs {len(b.image_ids)} images, or other "
            "ids): a paired comparison needs the same prepared data and split")
    if not np.array_equal(a.labels, b.labels):
        raise CompareError("the same images carry other labels: not the same prepared data")
    if not (np.array_equal(a.pair_image, b.pair_image)
            and np.array_equal(a.pair_finding, b.pair_finding)
            and np.allclose(a.pair_gt, b.pair_gt, equal_nan=True)):
        raise CompareError("the ground-truth boxes differ: not the same prepared data")
    iou_a, _ = pair_overlaps(a.pair_pred, a.pair_gt)
    iou_b, _ = pair_overlaps(b.pair_pred, b.pair_gt)
    return Paired(a.image_ids, a.labels, a.probs, b.probs, a.pair_image, a.pair_finding,
                  iou_a, iou_b)


class _Scorer:
    """Metrics of one model under many image-weight vectors (B x n) at once."""

    def __init__(self, labels: np.ndarray, probs: np.ndarray, pair_image: np.ndarray,
                 pair_finding: np.ndarray, iou: np.ndarray):
        self.aucs = []
        for j in range(labels.shape[1]):
            v = np.flatnonzero(np.isfinite(probs[:, j]))
            y = labels[v, j]
            self.aucs.append(_WeightedAuc(y, probs[v, j], v) if y.any() and not y.all()
                             else None)
        self.pair_image = pair_image
        self.pair_finding = pair_finding
        self.iou = np.nan_to_num(iou, nan=0.0)
        o = np.nan_to_num(iou, nan=-np.inf)
        self.hits = (o[None, :] > np.asarray(IOU_THRESHOLDS)[:, None] + TIE_EPS).astype(float)

    def auc(self, w: np.ndarray) -> np.ndarray:
        out = np.full((w.shape[0], len(self.aucs)), np.nan)
        for j, plan in enumerate(self.aucs):
            if plan is not None:
                out[:, j] = plan(w)
        return out

    def loc(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean IoU, mean loc accuracy) per weight row; NaN without boxes."""
        B = w.shape[0]
        if len(self.iou) == 0:
            return np.full(B, np.nan), np.full(B, np.nan)
        pw = w[:, self.pair_image].astype(float)  # B x m
        tot = pw.sum(axis=1)
        miou = np.divide(pw @ self.iou, tot, out=np.full(B, np.nan), where=tot > 0)
        accs = []
        for k in range(len(BOX_FINDINGS)):
            sel = self.pair_finding == k
            if not sel.any():
                continue
            wk = pw[:, sel]
            den = wk.sum(axis=1)
            num = wk @ self.hits[:, sel].T  # B x T
            acc = np.divide(num, den[:, None], out=np.full(num.shape, np.nan),
                            where=den[:, None] > 0)
            accs.append(acc.mean(axis=1))
        loc = np.nanmean(np.stack(accs, axis=1), axis=1) if accs else np.full(B, np.nan)
        return miou, loc


def _deltas(p: Paired, w: np.ndarray, included: np.ndarray) -> dict[str, np.ndarray]:
    """A - B of every metric for image weights ``w`` (B x n)."""
    out: dict[str, np.ndarray] = {}
    sa = _Scorer(p.labels, p.probs_a, p.pair_image, p.pair_finding, p.iou_a)
    sb = _Scorer(p.labels, p.probs_b, p.pair_image, p.pair_finding, p.iou_b)
    auc_a, auc_b = sa.auc(w), sb.auc(w)
    d = auc_a - auc_b
    out["auc"] = d
    sub = d[:, included]
    out["mean_auc"] = np.where(np.isfinite(sub).all(axis=1), sub.mean(axis=1), np.nan) \
        if included.any() else np.full(w.shape[0], np.nan)
    (ia, la), (ib, lb) = sa.loc(w), sb.loc(w)
    out["mean_iou"] = ia - ib
    out["loc_acc"] = la - lb
    out["a_mean_auc"] = auc_a[:, included].mean(axis=1) if included.any() \
        else np.full(w.shape[0], np.nan)
    out["b_mean_auc"] = auc_b[:, included].mean(axis=1) if included.any() \
        else np.full(w.shape[0], np.nan)
    return out


def _included(pairs: Sequence[Paired]) -> np.ndarray:
    """Findings whose AUC is defined for both models of every pair on the full sample."""
    ok = np.ones(len(FINDINGS), bool)
    for p in pairs:
        y = p.labels
        both = y.any(axis=0) & (~y).any(axis=0)
        both &= np.isfinite(p.probs_a).any(axis=0) & np.isfinite(p.probs_b).any(axis=0)
        ok &= both
    return ok


def pooled_bootstrap(pairs: Sequence[Paired], n_boot: int = 2000, seed: int = 0,
                     resample_seeds: bool = True, level: float = CI_LEVEL) -> dict:
    """Point estimates and percentile CIs of A - B, averaged over ``pairs`` (seeds).

    All pairs must be on the same images (one prepared workspace): each resample draws one
    image-weight vector for all of them (the pairing across settings *and* seeds is kept),
    and, with ``resample_seeds``, draws the seeds with replacement too (a second generator,
    ``seed + 1``), so the CI also carries the seed-to-seed spread. One pair = the classic
    paired bootstrap.
    """
    if not pairs:
        raise CompareError("nothing to compare")
    ids = pairs[0].image_ids
    for p in pairs[1:]:
        if not np.array_equal(p.image_ids, ids):
            raise CompareError("pooled pairs must share their test images")
    n, S = len(ids), len(pairs)
    included = _included(pairs)
    ones = np.ones((1, n), np.int32)
    point = [_deltas(p, ones, included) for p in pairs]
    keys = ("mean_auc", "mean_iou", "loc_acc", "a_mean_auc", "b_mean_auc")
    samples: dict[str, list[np.ndarray]] = {k: [] for k in (*keys, "auc")}
    srng = np.random.default_rng(seed + 1)
    for w in bootstrap_weights(n, n_boot, seed):
        per = [_deltas(p, w, included) for p in pairs]  # S dicts of (c,) / (c, F)
        c = w.shape[0]
        if resample_seeds and S > 1:
            draw = srng.integers(0, S, size=(c, S))
        else:
            draw = np.tile(np.arange(S), (c, 1))
        for k in (*keys, "auc"):
            stack = np.stack([d[k] for d in per], axis=1)  # c x S [x F]
            picked = np.take_along_axis(
                stack, draw if stack.ndim == 2 else draw[:, :, None], axis=1)
            samples[k].append(picked.mean(axis=1))
    res: dict = {"n_images": int(n), "n_pairs": S, "n_boot": int(n_boot), "level": level,
                 "findings_in_mean": [f for f, ok in zip(FINDINGS, included, strict=True)
                                      if ok]}
    for k in keys:
        est = float(np.mean([d[k][0] for d in point]))
        lo, hi = percentile_ci(np.concatenate(samples[k]), level)
        res[k] = {"delta": est, "ci": [lo, hi]}
    auc_s = np.concatenate(samples["auc"])
    auc_p = np.mean(np.stack([d["auc"][0] for d in point]), axis=0)
    res["per_finding_auc"] = {
        f: {"delta": float(auc_p[j]), "ci": list(percentile_ci(auc_s[:, j], level))}
        for j, f in enumerate(FINDINGS)}
    return res


def paired_bootstrap(p: Paired, n_boot: int = 2000, seed: int = 0,
                     level: float = CI_LEVEL) -> dict:
    """The paired bootstrap of one A/B pair (what ``kacl compare`` reports)."""
    return pooled_bootstrap([p], n_boot, seed, resample_seeds=False, level=level)


def excludes_zero(ci: Sequence[float]) -> bool:
    lo, hi = ci
    return bool(np.isfinite(lo) and np.isfinite(hi) and (lo > 0 or hi < 0))
