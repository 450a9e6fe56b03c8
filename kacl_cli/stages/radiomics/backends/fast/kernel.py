"""The compiled counting pass of the fast backend, and the choice between it and numpy.

:mod:`._texture` (C, built by ``pip install``; see ``setup.py``) does two things per chunk:
``place`` copies the crops into a raw canvas and histograms them, and ``counts`` walks each
ROI once per matrix family and returns the counts the numpy path of :mod:`.fast_texture`
builds (GLCM counts, GLRLM cells, GLSZM zones, GLDM counts, NGTDM sums). They go into the
mosaic's cache under the numpy path's keys, so the feature formulas run unchanged. Both
paths give the same integer counts (tested), so the choice changes speed only: the numpy
path costs ~60 ns per canvas pixel in whole-array passes, the kernel ~15-20 ns per ROI
pixel for all five classes, and it needs no code canvas.

``KACL_RADIOMICS_KERNEL`` picks the path: ``auto`` (default: the kernel when it is built),
``c`` (fail when it is not) or ``numpy`` (the reference path, e.g. to cross-check).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from kacl_cli.errors import InputError
from kacl_cli.stages.radiomics.backends.fast import texture
from kacl_cli.stages.radiomics.backends.fast.mosaic import Mosaic, discretise, pack

try:
    from kacl_cli.stages.radiomics.backends.fast import _texture
except ImportError:  # not built (e.g. a source tree on PYTHONPATH): the numpy path serves
    _texture = None
if _texture is not None and not hasattr(_texture, "mcc_second"):
    # built from an older _texture.c (not rebuilt after an update): its counts() lacks the
    # GLRLM sums; the numpy path serves, with the same values, until `pip install -e .`
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
            f"{KERNEL_ENV}=c but kacl_cli.stages.radiomics.backends.fast._texture is not built: "
            "reinstall with `pip install -e .` (needs a C compiler)"
        )
    return choice != "numpy" and _texture is not None


def _index(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64)


def build_raw(
    crops: Sequence[np.ndarray], bin_width: float | None, bin_count: int | None,
    values: np.ndarray | None = None,
) -> Mosaic:
    """A mosaic for the kernel: crops copied raw (one C call for all of them, which also
    histograms them), plus each ROI's level table; no level or code canvas. ``values``:
    each ROI's normalised value table (``normalize``), see :func:`.mosaic.level_tables`."""
    if _texture is None:
        raise RuntimeError("kacl_cli.stages.radiomics.backends.fast._texture is not built")
    n = len(crops)
    heights = np.array([c.shape[0] for c in crops], dtype=np.intp)
    widths = np.array([c.shape[1] for c in crops], dtype=np.intp)
    ys, xs, height, width, bands = pack(heights, widths)
    raw = np.zeros((height, width), dtype=np.uint8)
    hist = np.zeros((n, 256), dtype=np.int64)
    crops = [c if c.strides[1] == 1 else np.ascontiguousarray(c) for c in crops]
    _texture.place(crops, raw, _index(ys), _index(xs), hist)
    tables, ng, level_counts = discretise(hist, bin_width, bin_count, values)
    return Mosaic(None, None, hist, level_counts, ng, heights, widths, bands, ys, xs,
                  raw=raw, tables=np.ascontiguousarray(tables), values=values)


def fill(m: Mosaic, classes: set[str], alpha: int = 0, cells: bool = False) -> None:
    """Count every requested texture class of every ROI of the raw mosaic ``m`` in one
    compiled call, into the cache keys the numpy path's count functions read.

    GLRLM: the kernel sums each (ROI, angle)'s run counts into the 15 columns of
    :func:`texture.glrlm_sums` itself (cache ``"glrlm_sums"``; all the features need);
    ``cells=True`` also lists the nonzero GLRLM cells (``"glrlm"``), as the numpy path
    counts them, to compare the two (~87,000 cells for 240 ROIs at 256 px: building,
    copying and re-reading them was ~10% of a chunk)."""
    if _texture is None:
        raise RuntimeError("kacl_cli.stages.radiomics.backends.fast._texture is not built")
    if m.raw is None or m.tables is None:
        raise ValueError("fill needs a raw mosaic (build_raw)")
    n, g1 = m.n, m.n_levels + 1
    g = g1 - 1
    nd = 2 * texture.N_ANGLES + 1
    glcm = np.zeros((n, texture.N_ANGLES, g, g)) if "glcm" in classes else None
    rl_long = _index(texture.longest_runs(m)) if "glrlm" in classes else None
    rl_sums = np.empty((n * texture.N_ANGLES, texture.GLRLM_SUMS)) if rl_long is not None \
        else None
    gldm = np.zeros((n, g1, nd), dtype=np.int64) if "gldm" in classes else None
    ngtdm = np.zeros((n, g1, nd), dtype=np.int64) if "ngtdm" in classes else None
    rows, zones = _texture.counts(
        m.raw, _index(m.ys), _index(m.xs), _index(m.heights), _index(m.widths), m.tables,
        m.tables.itemsize, g1, int(alpha), glcm, rl_long, gldm, ngtdm,
        "glrlm" in classes and cells, "glszm" in classes, rl_sums,
    )
    if glcm is not None:
        m.cache["glcm"] = glcm
    if rl_sums is not None:
        m.cache["glrlm_sums"] = rl_sums
    if rows is not None:
        # (roi * 4 + angle, level, length, count) rows -> contiguous columns
        ra, level, length, count = np.frombuffer(rows, dtype=np.int64).reshape(-1, 4).T.copy()
        m.cache["glrlm"] = (ra, level, length, count)
        m.cache["glrlm_rows"] = rows
    if gldm is not None:
        m.cache[("gldm", alpha)] = gldm
    if ngtdm is not None:
        m.cache["ngtdm"] = ngtdm
    if zones is not None:
        roi, level, size = np.frombuffer(zones, dtype=np.int64).reshape(-1, 3).T.copy()
        m.cache["zones"] = (roi, level, size)


def glrlm_sums(m: Mosaic) -> np.ndarray:
    """:func:`texture.glrlm_sums` of a mosaic :func:`fill` counted: what the kernel summed
    while counting, else one compiled pass over the GLRLM cells (``fill(..., cells=True)``)
    instead of a dozen whole-array numpy passes (~15% of a chunk's time)."""
    if _texture is None:
        raise RuntimeError("kacl_cli.stages.radiomics.backends.fast._texture is not built")
    if "glrlm_sums" in m.cache:
        return m.cache["glrlm_sums"]
    out = np.empty((m.n * texture.N_ANGLES, texture.GLRLM_SUMS))
    _texture.glrlm_sums(m.cache["glrlm_rows"], _index(texture.longest_runs(m)),
                        m.n_levels + 1, out)
    return out


# The columns of _texture.glcm_features, in its order (the last: the matrix's total count).
GLCM_COLUMNS = (
    "Autocorrelation", "JointAverage", "ClusterProminence", "ClusterShade", "ClusterTendency",
    "Contrast", "Correlation", "DifferenceAverage", "DifferenceEntropy", "DifferenceVariance",
    "JointEnergy", "JointEntropy", "Imc1", "Imc2", "Idm", "Idmn", "Id", "Idn",
    "InverseVariance", "MaximumProbability", "SumAverage", "SumEntropy", "SumSquares",
)


def glcm(m: Mosaic, symmetric: bool = True) -> dict[str, np.ndarray]:
    """:func:`texture.glcm` of a mosaic :func:`fill` counted: the per-(roi, angle) sums in one
    compiled pass over each matrix (the numpy formulas made ~40 whole-array passes, a fifth
    of a chunk's time at 256 px); MCC (eigenvalues) stays :func:`texture._mcc`."""
    if _texture is None:
        raise RuntimeError("kacl_cli.stages.radiomics.backends.fast._texture is not built")
    counts = np.ascontiguousarray(m.cache["glcm"], dtype=np.float64)
    n, a, g, _ = counts.shape
    feats = np.empty((n, a, len(GLCM_COLUMNS) + 1))
    p = np.empty_like(counts)
    px = np.empty((n, a, g))
    py = np.empty((n, a, g))
    _texture.glcm_features(counts, np.ascontiguousarray(m.ng, dtype=np.float64), symmetric,
                           feats, p, px, py)
    valid = texture.angle_validity(m) & (feats[..., -1] > 0)
    means = texture.angle_means(feats[..., :len(GLCM_COLUMNS)], valid)
    out = {name: means[:, k] for k, name in enumerate(GLCM_COLUMNS)}
    present = m.level_counts[:, 1:] > 0
    out["MCC"] = (mcc(p, px, py, valid, present) if symmetric
                  else texture._mcc(p, px, py, valid, present, symmetric))
    return out


def mcc(p: np.ndarray, px: np.ndarray, py: np.ndarray, valid: np.ndarray,
        present: np.ndarray) -> np.ndarray:
    """:func:`texture._mcc` of symmetric GLCMs with the eigenvalues found in C
    (``_texture.mcc_second``): the same second eigenvalues to a few eps, and the same
    hand-over of tiny ones to pyradiomics' exact arithmetic (:func:`texture._mcc_exact`)."""
    n = p.shape[0]
    second = np.empty((n, texture.N_ANGLES))
    _texture.mcc_second(p, px, np.ascontiguousarray(present), np.ascontiguousarray(valid),
                        second)
    out = np.ones(n, dtype=np.float64)
    multi = present.sum(axis=1) >= 2
    with np.errstate(invalid="ignore"):
        tiny = ~(second >= texture.MCC_EXACT_BELOW)  # NaN: QL did not converge
        out[multi] = texture._angle_mean(np.sqrt(second[multi]), valid[multi])
    exact = np.flatnonzero(multi & (tiny & valid).any(axis=1))
    if exact.size:
        out[exact] = texture._mcc_exact(p, px, py, valid, present, exact)
    return out
