"""The compiled counting pass of the fast backend, and the choice between it and numpy.

:mod:`._texture` (C, built by ``pip install``) walks each ROI's rectangle of the mosaic's
level canvas once per matrix family and fills the very arrays the numpy path of
:mod:`.fast_texture` builds (GLCM counts, dense GLRLM cells, GLSZM zones, GLDM counts,
NGTDM sums) into the mosaic's cache; the feature formulas then run unchanged. Both paths
give the same integer counts (tested), so the choice changes speed only: the numpy path
costs ~60 ns per canvas pixel in whole-array passes, the kernel a few ns per ROI pixel.

``KACL_RADIOMICS_KERNEL`` picks the path: ``auto`` (default: the kernel when it is built),
``c`` (fail when it is not) or ``numpy`` (the reference path, e.g. to cross-check).
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import InputError
from . import fast_texture as texture
from .fast_mosaic import Mosaic

try:
    from . import _texture
except ImportError:  # not built (e.g. a source tree on PYTHONPATH): the numpy path serves
    _texture = None

KERNEL_ENV = "KACL_RADIOMICS_KERNEL"
KERNELS = ("auto", "c", "numpy")


def available() -> bool:
    return _texture is not None


def use_kernel() -> bool:
    """Whether the compiled kernel counts this process's mosaics (see the module docstring)."""
    choice = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if choice not in KERNELS:
        raise InputError(f"{KERNEL_ENV}={choice!r}: expected one of {', '.join(KERNELS)}")
    if choice == "c" and _texture is None:
        raise InputError(
            f"{KERNEL_ENV}=c but kacl_cli.radiomics._texture is not built: "
            "reinstall with `pip install -e .` (needs a C compiler)"
        )
    return choice != "numpy" and _texture is not None


def fill(m: Mosaic, classes: set[str], alpha: int = 0) -> None:
    """Count every requested texture class of every ROI of ``m`` in one compiled call."""
    if _texture is None:
        raise RuntimeError("kacl_cli.radiomics._texture is not built")
    n, g1 = m.n, m.n_levels + 1
    g = g1 - 1
    nd = 2 * texture.N_ANGLES + 1
    levels = np.ascontiguousarray(m.levels)
    if levels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"levels must be uint8 or uint16, not {levels.dtype}")

    def index(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=np.int64)

    glcm = np.zeros((n, texture.N_ANGLES, g, g)) if "glcm" in classes else None
    area = int((m.heights * m.widths).sum())
    glrlm = rl_long = None
    if "glrlm" in classes:
        rl_long = index(texture.longest_runs(m))
        # rows: at most one per run, and a (roi, angle) has at most Ng x longest cells
        cap = min(texture.N_ANGLES * area, int((np.repeat(m.ng, texture.N_ANGLES) * rl_long).sum()))
        glrlm = np.empty((cap, 4), dtype=np.int64)
    gldm = np.zeros((n, g1, nd), dtype=np.int64) if "gldm" in classes else None
    ngtdm = np.zeros((n, g1, nd), dtype=np.int64) if "ngtdm" in classes else None
    zone_roi = zone_level = zone_size = None
    if "glszm" in classes:
        zone_roi, zone_level, zone_size = (np.empty(area, dtype=np.int64) for _ in range(3))
    n_zones, n_cells = _texture.counts(
        levels, levels.itemsize, levels.shape[1], index(m.ys), index(m.xs), index(m.heights),
        index(m.widths), g1, int(alpha), glcm, glrlm, rl_long, gldm, ngtdm,
        zone_roi, zone_level, zone_size,
    )
    if glcm is not None:
        m.cache["glcm"] = glcm
    if glrlm is not None:
        ra, level, length, count = glrlm[:n_cells].T.copy()  # contiguous columns
        m.cache["glrlm"] = (ra, level, length, count)
    if gldm is not None:
        m.cache[("gldm", alpha)] = gldm
    if ngtdm is not None:
        m.cache["ngtdm"] = ngtdm
    if zone_roi is not None:
        m.cache["zones"] = (zone_roi[:n_zones], zone_level[:n_zones], zone_size[:n_zones])
