"""Box geometry shared by cam, radiomics, evaluate and predict.

Boxes are ``(x, y, w, h)`` with (x, y) the top-left corner, in the NIH BBox file's convention,
unless a name says ``xyxy``. Original pixel coordinates are the source image's; store
coordinates are the S x S store image's. The mapping is a per-axis scale
(``S / orig_width``, ``S / orig_height``) because prepare resizes anisotropically.
"""

from __future__ import annotations

import math

import numpy as np


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    return np.concatenate([b[..., :2], b[..., :2] + b[..., 2:4]], axis=-1)


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    return np.concatenate([b[..., :2], b[..., 2:4] - b[..., :2]], axis=-1)


def scale_xywh(boxes: np.ndarray, sx: float | np.ndarray, sy: float | np.ndarray) -> np.ndarray:
    """Scale boxes between coordinate frames (e.g. original -> store: sx = S / orig_width)."""
    b = np.asarray(boxes, dtype=np.float64).copy()
    sx = np.asarray(sx, dtype=np.float64)
    sy = np.asarray(sy, dtype=np.float64)
    b[..., 0] *= sx
    b[..., 2] *= sx
    b[..., 1] *= sy
    b[..., 3] *= sy
    return b


def to_pixel_slices(box_xywh: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """Integer half-open pixel bounds ``(x0, y0, x1, y1)`` covering a float box, clipped.

    Floor the start and ceil the end so a box never loses the pixels it partly covers; at least
    one pixel wide, so a tiny box still addresses a pixel.
    """
    x, y, w, h = (float(v) for v in box_xywh)
    # plain floats, not np.clip: ~20x faster per box (the radiomics stage maps every ROI)
    x0 = _clamp(_floor(x), 0, width - 1)
    y0 = _clamp(_floor(y), 0, height - 1)
    x1 = _clamp(_ceil(x + w), x0 + 1, width)
    y1 = _clamp(_ceil(y + h), y0 + 1, height)
    return x0, y0, x1, y1


def _floor(v: float) -> float:
    return float(math.floor(v)) if math.isfinite(v) else v  # +-inf clamps like np.floor's


def _ceil(v: float) -> float:
    return float(math.ceil(v)) if math.isfinite(v) else v


def _clamp(v: float, lo: float, hi: float) -> int:
    """``int(np.clip(v, lo, hi))``, NaN included (ValueError from ``int``)."""
    return int(min(max(v, lo), hi))


def intersection(a_xywh: np.ndarray, b_xywh: np.ndarray) -> np.ndarray:
    a = xywh_to_xyxy(a_xywh)
    b = xywh_to_xyxy(b_xywh)
    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    return w * h


def area(boxes_xywh: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes_xywh, dtype=np.float64)
    return np.clip(b[..., 2], 0, None) * np.clip(b[..., 3], 0, None)


def iou(pred_xywh: np.ndarray, gt_xywh: np.ndarray) -> np.ndarray:
    """Intersection over union, elementwise over matching leading dims (0 where union is 0)."""
    inter = intersection(pred_xywh, gt_xywh)
    union = area(pred_xywh) + area(gt_xywh) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def iobb(pred_xywh: np.ndarray, gt_xywh: np.ndarray) -> np.ndarray:
    """Intersection over the *predicted* box's area (Wang et al. 2017's IoBB)."""
    inter = intersection(pred_xywh, gt_xywh)
    pa = area(pred_xywh)
    return np.divide(inter, pa, out=np.zeros_like(inter), where=pa > 0)
