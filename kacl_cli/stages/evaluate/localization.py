"""Headroom of localization: how much of what the maps could give do the boxes use.

Pure numpy, shared by ``evaluate`` and ``benchmarks/localization_bench.py``.

The **grid ceiling** of a map size ``h x w`` is the best a box could do if its edges had to lie
on the map's cell edges (a map-resolution box, as kacl cut them before boxes were cut at image
resolution): for each ground-truth box, the IoU of the best snapped box. The best snapped box
has each edge on one of the two grid lines around the GT edge (moving an edge further out only
adds area outside the GT box, further in only removes area inside it), so trying the 2^4 floor/
ceil combinations is exact. Reported next to the achieved mean IoU and accuracy, it says
whether a miss is the maps' resolution (ceiling low) or the box rule / the net (ceiling high,
achieved low).
"""

from __future__ import annotations

import itertools

import numpy as np

from kacl_cli import boxes as bx

TIE_EPS = 1e-9


def snap_candidates(gt_xywh: np.ndarray, cell_w: np.ndarray, cell_h: np.ndarray) -> np.ndarray:
    """All 16 floor/ceil grid snaps of each box: (n x 16 x 4) xywh, degenerate ones zero-size."""
    b = bx.xywh_to_xyxy(np.asarray(gt_xywh, dtype=np.float64).reshape(-1, 4))
    cw = np.asarray(cell_w, dtype=np.float64).reshape(-1)
    ch = np.asarray(cell_h, dtype=np.float64).reshape(-1)
    scale = np.stack([cw, ch, cw, ch], axis=1)
    g = b / scale
    lo, hi = np.floor(g + 1e-9), np.ceil(g - 1e-9)
    out = []
    for pick in itertools.product((0, 1), repeat=4):
        c = np.where(np.array(pick, dtype=bool)[None, :], hi, lo) * scale
        c[:, 2] = np.maximum(c[:, 2], c[:, 0])
        c[:, 3] = np.maximum(c[:, 3], c[:, 1])
        out.append(bx.xyxy_to_xywh(c))
    return np.stack(out, axis=1)


def grid_ceiling_iou(gt_xywh: np.ndarray, orig_size: np.ndarray, map_hw: tuple[int, int]
                     ) -> np.ndarray:
    """Per GT box (original px; ``orig_size`` n x 2 width, height): the best IoU of a box
    whose edges lie on the ``map_hw`` grid spanning the image."""
    gt = np.asarray(gt_xywh, dtype=np.float64).reshape(-1, 4)
    if len(gt) == 0:
        return np.zeros(0)
    size = np.asarray(orig_size, dtype=np.float64).reshape(-1, 2)
    cand = snap_candidates(gt, size[:, 0] / map_hw[1], size[:, 1] / map_hw[0])
    return bx.iou(cand, np.repeat(gt[:, None, :], cand.shape[1], axis=1)).max(axis=1)


def mean_accuracy(iou: np.ndarray, thresholds: tuple[float, ...] | np.ndarray) -> float:
    """Mean over T of the fraction of IoUs > T (NaN counts as a miss); NaN with no pairs."""
    o = np.nan_to_num(np.asarray(iou, dtype=np.float64), nan=-np.inf)
    if o.size == 0:
        return float("nan")
    t = np.asarray(thresholds, dtype=np.float64)
    return float((o[None, :] > t[:, None] + TIE_EPS).mean())


def headroom(
    iou: np.ndarray, ceiling: np.ndarray, finding: np.ndarray, names: tuple[str, ...],
    thresholds: tuple[float, ...],
) -> list[dict[str, float | int | str | None]]:
    """Per finding (index into ``names``): achieved mean IoU and mean accuracy over
    ``thresholds`` next to the grid ceiling's, and the share of the ceiling used."""
    rows = []
    fi = np.asarray(finding)
    for k, name in enumerate(names):
        sel = fi == k
        n = int(sel.sum())
        if n == 0:
            rows.append({"finding": name, "n": 0, "mean_iou": None, "ceiling_iou": None,
                         "mean_acc": None, "ceiling_acc": None, "share_of_ceiling": None})
            continue
        got = np.nan_to_num(np.asarray(iou)[sel], nan=0.0)
        ceil = np.asarray(ceiling)[sel]
        acc, ceil_acc = mean_accuracy(iou[sel], thresholds), mean_accuracy(ceil, thresholds)
        rows.append({
            "finding": name, "n": n, "mean_iou": float(got.mean()),
            "ceiling_iou": float(ceil.mean()), "mean_acc": acc, "ceiling_acc": ceil_acc,
            "share_of_ceiling": acc / ceil_acc if ceil_acc > 0 else None,
        })
    return rows


def any_of_k_iou(pred_k: np.ndarray, gt_xywh: np.ndarray) -> np.ndarray:
    """Per GT box, the best IoU of its (image, finding)'s K ranked boxes (``pred_k`` m x K x 4,
    a NaN row where there is no box); NaN when there is none at all (a miss, as for top-1).

    "Any of K": a GT box is hit at T when any of the K boxes reaches it, i.e. when the best
    one does. Not the protocol (one box per finding): a measure of what ranked boxes hold.
    """
    pred = np.asarray(pred_k, dtype=np.float64)
    gt = np.asarray(gt_xywh, dtype=np.float64).reshape(-1, 4)
    has = np.isfinite(pred).all(axis=2)
    iou = np.full(has.shape, -np.inf)
    if has.any():
        rows, cols = np.nonzero(has)
        iou[rows, cols] = bx.iou(pred[rows, cols], gt[rows])
    best = iou.max(axis=1) if iou.shape[1] else np.full(len(gt), -np.inf)
    return np.where(np.isfinite(best), best, np.nan)
