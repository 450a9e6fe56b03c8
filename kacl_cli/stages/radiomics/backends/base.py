"""The radiomics backend interface every extractor implements, and the backend registry.

A backend turns rectangles of 8-bit store images into one feature row each. Two exist:
``pyradiomics`` (the reference, :mod:`kacl_cli.stages.radiomics.backends.pyrad`) and ``fast``
(vectorised, :mod:`kacl_cli.stages.radiomics.backends.fast.backend`, checked against the
reference by parity tests). Both must
return the same columns for the same settings (:func:`settings.feature_names`) and the same
*reasons* for degenerate ROIs, so the stage, the catalog and the models never care which one
ran.

Failure handling (why ``extract`` returns reasons instead of raising): one bad ROI among
thousands must not abort a chunk. A failed ROI gets a NaN row and a one-line reason; rows
without a reason are real values (which may still contain NaN/inf for a legitimately
undefined feature; the stage counts those). :func:`roi_problem` is the shared pre-check
that gives both backends identical reasons for the geometric degenerate cases.

Adding a backend: put a :class:`Backend` subclass with a no-argument constructor that
implements ``_extract_into`` in a module and add
``name: "module:Class"`` to :data:`_REGISTRY`. It is imported only when asked for, so a
missing optional module never breaks the CLI.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from kacl_cli.errors import KaclError
from kacl_cli.stages.radiomics import settings as settings_mod

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), half-open, store pixels
Spacing = tuple[float, float]  # (sx, sy): mm (or 1.0) per store pixel along x and y

# Reasons shared by every backend (tests and the docs refer to these prefixes).
REASON_EMPTY = "empty ROI"
REASON_OUTSIDE = "ROI outside the image"
REASON_THIN = "ROI thinner than 2 px"
REASON_ERROR = "extraction failed"


@dataclass
class BatchResult:
    """Features of a batch of ROIs: ``features[i]`` is NaN wherever ``reasons[i]`` is set."""

    features: np.ndarray  # n x F float64
    reasons: list[str | None]

    @property
    def n_failed(self) -> int:
        return sum(r is not None for r in self.reasons)


class Backend(ABC):
    """What the stage calls. ``settings`` is a resolved dict from :mod:`.settings`.

    ``extract`` does what every backend shares (argument checks, a NaN row and no reason per
    ROI to start from) and hands the filling to :meth:`_extract_into`, the one method a
    backend implements.
    """

    name: str = "base"
    # ROIs per stage task: each task ends in one catalog commit (~30-50 ms), so a fast backend
    # needs bigger tasks for the commit not to dominate
    rois_per_task: int = 256
    # One core's seconds per ROI at 256 px, an upper estimate: a job below ~1.5 s of work
    # runs in-process even with --workers N (kacl_cli.parallel.pool_pays)
    seconds_per_roi: float = 0.05

    def feature_names(self, settings: dict[str, Any]) -> list[str]:
        """pyradiomics key names of the columns, diagnostics excluded, in the fixed order."""
        return settings_mod.feature_names(settings)

    def extract(
        self,
        images: list[np.ndarray],
        boxes: list[Box],
        settings: dict[str, Any],
        spacings: list[Spacing] | None = None,
    ) -> BatchResult:
        """ROI i is rectangle ``boxes[i]`` of ``images[i]`` (uint8 2D; images may repeat)."""
        spacings = check_batch(images, boxes, spacings)
        names = self.feature_names(settings)
        result = BatchResult(np.full((len(boxes), len(names)), np.nan, dtype=np.float64),
                             [None] * len(boxes))
        self._extract_into(result, images, boxes, settings, spacings, names)
        return result

    @abstractmethod
    def _extract_into(
        self,
        result: BatchResult,
        images: list[np.ndarray],
        boxes: list[Box],
        settings: dict[str, Any],
        spacings: list[Spacing],
        names: list[str],
    ) -> None:
        """Fill ``result.features`` rows (NaN to start with) and set ``result.reasons[i]`` for
        ROIs that give no features; ``spacings`` are checked and defaulted already."""

    def extract_batch(
        self,
        images: list[np.ndarray],
        boxes: list[Box],
        settings: dict[str, Any],
        spacings: list[Spacing] | None = None,
    ) -> np.ndarray:
        """``extract(...).features``: n x F float64, NaN rows for failed ROIs."""
        return self.extract(images, boxes, settings, spacings).features


def error_reason(exc: BaseException) -> str:
    """The one-line reason recorded for an ROI whose extraction raised (same in every backend)."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    return f"{REASON_ERROR}: {message}"


def check_batch(
    images: list[np.ndarray], boxes: list[Box], spacings: list[Spacing] | None
) -> list[Spacing]:
    """Validate batch arguments (programming errors raise) and default the spacings to 1."""
    if len(images) != len(boxes):
        raise ValueError(f"{len(images)} images but {len(boxes)} boxes")
    if spacings is None:
        return [(1.0, 1.0)] * len(boxes)
    if len(spacings) != len(boxes):
        raise ValueError(f"{len(spacings)} spacings but {len(boxes)} boxes")
    return [(float(sx), float(sy)) for sx, sy in spacings]


def roi_problem(image: np.ndarray, box: Box) -> str | None:
    """Why the rectangle cannot give features, or None. Same answers for every backend.

    One grey level is *not* a problem: pyradiomics defines those values (e.g. zero
    contrast), so they are features, not failures.
    """
    if image.ndim != 2:
        return f"{REASON_ERROR}: image is not 2D (shape {image.shape})"
    h, w = image.shape
    x0, y0, x1, y1 = (int(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        return f"{REASON_EMPTY} ({x0},{y0})-({x1},{y1})"
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        return f"{REASON_OUTSIDE} ({x0},{y0})-({x1},{y1}) vs {w}x{h}"
    if x1 - x0 < 2 or y1 - y0 < 2:
        return f"{REASON_THIN} ({x1 - x0}x{y1 - y0})"
    return None


_REGISTRY: dict[str, str] = {
    "pyradiomics": "kacl_cli.stages.radiomics.backends.pyrad:PyradiomicsBackend",
    "fast": "kacl_cli.stages.radiomics.backends.fast.backend:FastBackend",
}
BACKENDS: tuple[str, ...] = tuple(_REGISTRY)
# pyradiomics' values (parity tested), compiled and batched: ~70x faster per core.
DEFAULT_BACKEND = "fast"


def get_backend(name: str) -> Backend:
    """A backend instance by name (imported lazily)."""
    target = _REGISTRY.get(name)
    if target is None:
        raise KaclError(f"unknown radiomics backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module_name, cls_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise KaclError(f"radiomics backend {name!r} is not available in this install") from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise KaclError(f"radiomics backend {name!r}: {module_name} defines no {cls_name}")
    return cls()
