"""The compiled counting kernel against the numpy path: the same integers, and clear errors.

The feature formulas are shared, so equal counts mean equal features; the parity tests
(test_fast_parity.py) then hold both paths to pyradiomics.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from kacl_cli.errors import InputError
from kacl_cli.stages.radiomics import settings as S
from kacl_cli.stages.radiomics.backends.fast import kernel as fast_kernel
from kacl_cli.stages.radiomics.backends.fast import texture as T
from kacl_cli.stages.radiomics.backends.fast.backend import FastBackend, extract_rois
from kacl_cli.stages.radiomics.backends.fast.mosaic import build

CLASSES = {"glcm", "glrlm", "glszm", "gldm", "ngtdm"}


def image(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Gaussian-smoothed noise from white (sigma 0) to blotchy (sigma 6), a random contrast
    that saturates some pixels, or a flat image: few to many grey levels per ROI."""
    sigma = rng.choice([0.0, 0.8, 2.0, 6.0, -1.0])
    if sigma < 0:
        return np.full((size, size), rng.integers(0, 256), dtype=np.uint8)
    field = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma)
    return np.clip(128 + field / field.std() * rng.uniform(10, 120), 0, 255).astype(np.uint8)


def crops_of(seed: int, n: int = 40, size: int = 64) -> list[np.ndarray]:
    """Crops from 1 x 1 to the whole image, some of them 1 pixel thin."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        img = image(rng, size)
        h, w = rng.integers(1, size + 1, size=2)
        if k % 7 == 0:
            h = 1  # a one-pixel line
        y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        out.append(img[y:y + h, x:x + w])
    return out


def numpy_counts(crops, bin_width, bin_count, alpha):
    m = build(crops, bin_width, bin_count)
    zr, zl, zs = T.zones(m)
    return m, {
        "glcm": T.glcm_counts(m),
        "glrlm": T.glrlm_cells(m),
        "zones": np.sort(np.stack([zr, zl, zs]), axis=1),
        "gldm": T.gldm_counts(m, alpha),
        "ngtdm": T.ngtdm_sums(m),
    }


def kernel_counts(crops, bin_width, bin_count, alpha):
    m = fast_kernel.build_raw(crops, bin_width, bin_count)
    fast_kernel.fill(m, CLASSES, alpha, cells=True)
    zr, zl, zs = m.cache["zones"]
    return m, {
        "glcm": m.cache["glcm"],
        "glrlm": m.cache["glrlm"],
        "zones": np.sort(np.stack([zr, zl, zs]), axis=1),
        "gldm": m.cache[("gldm", alpha)],
        "ngtdm": m.cache["ngtdm"],
    }


def test_the_kernel_is_built() -> None:
    """`pip install` (make install) builds it; without it the backend is 3-4x slower."""
    assert fast_kernel.available()


@pytest.mark.parametrize(
    ("bin_width", "bin_count", "alpha"),
    [(25, None, 0), (7.5, None, 1), (None, 16, 2), (None, 300, 0)],
    ids=["binWidth25", "binWidth7.5-alpha1", "binCount16-alpha2", "binCount300-uint16"],
)
def test_kernel_counts_equal_the_numpy_path(bin_width, bin_count, alpha) -> None:
    crops = crops_of(seed=int(alpha) + (bin_count or 0))
    m_np, ref = numpy_counts(crops, bin_width, bin_count, alpha)
    m_c, got = kernel_counts(crops, bin_width, bin_count, alpha)
    if bin_count == 300:
        assert m_c.tables.dtype == np.uint16  # more than 255 levels: the uint16 kernel
    np.testing.assert_array_equal(m_c.hist, m_np.hist)
    np.testing.assert_array_equal(m_c.level_counts, m_np.level_counts)
    np.testing.assert_array_equal(got["glcm"], ref["glcm"])
    for a, b in zip(got["glrlm"], ref["glrlm"], strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(got["zones"], ref["zones"])
    np.testing.assert_array_equal(got["gldm"], ref["gldm"])
    np.testing.assert_array_equal(got["ngtdm"], ref["ngtdm"])


@pytest.mark.parametrize(("bin_width", "bin_count"), [(25, None), (None, 300)])
def test_kernel_glrlm_sums_equal_the_numpy_sums(bin_width, bin_count) -> None:
    """The GLRLM sums in C against the numpy formulas on the same cells: summed by the
    kernel while it counts (what the backend uses) and from the listed cells
    (_texture.glrlm_sums), the same arithmetic in the same order; the 1-pixel lines of
    crops_of give (roi, angle) blocks with no pairs."""
    crops = crops_of(seed=5)
    m_c, _ = kernel_counts(crops, bin_width, bin_count, 0)
    got = fast_kernel.glrlm_sums(m_c)  # summed while counting
    m_c.cache.pop("glrlm_sums")
    from_cells = fast_kernel.glrlm_sums(m_c)
    m_c.cache.pop("glrlm_rows")
    ref = T.glrlm_sums(m_c)  # numpy, from the kernel's cells (raw mosaic: no canvas pass)
    assert got.shape == (len(crops) * T.N_ANGLES, T.GLRLM_SUMS)
    np.testing.assert_array_equal(got, from_cells)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    # without cells=True the kernel lists no cells: the sums are all the features need
    m = fast_kernel.build_raw(crops, bin_width, bin_count)
    fast_kernel.fill(m, {"glrlm"})
    assert "glrlm" not in m.cache
    np.testing.assert_array_equal(fast_kernel.glrlm_sums(m), got)


@pytest.mark.parametrize("symmetric", [True, False])
def test_kernel_glcm_features_equal_the_numpy_formulas(symmetric) -> None:
    """GLCM features computed in C (_texture.glcm_features) against texture.glcm on the same
    counts, asymmetric matrices included (MCC's exact path)."""
    m, _ = kernel_counts(crops_of(seed=7), None, 16, 0)
    got, ref = fast_kernel.glcm(m, symmetric), T.glcm(m, symmetric)
    assert set(got) == set(ref)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-11, atol=1e-12,
                                   equal_nan=True, err_msg=name)


@pytest.mark.parametrize(("bin_width", "bin_count"), [(25, None), (None, 16), (None, 64)])
def test_kernel_mcc_equals_the_numpy_eigenvalues(bin_width, bin_count) -> None:
    """MCC's eigenvalues in C (_texture.mcc_second: tridiagonal QL) against LAPACK through
    texture._mcc on the same normalised GLCMs: ROIs of one level (MCC 1), dropped angles of
    1-px lines, and tiny second eigenvalues handed to pyradiomics' exact arithmetic."""
    m, _ = kernel_counts(crops_of(seed=11, n=80), bin_width, bin_count, 0)
    counts = np.ascontiguousarray(m.cache["glcm"])
    n, a, g, _ = counts.shape
    feats, p = np.empty((n, a, 24)), np.empty_like(counts)
    px, py = np.empty((n, a, g)), np.empty((n, a, g))
    fast_kernel._texture.glcm_features(counts, m.ng.astype(np.float64), True, feats, p, px, py)
    valid = T.angle_validity(m) & (feats[..., -1] > 0)
    present = m.level_counts[:, 1:] > 0
    ref = T._mcc(p, px, py, valid, present, True)
    got = fast_kernel.mcc(p, px, py, valid, present)
    assert (present.sum(axis=1) < 2).any() and (~valid).any()  # the cases are there
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14, equal_nan=True)


def test_kernel_glrlm_sums_refuse_cells_they_cannot_place() -> None:
    m, _ = kernel_counts(crops_of(seed=6, n=4), 25, None, 0)
    rows = np.frombuffer(m.cache["glrlm_rows"], dtype=np.int64).reshape(-1, 4).copy()
    long_ = np.ascontiguousarray(T.longest_runs(m), dtype=np.int64)
    out = np.empty((len(long_), T.GLRLM_SUMS))
    bad = rows.copy()
    bad[0, 2] = long_[bad[0, 0]] + 1  # a run longer than its line
    with pytest.raises(ValueError, match="outside its level or run range"):
        fast_kernel._texture.glrlm_sums(bad.tobytes(), long_, m.n_levels + 1, out)
    with pytest.raises(ValueError, match="not sorted"):
        fast_kernel._texture.glrlm_sums(rows[::-1].copy().tobytes(), long_, m.n_levels + 1, out)


def test_strided_crops_are_copied_not_misread() -> None:
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (64, 64)).astype(np.uint8)
    crops = [img[5:40, 3:50:2], img[10:30, 10:40].T, img[::-1, ::-1][:20, :20]]
    _, ref = numpy_counts([np.ascontiguousarray(c) for c in crops], 25, None, 0)
    _, got = kernel_counts(crops, 25, None, 0)
    np.testing.assert_array_equal(got["glcm"], ref["glcm"])
    np.testing.assert_array_equal(got["zones"], ref["zones"])


def test_kernel_choice_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv(fast_kernel.KERNEL_ENV, "numpy")
    assert not fast_kernel.use_kernel()
    monkeypatch.setenv(fast_kernel.KERNEL_ENV, "c")
    assert fast_kernel.use_kernel()
    monkeypatch.setenv(fast_kernel.KERNEL_ENV, "gpu")
    with pytest.raises(InputError, match="auto, c, numpy"):
        fast_kernel.use_kernel()


def test_without_the_kernel_auto_falls_back_and_c_refuses(monkeypatch) -> None:
    settings = S.load_settings()
    crops = crops_of(seed=5, n=12)
    with_kernel = extract_rois(crops, settings)
    monkeypatch.setattr(fast_kernel, "_texture", None)
    monkeypatch.setenv(fast_kernel.KERNEL_ENV, "auto")
    assert not fast_kernel.use_kernel()
    np.testing.assert_allclose(extract_rois(crops, settings), with_kernel, rtol=1e-12,
                               atol=1e-12, equal_nan=True)
    monkeypatch.setenv(fast_kernel.KERNEL_ENV, "c")
    with pytest.raises(InputError, match="not built"):
        extract_rois(crops, settings)
    # through the backend too: one clear error for the call, not a failure reason per ROI
    image = np.zeros((32, 32), np.uint8)
    with pytest.raises(InputError, match="not built"):
        FastBackend().extract([image], [(0, 0, 8, 8)], settings)


def _args(m, **over):
    ix = fast_kernel._index
    args = dict(canvas=m.raw, ys=ix(m.ys), xs=ix(m.xs), hs=ix(m.heights), ws=ix(m.widths),
                tables=m.tables, itemsize=m.tables.itemsize, g1=m.n_levels + 1, alpha=0,
                glcm=None, rl_long=None, gldm=None, ngtdm=None, glrlm=False, zones=True)
    args.update(over)
    return tuple(args.values())


def test_bad_kernel_arguments_raise_instead_of_reading_out_of_bounds() -> None:
    m = fast_kernel.build_raw(crops_of(seed=2, n=4), 25, None)
    texture_c = fast_kernel._texture
    assert texture_c.counts(*_args(m))[1] is not None
    outside = fast_kernel._index(m.ys + m.raw.shape[0])
    with pytest.raises(ValueError, match="does not lie inside the canvas"):
        texture_c.counts(*_args(m, ys=outside))
    with pytest.raises(ValueError, match="level >= g1"):
        texture_c.counts(*_args(m, g1=2))
    with pytest.raises(ValueError, match="glcm"):
        texture_c.counts(*_args(m, glcm=np.zeros(3)))
    with pytest.raises(ValueError, match="rl_long is required"):
        texture_c.counts(*_args(m, glrlm=True))
    short = fast_kernel._index(np.ones(4 * m.n))
    with pytest.raises(ValueError, match="longer than rl_long"):
        texture_c.counts(*_args(m, glrlm=True, rl_long=short))
    sums = np.empty((4 * m.n, T.GLRLM_SUMS))
    with pytest.raises(ValueError, match="longer than rl_long"):  # summed, not listed
        texture_c.counts(*_args(m, rl_long=short), sums)
    with pytest.raises(ValueError, match="rl_long is required"):
        texture_c.counts(*_args(m), sums)
    with pytest.raises(ValueError, match="glrlm_sums"):
        texture_c.counts(*_args(m, rl_long=fast_kernel._index(T.longest_runs(m))), sums[:1])
    canvas = np.zeros((8, 8), np.uint8)
    hist = np.zeros((1, 256), np.int64)
    ix = fast_kernel._index
    with pytest.raises(ValueError, match="inside the canvas"):
        texture_c.place([np.ones((5, 5), np.uint8)], canvas, ix([6]), ix([0]), hist)
    with pytest.raises(ValueError, match="2D uint8"):
        texture_c.place([np.ones((5, 5), np.uint16)], canvas, ix([0]), ix([0]), hist)


def test_rois_wider_than_the_kernel_allows_are_refused() -> None:
    """Row positions are uint16 in the kernel: a wider ROI is an error, not a wrap-around."""
    m = fast_kernel.build_raw([np.zeros((2, 65_001), np.uint8)], 25, None)
    with pytest.raises(ValueError, match="wider than 65000 px"):
        fast_kernel.fill(m, {"glcm"})


def test_a_build_older_than_the_source_falls_back_to_the_numpy_path() -> None:
    """A _texture built from an older _texture.c (no mcc_second; counts() without the GLRLM
    sums) is not used: the numpy path serves, same values, instead of a TypeError."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, types; name = 'kacl_cli.stages.radiomics.backends.fast._texture'; "
        "sys.modules[name] = types.ModuleType(name); "
        "from kacl_cli.stages.radiomics.backends.fast import kernel; "
        "print(kernel.available(), kernel.use_kernel())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[3])
    assert out.stdout.split() == ["False", "False"]
