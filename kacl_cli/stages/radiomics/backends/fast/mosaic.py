"""Many rectangular ROIs packed into one 2D canvas, discretised the way pyradiomics does.

Why a mosaic: every texture matrix pyradiomics builds (GLCM, GLRLM, GLSZM, GLDM, NGTDM) only
looks at 8-neighbours *inside the mask*. If all ROIs of a batch are copied into one canvas
with a one-pixel gap of "outside" (level 0) between them and around the border, a single
whole-array operation (a shifted comparison, a ``bincount`` keyed by ROI id, one
``scipy.ndimage.label`` call) computes that matrix for every ROI at once: a neighbour that
falls in a gap is outside the mask, exactly as pyradiomics' bounds and mask checks say.
The only per-ROI Python work is the copy of each crop into its slot. (For the compiled
kernel, :func:`.fast_kernel.build_raw` packs the raw pixels the same way; there the canvas
only carries all crops in one buffer, as the kernel copies each ROI into its own scratch.)

Packing: shelves (rows of ROIs) filled tallest-first on a roughly square canvas; the shelves
are also the bands in which :mod:`.fast_texture` shears the canvas for diagonal runs.

Discretisation (pyradiomics ``imageoperations.getBinEdges`` + ``numpy.digitize``, on the
float64 values the reference backend passes): with ``binWidth`` the edges are
``arange(min - min % binWidth, max + 2 * binWidth, binWidth)``, so a ROI's level table only
depends on that lower bound; with ``binCount`` they are ``histogram([min, max], binCount)``
edges with the last one raised by 1, so they depend on (min, max). Since the pixels are
uint8, each distinct bound gives one 256-entry look-up table, applied to each crop as it is
copied into the canvas. With ``normalize`` the values are each ROI's image's normalised
values of 0..255 (``values``, n x 256, non-decreasing); the tables are then computed per
distinct (value table, bounds), with the same ``arange``/``histogram`` edges on those values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

MAX_CANVAS_WIDTH = 1 << 14


@dataclass
class Mosaic:
    """A batch of n rectangular ROIs on one canvas."""

    codes: np.ndarray | None  # H x W roi * (G + 1) + level (narrowest unsigned dtype);
    # ``outside`` (= n * (G + 1)) in gaps; None in a raw mosaic (compiled kernel)
    levels: np.ndarray | None  # H x W uint8/uint16 discretised grey level 1..G, 0 outside
    hist: np.ndarray  # n x 256 int64 counts of the raw values of each ROI
    level_counts: np.ndarray  # n x (G + 1) int64 pixels per grey level (column 0 unused)
    ng: np.ndarray  # n int: pyradiomics' Ng, the highest grey level in the ROI
    heights: np.ndarray  # n int
    widths: np.ndarray  # n int
    bands: list[slice]  # row ranges of the shelves, each including its empty rows above/below
    ys: np.ndarray  # n int: canvas row of each ROI's top-left pixel
    xs: np.ndarray  # n int: canvas column of each ROI's top-left pixel
    raw: np.ndarray | None = None  # raw mosaic only: H x W uint8 pixels as cropped
    tables: np.ndarray | None = None  # raw mosaic only: n x 256 raw value -> level
    values: np.ndarray | None = None  # n x 256 normalised value of each raw value (normalize)
    cache: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.heights)

    @property
    def n_levels(self) -> int:
        """G: the highest grey level of any ROI (levels run 1..G, 0 is outside)."""
        return self.level_counts.shape[1] - 1

    @property
    def outside(self) -> int:
        """The code of gap pixels: level 0 of the virtual ROI n, dropped by every consumer."""
        return self.n * (self.n_levels + 1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.levels.shape if self.levels is not None else self.raw.shape

    def compact_codes(self) -> np.ndarray:
        """``codes`` (already in the narrowest unsigned dtype: cheap to transpose and shear)."""
        if self.codes is None:
            raise RuntimeError("a raw mosaic has no code canvas (compiled kernel only)")
        return self.codes


def pack(
    heights: np.ndarray, widths: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int, int, list[slice]]:
    """Shelf-pack rectangles with one-pixel gaps and a one-pixel border.

    Returns (ys, xs, H, W, bands). Rows 0 and H-1 and columns 0 and W-1 stay empty, no two
    rectangles touch, not even diagonally, and ``bands`` are the shelves' row ranges with
    their empty rows above and below. A roughly square canvas keeps shelves short, which
    fills it best (85-90% for the NIH box-size distribution).
    """
    n = len(heights)
    ys = np.zeros(n, dtype=np.intp)
    xs = np.zeros(n, dtype=np.intp)
    if n == 0:
        return ys, xs, 2, 2, []
    area = float(((heights + 1) * (widths + 1)).sum())
    width = max(int(widths.max()) + 2, min(MAX_CANVAS_WIDTH, int(math.sqrt(area)) + 2))
    order = np.lexsort((-widths, -heights))  # tallest first: each shelf's height is its first
    y, x, shelf = 1, 1, 0
    bands = []
    hs, ws = heights.tolist(), widths.tolist()
    for i in order.tolist():
        h, w = hs[i], ws[i]
        if x + w + 1 > width:
            bands.append(slice(y - 1, y + shelf + 1))
            y, x, shelf = y + shelf + 1, 1, 0
        ys[i], xs[i] = y, x
        x += w + 1
        shelf = max(shelf, h)
    bands.append(slice(y - 1, y + shelf + 1))
    return ys, xs, y + shelf + 1, width, bands

def _edges(lo: float, hi: float, bin_width: float | None, bin_count: int | None) -> np.ndarray:
    """pyradiomics' ``getBinEdges`` for an ROI whose values run from ``lo`` to ``hi``."""
    if bin_count is not None:
        edges = np.histogram(np.array([lo, hi], dtype=np.float64), bin_count)[1]
        edges[-1] += 1
        return edges
    width = float(bin_width if bin_width is not None else 25)
    low = np.float64(lo) - np.mod(np.float64(lo), width)
    edges = np.arange(low, np.float64(hi) + 2 * width, width)
    if len(edges) == 1:  # pyradiomics' flat-region rule
        edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
    return edges


def _value_level_tables(
    hist: np.ndarray, values: np.ndarray, bin_width: float | None, bin_count: int | None
) -> np.ndarray:
    """Level tables of ROIs whose raw values 0..255 stand for ``values`` (n x 256).

    One ``digitize`` per distinct (value table, lower edge) (binWidth; the upper bound only
    lengthens ``arange``, whose elements do not depend on it, so the group's highest maximum
    serves all) or (value table, min, max) (binCount); ROIs of one image share a table.
    """
    n = hist.shape[0]
    present = hist > 0
    rows = np.arange(n)
    lo = values[rows, present.argmax(axis=1)]
    hi = values[rows, 255 - present[:, ::-1].argmax(axis=1)]
    table = np.zeros((n, 256), dtype=np.int64)
    groups: dict[tuple, list[int]] = {}
    for i in range(n):
        if bin_count is not None:
            key = (values[i].tobytes(), float(lo[i]), float(hi[i]))
        else:
            width = float(bin_width if bin_width is not None else 25)
            key = (values[i].tobytes(), float(lo[i] - np.mod(lo[i], width)))
        groups.setdefault(key, []).append(i)
    for members in groups.values():
        first = members[0]
        top = float(hi[members].max())
        table[members] = np.digitize(values[first], _edges(lo[first], top, bin_width, bin_count))
    return table


def level_tables(
    hist: np.ndarray, bin_width: float | None, bin_count: int | None,
    values: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-ROI 256-entry grey-level tables (n x 256, 0 for values the ROI lacks) and Ng;
    ``values``: each ROI's normalised value of every raw value (``normalize``), else None."""
    n = hist.shape[0]
    present = hist > 0
    vmin = present.argmax(axis=1)
    vmax = 255 - present[:, ::-1].argmax(axis=1)
    if values is not None:
        table = np.where(present, _value_level_tables(hist, values, bin_width, bin_count), 0)
        return table, table[np.arange(n), vmax]
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


def discretise(
    hist: np.ndarray, bin_width: float | None, bin_count: int | None,
    values: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-ROI level tables (n x 256, uint8/uint16), Ng and pixels per level (n x (G + 1))."""
    n = hist.shape[0]
    table, ng = level_tables(hist, bin_width, bin_count, values)
    top = int(ng.max()) if n else 1
    g1 = top + 1
    pair = np.repeat(np.arange(n) * g1, 256) + table.ravel()
    level_counts = np.bincount(pair, weights=hist.ravel(), minlength=n * g1)
    level_counts = level_counts.reshape(n, g1).astype(np.int64)
    level_counts[:, 0] = 0
    return table.astype(np.uint8 if top < 256 else np.uint16), ng, level_counts


def build(
    crops: Sequence[np.ndarray], bin_width: float | None, bin_count: int | None,
    values: np.ndarray | None = None,
) -> Mosaic:
    """Pack uint8 crops (each one whole rectangular ROI) and discretise them (``values``:
    see :func:`level_tables`)."""
    n = len(crops)
    heights = np.array([c.shape[0] for c in crops], dtype=np.intp)
    widths = np.array([c.shape[1] for c in crops], dtype=np.intp)
    ys, xs, height, width, bands = pack(heights, widths)
    hist = np.zeros((n, 256), dtype=np.int64)
    for i, crop in enumerate(crops):
        hist[i] = np.bincount(crop.ravel(), minlength=256)
    level_table, ng, level_counts = discretise(hist, bin_width, bin_count, values)
    g1 = level_counts.shape[1]
    code_dtype = np.uint16 if n * g1 < 1 << 16 else np.uint32 if n * g1 < 1 << 32 else np.intp
    code_table = (level_table + (np.arange(n, dtype=np.intp) * g1)[:, None]).astype(code_dtype)
    codes = np.full((height, width), n * g1, dtype=code_dtype)
    levels = np.zeros((height, width), dtype=level_table.dtype)
    for i, crop in enumerate(crops):  # the only per-ROI work: two table look-ups per crop
        y, x = ys[i], xs[i]
        h, w = crop.shape
        np.take(code_table[i], crop, out=codes[y:y + h, x:x + w], mode="clip")
        np.take(level_table[i], crop, out=levels[y:y + h, x:x + w], mode="clip")
    return Mosaic(codes, levels, hist, level_counts, ng, heights, widths, bands, ys, xs,
                  values=values)
