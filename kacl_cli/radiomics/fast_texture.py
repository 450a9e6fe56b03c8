"""pyradiomics' 2D texture classes (GLCM, GLRLM, GLSZM, GLDM, NGTDM) for a whole mosaic.

Each function takes a :class:`~.fast_mosaic.Mosaic` and returns ``{feature: values[n]}``
with pyradiomics' feature names. The matrices are those of pyradiomics' C extension
(``_cmatrices``) for a 2D image, distance 1:

- neighbours are the 8 pixels around a pixel, i.e. the 4 angles (0,1), (1,1), (1,0), (1,-1)
  taken in both directions, and only pixels inside the ROI count;
- GLCM: per angle, counts of (level at p, level at p + angle); symmetric = plus its
  transpose; features per angle, then the mean over angles (pyradiomics' ``nanmean``);
- GLRLM: runs of equal level along each angle; an angle whose lines all have one pixel is
  dropped (the C code's ``multiElement`` rule), as is any angle without pairs in the GLCM;
- GLSZM: 8-connected zones of equal level;
- GLDM: per pixel, the number of neighbours whose level differs by at most ``gldm_a``;
- NGTDM: per pixel, |level - mean level of its neighbours in the ROI| (0 without one).

Feature formulas follow pyradiomics line by line where rounding could matter (e.g. the
complex-eigenvalue quirk of MCC, ``numpy.e ** x`` in IMC2); elsewhere sums are regrouped
(over runs, zones or pixel pairs instead of dense matrices), which changes results only in
the last bits. Grey levels absent from a ROI are kept as empty rows: every formula gives
them zero weight, except where pyradiomics' deletion of empty levels matters (MCC's
eigenvalues, NGTDM's pairwise sums), which is handled explicitly.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from numpy.lib.stride_tricks import as_strided
from scipy import ndimage

from .fast_mosaic import Mosaic

EPS = np.spacing(1)
N_ANGLES = 4
# (rows of p, rows of q) slices for q = p + angle on the canvas, angles as in pyradiomics 2D
_ALL = slice(None)
ANGLE_SLICES = (
    ((_ALL, slice(None, -1)), (_ALL, slice(1, None))),  # (0, 1)
    ((slice(None, -1), slice(None, -1)), (slice(1, None), slice(1, None))),  # (1, 1)
    ((slice(None, -1), _ALL), (slice(1, None), _ALL)),  # (1, 0)
    ((slice(None, -1), slice(1, None)), (slice(1, None), slice(None, -1))),  # (1, -1)
)
# Memory per sub-batch of ROIs for the dense per-ROI feature arrays (large binCounts).
DENSE_BUDGET = 64 << 20


def _batches(n: int, bytes_per_roi: int) -> Iterator[slice]:
    step = max(1, DENSE_BUDGET // max(bytes_per_roi, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def angle_validity(m: Mosaic) -> np.ndarray:
    """n x 4: whether pyradiomics keeps the angle for the ROI (a line of >= 2 pixels)."""
    h2, w2 = m.heights >= 2, m.widths >= 2
    return np.stack([w2, h2 & w2, h2, h2 & w2], axis=1)


def _angle_mean(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """pyradiomics' ``nanmean`` over the kept angles (NaN values inside an angle ignored)."""
    v = np.where(valid, values, np.nan)
    ok = ~np.isnan(v)
    count = ok.sum(axis=1)
    total = np.where(ok, v, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


# ----------------------------------------------------------------------------------- GLCM


def glcm_counts(m: Mosaic) -> np.ndarray:
    """n x 4 x G x G raw (asymmetric) co-occurrence counts, cached on the mosaic."""
    if "glcm" not in m.cache:
        n, g1 = m.n, m.n_levels + 1
        k1 = m.roi_level() * g1
        counts = np.empty((n, N_ANGLES, g1 - 1, g1 - 1), dtype=np.float64)
        for a, (ps, qs) in enumerate(ANGLE_SLICES):
            key = k1[ps] + m.levels[qs]
            c = np.bincount(key.ravel(), minlength=(n + 1) * g1 * g1)
            counts[:, a] = c[: n * g1 * g1].reshape(n, g1, g1)[:, 1:, 1:]
        m.cache["glcm"] = counts
    return m.cache["glcm"]


def glcm(m: Mosaic, symmetric: bool = True) -> dict[str, np.ndarray]:
    counts = glcm_counts(m)
    n, _, g, _ = counts.shape
    valid = angle_validity(m) & (counts.sum(axis=(2, 3)) > 0)
    present = m.level_counts[:, 1:] > 0
    out: dict[str, list[np.ndarray]] = {}
    for sl in _batches(n, 12 * N_ANGLES * g * g * 8):
        p = counts[sl]
        if symmetric:
            p = p + p.transpose(0, 1, 3, 2)
        for name, value in _glcm_features(p, m.ng[sl], valid[sl], present[sl]).items():
            out.setdefault(name, []).append(value)
    return {k: np.concatenate(v) for k, v in out.items()}


def _glcm_features(
    p: np.ndarray, ng: np.ndarray, valid: np.ndarray, present: np.ndarray
) -> dict[str, np.ndarray]:
    n, a, g, _ = p.shape
    total = p.sum(axis=(2, 3))
    p = p / np.where(total > 0, total, 1.0)[..., None, None]
    lv = np.arange(1, g + 1, dtype=np.float64)
    px = p.sum(axis=3)  # n x a x g: p_x(i)
    py = p.sum(axis=2)  # p_y(j)
    ux = px @ lv
    uy = py @ lv
    # p_{x+y}(k), k = 2..2g, and p_{x-y}(k), k = 0..g-1, via one bincount over all cells
    ii, jj = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    rows = np.arange(n * a)[:, None]
    flat = p.reshape(n * a, g * g)
    k_sum = (rows * (2 * g - 1) + (ii + jj).ravel()[None, :]).ravel()
    pxy_sum = np.bincount(k_sum, flat.ravel(), (n * a) * (2 * g - 1)).reshape(n, a, 2 * g - 1)
    k_diff = (rows * g + np.abs(ii - jj).ravel()[None, :]).ravel()
    pxy_diff = np.bincount(k_diff, flat.ravel(), (n * a) * g).reshape(n, a, g)
    ks = np.arange(2, 2 * g + 1, dtype=np.float64)
    kd = np.arange(0, g, dtype=np.float64)
    ngf = ng.astype(np.float64)[:, None, None]

    f: dict[str, np.ndarray] = {}
    f["Autocorrelation"] = np.einsum("naij,i,j->na", p, lv, lv)
    f["JointAverage"] = ux
    centre = ks[None, None, :] - (ux + uy)[..., None]
    f["ClusterProminence"] = (pxy_sum * centre**4).sum(axis=2)
    f["ClusterShade"] = (pxy_sum * centre**3).sum(axis=2)
    f["ClusterTendency"] = (pxy_sum * centre**2).sum(axis=2)
    f["Contrast"] = pxy_diff @ kd**2
    dx = lv[None, None, :] - ux[..., None]
    dy = lv[None, None, :] - uy[..., None]
    sigx = np.einsum("nai,nai->na", px, dx**2) ** 0.5
    sigy = np.einsum("naj,naj->na", py, dy**2) ** 0.5
    corm = np.einsum("naij,nai,naj->na", p, dx, dy)
    corr = corm / (sigx * sigy + EPS)
    f["Correlation"] = np.where(sigx * sigy == 0, 1.0, corr)
    diff_avg = pxy_diff @ kd
    f["DifferenceAverage"] = diff_avg
    f["DifferenceEntropy"] = -(pxy_diff * np.log2(pxy_diff + EPS)).sum(axis=2)
    f["DifferenceVariance"] = (pxy_diff * (kd[None, None, :] - diff_avg[..., None]) ** 2).sum(2)
    f["JointEnergy"] = (p**2).sum(axis=(2, 3))
    hxy = -(p * np.log2(p + EPS)).sum(axis=(2, 3))
    f["JointEntropy"] = hxy
    hx = -(px * np.log2(px + EPS)).sum(axis=2)
    hy = -(py * np.log2(py + EPS)).sum(axis=2)
    pxpy = px[..., :, None] * py[..., None, :]
    hxy1 = -(p * np.log2(pxpy + EPS)).sum(axis=(2, 3))
    hxy2 = -(pxpy * np.log2(pxpy + EPS)).sum(axis=(2, 3))
    div = np.fmax(hx, hy)
    with np.errstate(divide="ignore", invalid="ignore"):
        f["Imc1"] = np.where(div != 0, (hxy - hxy1) / np.where(div != 0, div, 1.0), 0.0)
        imc2 = (1 - np.e ** (-2 * (hxy2 - hxy))) ** 0.5
    f["Imc2"] = np.where(hxy2 == hxy, 0.0, imc2)
    f["Idm"] = (pxy_diff / (1 + kd**2)).sum(axis=2)
    f["Idmn"] = (pxy_diff / (1 + kd[None, None, :] ** 2 / ngf**2)).sum(axis=2)
    f["Id"] = (pxy_diff / (1 + kd)).sum(axis=2)
    f["Idn"] = (pxy_diff / (1 + kd[None, None, :] / ngf)).sum(axis=2)
    f["InverseVariance"] = (pxy_diff[..., 1:] / kd[1:] ** 2).sum(axis=2)
    f["MaximumProbability"] = p.max(axis=(2, 3))
    f["SumAverage"] = pxy_sum @ ks
    f["SumEntropy"] = -(pxy_sum * np.log2(pxy_sum + EPS)).sum(axis=2)
    f["SumSquares"] = np.einsum("nai,nai->na", px, dx**2)
    out = {name: _angle_mean(v, valid) for name, v in f.items()}
    out["MCC"] = _mcc(p, px, py, valid, present)
    return out


def _mcc(
    p: np.ndarray, px: np.ndarray, py: np.ndarray, valid: np.ndarray, present: np.ndarray
) -> np.ndarray:
    """sqrt of the second largest eigenvalue of Q, as pyradiomics computes it.

    pyradiomics deletes the grey levels absent from the ROI before ``eigvals`` (extra zero
    rows would add zero eigenvalues), returns 1 for a single level, and takes the square
    root in complex arithmetic whenever any eigenvalue of the ROI's angle stack is complex
    (numpy returns a complex array then), where a real negative eigenvalue would give NaN.
    ROIs are therefore grouped by their number of levels; each group is one batched call.
    """
    n, a, g, _ = p.shape
    out = np.ones(n, dtype=np.float64)
    k = present.sum(axis=1)
    for kk in np.unique(k[k >= 2]).tolist():
        rows = np.flatnonzero(k == kk)
        idx = np.argsort(~present[rows], axis=1, kind="stable")[:, :kk]
        r4 = rows[:, None, None, None]
        a4 = np.arange(a)[None, :, None, None]
        pc = p[r4, a4, idx[:, None, :, None], idx[:, None, None, :]]
        pxc = np.take_along_axis(px[rows], idx[:, None, :], axis=2)
        pyc = np.take_along_axis(py[rows], idx[:, None, :], axis=2)
        w = pc / (pxc[..., :, None] * pyc[..., None, :] + EPS)
        q = np.einsum("naik,najk->naij", w, pc)
        ok = valid[rows]
        q[~ok] = 0.0  # dropped angles: keep eigvals finite, masked below
        ev = np.linalg.eigvals(q)
        ev = np.sort(ev, axis=-1)  # complex: lexicographic (real, imag), like pyradiomics
        second = ev[..., -2]
        with np.errstate(invalid="ignore"):
            if np.iscomplexobj(ev):
                cplx = ((ev.imag != 0).any(axis=2) & ok).any(axis=1)
                real_part = np.sqrt(second.real)
                complex_part = np.sqrt(second.astype(np.complex128)).real
                val = np.where(cplx[:, None], complex_part, real_part)
            else:
                val = np.sqrt(second)
        out[rows] = _angle_mean(val, ok)
    return out


# ----------------------------------------------------------------------------------- GLRLM


def _run_layouts(m: Mosaic) -> Iterator[tuple[int, np.ndarray, object]]:
    """(angle, 2D layout whose rows are the lines of that angle, pos -> (y, x))."""
    lv = m.levels
    h, w = lv.shape
    yield 0, lv, lambda pos: np.divmod(pos, w)

    def vertical(pos):
        x, y = np.divmod(pos, h)
        return y, x

    yield 2, np.ascontiguousarray(lv.T), vertical
    for angle, flip in ((1, False), (3, True)):
        # shear so that diagonals become columns: S[y, j] = L[y, j - y] (0 where j - y is
        # outside), a free strided view of L padded on the right by h columns
        padded = np.zeros((h, w + h), dtype=lv.dtype)
        padded[:, :w] = lv[:, ::-1] if flip else lv
        step = padded.itemsize
        sheared = as_strided(padded, shape=(h, w + h - 1), strides=((w + h - 1) * step, step))
        layout = np.ascontiguousarray(sheared.T)

        def diagonal(pos, flip=flip):
            j, y = np.divmod(pos, h)
            x = j - y
            return y, (w - 1 - x) if flip else x

        yield angle, layout, diagonal


def runs(layout: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of equal non-zero values along the rows of a layout whose rows all
    start and end with 0 (so the flattened array never joins two rows): (start, length,
    value)."""
    flat = layout.ravel()
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    lengths = np.diff(starts, append=flat.size)
    values = flat[starts]
    keep = values != 0
    return starts[keep], lengths[keep], values[keep]


def glrlm(m: Mosaic) -> dict[str, np.ndarray]:
    n, g1 = m.n, m.n_levels + 1
    valid = angle_validity(m)
    longest = np.stack(
        [m.widths, np.minimum(m.heights, m.widths), m.heights, np.minimum(m.heights, m.widths)],
        axis=1,
    ).ravel()  # per (roi, angle): the longest possible run
    ngs = np.repeat(m.ng, N_ANGLES)
    seg = ngs * longest
    off = np.concatenate(([0], np.cumsum(seg)))
    roi_flat = m.roi.ravel()
    keys = []
    for angle, layout, to_yx in _run_layouts(m):
        start, length, level = runs(layout)
        y, x = to_yx(start)
        ra = roi_flat[y * m.roi.shape[1] + x] * N_ANGLES + angle
        keys.append(off[ra] + (level.astype(np.intp) - 1) * longest[ra] + (length - 1))
    # one bincount over (roi, angle, level, run length): the GLRLM of every ROI and angle
    counts = np.bincount(np.concatenate(keys), minlength=int(off[-1]))
    cell = np.flatnonzero(counts)
    c = counts[cell].astype(np.float64)
    ra = np.searchsorted(off, cell, side="right") - 1
    gl, rl = np.divmod(cell - off[ra], longest[ra])
    gl = (gl + 1).astype(np.float64)
    rl = (rl + 1).astype(np.float64)
    na = n * N_ANGLES

    def per(weights: np.ndarray) -> np.ndarray:
        return np.bincount(ra, weights, na)

    nr = per(c)
    nr_safe = np.where(nr > 0, nr, 1.0)
    npix = per(c * rl)
    f: dict[str, np.ndarray] = {}
    f["ShortRunEmphasis"] = per(c / rl**2) / nr_safe
    f["LongRunEmphasis"] = per(c * rl**2) / nr_safe
    pg = np.bincount(ra * g1 + gl.astype(np.intp), c, na * g1).reshape(na, g1)
    f["GrayLevelNonUniformity"] = (pg**2).sum(axis=1) / nr_safe
    f["GrayLevelNonUniformityNormalized"] = (pg**2).sum(axis=1) / nr_safe**2
    off_len = np.concatenate(([0], np.cumsum(longest)))
    pr = np.bincount(off_len[ra] + rl.astype(np.intp) - 1, c, int(off_len[-1]))
    rln = np.add.reduceat(pr**2, off_len[:-1]) if na else np.zeros(0)
    f["RunLengthNonUniformity"] = rln / nr_safe
    f["RunLengthNonUniformityNormalized"] = rln / nr_safe**2
    with np.errstate(divide="ignore", invalid="ignore"):
        f["RunPercentage"] = nr / npix
    pgn = pg / nr_safe[:, None]
    lv = np.arange(g1, dtype=np.float64)
    mu = pgn @ lv
    f["GrayLevelVariance"] = (pgn * (lv[None, :] - mu[:, None]) ** 2).sum(axis=1)
    mu_r = npix / nr_safe
    f["RunVariance"] = per(c * (rl - mu_r[ra]) ** 2) / nr_safe
    prob = c / nr_safe[ra]
    f["RunEntropy"] = -per(prob * np.log2(prob + EPS))
    f["LowGrayLevelRunEmphasis"] = per(c / gl**2) / nr_safe
    f["HighGrayLevelRunEmphasis"] = per(c * gl**2) / nr_safe
    f["ShortRunLowGrayLevelEmphasis"] = per(c / (gl**2 * rl**2)) / nr_safe
    f["ShortRunHighGrayLevelEmphasis"] = per(c * gl**2 / rl**2) / nr_safe
    f["LongRunLowGrayLevelEmphasis"] = per(c * rl**2 / gl**2) / nr_safe
    f["LongRunHighGrayLevelEmphasis"] = per(c * rl**2 * gl**2) / nr_safe
    ok = valid & (nr.reshape(n, N_ANGLES) > 0)
    return {k: _angle_mean(v.reshape(n, N_ANGLES), ok) for k, v in f.items()}


# ----------------------------------------------------------------------------------- GLSZM


def level_colouring(m: Mosaic) -> list[np.ndarray]:
    """Groups of grey levels no two of which are 8-adjacent anywhere on the canvas.

    Zones of the levels of one group can then be labelled by a single binary
    ``ndimage.label`` call without merging different levels. The adjacency comes from the
    GLCM counts; smooth images need 2-3 groups, white noise one per level.
    """
    counts = glcm_counts(m).sum(axis=(0, 1))
    adjacent = (counts + counts.T) > 0
    np.fill_diagonal(adjacent, False)
    levels_present = np.flatnonzero(m.level_counts.sum(axis=0)[1:] > 0) + 1
    colour = np.full(m.n_levels + 1, -1)
    groups: list[list[int]] = []
    for lvl in levels_present.tolist():
        taken = {colour[j] for j in np.flatnonzero(adjacent[lvl - 1]) + 1 if colour[j] >= 0}
        c = next(i for i in range(len(groups) + 1) if i not in taken)
        if c == len(groups):
            groups.append([])
        groups[c].append(lvl)
        colour[lvl] = c
    return [np.array(grp) for grp in groups]


def zones(m: Mosaic) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All 8-connected zones of equal level: (roi, level, size) per zone."""
    structure = np.ones((3, 3), dtype=bool)
    lv = m.levels.ravel()
    roi = m.roi.ravel()
    z_roi, z_level, z_size = [], [], []
    for group in level_colouring(m):
        table = np.zeros(m.n_levels + 1, dtype=bool)
        table[group] = True
        mask = table[m.levels]
        labels, count = ndimage.label(mask, structure=structure)
        idx = np.flatnonzero(mask)
        z = labels.ravel()[idx] - 1
        z_size.append(np.bincount(z, minlength=count))
        first = np.empty(count, dtype=np.intp)
        first[z] = idx  # any pixel of a zone gives its ROI and level
        z_roi.append(roi[first])
        z_level.append(lv[first])
    return np.concatenate(z_roi), np.concatenate(z_level), np.concatenate(z_size)


def glszm(m: Mosaic) -> dict[str, np.ndarray]:
    n, g1 = m.n, m.n_levels + 1
    zr, zl, zs = zones(m)
    zl = zl.astype(np.intp)
    s = zs.astype(np.float64)
    gl = zl.astype(np.float64)

    def per(weights: np.ndarray | None = None) -> np.ndarray:
        return np.bincount(zr, weights, n)

    nz = per()
    nz = np.where(nz > 0, nz, 1.0)
    npix = per(s)
    npix = np.where(npix > 0, npix, 1.0)
    pg = np.bincount(zr * g1 + zl, None, n * g1).reshape(n, g1).astype(np.float64)
    # (roi, size, level) cells: one sort gives both the size histogram and the joint one
    smax = int(zs.max()) + 1 if zs.size else 1
    key = (zr * smax + zs) * g1 + zl
    cell, cnt = np.unique(key, return_counts=True)
    cell_roi = cell // (smax * g1)
    size_key = cell // g1
    bounds = np.flatnonzero(np.diff(size_key, prepend=-1))
    ps = np.add.reduceat(cnt, bounds) if cnt.size else cnt
    f: dict[str, np.ndarray] = {}
    f["SmallAreaEmphasis"] = per(1 / s**2) / nz
    f["LargeAreaEmphasis"] = per(s**2) / nz
    f["GrayLevelNonUniformity"] = (pg**2).sum(axis=1) / nz
    f["GrayLevelNonUniformityNormalized"] = (pg**2).sum(axis=1) / nz**2
    szn = np.bincount(cell_roi[bounds], ps.astype(np.float64) ** 2, n)
    f["SizeZoneNonUniformity"] = szn / nz
    f["SizeZoneNonUniformityNormalized"] = szn / nz**2
    f["ZonePercentage"] = nz / npix
    pgn = pg / nz[:, None]
    lv = np.arange(g1, dtype=np.float64)
    mu = pgn @ lv
    f["GrayLevelVariance"] = (pgn * (lv[None, :] - mu[:, None]) ** 2).sum(axis=1)
    mu_s = npix / nz
    f["ZoneVariance"] = per((s - mu_s[zr]) ** 2) / nz
    prob = cnt / nz[cell_roi]
    f["ZoneEntropy"] = -np.bincount(cell_roi, prob * np.log2(prob + EPS), n)
    f["LowGrayLevelZoneEmphasis"] = per(1 / gl**2) / nz
    f["HighGrayLevelZoneEmphasis"] = per(gl**2) / nz
    f["SmallAreaLowGrayLevelEmphasis"] = per(1 / (gl**2 * s**2)) / nz
    f["SmallAreaHighGrayLevelEmphasis"] = per(gl**2 / s**2) / nz
    f["LargeAreaLowGrayLevelEmphasis"] = per(s**2 / gl**2) / nz
    f["LargeAreaHighGrayLevelEmphasis"] = per(gl**2 * s**2) / nz
    return f


# ------------------------------------------------------------------------------------ GLDM


def gldm(m: Mosaic, alpha: int = 0) -> dict[str, np.ndarray]:
    n, g1 = m.n, m.n_levels + 1
    lv = m.levels
    dep = np.zeros(lv.shape, dtype=np.uint8)
    for ps, qs in ANGLE_SLICES:
        a, b = lv[ps], lv[qs]
        if alpha == 0:
            same = (a == b) & (a != 0)
        else:
            diff = np.abs(a.astype(np.int32) - b.astype(np.int32))
            same = (diff <= alpha) & (a != 0) & (b != 0)
        dep[ps] += same
        dep[qs] += same
    nd = 2 * N_ANGLES + 1
    key = m.roi_level() * nd + dep
    counts = np.bincount(key.ravel(), minlength=(n + 1) * g1 * nd)
    p = counts[: n * g1 * nd].reshape(n, g1, nd)[:, 1:, :].astype(np.float64)
    ivec = np.arange(1, g1, dtype=np.float64)[None, :, None]
    jvec = np.arange(1, nd + 1, dtype=np.float64)[None, None, :]
    nz = p.sum(axis=(1, 2))
    nz = np.where(nz > 0, nz, 1.0)
    pd = p.sum(axis=1)
    pg = p.sum(axis=2)
    jv, iv = jvec[:, 0, :], ivec[:, :, 0]
    f: dict[str, np.ndarray] = {}
    f["SmallDependenceEmphasis"] = (pd / jv**2).sum(1) / nz
    f["LargeDependenceEmphasis"] = (pd * jv**2).sum(1) / nz
    f["GrayLevelNonUniformity"] = (pg**2).sum(1) / nz
    f["DependenceNonUniformity"] = (pd**2).sum(1) / nz
    f["DependenceNonUniformityNormalized"] = (pd**2).sum(1) / nz**2
    pgn = pg / nz[:, None]
    f["GrayLevelVariance"] = (pgn * (iv - (pgn * iv).sum(1, keepdims=True)) ** 2).sum(1)
    pdn = pd / nz[:, None]
    f["DependenceVariance"] = (pdn * (jv - (pdn * jv).sum(1, keepdims=True)) ** 2).sum(1)
    pn = p / nz[:, None, None]
    f["DependenceEntropy"] = -(pn * np.log2(pn + EPS)).sum(axis=(1, 2))
    f["LowGrayLevelEmphasis"] = (pg / iv**2).sum(1) / nz
    f["HighGrayLevelEmphasis"] = (pg * iv**2).sum(1) / nz
    f["SmallDependenceLowGrayLevelEmphasis"] = (p / (ivec**2 * jvec**2)).sum((1, 2)) / nz
    f["SmallDependenceHighGrayLevelEmphasis"] = (p * ivec**2 / jvec**2).sum((1, 2)) / nz
    f["LargeDependenceLowGrayLevelEmphasis"] = (p * jvec**2 / ivec**2).sum((1, 2)) / nz
    f["LargeDependenceHighGrayLevelEmphasis"] = (p * jvec**2 * ivec**2).sum((1, 2)) / nz
    return f


# ----------------------------------------------------------------------------------- NGTDM


def ngtdm(m: Mosaic) -> dict[str, np.ndarray]:
    n, g1 = m.n, m.n_levels + 1
    lv = m.levels.astype(np.int32)
    inside = (m.levels != 0).astype(np.int16)

    def box(a: np.ndarray) -> np.ndarray:  # 3 x 3 sums of the interior pixels
        rows = a[:, :-2] + a[:, 1:-1] + a[:, 2:]
        return rows[:-2] + rows[1:-1] + rows[2:]

    centre = lv[1:-1, 1:-1]
    total = box(lv) - centre
    count = box(inside) - inside[1:-1, 1:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = np.abs(centre - total / count)
    diff[count == 0] = 0.0
    key = m.roi_level()[1:-1, 1:-1].ravel()
    s_all = np.bincount(key, diff.ravel(), (n + 1) * g1)[: n * g1].reshape(n, g1)[:, 1:]
    n_all = m.level_counts[:, 1:].astype(np.float64)
    out: dict[str, list[np.ndarray]] = {}
    g = g1 - 1
    for sl in _batches(n, 6 * g * g * 8):
        for name, value in _ngtdm_features(n_all[sl], s_all[sl]).items():
            out.setdefault(name, []).append(value)
    return {k: np.concatenate(v) for k, v in out.items()}


def _ngtdm_features(counts: np.ndarray, s: np.ndarray) -> dict[str, np.ndarray]:
    n, g = counts.shape
    present = counts > 0
    nvp = counts.sum(axis=1)
    p = counts / nvp[:, None]
    i = np.arange(1, g + 1, dtype=np.float64)[None, :]
    ngp = present.sum(axis=1)
    pair = present[:, :, None] & present[:, None, :]
    f: dict[str, np.ndarray] = {}
    ps = (p * s).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        f["Coarseness"] = np.where(ps != 0, 1 / ps, 1e6)
        sq = (i[:, :, None] - i[:, None, :]) ** 2
        contrast = (p[:, :, None] * p[:, None, :] * sq).sum(axis=(1, 2)) * s.sum(1) / nvp
        div = ngp * (ngp - 1)
        f["Contrast"] = np.where(div != 0, contrast / np.where(div != 0, div, 1), 0.0)
        ipi = i * p
        absdiff = np.where(pair, np.abs(ipi[:, :, None] - ipi[:, None, :]), 0.0).sum((1, 2))
        f["Busyness"] = np.where(absdiff != 0, ps / np.where(absdiff != 0, absdiff, 1), 0.0)
        pisi = p * s
        num = np.where(pair, pisi[:, :, None] + pisi[:, None, :], 0.0)
        den = p[:, :, None] + p[:, None, :]
        den = np.where(den == 0, 1.0, den)
        dist = np.abs(i[:, :, None] - i[:, None, :])
        f["Complexity"] = (dist * num / den).sum(axis=(1, 2)) / nvp
        strength = np.where(pair, (p[:, :, None] + p[:, None, :]) * sq, 0.0).sum(axis=(1, 2))
        s_sum = s.sum(axis=1)
        f["Strength"] = np.where(s_sum != 0, strength / np.where(s_sum != 0, s_sum, 1), 0.0)
    return f
