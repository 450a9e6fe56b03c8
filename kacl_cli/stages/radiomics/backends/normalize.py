"""pyradiomics' intensity normalisation (``normalize``), shared by both radiomics backends.

pyradiomics' ``normalizeImage`` maps every pixel of the *image* (not of the ROI) to
``f(x) = s * clip((x - mu) / sigma, -n, n)``: ``mu`` and ``sigma`` are the mean and the
(n-1) standard deviation of all pixels of the image (SimpleITK ``Normalize``), ``n`` is
``removeOutliers`` (no clipping when unset) and ``s`` is ``normalizeScale`` (default 1). The
extractor does this right after loading, before cropping to the mask and before binning, so
first-order features see the normalised float values and ``binWidth`` is in normalised units.

Which image: kacl's ROIs are rectangles of the **whole stored X-ray** (``store.h5`` at store
size), so the statistics come from the whole stored image, whichever backend runs. That is
the point of normalising: it removes each image's exposure (its mean grey level and
contrast), so an ROI's first-order Mean says how bright the ROI is *relative to its image*.
The pyradiomics backend hands pyradiomics only a crop around each ROI (for speed), so it
normalises the whole image first with pyradiomics' own ``normalizeImage`` and crops the
result (:func:`normalized_image`); the fast backend applies the same map to the 256 possible
values of a uint8 image (:func:`value_table`), which is exact because ``f`` is
non-decreasing: the ROI's histogram, order statistics and grey-level tables carry over.

An image of one grey level has ``sigma = 0``: pyradiomics turns it into NaN pixels; both
backends instead give such ROIs the reason :func:`image_problem` returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kacl_cli.stages.radiomics.backends.base import REASON_ERROR


@dataclass(frozen=True)
class Normalization:
    """The three pyradiomics settings that define ``normalizeImage``."""

    scale: float = 1.0
    outliers: float | None = None

    @classmethod
    def from_setting(cls, setting: dict[str, Any]) -> Normalization | None:
        """The normalisation a pyradiomics ``setting`` dict asks for, or None (off)."""
        if not setting.get("normalize"):
            return None
        outliers = setting.get("removeOutliers")
        return cls(scale=float(setting.get("normalizeScale", 1) or 1),
                   outliers=None if outliers is None else float(outliers))


def image_key(image: np.ndarray) -> tuple:
    """Identifies an image's pixels within one batch, where the same stored image comes as
    several views (the stage indexes one read-out array per ROI): its memory, not its id."""
    interface = image.__array_interface__
    return interface["data"][0], image.shape, interface["strides"], image.dtype.str


def image_stats(image: np.ndarray) -> tuple[float, float]:
    """``(mu, sigma)`` of all pixels exactly as SimpleITK's ``Normalize`` computes them.

    ITK's ``StatisticsImageFilter``: ``mu = sum / n``, ``sigma = sqrt((sumsq - sum * sum / n)
    / (n - 1))`` in doubles. For integer pixels ``sum`` and ``sumsq`` are exact integers
    whatever the summation order, so the same formula on exact sums gives ITK's values bit
    for bit (numpy's ``std`` differs in the last bits, and a last-bit difference moves a value
    that sits exactly on a ``binCount`` edge into the next bin) at a tenth of the cost of a
    SimpleITK call. Other pixel types go through ITK itself.
    """
    pixels = np.asarray(image)
    if not np.issubdtype(pixels.dtype, np.integer) and pixels.dtype != bool:
        import SimpleITK as sitk

        stats = sitk.StatisticsImageFilter()
        stats.Execute(sitk.GetImageFromArray(pixels.astype(np.float64)))
        return float(stats.GetMean()), float(stats.GetSigma())
    if pixels.dtype == np.uint8:  # the store's pixels: sums from the 256-bin histogram
        hist = np.bincount(pixels.ravel(), minlength=256)
        levels = np.arange(256, dtype=np.int64)
        total, squares = float(hist @ levels), float(hist @ (levels * levels))
    else:
        wide = pixels.astype(np.int64).ravel()
        total, squares = float(wide.sum()), float(np.dot(wide, wide))
    n = float(pixels.size)
    return total / n, float(np.sqrt((squares - total * total / n) / (n - 1.0)))


def image_problem(image: np.ndarray) -> str | None:
    """Why the image cannot be normalised (one grey level), or None."""
    pixels = np.asarray(image)
    if pixels.size and pixels.min() == pixels.max():
        return f"{REASON_ERROR}: cannot normalize an image of one grey level"
    return None


def value_table(mu: float, sigma: float, norm: Normalization) -> np.ndarray:
    """The normalised value of each raw value 0..255 (float64, non-decreasing).

    Same arithmetic order as SimpleITK/pyradiomics: ``(x - mu) * (1 / sigma)``, then the
    clip, then the scale.
    """
    values = (np.arange(256, dtype=np.float64) - mu) * (1.0 / sigma)
    if norm.outliers is not None:
        values = np.clip(values, -norm.outliers, norm.outliers)
    return values * norm.scale


def image_table(image: np.ndarray, norm: Normalization) -> np.ndarray:
    """:func:`value_table` of one whole uint8 image."""
    mu, sigma = image_stats(image)
    return value_table(mu, sigma, norm)


def normalized_image(image: np.ndarray, setting: dict[str, Any]) -> np.ndarray:
    """The whole image through pyradiomics' own ``normalizeImage`` (float64 array)."""
    import SimpleITK as sitk
    from radiomics import imageoperations

    normed = imageoperations.normalizeImage(
        sitk.GetImageFromArray(np.asarray(image, dtype=np.float64)), **setting)
    return sitk.GetArrayFromImage(normed)
