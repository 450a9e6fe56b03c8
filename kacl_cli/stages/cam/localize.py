"""Map -> boxes at image resolution: the ONE rule that cam, predict, evaluate and the
threshold fit share.

Why at image resolution: a raw Grad-CAM map has one pixel per 8-32 input pixels, so a box cut
from the map itself can only have edges on that grid (the "grid ceiling" of
:mod:`kacl_cli.stages.evaluate.localization`). Upsampling the map bilinearly to the network's
input size first lets the threshold fall between map cells, the way Wang et al. 2017 and
Li et al. 2018 cut their boxes.

Frame: :func:`upsample_maps` uses ``align_corners=False``: output pixel ``i`` of ``S`` has its
centre at ``(i + 0.5) * h / S`` map units, exactly the pixel-edge convention of docs/cam.md
(map pixel ``j`` covers ``[j, j + 1)``, its value sits at the centre ``j + 0.5``). A box in the
upsampled frame is ``(x, y, w, h)`` in input pixels, pixel ``i`` covering ``[i, i + 1)``; the
map-resolution box of a map pixel ``j`` is the upsampled box ``[j S / w, (j + 1) S / w)``, so
both frames scale to original pixels the same way (``x * orig_width / S``).

The rule (:class:`BoxRule`): threshold the upsampled map at ``frac * peak`` (``>=``, so the peak
pixel is always in), 8-connected components, and pick the component by ``component``:
``"peak"`` (the one holding the map's peak) or ``"mass"`` (largest sum of map values). With
``max_boxes = K`` the remaining components follow, ranked by mass. Reasons instead of boxes
(never exceptions) for non-finite, empty and flat maps: these are decided on the RAW map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from kacl_cli.errors import InputError
from kacl_cli.stages.cam.gradcam import (
    REASON_EMPTY,
    REASON_FLAT,
    REASON_NONFINITE,
    MapBox,
)

COMPONENT_RULES = ("peak", "mass")
# Maps labelled per scipy call: bounds the int32 label volume (256 x 224 x 224 = 51 MB).
_LABEL_CHUNK = 256


def check_frac(frac: float) -> None:
    """One-line usage error for a threshold fraction outside (0, 1]."""
    if not (isinstance(frac, (int, float)) and math.isfinite(frac) and 0.0 < frac <= 1.0):
        raise InputError(f"threshold {frac!r}: must be a fraction of the peak in (0, 1]")


@dataclass(frozen=True)
class BoxRule:
    """Threshold fraction of the peak and which component becomes the (top) box."""

    frac: float = 0.5
    component: str = "peak"

    def __post_init__(self) -> None:
        check_frac(self.frac)
        if self.component not in COMPONENT_RULES:
            raise InputError(f"component rule {self.component!r}: expected peak or mass")

    def to_dict(self) -> dict[str, float | str]:
        return {"frac": float(self.frac), "component": self.component}


# Used when no ground-truth boxes are available to fit on (the note says so).
DEFAULT_RULE = BoxRule(0.5, "peak")


def check_max_boxes(k: int) -> None:
    if int(k) < 1:
        raise InputError(f"--max-boxes {k}: must be >= 1")


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear N x h x w -> N x H x W on the maps' device, float32, pixel-edge frame."""
    if maps.ndim != 3:
        raise ValueError(f"expected N x h x w maps, got shape {tuple(maps.shape)}")
    m = maps.float()
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    return F.interpolate(m[:, None], size=tuple(size), mode="bilinear",
                         align_corners=False)[:, 0]


def _map_status(m: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(finite, raw peak, flat, raw sum) per map, decided on the raw maps."""
    finite = torch.isfinite(m).flatten(1).all(dim=1)
    safe = torch.where(finite[:, None, None], m, torch.zeros_like(m))
    flatm = safe.flatten(1)
    peak = flatm.max(dim=1).values
    flat = peak == flatm.min(dim=1).values
    return (finite.cpu().numpy(), peak.double().cpu().numpy(), flat.cpu().numpy(),
            flatm.double().sum(dim=1).cpu().numpy())


def localize(
    maps: torch.Tensor | np.ndarray,
    size: tuple[int, int],
    rules: BoxRule | Sequence[BoxRule],
    max_boxes: int = 1,
) -> list[list[MapBox]]:
    """Boxes of each raw map (N x h x w) in the ``size`` (H, W) frame, ranked, at most K.

    ``rules`` is one rule for all maps or one per map (e.g. per finding). Every map gets a
    non-empty list: its boxes (first = the protocol's single box), or one box-less
    :class:`MapBox` with the reason. ``peak`` is the raw map's peak; ``mass`` the component's
    sum of upsampled values times ``h w / (H W)`` (so it is in raw-map units).
    """
    check_max_boxes(max_boxes)
    m = torch.as_tensor(maps)
    if m.ndim != 3:
        raise ValueError(f"expected N x h x w maps, got shape {tuple(m.shape)}")
    n = len(m)
    per_map = [rules] * n if isinstance(rules, BoxRule) else list(rules)
    if len(per_map) != n:
        raise ValueError(f"{len(per_map)} rules for {n} maps")
    if n == 0:
        return []
    if m.shape[1] * m.shape[2] == 0:
        return [[MapBox(None, math.nan, math.nan, f"not a 2-D map (shape {tuple(m.shape[1:])})")]
                for _ in range(n)]
    m = m.float()
    finite, peak, flat, _ = _map_status(m)
    ok = finite & (peak > 0) & ~flat
    out: list[list[MapBox]] = []
    for i in range(n):
        if not finite[i]:
            out.append([MapBox(None, math.nan, math.nan, REASON_NONFINITE)])
        elif peak[i] <= 0.0:
            out.append([MapBox(None, float(peak[i]), 0.0, REASON_EMPTY)])
        elif flat[i]:
            out.append([MapBox(None, float(peak[i]), math.nan, REASON_FLAT)])
        else:
            out.append([])
    idx = np.flatnonzero(ok)
    area_ratio = float(m.shape[1] * m.shape[2]) / float(size[0] * size[1])
    fracs = torch.tensor([per_map[i].frac for i in range(n)], dtype=torch.float32,
                         device=m.device)
    for start in range(0, len(idx), _LABEL_CHUNK):
        sel = idx[start:start + _LABEL_CHUNK]
        sel_t = torch.as_tensor(sel, device=m.device)
        up = upsample_maps(m[sel_t], size)
        up_peak = up.flatten(1).max(dim=1).values
        mask = up >= (fracs[sel_t] * up_peak)[:, None, None]
        arg = up.flatten(1).argmax(dim=1).cpu().numpy()
        values = up.cpu().numpy()
        boxes = _components(values, mask.cpu().numpy(), arg,
                            [per_map[i].component for i in sel], max_boxes)
        for k, i in enumerate(sel):
            out[i] = [MapBox(b, float(peak[i]), float(mass) * area_ratio, None)
                      for b, mass in boxes[k]]
    return out


def _components(
    values: np.ndarray, mask: np.ndarray, argmax: np.ndarray, components: list[str], k: int,
) -> list[list[tuple[tuple[float, float, float, float], float]]]:
    """Per map: up to k (box, mass) of its 8-connected components, the chosen one first."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = 1  # 8-neighbours within a map, never across maps
    labels, n_labels = ndimage.label(mask, structure=structure)
    if n_labels == 0:  # impossible: the peak pixel is always >= frac * peak
        return [[] for _ in range(len(values))]
    ids = np.arange(1, n_labels + 1)
    masses = np.asarray(ndimage.sum_labels(values, labels, index=ids), dtype=np.float64)
    objects = ndimage.find_objects(labels)
    owner = np.array([o[0].start for o in objects])
    peak_label = labels.reshape(len(values), -1)[np.arange(len(values)), argmax]
    # per map: components by mass, descending; ties by raster order (label id)
    order = np.lexsort((ids, -masses, owner))
    bounds = np.searchsorted(owner[order], np.arange(len(values) + 1))
    out = []
    for i in range(len(values)):
        ranked = [int(j) for j in order[bounds[i]:bounds[i + 1]]]
        if components[i] == "peak" and peak_label[i] > 0:
            top = int(peak_label[i]) - 1
            ranked = [top] + [j for j in ranked if j != top]
        boxes = []
        for j in ranked[:k]:
            _, rows, cols = objects[j]
            boxes.append(((float(cols.start), float(rows.start), float(cols.stop - cols.start),
                           float(rows.stop - rows.start)), float(masses[j])))
        out.append(boxes)
    return out
