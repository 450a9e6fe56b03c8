"""The reference radiomics backend: pyradiomics on the raw 8-bit pixels, as a true 2D image.

How an ROI is handed to pyradiomics (each choice is checked by tests/radiomics/test_pyrad.py):
- The image is a 2D SimpleITK image, and ``force2D`` stays off. On a 2D image pyradiomics
  already computes 2D texture (4 GLCM directions); ``force2D`` with ``force2Ddimension`` 0
  would drop every direction with a component along the first array axis (y), leaving only
  horizontal neighbours, i.e. row-wise texture.
- The pixels are the store's raw 0..255 values, cast to float64. Passing uint8 arrays is a
  trap: pyradiomics computes the top bin edge as ``max + 2 * binWidth`` in the array's dtype,
  which wraps around at 255 and corrupts the binning of any ROI that contains white pixels.
- Only the ROI plus a small margin is given to SimpleITK (pyradiomics crops to the mask's
  bounding box anyway, so the features are identical and the copy is much cheaper), padded
  with non-ROI pixels so the mask never covers the whole image: pyradiomics refuses an
  all-ones mask with "No labels found in this mask".
- ``normalize``: pyradiomics normalises the image it is given, and it is given a crop; so
  the backend normalises the whole stored image itself, with pyradiomics' own
  ``normalizeImage``, crops the result and turns the extractor's ``normalize`` off
  (:mod:`.normalize`: the statistics come from the whole image, as in the fast backend).
- pyradiomics' logging is silenced; per-ROI failures become reasons (see :mod:`.backend`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from kacl_cli.stages.radiomics import settings as settings_mod
from kacl_cli.stages.radiomics.backends import normalize as norm_mod
from kacl_cli.stages.radiomics.backends.base import (
    Backend,
    BatchResult,
    Box,
    Spacing,
    error_reason,
    roi_problem,
)

MARGIN = 2  # pixels of real image kept around the ROI (and at least 1 of padding)


def silence_pyradiomics() -> None:
    """pyradiomics logs a warning per odd ROI to stderr; the stage records reasons instead."""
    import radiomics

    radiomics.setVerbosity(logging.CRITICAL + 10)
    logging.getLogger("radiomics").setLevel(logging.CRITICAL + 10)


def single_threaded_sitk() -> None:
    """One ITK thread per process: kacl parallelises across ROI worker processes, and ITK's
    per-filter thread pool costs more than it saves on images of a few thousand pixels."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def roi_arrays(image: np.ndarray, box: Box, margin: int = MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """The float64 crop around ``box`` and its 0/1 mask, padded so the mask has a 0 border."""
    h, w = image.shape
    x0, y0, x1, y1 = box
    cx0, cy0 = max(x0 - margin, 0), max(y0 - margin, 0)
    cx1, cy1 = min(x1 + margin, w), min(y1 + margin, h)
    pad = (
        (max(1 - (y0 - cy0), 0), max(1 - (cy1 - y1), 0)),
        (max(1 - (x0 - cx0), 0), max(1 - (cx1 - x1), 0)),
    )
    crop = np.pad(image[cy0:cy1, cx0:cx1].astype(np.float64), pad)
    mask = np.zeros(crop.shape, dtype=np.uint8)
    oy, ox = y0 - cy0 + pad[0][0], x0 - cx0 + pad[1][0]
    mask[oy:oy + (y1 - y0), ox:ox + (x1 - x0)] = 1
    return crop, mask


def to_sitk(pixels: np.ndarray, mask: np.ndarray, spacing: Spacing = (1.0, 1.0)) -> tuple:
    """A 2D SimpleITK image and mask pair with the given (x, y) spacing."""
    import SimpleITK as sitk

    im = sitk.GetImageFromArray(pixels)
    mk = sitk.GetImageFromArray(mask)
    im.SetSpacing(tuple(float(s) for s in spacing))
    mk.SetSpacing(tuple(float(s) for s in spacing))
    return im, mk


def make_extractor(settings: dict[str, Any]):
    """A configured ``RadiomicsFeatureExtractor`` (diagnostics off: they are not features;
    ``normalize`` off: :class:`PyradiomicsBackend` normalises the whole image before cropping)."""
    from radiomics import featureextractor

    silence_pyradiomics()
    setting = {**settings["setting"], "additionalInfo": False, "normalize": False}
    extractor = featureextractor.RadiomicsFeatureExtractor(**setting)
    extractor.disableAllFeatures()
    extractor.enableFeaturesByName(**{c: list(n) for c, n in settings["featureClass"].items()})
    extractor.enableImageTypes(Original={})
    return extractor


class PyradiomicsBackend(Backend):
    """pyradiomics, one ROI at a time (the reference the fast backend is checked against)."""

    name = "pyradiomics"

    def __init__(self) -> None:
        self._extractors: dict[str, Any] = {}

    def _extractor(self, settings: dict[str, Any]):
        key = settings_mod.settings_hash(settings)
        if key not in self._extractors:
            self._extractors[key] = make_extractor(settings)
        return self._extractors[key]

    def _extract_into(
        self,
        result: BatchResult,
        images: list[np.ndarray],
        boxes: list[Box],
        settings: dict[str, Any],
        spacings: list[Spacing],
        names: list[str],
    ) -> None:
        extractor = self._extractor(settings)
        normalize = norm_mod.Normalization.from_setting(settings["setting"]) is not None
        normed: dict[tuple, np.ndarray] = {}  # image -> normalised image (images repeat)
        out, reasons = result.features, result.reasons
        for i, (image, box, spacing) in enumerate(zip(images, boxes, spacings, strict=True)):
            image = np.asarray(image)
            reason = roi_problem(image, box)
            if reason is None and normalize:
                reason = norm_mod.image_problem(image)
                if reason is None:
                    key = norm_mod.image_key(image)
                    if key not in normed:
                        normed[key] = norm_mod.normalized_image(image, settings["setting"])
                    image = normed[key]
            if reason is None:
                try:
                    out[i] = self._one(extractor, image, box, spacing, names)
                except Exception as exc:  # noqa: BLE001 - one bad ROI must not end the batch
                    reason = error_reason(exc)
            reasons[i] = reason

    @staticmethod
    def _one(extractor, image: np.ndarray, box: Box, spacing: Spacing,
             names: list[str]) -> np.ndarray:
        crop, mask = roi_arrays(image, tuple(int(v) for v in box))
        im, mk = to_sitk(crop, mask, spacing)
        with np.errstate(all="ignore"):
            result = extractor.execute(im, mk, label=1)
        missing = [n for n in names if n not in result]
        if missing:
            raise RuntimeError(f"pyradiomics returned no {missing[0]}")
        return np.array([float(result[n]) for n in names], dtype=np.float64)
