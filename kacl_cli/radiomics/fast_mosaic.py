"""Many rectangular ROIs packed into one 2D canvas, discretised the way pyradiomics does.

Why a mosaic: every texture matrix pyradiomics builds (GLCM, GLRLM, GLSZM, GLDM, NGTDM) only
looks at 8-neighbours *inside the mask*. If all ROIs of a batch are copied into one canvas
with a one-pixel gap of "outside" (level 0) between them and around the border, a single
whole-array operation (a shifted comparison, a ``bincount`` keyed by ROI id, one
``scipy.ndimage.label`` call) computes that matrix for every ROI at once: a neighbour that
falls in a gap is outside the mask, exactly as pyradiomics' bounds and mask checks say.
The only per-ROI Python work is the copy of each crop into its slot.

Packing: shelves (rows of ROIs) filled tallest-first, on a canvas several times wider than
tall, which keeps the waste small and the diagonal layouts of :mod:`.fast_texture` cheap.

Discretisation (pyradiomics ``imageoperations.getBinEdges`` + ``numpy.digitize``, on the
float64 values the reference backend passes): with ``binWidth`` the edges are
``arange(min - min % binWidth, max + 2 * binWidth, binWidth)``, so a ROI's level table only
depends on that lower bound; with ``binCount`` they are ``histogram([min, max], binCount)``
edges with the last one raised by 1, so they depend on (min, max). Since the pixels are
uint8, each distinct bound gives one 256-entry look-up table and the whole canvas is
discretised by one gather.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

MAX_CANVAS_WIDTH = 1 << 14


@dataclass
class Mosaic:
    """A batch of n rectangular ROIs on one canvas (index n marks "outside")."""

    values: np.ndarray  # H x W uint8 raw intensities (0 in gaps; use ``roi`` for the mask)
    roi: np.ndarray  # H x W intp ROI index, n outside
    levels: np.ndarray  # H x W uint8/uint16 discretised grey level 1..G, 0 outside
    hist: np.ndarray  # n x 256 int64 counts of the raw values of each ROI
    level_counts: np.ndarray  # n x (G + 1) int64 pixels per grey level (column 0 unused)
    ng: np.ndarray  # n int: pyradiomics' Ng, the highest grey level in the ROI
    heights: np.ndarray  # n int
    widths: np.ndarray  # n int
    ys: np.ndarray  # n int: top row of each ROI on the canvas
    xs: np.ndarray  # n int: left column of each ROI on the canvas
    cache: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.heights)

    @property
    def n_levels(self) -> int:
        """G: the highest grey level of any ROI (levels run 1..G, 0 is outside)."""
        return self.level_counts.shape[1] - 1

    def roi_level(self) -> np.ndarray:
        """``roi * (G + 1) + level`` per pixel (intp): the bincount key of (ROI, level) pairs.

        Gap pixels land in the row of the virtual ROI n, which callers drop.
        """
        if "roi_level" not in self.cache:
            self.cache["roi_level"] = self.roi * (self.n_levels + 1) + self.levels
        return self.cache["roi_level"]


def pack(heights: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Shelf-pack rectangles with one-pixel gaps and a one-pixel border.

    Returns (ys, xs, H, W). Rows 0 and H-1 and columns 0 and W-1 stay empty, and no two
    rectangles touch, not even diagonally.
    """
    n = len(heights)
    ys = np.zeros(n, dtype=np.intp)
    xs = np.zeros(n, dtype=np.intp)
    if n == 0:
        return ys, xs, 2, 2
    area = float(((heights + 1) * (widths + 1)).sum())
    width = max(int(widths.max()) + 2, min(MAX_CANVAS_WIDTH, int(4 * math.sqrt(area)) + 2))
    order = np.lexsort((-widths, -heights))  # tallest first: each shelf's height is its first
    y, x, shelf = 1, 1, 0
    hs, ws = heights.tolist(), widths.tolist()
    for i in order.tolist():
        h, w = hs[i], ws[i]
        if x + w + 1 > width:
            y, x, shelf = y + shelf + 1, 1, 0
        ys[i], xs[i] = y, x
        x += w + 1
        shelf = max(shelf, h)
    return ys, xs, y + shelf + 1, width


def level_tables(
    hist: np.ndarray, bin_width: float | None, bin_count: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-ROI 256-entry grey-level tables (n x 256, 0 for values the ROI lacks) and Ng."""
    n = hist.shape[0]
    present = hist > 0
    vmin = present.argmax(axis=1)
    vmax = 255 - present[:, ::-1].argmax(axis=1)
    values = np.arange(256, dtype=np.float64)
    if bin_count is not None:
        keys = vmin * 256 + vmax
        rows = {}
        for key in np.unique(keys).tolist():
            lo, hi = divmod(key, 256)
            edges = np.histogram(np.array([lo, hi], dtype=np.float64), bin_count)[1]
            edges[-1] += 1
            rows[key] = np.digitize(values, edges)
        uniq, inverse = np.unique(keys, return_inverse=True)
    else:
        width = float(bin_width if bin_width is not None else 25)
        low = vmin.astype(np.float64) - np.mod(vmin.astype(np.float64), width)
        uniq, inverse = np.unique(low, return_inverse=True)
        rows = {}
        for lo in uniq.tolist():
            # arange's elements are start + i * step whatever the stop, so one table per
            # lower bound serves every ROI maximum (pyradiomics stops at max + 2 * width)
            edges = np.arange(np.float64(lo), 255.0 + 2 * width, width)
            rows[lo] = np.digitize(values, edges)
    table = np.stack([rows[k] for k in uniq.tolist()])[inverse.reshape(-1)]
    table = np.where(present, table, 0)
    ng = table[np.arange(n), vmax]
    return table, ng


def build(
    crops: Sequence[np.ndarray], bin_width: float | None, bin_count: int | None
) -> Mosaic:
    """Pack uint8 crops (each one whole rectangular ROI) and discretise them."""
    n = len(crops)
    heights = np.array([c.shape[0] for c in crops], dtype=np.intp)
    widths = np.array([c.shape[1] for c in crops], dtype=np.intp)
    ys, xs, height, width = pack(heights, widths)
    values = np.zeros((height, width), dtype=np.uint8)
    roi = np.full((height, width), n, dtype=np.intp)
    for i, crop in enumerate(crops):  # the only per-ROI loop: one copy into the slot
        y, x = ys[i], xs[i]
        values[y:y + crop.shape[0], x:x + crop.shape[1]] = crop
        roi[y:y + crop.shape[0], x:x + crop.shape[1]] = i
    key = roi * 256 + values
    hist = np.bincount(key.ravel(), minlength=(n + 1) * 256).reshape(n + 1, 256)[:n]
    table, ng = level_tables(hist, bin_width, bin_count)
    top = int(ng.max()) if n else 1
    dtype = np.uint8 if top < 256 else np.uint16
    full = np.zeros((n + 1, 256), dtype=dtype)
    full[:n] = table
    levels = full.ravel()[key]
    pair = np.repeat(np.arange(n) * (top + 1), 256) + table.ravel()
    level_counts = np.bincount(pair, weights=hist.ravel(), minlength=n * (top + 1))
    level_counts = level_counts.reshape(n, top + 1).astype(np.int64)
    level_counts[:, 0] = 0
    return Mosaic(values, roi, levels, hist, level_counts, ng, heights, widths, ys, xs)
