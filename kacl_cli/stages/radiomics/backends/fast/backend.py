"""The fast radiomics backend: pyradiomics' 2D features for thousands of rectangles at once.

Same columns, same values (parity-tested to 1e-4 relative, see docs/radiomics-fast.md) and
the same per-ROI reasons as the pyradiomics backend (:mod:`.pyrad`), computed with
batched numpy over all ROIs of a chunk instead of one SimpleITK round trip per ROI:

1. the ROIs of a chunk are packed into one canvas (:mod:`.fast_mosaic`), and every ROI's
   256-bin histogram gives its first-order features exactly (pixels are uint8) and
   pyradiomics' bin edges; with ``normalize`` each ROI also carries its image's 256-entry
   table of normalised values (:mod:`..normalize`), through which the histogram is read;
2. the texture matrices of all ROIs are counted by the compiled kernel
   (:mod:`.fast_kernel`, ``_texture.c``) or, where it is not built or
   ``KACL_RADIOMICS_KERNEL=numpy``, by whole-canvas numpy/scipy passes
   (:mod:`.fast_texture`); both give the same integers, and the features come from them
   through the same vectorised formulas;
3. shape2D is closed-form: kacl's ROIs are axis-aligned rectangles, whose marching-squares
   contour pyradiomics computes as the rectangle with its four corners cut by half a pixel.

Exploited assumptions, all true for kacl's ROIs: the ROI is a whole rectangle of a 2D uint8
image, the image type is Original, distances is [1] and there is no resampling,
re-segmentation or GLCM weighting. Normalisation (``normalize``, ``normalizeScale``,
``removeOutliers``) is over the whole stored image, as in the pyradiomics backend.
Settings outside that are refused with a message pointing at ``--backend pyradiomics``
rather than silently computed differently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kacl_cli.errors import InputError
from kacl_cli.stages.radiomics import settings as settings_mod
from kacl_cli.stages.radiomics.backends import normalize as norm_mod
from kacl_cli.stages.radiomics.backends.base import (
    REASON_ERROR,
    Backend,
    BatchResult,
    Box,
    Spacing,
    error_reason,
    roi_problem,
)
from kacl_cli.stages.radiomics.backends.fast import kernel as fast_kernel
from kacl_cli.stages.radiomics.backends.fast import texture
from kacl_cli.stages.radiomics.backends.fast.mosaic import Mosaic, build

EPS = np.spacing(1)
CHUNK_PIXELS = 1 << 20  # canvas pixels per chunk: big enough to amortise, small for the cache
# The kernel walks one ROI at a time, so its chunks only bound memory (raw canvas, counts)
# and amortise the per-chunk numpy feature code over more ROIs.
KERNEL_CHUNK_PIXELS = 1 << 22
DENSE_BYTES = 256 << 20  # cap on the n x 4 x G x G co-occurrence array of a chunk

# Settings that cannot change the features of a whole-rectangle ROI on the Original image.
NEUTRAL_SETTINGS = frozenset({
    "label", "label_channel", "additionalInfo", "geometryTolerance", "correctMask",
    "padDistance", "preCrop", "interpolator", "force2Ddimension", "resegmentMode",
    "resegmentShape", "sigma", "start_level", "level",
    "wavelet", "gradientUseSpacing", "lbp2DRadius", "lbp2DSamples", "lbp2DMethod",
    "lbp3DLevels", "lbp3DIcosphereRadius", "lbp3DIcosphereSubdivision",
})
# Settings the fast backend implements only at these values.
FIXED_SETTINGS: dict[str, Any] = {
    "resampledPixelSpacing": None,
    "resegmentRange": None,
    "force2D": False,
    "weightingNorm": None,
}
HANDLED_SETTINGS = frozenset({
    "binWidth", "binCount", "voxelArrayShift", "symmetricalGLCM", "gldm_a", "distances",
    "minimumROIDimensions", "minimumROISize", "normalize", "normalizeScale", "removeOutliers",
})
TEXTURE = ("glcm", "glrlm", "glszm", "gldm", "ngtdm")


@dataclass(frozen=True)
class FastOptions:
    """The pyradiomics settings the fast path reads, validated once per batch."""

    bin_width: float | None
    bin_count: int | None
    shift: float
    symmetric: bool
    gldm_a: int
    min_dims: int
    min_size: float | None
    normalization: norm_mod.Normalization | None = None

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> FastOptions:
        image_types = settings.get("imageType", {"Original": {}})
        if set(image_types) != {"Original"} or image_types["Original"] not in (None, {}):
            raise _unsupported(f"imageType {sorted(image_types)} (Original only)")
        setting = settings.get("setting", {})
        for key, value in setting.items():
            if key in NEUTRAL_SETTINGS or key in HANDLED_SETTINGS:
                continue
            if key in FIXED_SETTINGS:
                if value in (FIXED_SETTINGS[key], None) or (key == "force2D" and not value):
                    continue
                raise _unsupported(f"setting {key}={value!r}")
            raise _unsupported(f"setting {key!r}")
        distances = setting.get("distances", [1])
        if list(distances or [1]) != [1]:
            raise _unsupported(f"distances={distances!r} (only [1])")
        bin_count = setting.get("binCount")
        bin_width = setting.get("binWidth", 25)
        if bin_count is not None and (int(bin_count) != bin_count or bin_count < 1):
            raise InputError(f"binCount must be a positive integer, got {bin_count!r}")
        if bin_count is None and not (isinstance(bin_width, int | float) and bin_width > 0):
            raise InputError(f"binWidth must be a positive number, got {bin_width!r}")
        alpha = setting.get("gldm_a", 0)
        if int(alpha) != alpha or alpha < 0:
            raise _unsupported(f"gldm_a={alpha!r} (a non-negative integer)")
        min_size = setting.get("minimumROISize")
        return cls(
            bin_width=None if bin_count is not None else float(bin_width),
            bin_count=None if bin_count is None else int(bin_count),
            shift=float(setting.get("voxelArrayShift", 0) or 0),
            symmetric=bool(setting.get("symmetricalGLCM", True)),
            gldm_a=int(alpha),
            min_dims=int(setting.get("minimumROIDimensions", 2) or 1),
            min_size=None if min_size is None else float(min_size),
            normalization=norm_mod.Normalization.from_setting(setting),
        )

    def max_levels(self, values: np.ndarray | None = None) -> int:
        """An upper bound on the grey levels of a uint8 ROI (sizes the dense arrays);
        ``values``: the n x 256 normalised value tables, when normalising."""
        if self.bin_count is not None:
            return self.bin_count
        span = 256.0 if values is None or not len(values) else float(
            np.max(values[:, -1] - values[:, 0]))
        return int(math.ceil(span / float(self.bin_width))) + 2

    def mask_problem(self, height: int, width: int) -> str | None:
        """pyradiomics' ``checkMask`` verdict for a whole-rectangle mask, worded the same."""
        dims = int(height > 1) + int(width > 1)
        if dims == 0:
            return (f"{REASON_ERROR}: mask only contains 1 segmented voxel! "
                    "Cannot extract features for a single voxel.")
        if dims < self.min_dims:
            return (f"{REASON_ERROR}: mask has too few dimensions (number of dimensions {dims}, "
                    f"minimum required {self.min_dims})")
        size = height * width
        if self.min_size is not None and size <= self.min_size:
            return (f"{REASON_ERROR}: Size of the ROI is too small (minimum size: "
                    f"{self.min_size:g}, ROI size: {size:g}")
        return None


def _unsupported(what: str) -> InputError:
    return InputError(
        f"the fast radiomics backend does not implement {what}; "
        "use --backend pyradiomics for these settings"
    )


class FastBackend(Backend):
    """Vectorised pyradiomics-equivalent extraction (see the module docstring)."""

    name = "fast"
    rois_per_task = 2048  # ~0.5 s at 256 px on one core: commits stay a few % of a task
    seconds_per_roi = 4e-4  # 500 real NIH ROIs at 256 px: 0.17 s (benchmarks/fixed_cost.py)

    def _extract_into(
        self,
        result: BatchResult,
        images: list[np.ndarray],
        boxes: list[Box],
        settings: dict[str, Any],
        spacings: list[Spacing],
        names: list[str],
    ) -> None:
        opts = FastOptions.from_settings(settings)
        fast_kernel.use_kernel()  # a bad KACL_RADIOMICS_KERNEL fails the call, not each ROI
        out, reasons = result.features, result.reasons
        norm = opts.normalization
        tables: dict[tuple, np.ndarray | str] = {}  # image -> value table or reason
        todo: list[int] = []
        crops: list[np.ndarray] = []
        values: list[np.ndarray] = []
        for i, (image, box) in enumerate(zip(images, boxes, strict=True)):
            image = np.asarray(image)
            reason = roi_problem(image, box)
            if reason is None:
                x0, y0, x1, y1 = (int(v) for v in box)
                reason = opts.mask_problem(y1 - y0, x1 - x0) or _pixel_problem(image)
            if reason is None and norm is not None:
                key = norm_mod.image_key(image)
                if key not in tables:
                    tables[key] = _image_table(image, norm)
                table = tables[key]
                reason = table if isinstance(table, str) else None
            if reason is not None:
                reasons[i] = reason
                continue
            try:
                crops.append(_as_uint8(image[y0:y1, x0:x1]))
            except ValueError as exc:
                reasons[i] = f"{REASON_ERROR}: {exc}"
                continue
            if norm is not None:
                values.append(table)
            todo.append(i)
        if not todo:
            return
        sp = [spacings[i] for i in todo]
        vals = np.stack(values) if norm is not None else None
        try:
            out[todo] = extract_rois(crops, settings, sp, names=names, values=vals)
        except Exception:  # noqa: BLE001 - isolate the ROI that breaks the batch
            for k, i in enumerate(todo):
                try:
                    one = None if vals is None else vals[k:k + 1]
                    out[i] = extract_rois([crops[k]], settings, [sp[k]], names=names,
                                          values=one)[0]
                except Exception as exc:  # noqa: BLE001 - one bad ROI must not end the batch
                    reasons[i] = error_reason(exc)


def _image_table(image: np.ndarray, norm: norm_mod.Normalization) -> np.ndarray | str:
    """The whole image's normalised value table, or the reason it has none."""
    problem = norm_mod.image_problem(image)
    return problem if problem is not None else norm_mod.image_table(image, norm)


def _pixel_problem(image: np.ndarray) -> str | None:
    if image.dtype == np.uint8 or image.dtype == bool:
        return None
    if np.issubdtype(image.dtype, np.integer):
        return None  # range checked on the crop
    return f"{REASON_ERROR}: the fast backend needs 8-bit pixels (got {image.dtype})"


def _as_uint8(crop: np.ndarray) -> np.ndarray:
    if crop.dtype == np.uint8:
        return crop
    if crop.size and (crop.min() < 0 or crop.max() > 255):
        raise ValueError(f"pixel values outside 0..255 in a {crop.dtype} image")
    return crop.astype(np.uint8)


def extract_rois(
    crops: Sequence[np.ndarray],
    settings: dict[str, Any],
    spacings: Sequence[Spacing] | None = None,
    names: list[str] | None = None,
    values: np.ndarray | None = None,
) -> np.ndarray:
    """Features (n x F, columns = ``names`` or the settings' names) of whole uint8 crops.

    The lower-level entry point: each crop *is* a rectangular ROI (no mask). Crops of a
    single pixel give NaN rows (pyradiomics refuses them); 1-pixel-wide lines give what
    pyradiomics gives with ``minimumROIDimensions: 1``. No other per-ROI checks happen here.
    With ``normalize`` in the settings, ``values`` (n x 256) is each crop's image's table of
    normalised values (:func:`..normalize.image_table` of the whole image; a crop alone
    does not know its image's statistics); without it, ``values`` must be None.
    """
    opts = FastOptions.from_settings(settings)
    names = settings_mod.feature_names(settings) if names is None else names
    n = len(crops)
    sp = np.ones((n, 2)) if spacings is None else np.asarray(spacings, dtype=np.float64)
    if sp.shape != (n, 2):
        raise ValueError(f"{n} crops but spacings of shape {sp.shape}")
    if (values is None) != (opts.normalization is None):
        raise ValueError("normalize needs each crop's value table (values=), and only it does")
    if values is not None:
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (n, 256):
            raise ValueError(f"{n} crops but value tables of shape {values.shape}")
    crops = [np.asarray(c) for c in crops]
    for c in crops:
        if c.ndim != 2 or c.size == 0 or c.dtype != np.uint8:
            raise ValueError(f"crops must be non-empty 2D uint8 arrays (got {c.dtype} {c.shape})")
    classes = {name.split("_")[1] for name in names}
    out = np.full((n, len(names)), np.nan, dtype=np.float64)
    g = opts.max_levels(values)
    max_rois = max(1, DENSE_BYTES // (texture.N_ANGLES * g * g * 8))
    compiled = fast_kernel.use_kernel()
    chunk_pixels = KERNEL_CHUNK_PIXELS if compiled else CHUNK_PIXELS
    for chunk in _chunks([c.shape for c in crops], max_rois, chunk_pixels):
        tables = None if values is None else values[chunk]
        found = _features([crops[i] for i in chunk], sp[chunk], opts, classes, compiled, tables)
        rows = slice(chunk[0], chunk[-1] + 1)  # chunks are runs of consecutive crops
        for j, name in enumerate(names):
            out[rows, j] = found[name]
    single = np.array([c.size == 1 for c in crops], dtype=bool)
    out[single] = np.nan
    return out


def _chunks(
    shapes: list[tuple[int, ...]], max_rois: int, chunk_pixels: int = CHUNK_PIXELS
) -> list[np.ndarray]:
    chunks, current, pixels = [], [], 0
    for i, (h, w) in enumerate(shapes):
        size = (h + 1) * (w + 1)
        if current and (pixels + size > chunk_pixels or len(current) >= max_rois):
            chunks.append(np.array(current))
            current, pixels = [], 0
        current.append(i)
        pixels += size
    if current:
        chunks.append(np.array(current))
    return chunks


def _features(
    crops: list[np.ndarray], spacing: np.ndarray, opts: FastOptions, classes: set[str],
    compiled: bool, values: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    if compiled:
        m = fast_kernel.build_raw(crops, opts.bin_width, opts.bin_count, values)
        fast_kernel.fill(m, classes & set(TEXTURE), opts.gldm_a)
    else:
        m = build(crops, opts.bin_width, opts.bin_count, values)
    found: dict[str, dict[str, np.ndarray]] = {}
    area = spacing[:, 0] * spacing[:, 1]
    if "firstorder" in classes:
        found["firstorder"] = first_order(m, area, opts.shift)
    if "shape2D" in classes:
        found["shape2D"] = shape2d(m.heights, m.widths, spacing[:, 0], spacing[:, 1])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if "glcm" in classes:
            found["glcm"] = (fast_kernel.glcm(m, opts.symmetric) if compiled
                             else texture.glcm(m, opts.symmetric))
        if "glrlm" in classes:
            found["glrlm"] = texture.glrlm(m, fast_kernel.glrlm_sums(m) if compiled else None)
        if "glszm" in classes:
            found["glszm"] = texture.glszm(m)
        if "gldm" in classes:
            found["gldm"] = texture.gldm(m, opts.gldm_a)
        if "ngtdm" in classes:
            found["ngtdm"] = texture.ngtdm(m)
    return {
        f"original_{cls}_{name}": value
        for cls, feats in found.items() for name, value in feats.items()
    }


# ------------------------------------------------------------------------------ first order


def _percentile(cum: np.ndarray, count: np.ndarray, q: float, v: np.ndarray) -> np.ndarray:
    """numpy's default ('linear') percentile, read off cumulative histograms of 0..255.

    ``v`` (n x 256 or 1 x 256) is the value of each raw level: the order statistics of the
    values are the values of the raw order statistics, as ``v`` is non-decreasing."""
    virtual = (count - 1) * np.true_divide(q, 100)
    below = np.floor(virtual)
    gamma = virtual - below
    lo = below.astype(np.int64)
    hi = np.minimum(lo + 1, count.astype(np.int64) - 1)
    rows = np.arange(len(cum)) % len(v)
    a = v[rows, (cum > lo[:, None]).argmax(axis=1)]
    b = v[rows, (cum > hi[:, None]).argmax(axis=1)]
    diff = b - a
    return np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)


def first_order(m: Mosaic, pixel_area: np.ndarray, shift: float = 0.0) -> dict[str, np.ndarray]:
    """pyradiomics firstorder from each ROI's exact 256-bin histogram (of raw values,
    read through the ROI's normalised value table ``m.values`` when there is one)."""
    c = m.hist.astype(np.float64)
    v = np.arange(256, dtype=np.float64)[None, :] if m.values is None else m.values
    rows = np.arange(len(c)) % len(v)
    count = c.sum(axis=1)
    cum = np.cumsum(m.hist, axis=1)
    mean = (c * v).sum(axis=1) / count
    present = m.hist > 0
    vmin = v[rows, present.argmax(axis=1)]
    vmax = v[rows, 255 - present[:, ::-1].argmax(axis=1)]
    dev = v - mean[:, None]
    dev2 = dev * dev
    m2 = (c * dev2).sum(axis=1) / count
    m3 = (c * dev2 * dev).sum(axis=1) / count
    m4 = (c * dev2 * dev2).sum(axis=1) / count
    m2_safe = np.where(m2 == 0, 1.0, m2)
    energy = (c * ((v + shift) * (v + shift))).sum(axis=1)
    p10, p25, p50, p75, p90 = (_percentile(cum, count, q, v) for q in (10, 25, 50, 75, 90))
    robust = (v - p10[:, None] >= 0) & (v - p90[:, None] <= 0)
    cr = np.where(robust, c, 0.0)
    mean_r = (cr * v).sum(axis=1) / cr.sum(axis=1)
    p = m.level_counts[:, 1:] / count[:, None]
    f = {
        "10Percentile": p10,
        "90Percentile": p90,
        "Energy": energy,
        "Entropy": -(p * np.log2(p + EPS)).sum(axis=1),
        "InterquartileRange": p75 - p25,
        "Kurtosis": m4 / m2_safe**2.0,
        "Maximum": vmax,
        "MeanAbsoluteDeviation": (c * np.abs(dev)).sum(axis=1) / count,
        "Mean": mean,
        "Median": p50,
        "Minimum": vmin,
        "Range": vmax - vmin,
        "RobustMeanAbsoluteDeviation": (cr * np.abs(v - mean_r[:, None])).sum(1)
        / cr.sum(axis=1),
        "RootMeanSquared": np.sqrt(energy / count),
        "Skewness": m3 / m2_safe**1.5,
        "TotalEnergy": energy * pixel_area,
        "Uniformity": (p**2).sum(axis=1),
        "Variance": m2,
    }
    return f


# ---------------------------------------------------------------------------------- shape2D


def shape2d(
    heights: np.ndarray, widths: np.ndarray, sx: np.ndarray, sy: np.ndarray
) -> dict[str, np.ndarray]:
    """pyradiomics shape2D of whole h x w rectangles with pixel spacing (sx, sy).

    pyradiomics' marching-squares contour of a rectangle of pixel centres runs half a pixel
    outside them, with each corner cut by a diagonal of half a pixel: perimeter
    2(w-1)sx + 2(h-1)sy + 2*hypot(sx, sy), area (wh - 1/2) sx sy; the longest chord joins
    opposite cut corners. The axes come from the pixel-centre covariance, diag(sx^2 (w^2-1),
    sy^2 (h^2-1)) / 12.
    """
    h = heights.astype(np.float64)
    w = widths.astype(np.float64)
    mesh = (w * h - 0.5) * sx * sy
    perimeter = 2 * (w - 1) * sx + 2 * (h - 1) * sy + 2 * np.hypot(sx, sy)
    diameter = np.sqrt(np.maximum.reduce([
        (w * sx) ** 2 + ((h - 1) * sy) ** 2,
        ((w - 1) * sx) ** 2 + (h * sy) ** 2,
        ((w - 0.5) * sx) ** 2 + ((h - 0.5) * sy) ** 2,
    ]))
    var_x = sx**2 * (w**2 - 1) / 12
    var_y = sy**2 * (h**2 - 1) / 12
    minor, major = np.minimum(var_x, var_y), np.maximum(var_x, var_y)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "Elongation": np.sqrt(minor / major),
            "MajorAxisLength": np.sqrt(major) * 4,
            "MaximumDiameter": diameter,
            "MeshSurface": mesh,
            "MinorAxisLength": np.sqrt(minor) * 4,
            "Perimeter": perimeter,
            "PerimeterSurfaceRatio": perimeter / mesh,
            "PixelSurface": w * h * sx * sy,
            "Sphericity": 2 * np.sqrt(np.pi * mesh) / perimeter,
        }
