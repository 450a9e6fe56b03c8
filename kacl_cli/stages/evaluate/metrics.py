"""The papers' metrics (Wang et al. 2017; Li et al. 2018), pure numpy: no catalog, no files.

Classification: per-finding ROC AUC on one split from ``cam_boxes.probability`` of a round, their
mean over findings with both classes present, and percentile bootstrap 95% CIs that resample
*images* (so the 14 per-finding AUCs and their mean are resampled jointly, as they were
measured). Localization: for every ground-truth box of the split (images whose boxes supervised
training are excluded, from AUC too) the predicted box of that image and finding, correct when
IoU > T(IoU) / IoBB > T(IoBB) (strict), a missing prediction counting as wrong; accuracy =
correct / ground-truth boxes. Definitions in docs/evaluation.md.

Tested against hand-computed cases and sklearn. :func:`compute_metrics` turns one
:class:`~kacl_cli.stages.evaluate.data.EvalData` into the metrics document (metrics.json);
:func:`metric_rows` is that document as ``metrics`` table rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from kacl_cli import boxes as bx
from kacl_cli.findings import BOX_FINDINGS, FINDINGS
from kacl_cli.progress import bar
from kacl_cli.stages.evaluate.baselines import IOBB_THRESHOLDS, IOU_THRESHOLDS
from kacl_cli.stages.evaluate.data import EvalData
from kacl_cli.stages.evaluate.localization import any_of_k_iou, grid_ceiling_iou, mean_accuracy

__all__ = [
    "IOU_THRESHOLDS", "IOBB_THRESHOLDS", "roc_auc", "weighted_auc", "bootstrap_aucs",
    "percentile_ci", "pair_overlaps", "accuracy_at", "compute_metrics", "metric_rows",
]

CI_LEVEL = 0.95
ALL = "all"  # the `finding` of summary rows (means over findings) in the metrics table
# Bootstrap weights are built in chunks of at most this many cells (resamples x images), so
# memory stays ~100 MB even on the full 25,596-image NIH test split.
_CHUNK_CELLS = 4_000_000
# "overlap > T" is strict; this slack keeps floating-point round-off at an exact tie (a box
# shifted by half its width has IoBB 0.5 up to ~1e-16) from counting as a hit.
TIE_EPS = 1e-9


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (sklearn); NaN when only one class is present, where AUC is undefined."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    keep = np.isfinite(s)
    y, s = y[keep], s[keep]
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, s))


class _WeightedAuc:
    """The AUC of integer-weighted resamples of one sample, prepared once per finding.

    A bootstrap resample is the original sample with multiplicities, so its AUC is the
    weighted Mann-Whitney statistic: for each positive, the weight of the negatives scored
    below it plus half of those tied with it. The negatives are sorted by score once; per
    resample that is one cumulative sum over the negatives' weights and a gather at each
    positive's (precomputed) position: a few passes over a B x n array for B resamples,
    instead of B sorts or B sklearn calls.
    """

    def __init__(self, labels: np.ndarray, scores: np.ndarray, columns: np.ndarray | None = None):
        y = np.asarray(labels, dtype=bool)
        s = np.asarray(scores, dtype=np.float64)
        cols = np.arange(len(y)) if columns is None else np.asarray(columns)
        neg = np.flatnonzero(~y)
        order = np.argsort(s[neg], kind="mergesort")
        s_neg = s[neg][order]
        self.neg_cols = cols[neg[order]]
        pos = np.flatnonzero(y)
        self.pos_cols = cols[pos]
        # cumulative negative weight strictly below / up to each positive's score
        self.lo = np.searchsorted(s_neg, s[pos], side="left")
        self.hi = np.searchsorted(s_neg, s[pos], side="right")

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        w = np.atleast_2d(weights)
        cn = np.zeros((w.shape[0], len(self.neg_cols) + 1), dtype=np.int64)
        np.cumsum(w[:, self.neg_cols], axis=1, out=cn[:, 1:])
        w_pos = w[:, self.pos_cols].astype(np.float64)
        num = (w_pos * (cn[:, self.lo] + cn[:, self.hi])).sum(axis=1) * 0.5
        denom = w_pos.sum(axis=1) * cn[:, -1]
        return np.divide(num, denom, out=np.full(num.shape, np.nan), where=denom > 0)


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUCs of many integer-weighted resamples at once (B x n weights -> B AUCs); with weights
    all 1 it is sklearn's AUC. NaN for a resample without both classes."""
    return _WeightedAuc(labels, scores)(np.asarray(weights))


def bootstrap_weights(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Chunks of bootstrap multiplicities (c x n int): row b counts how often resample b drew
    each image. Seeded, so the same call gives the same CIs."""
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _CHUNK_CELLS // max(n, 1)))
    done = 0
    while done < n_boot:
        c = min(chunk, n_boot - done)
        idx = rng.integers(0, n, size=(c, n))
        flat = (idx + np.arange(c)[:, None] * n).ravel()
        yield np.bincount(flat, minlength=c * n).reshape(c, n).astype(np.int32)
        done += c


def bootstrap_aucs(labels: np.ndarray, scores: np.ndarray, n_boot: int, seed: int,
                   progress: Callable[[int], object] | None = None) -> np.ndarray:
    """Per-finding AUCs of ``n_boot`` image-level bootstrap resamples: (n_boot x F).

    ``labels``/``scores`` are n x F; a NaN score (image without a probability for that finding)
    leaves the image out of that finding only. NaN where a resample lacks a class. All findings
    share the same resamples (images are resampled, with all their labels). ``progress(k)`` is
    called after each chunk of k resamples.
    """
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n, n_f = s.shape
    out = np.full((n_boot, n_f), np.nan)
    if n == 0 or n_boot <= 0:
        return out
    plans = []
    for j in range(n_f):
        v = np.flatnonzero(np.isfinite(s[:, j]))
        plans.append(_WeightedAuc(y[v, j], s[v, j], v))
    row = 0
    for w in bootstrap_weights(n, n_boot, seed):
        for j, plan in enumerate(plans):
            out[row:row + len(w), j] = plan(w)
        row += len(w)
        if progress is not None:
            progress(len(w))
    return out


def percentile_ci(samples: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the finite samples; (NaN, NaN) when there are none."""
    x = np.asarray(samples, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(x, [tail, 100.0 - tail])
    return float(lo), float(hi)


def pair_overlaps(pred_xywh: np.ndarray, gt_xywh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU and IoBB of each (predicted, ground-truth) pair; NaN where there is no prediction
    (a NaN predicted box), so the caller can count those pairs as wrong explicitly."""
    pred = np.asarray(pred_xywh, dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(gt_xywh, dtype=np.float64).reshape(-1, 4)
    has = np.isfinite(pred).all(axis=1)
    iou = np.full(len(gt), np.nan)
    iobb = np.full(len(gt), np.nan)
    iou[has] = bx.iou(pred[has], gt[has])
    iobb[has] = bx.iobb(pred[has], gt[has])
    return iou, iobb


def accuracy_at(overlap: np.ndarray, thresholds: tuple[float, ...] | np.ndarray) -> np.ndarray:
    """Fraction of pairs with overlap > T (strict, see TIE_EPS) for each T; a NaN overlap (no
    predicted box) is wrong. NaN for every T when there are no pairs (undefined, not 0)."""
    o = np.nan_to_num(np.asarray(overlap, dtype=np.float64), nan=-np.inf)
    t = np.asarray(thresholds, dtype=np.float64)
    if o.size == 0:
        return np.full(t.shape, np.nan)
    return (o[None, :] > t[:, None] + TIE_EPS).mean(axis=1)


# -- the metrics document -------------------------------------------------------------------
def _num(x: float | np.floating | None) -> float | None:
    """JSON-safe number: None for NaN/inf (shown as "n/a")."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def compute_metrics(data: EvalData, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """All metrics of one (round, split) as one JSON-ready document (metrics.json)."""
    notes: list[str] = []
    # -- classification -----------------------------------------------------------------
    boot = None
    if n_boot > 0:
        with bar(n_boot, "bootstrap", unit="resample") as pb:
            boot = bootstrap_aucs(data.labels, data.probs, n_boot, seed, progress=pb.update)
    cls_rows, included = [], []
    for j, f in enumerate(FINDINGS):
        keep = np.isfinite(data.probs[:, j])
        y = data.labels[keep, j]
        auc = roc_auc(y, data.probs[keep, j])
        lo = hi = float("nan")
        n_valid = 0
        if boot is not None and math.isfinite(auc):
            lo, hi = percentile_ci(boot[:, j])
            n_valid = int(np.isfinite(boot[:, j]).sum())
        if math.isfinite(auc):
            included.append(j)
        cls_rows.append({
            "finding": f, "auc": _num(auc), "ci_low": _num(lo), "ci_high": _num(hi),
            "n": int(keep.sum()), "n_pos": int(y.sum()), "n_boot_valid": n_valid,
        })
    excluded = [FINDINGS[j] for j in range(len(FINDINGS)) if j not in included]
    if excluded:
        notes.append(
            f"AUC n/a (only one class in split {data.split!r}), excluded from the mean: "
            + ", ".join(excluded)
        )
    mean_auc = _mean([cls_rows[j]["auc"] for j in included])
    m_lo = m_hi = float("nan")
    m_valid = 0
    if boot is not None and included:
        per = boot[:, included]
        means = np.where(np.isfinite(per).all(axis=1), per.mean(axis=1), np.nan)
        m_lo, m_hi = percentile_ci(means)
        m_valid = int(np.isfinite(means).sum())
        if m_valid < 0.5 * n_boot:
            notes.append(
                f"mean-AUC CI from only {m_valid} of {n_boot} resamples (the others lacked a "
                "class for some finding): treat it as rough"
            )
    if data.n_missing_cam_images:
        notes.append(
            f"{data.n_missing_cam_images} image(s) of the split have no cam_boxes rows for "
            f"round {data.round} (see the errors table): left out of the AUCs, their "
            "ground-truth boxes count as wrong"
        )

    # -- localization -------------------------------------------------------------------
    iou, iobb = pair_overlaps(data.pair_pred, data.pair_gt)
    ceiling = (grid_ceiling_iou(data.pair_gt, data.orig_size[data.pair_image], data.map_hw)
               if data.map_hw is not None else np.full(len(iou), np.nan))
    loc_rows = []
    for k, f in enumerate(BOX_FINDINGS):
        sel = data.pair_finding == k
        m = int(sel.sum())
        loc_rows.append({
            "finding": f, "n": m, "n_missing": int(np.isnan(iou[sel]).sum()),
            "n_images": len(set(data.pair_image[sel].tolist())),
            "mean_iou": _num(np.nan_to_num(iou[sel], nan=0.0).mean()) if m else None,
            "mean_iobb": _num(np.nan_to_num(iobb[sel], nan=0.0).mean()) if m else None,
            "acc_iou": [_num(a) for a in accuracy_at(iou[sel], IOU_THRESHOLDS)],
            "acc_iobb": [_num(a) for a in accuracy_at(iobb[sel], IOBB_THRESHOLDS)],
            # headroom: the best boxes with edges on the map grid (localization.py)
            "ceiling_iou": _num(ceiling[sel].mean()) if m else None,
            "ceiling_acc": _num(mean_accuracy(ceiling[sel], IOU_THRESHOLDS)) if m else None,
        })
    any_k = _any_of_k(data, loc_rows)
    mean_acc_iou = [_mean([r["acc_iou"][t] for r in loc_rows])
                    for t in range(len(IOU_THRESHOLDS))]
    mean_acc_iobb = [_mean([r["acc_iobb"][t] for r in loc_rows])
                     for t in range(len(IOBB_THRESHOLDS))]
    mean_loc_acc = _mean(mean_acc_iou)
    no_pairs = [r["finding"] for r in loc_rows if r["n"] == 0]
    if len(data.pair_gt) == 0:
        notes.append(f"no ground-truth boxes to localize in split {data.split!r}")
    elif no_pairs:
        notes.append("no ground-truth boxes (accuracy n/a, excluded from the means) for: "
                     + ", ".join(no_pairs))
    if data.n_excluded_images:
        notes.append(
            f"{data.n_excluded_images} image(s) ({data.n_excluded_pairs} boxes) of box-"
            "supervision patients excluded from AUC and localization: their boxes supervised "
            "training (box_supervision: every image of the chosen patients)"
        )
    if data.n_fit_pairs:
        notes.append(f"{data.n_fit_pairs} ground-truth box(es) of split {data.split!r} not "
                     "scored: the round's box rules were fitted on them")
    sources = sorted({str(r[0]) for r in data.box_rules})
    if sources:
        notes.append("box rules: " + "; ".join(sources))
    if data.n_other_gt:
        notes.append(f"{data.n_other_gt} ground-truth box(es) of findings outside the 8 box "
                     "findings ignored")
    if any_k is not None:
        notes.append(f"any of K = {any_k['k']}: a ground-truth box also counts as hit when "
                     "any of the K ranked boxes of its (image, finding) reaches T (an extra "
                     "column; the protocol's figures score the top box only)")
    return {
        "round": data.round,
        "split": data.split,
        "n_images": len(data.image_ids),
        "bootstrap": int(n_boot),
        "seed": int(seed),
        "ci_level": CI_LEVEL,
        "classification": {
            "findings": cls_rows,
            "mean_auc": mean_auc,
            "mean_auc_ci": [_num(m_lo), _num(m_hi)],
            "mean_auc_boot_valid": m_valid,
            "n_findings_in_mean": len(included),
            "excluded_findings": excluded,
        },
        "localization": {
            "iou_thresholds": list(IOU_THRESHOLDS),
            "iobb_thresholds": list(IOBB_THRESHOLDS),
            "n_pairs": int(len(data.pair_gt)),
            "n_images": len(set(data.pair_image.tolist())),
            "n_missing_pred": int(np.isnan(iou).sum()),
            "n_excluded_images": data.n_excluded_images,
            "n_excluded_pairs": data.n_excluded_pairs,
            "findings": loc_rows,
            "mean_acc_iou": mean_acc_iou,
            "mean_acc_iobb": mean_acc_iobb,
            "mean_loc_acc": mean_loc_acc,
            "any_of_k": any_k,
        },
        "headline": {"mean_auc": mean_auc, "mean_loc_acc": mean_loc_acc},
        "notes": notes,
    }


def _any_of_k(data: EvalData, loc_rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The "any of K" column (``cam --max-boxes K``, K > 1): per finding, accuracy at each
    T(IoU) when any of the K ranked boxes may hit, and the mean IoU of the best of K; added to
    ``loc_rows`` as ``any_of_k``. None when the round has no ranked boxes (K = 1)."""
    if data.max_boxes <= 1:
        return None
    best = any_of_k_iou(data.pair_pred_k, data.pair_gt)
    for k, row in enumerate(loc_rows):
        sel = data.pair_finding == k
        row["any_of_k"] = {
            "acc_iou": [_num(a) for a in accuracy_at(best[sel], IOU_THRESHOLDS)],
            "mean_iou": _num(np.nan_to_num(best[sel], nan=0.0).mean()) if sel.any() else None,
        }
    per_t = [_mean([r["any_of_k"]["acc_iou"][t] for r in loc_rows])
             for t in range(len(IOU_THRESHOLDS))]
    return {"k": int(data.max_boxes), "mean_acc_iou": per_t, "mean_loc_acc": _mean(per_t),
            "n_ranked_boxes": int(np.isfinite(data.ranked).all(axis=-1).sum())
            if data.ranked is not None else 0}


def metric_rows(doc: dict[str, Any], run_id: str | None) -> list[tuple]:
    """The document as long-format ``metrics`` rows:
    (round, split, metric, finding, threshold, value, ci_low, ci_high, n, run_id)."""
    r, s = doc["round"], doc["split"]
    rows: list[tuple] = []

    def add(metric: str, finding: str, threshold: float | None, value: float | None,
            lo: float | None = None, hi: float | None = None, n: int | None = None) -> None:
        rows.append((r, s, metric, finding, threshold, value, lo, hi, n, run_id))

    cls = doc["classification"]
    for c in cls["findings"]:
        add("auc", c["finding"], None, c["auc"], c["ci_low"], c["ci_high"], c["n"])
    add("mean_auc", ALL, None, cls["mean_auc"], *cls["mean_auc_ci"], cls["n_findings_in_mean"])
    loc = doc["localization"]
    for c in loc["findings"]:
        for t, a in zip(loc["iou_thresholds"], c["acc_iou"], strict=True):
            add("loc_acc_iou", c["finding"], t, a, n=c["n"])
        for t, a in zip(loc["iobb_thresholds"], c["acc_iobb"], strict=True):
            add("loc_acc_iobb", c["finding"], t, a, n=c["n"])
        add("mean_iou", c["finding"], None, c["mean_iou"], n=c["n"])
        add("mean_iobb", c["finding"], None, c["mean_iobb"], n=c["n"])
        if c.get("any_of_k") is not None:  # K is in metrics.json (localization.any_of_k.k)
            for t, a in zip(loc["iou_thresholds"], c["any_of_k"]["acc_iou"], strict=True):
                add("loc_acc_iou_any_of_k", c["finding"], t, a, n=c["n"])
            add("mean_iou_any_of_k", c["finding"], None, c["any_of_k"]["mean_iou"], n=c["n"])
    n_loc = sum(1 for c in loc["findings"] if c["n"])
    for t, a in zip(loc["iou_thresholds"], loc["mean_acc_iou"], strict=True):
        add("mean_loc_acc_iou", ALL, t, a, n=n_loc)
    for t, a in zip(loc["iobb_thresholds"], loc["mean_acc_iobb"], strict=True):
        add("mean_loc_acc_iobb", ALL, t, a, n=n_loc)
    add("mean_loc_acc", ALL, None, loc["mean_loc_acc"], n=n_loc)
    if loc.get("any_of_k") is not None:
        add("mean_loc_acc_any_of_k", ALL, None, loc["any_of_k"]["mean_loc_acc"], n=n_loc)
    add("n_images", ALL, None, doc["n_images"], n=doc["n_images"])
    add("n_loc_pairs", ALL, None, loc["n_pairs"], n=loc["n_pairs"])
    add("n_loc_excluded_images", ALL, None, loc["n_excluded_images"],
        n=loc["n_excluded_images"])
    return rows
