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

The count functions (``glcm_counts``, ``glrlm_cells``, ``zones``, ``gldm_counts``,
``ngtdm_sums``) are this module's numpy path and cache their result on the mosaic; the
compiled kernel (:mod:`.fast_kernel`) fills the same cache keys with the same integers, so
the feature functions serve both paths.

Feature formulas follow pyradiomics line by line where rounding could matter (e.g. the
complex-eigenvalue quirk of MCC, ``numpy.e ** x`` in IMC2); elsewhere sums are regrouped
(over runs, zones or pixel pairs instead of dense matrices), which changes results only in
the last bits. Grey levels absent from a ROI are kept as empty rows: every formula gives
them zero weight, except where pyradiomics' deletion of empty levels matters (MCC's
eigenvalues, NGTDM's pairwise sums), which is handled explicitly.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
from numpy.lib.stride_tricks import as_strided

from kacl_cli.stages.radiomics.backends.fast.mosaic import Mosaic

EPS = np.spacing(1)
N_ANGLES = 4
# Texture below works on the flattened canvas: angle (dy, dx) is the flat offset dy * W + dx.
# Pairs that wrap around a row end always involve a border pixel, which is outside.
RESIDUAL_SHARE = 1 / 32  # GLSZM: colours rarer than this share of the canvas skip labelling


def flat_offsets(width: int) -> tuple[int, int, int, int]:
    """Flat offsets of pyradiomics' 2D angles (0, 1), (1, 1), (1, 0), (1, -1)."""
    return 1, width + 1, width, width - 1
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
    """pyradiomics' ``nanmean`` over the kept angles (NaN values inside an angle ignored);
    angles on the last axis."""
    v = np.where(valid, values, np.nan)
    ok = ~np.isnan(v)
    count = ok.sum(axis=-1)
    total = np.where(ok, v, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def angle_means(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """:func:`_angle_mean` of every column of ``values`` (n x 4 x k) at once -> n x k: one
    pass instead of one per feature; angles made the last, contiguous axis, so each mean
    sums its angles in the order :func:`_angle_mean` does (the same bits)."""
    return _angle_mean(np.ascontiguousarray(np.moveaxis(values, 1, 2)), valid[:, None, :])


# ----------------------------------------------------------------------------------- GLCM


def glcm_counts(m: Mosaic) -> np.ndarray:
    """n x 4 x G x G raw (asymmetric) co-occurrence counts, cached on the mosaic.

    Counted from the runs along each angle rather than from pixel pairs: a run of length L
    holds L - 1 pairs (level, level), and each pair of consecutive runs one pair (level of
    the first, level of the next); smooth images have runs of 5-8 pixels.
    """
    if "glcm" not in m.cache:
        n, g1 = m.n, m.n_levels + 1
        level_of = np.arange(m.outside + 1) % g1  # outside -> 0, dropped below
        counts = np.empty((n, N_ANGLES, g1 - 1, g1 - 1), dtype=np.float64)
        size = (n + 1) * g1 * g1
        for a, (code, length) in enumerate(line_runs(m)):
            row = code * g1
            level = level_of[code]
            c = np.bincount(row + level, length - 1.0, size)  # pairs inside runs
            c += np.bincount(row[:-1] + level[1:], None, size)  # pairs across run ends
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
        for name, value in _glcm_features(p, m.ng[sl], valid[sl], present[sl],
                                           symmetric).items():
            out.setdefault(name, []).append(value)
    return {k: np.concatenate(v) for k, v in out.items()}


@functools.lru_cache(maxsize=8)
def _diagonal_indicators(g: int) -> np.ndarray:
    """(g * g) x (3g - 1): cell (i, j) -> |i - j| (first g columns) and i + j (the rest)."""
    i, j = np.divmod(np.arange(g * g), g)
    out = np.zeros((g * g, 3 * g - 1))
    out[np.arange(g * g), np.abs(i - j)] = 1.0
    out[np.arange(g * g), g + i + j] = 1.0
    out.flags.writeable = False
    return out


def _glcm_features(
    p: np.ndarray, ng: np.ndarray, valid: np.ndarray, present: np.ndarray, symmetric: bool
) -> dict[str, np.ndarray]:
    n, a, g, _ = p.shape
    total = p.sum(axis=(2, 3))
    p = p / np.where(total > 0, total, 1.0)[..., None, None]
    lv = np.arange(1, g + 1, dtype=np.float64)
    px = p.sum(axis=3)  # n x a x g: p_x(i)
    py = px if symmetric else p.sum(axis=2)  # p_y(j)
    ux = px @ lv
    uy = ux if symmetric else py @ lv
    # p_{x-y}(k), k = 0..g-1, and p_{x+y}(k), k = 2..2g: sums over (anti-)diagonals, as one
    # matrix product with 0/1 indicators (one BLAS call instead of 3g diagonal sums)
    marginals = p.reshape(n * a, g * g) @ _diagonal_indicators(g)
    pxy_diff = marginals[:, :g].reshape(n, a, g)
    pxy_sum = marginals[:, g:].reshape(n, a, 2 * g - 1)
    ks = np.arange(2, 2 * g + 1, dtype=np.float64)
    kd = np.arange(0, g, dtype=np.float64)
    ngf = ng.astype(np.float64)[:, None, None]

    f: dict[str, np.ndarray] = {}
    f["Autocorrelation"] = np.einsum("naij,i,j->na", p, lv, lv)
    f["JointAverage"] = ux
    centre = ks[None, None, :] - (ux + uy)[..., None]
    centre2 = centre * centre
    f["ClusterProminence"] = (pxy_sum * centre2 * centre2).sum(axis=2)
    f["ClusterShade"] = (pxy_sum * centre2 * centre).sum(axis=2)
    f["ClusterTendency"] = (pxy_sum * centre**2).sum(axis=2)
    f["Contrast"] = pxy_diff @ kd**2
    dx = lv[None, None, :] - ux[..., None]
    dy = dx if symmetric else lv[None, None, :] - uy[..., None]
    sigx = np.einsum("nai,nai->na", px, dx**2) ** 0.5
    sigy = sigx if symmetric else np.einsum("naj,naj->na", py, dy**2) ** 0.5
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
    hy = hx if symmetric else -(py * np.log2(py + EPS)).sum(axis=2)
    pxpy = px[..., :, None] * py[..., None, :]
    log_pxpy = np.log2(pxpy + EPS)  # shared by HXY1 and HXY2
    hxy1 = -(p * log_pxpy).sum(axis=(2, 3))
    hxy2 = -(pxpy * log_pxpy).sum(axis=(2, 3))
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
    out["MCC"] = _mcc(p, px, py, valid, present, symmetric)
    return out


MCC_EXACT_BELOW = 1e-4  # second eigenvalues this small take pyradiomics' exact path


def _compressed(p: np.ndarray, px: np.ndarray, py: np.ndarray, present: np.ndarray,
                rows: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The GLCMs of ``rows`` (all with kk levels) restricted to their present levels."""
    idx = np.argsort(~present[rows], axis=1, kind="stable")[:, :kk]
    r4 = rows[:, None, None, None]
    a4 = np.arange(p.shape[1])[None, :, None, None]
    pc = p[r4, a4, idx[:, None, :, None], idx[:, None, None, :]]
    pxc = np.take_along_axis(px[rows], idx[:, None, :], axis=2)
    pyc = np.take_along_axis(py[rows], idx[:, None, :], axis=2)
    return pc, pxc, pyc


def _mcc(
    p: np.ndarray, px: np.ndarray, py: np.ndarray, valid: np.ndarray, present: np.ndarray,
    symmetric: bool,
) -> np.ndarray:
    """sqrt of the second largest eigenvalue of Q (pyradiomics' MCC), grouped by level count.

    pyradiomics computes Q_ij = sum_k p(i,k) p(j,k) / (p_x(i) p_y(k) + eps) on the GLCM
    without its absent levels and returns 1 for a single level. For a symmetric GLCM, Q is
    similar to A^2 with A = D^-1/2 P D^-1/2 (D = diag(p_x)), so the symmetric solver on A
    gives the same eigenvalues (up to eps) 3x faster. ROIs whose second eigenvalue is tiny,
    where pyradiomics' general solver may return a slightly negative (sqrt -> NaN, angle
    skipped) or complex value, and asymmetric GLCMs go through :func:`_mcc_exact`.
    """
    n = p.shape[0]
    out = np.ones(n, dtype=np.float64)
    k = present.sum(axis=1)
    exact = np.zeros(n, dtype=bool)
    for kk in np.unique(k[k >= 2]).tolist():
        rows = np.flatnonzero(k == kk)
        if not symmetric:
            exact[rows] = True
            continue
        pc, pxc, _ = _compressed(p, px, py, present, rows, kk)
        ok = valid[rows]
        with np.errstate(divide="ignore"):
            scale = np.where(pxc > 0, 1 / np.sqrt(pxc), 0.0)
        a = pc * scale[..., :, None] * scale[..., None, :]
        a[~ok] = 0.0
        mu = np.linalg.eigvalsh(a)
        second = np.sort(mu * mu, axis=-1)[..., -2]
        exact[rows[((second < MCC_EXACT_BELOW) & ok).any(axis=1)]] = True
        out[rows] = _angle_mean(np.sqrt(second), ok)
    if exact.any():
        out[exact] = _mcc_exact(p, px, py, valid, present, np.flatnonzero(exact))
    return out


def _mcc_exact(
    p: np.ndarray, px: np.ndarray, py: np.ndarray, valid: np.ndarray, present: np.ndarray,
    which: np.ndarray,
) -> np.ndarray:
    """pyradiomics' own MCC arithmetic for the ROIs ``which`` (each with >= 2 levels).

    The square root is complex whenever any eigenvalue of the ROI's angle stack is complex
    (numpy's ``eigvals`` then returns a complex array); otherwise a negative eigenvalue
    gives NaN, which the angle mean skips.
    """
    out = np.empty(len(which), dtype=np.float64)
    k = present[which].sum(axis=1)
    for kk in np.unique(k).tolist():
        sel = np.flatnonzero(k == kk)
        rows = which[sel]
        pc, pxc, pyc = _compressed(p, px, py, present, rows, kk)
        w = pc / (pxc[..., :, None] * pyc[..., None, :] + EPS)
        q = np.einsum("naik,najk->naij", w, pc)
        ok = valid[rows]
        q[~ok] = 0.0  # dropped angles: keep eigvals finite, masked below
        ev = np.sort(np.linalg.eigvals(q), axis=-1)  # complex: by (real, imag) like numpy
        second = ev[..., -2]
        with np.errstate(invalid="ignore"):
            if np.iscomplexobj(ev):
                cplx = ((ev.imag != 0).any(axis=2) & ok).any(axis=1)
                real_part = np.sqrt(second.real)
                complex_part = np.sqrt(second.astype(np.complex128)).real
                val = np.where(cplx[:, None], complex_part, real_part)
            else:
                val = np.sqrt(second)
        out[sel] = _angle_mean(val, ok)
    return out


# ----------------------------------------------------------------------------------- GLRLM


def _line_layouts(m: Mosaic) -> Iterator[tuple[int, np.ndarray]]:
    """(angle, flat array of ROI codes in which the lines of that angle are consecutive).

    Every line starts and ends with an outside pixel, so runs never join two lines. For the
    diagonals each shelf band is sheared (S[y, j] = band[y, j - y], a free strided view of
    the band padded on the right) and transposed, so diagonals become rows.
    """
    codes = m.compact_codes()
    outside = m.outside
    yield 0, codes.ravel()
    yield 2, np.ascontiguousarray(codes.T).ravel()
    width = codes.shape[1]
    for angle, flip in ((1, False), (3, True)):
        parts = []
        for band in m.bands:
            rows = codes[band]
            hb = rows.shape[0]
            padded = np.full((hb, width + hb), outside, dtype=codes.dtype)
            padded[:, :width] = rows[:, ::-1] if flip else rows
            step = padded.itemsize
            sheared = as_strided(
                padded, shape=(hb, width + hb - 1), strides=((width + hb - 1) * step, step)
            )
            parts.append(np.ascontiguousarray(sheared.T).ravel())
        yield angle, np.concatenate(parts)


def line_runs(m: Mosaic) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per angle: (code, length) of every maximal run of equal codes along that angle's
    lines, outside runs included and in line order (cached: GLCM and GLRLM share them).

    Consecutive runs of one layout are neighbours along the angle unless one of them is
    outside (lines start and end outside), which is all the GLCM needs.
    """
    if "runs" not in m.cache:
        found: list = [None] * N_ANGLES
        for angle, flat in _line_layouts(m):
            change = np.empty(flat.size, dtype=bool)
            change[0] = True  # flat[0] is outside: the first run starts there
            np.not_equal(flat[1:], flat[:-1], out=change[1:])
            starts = np.flatnonzero(change)
            found[angle] = (flat[starts].astype(np.intp), np.diff(starts, append=flat.size))
            if angle == 0:
                m.cache["row_starts"] = starts  # canvas positions of the horizontal runs
        m.cache["runs"] = found
    return m.cache["runs"]


def longest_runs(m: Mosaic) -> np.ndarray:
    """n * 4: the longest possible run of each (ROI, angle), in (roi, angle) order."""
    return np.stack(
        [m.widths, np.minimum(m.heights, m.widths), m.heights, np.minimum(m.heights, m.widths)],
        axis=1,
    ).ravel()


def glrlm_cells(m: Mosaic) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The nonzero GLRLM cells of every ROI and angle, cached: (roi * 4 + angle, level,
    run length, count), sorted by (roi, angle), then level, then length."""
    if "glrlm" in m.cache:
        return m.cache["glrlm"]
    n, g1 = m.n, m.n_levels + 1
    longest = longest_runs(m)
    # dense layout: block roi * 4 + angle holds ng rows (levels 1..Ng) of ``longest`` lengths
    off = np.concatenate(([0], np.cumsum(np.repeat(m.ng, N_ANGLES) * longest)))
    code_roi, code_level = np.divmod(np.arange(n * g1), g1)
    keys = []
    top = int(off[-1])
    for angle, (code, length) in enumerate(line_runs(m)):
        ra = code_roi * N_ANGLES + angle
        # per code: where the (roi, angle, level, run length 1) cell of the GLRLM sits; the
        # outside code (last) points past the end, so no filtering pass over the runs
        base = np.append(off[ra] + (code_level - 1) * longest[ra] - 1, top)
        keys.append(base[code] + length)
    # one bincount over (roi, angle, level, run length): the GLRLM of every ROI and angle
    counts = np.bincount(np.concatenate(keys), minlength=top)[:top]
    cell = np.flatnonzero(counts)
    ra = np.searchsorted(off, cell, side="right") - 1  # sorted: cells come in key order
    gl, rl = np.divmod(cell - off[ra], longest[ra])
    m.cache["glrlm"] = (ra, gl + 1, rl + 1, counts[cell])
    return m.cache["glrlm"]


GLRLM_SUMS = 15  # columns of glrlm_sums: see glrlm_sums and _texture.glrlm_sums


def glrlm_sums(m: Mosaic) -> np.ndarray:
    """(n * 4) x 15: per (roi, angle) the sums every GLRLM feature is a ratio of.

    Nr, Np, the eight emphasis sums (c/r^2, c r^2, c/g^2, c g^2, c/(r^2 g^2), c g^2/r^2,
    c r^2/g^2, c r^2 g^2), sum c (r - mu_r)^2, sum p log2(p + eps), sum_g P(g)^2,
    sum_r P(r)^2 and the grey-level variance of P(g) / Nr. The compiled kernel computes the
    same columns in one pass over the cells (``_texture.glrlm_sums``).
    """
    n, g1 = m.n, m.n_levels + 1
    longest = longest_runs(m)
    ra, gl, rl, count = glrlm_cells(m)
    c = count.astype(np.float64)
    na = n * N_ANGLES
    starts = np.searchsorted(ra, np.arange(na))  # every (roi, angle) has runs
    rlf = rl.astype(np.float64)
    squares = np.arange(max(int(rl.max(initial=0)), g1) + 1, dtype=np.float64) ** 2
    g2, r2 = squares[gl], squares[rl]
    out = np.empty((na, GLRLM_SUMS))
    # per-cell terms of the sums over the GLRLM, reduced per (roi, angle) in one call
    # (terms x cells: reduceat along the contiguous axis is 3x faster than across it);
    # written in place, row by row, instead of stacking ten temporaries
    terms = np.empty((10, c.size))
    terms[0] = c
    np.multiply(c, rlf, out=terms[1])
    np.divide(c, r2, out=terms[2])  # short runs
    np.multiply(c, r2, out=terms[3])  # long runs
    np.divide(c, g2, out=terms[4])  # low grey
    np.multiply(c, g2, out=terms[5])  # high grey
    np.divide(terms[2], g2, out=terms[6])
    np.multiply(terms[2], g2, out=terms[7])
    np.divide(terms[3], g2, out=terms[8])
    np.multiply(terms[3], g2, out=terms[9])
    out[:, :10] = np.add.reduceat(terms, starts, axis=1).T if na else 0.0
    nr_safe = np.where(out[:, 0] > 0, out[:, 0], 1.0)
    mu_r = out[:, 1] / nr_safe
    dev = rlf - mu_r[ra]
    prob = c / nr_safe[ra]
    extra = np.stack([c * dev * dev, prob * np.log2(prob + EPS)])
    out[:, 10:12] = np.add.reduceat(extra, starts, axis=1).T if na else 0.0
    pg = np.bincount(ra * g1 + gl, c, na * g1).reshape(na, g1)
    off_len = np.concatenate(([0], np.cumsum(longest)))
    pr = np.bincount(off_len[ra] + rl - 1, c, int(off_len[-1]))
    out[:, 12] = (pg * pg).sum(axis=1)
    out[:, 13] = np.add.reduceat(pr * pr, off_len[:-1]) if na else 0.0
    pgn = pg / nr_safe[:, None]
    lv = np.arange(g1, dtype=np.float64)
    mu = pgn @ lv
    out[:, 14] = (pgn * (lv[None, :] - mu[:, None]) ** 2).sum(axis=1)
    return out


def glrlm(m: Mosaic, sums: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """GLRLM features from :func:`glrlm_sums` (or the kernel's ``sums``, same columns)."""
    n = m.n
    valid = angle_validity(m)
    sums = glrlm_sums(m) if sums is None else sums
    nr, npix = sums[:, 0], sums[:, 1]
    nr_safe = np.where(nr > 0, nr, 1.0)
    gln, rln = sums[:, 12], sums[:, 13]
    f: dict[str, np.ndarray] = {
        "ShortRunEmphasis": sums[:, 2] / nr_safe,
        "LongRunEmphasis": sums[:, 3] / nr_safe,
        "GrayLevelNonUniformity": gln / nr_safe,
        "GrayLevelNonUniformityNormalized": gln / nr_safe**2,
        "RunLengthNonUniformity": rln / nr_safe,
        "RunLengthNonUniformityNormalized": rln / nr_safe**2,
        "RunPercentage": nr / np.where(npix > 0, npix, 1.0),
        "GrayLevelVariance": sums[:, 14],
        "RunVariance": sums[:, 10] / nr_safe,
        "RunEntropy": -sums[:, 11],
        "LowGrayLevelRunEmphasis": sums[:, 4] / nr_safe,
        "HighGrayLevelRunEmphasis": sums[:, 5] / nr_safe,
        "ShortRunLowGrayLevelEmphasis": sums[:, 6] / nr_safe,
        "ShortRunHighGrayLevelEmphasis": sums[:, 7] / nr_safe,
        "LongRunLowGrayLevelEmphasis": sums[:, 8] / nr_safe,
        "LongRunHighGrayLevelEmphasis": sums[:, 9] / nr_safe,
    }
    ok = valid & (nr.reshape(n, N_ANGLES) > 0)
    means = angle_means(np.stack(list(f.values()), axis=-1).reshape(n, N_ANGLES, len(f)), ok)
    return {k: means[:, j] for j, k in enumerate(f)}


# ----------------------------------------------------------------------------------- GLSZM


MAX_COLOURS = 62  # colours are bit positions in an int64


def colouring(m: Mosaic) -> np.ndarray:
    """(n + 1) x (G + 1) colour of each (ROI, level), -1 where absent or outside.

    Levels of one colour are never 8-adjacent within a ROI (ROIs never touch), so the zones
    of all (ROI, level) pairs of one colour come from a single binary ``ndimage.label``
    call. Greedy colouring per ROI from its GLCM, most frequent level first, so that the
    colours beyond the first two (needed where three levels meet, e.g. at sharp edges)
    go to few pixels: smooth X-ray ROIs put ~99% of their pixels in colours 0 and 1.
    """
    n, g = m.n, m.n_levels
    counts = m.level_counts[:, 1:]
    present = counts > 0
    colour = np.full((n + 1, g + 1), -1, dtype=np.int64)
    if g + 1 > MAX_COLOURS:  # too many levels for bit masks: one colour per level
        colour[:n, 1:] = np.where(present, np.arange(g), -1)
        return colour
    pairs = glcm_counts(m).sum(axis=1)
    adjacent = (pairs + pairs.transpose(0, 2, 1)) > 0
    col = colour[:n, 1:]
    rows = np.arange(n)
    for lvl in np.argsort(-counts, axis=1, kind="stable").T:  # k-th most frequent level
        seen = adjacent[rows, lvl] & (col >= 0)
        taken = np.bitwise_or.reduce(np.where(seen, np.left_shift(1, np.maximum(col, 0)), 0),
                                     axis=1)
        free = ~taken
        lowest = np.log2((free & -free).astype(np.float64)).astype(np.int64)
        col[rows, lvl] = np.where(present[rows, lvl], lowest, -1)
    return colour


PARITY_MAX_SHARE = 1 / 25  # GLSZM: largest share of conflicted pixels for the parity scheme


def zones(m: Mosaic) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All 8-connected zones of equal level: (roi, level, size) per zone.

    Zones are unions of horizontal runs. Two schemes give the same zones; the cheaper one is
    chosen from the GLCM counts:
    - parity (smooth images): neighbouring levels mostly differ by 1, so runs of odd and of
      even levels are labelled separately (two ``ndimage.label`` calls), leaving out the few
      "conflicted" runs with a pixel that touches another level of the same parity;
    - colouring (noisy images): see :func:`colouring`; rare colours are left out.
    The runs left out are then joined to their equal-level neighbours by union-find.
    """
    if "zones" in m.cache:
        return m.cache["zones"]
    counts = glcm_counts(m)
    lv = np.arange(1, m.n_levels + 1)
    gap = np.abs(lv[:, None] - lv[None, :])
    conflicts = counts[:, :, (gap > 0) & (gap % 2 == 0)].sum()
    code, length = line_runs(m)[0]
    start = m.cache["row_starts"]
    if 2 * conflicts <= PARITY_MAX_SHARE * m.levels.size:
        z_code, z_size = _zones_parity(m, code, length, start)
    else:
        z_code, z_size = _zones_colouring(m, code, length, start)
    g1 = m.n_levels + 1
    m.cache["zones"] = (z_code // g1, z_code % g1, z_size)
    return m.cache["zones"]


def _label_runs(m: Mosaic, chosen: np.ndarray, length: np.ndarray,
                start: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of the pixels of the chosen runs: per run its label (0 for
    runs not chosen) and the number of labels."""
    mask = np.repeat(chosen, length).reshape(m.shape)
    return _label_mask(mask, start)


def _label_mask(mask: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a canvas mask whose horizontal runs (starting at flat
    positions ``start``) are each all in or all out: per run its label and the count.

    Two runs of one mask are never neighbours in a row (they would be equal-code runs, or
    adjacent levels that the schemes keep in different masks), so a mask holds fewer than
    half the runs, hence fewer components: when that bound fits, uint16 labels make
    ``ndimage.label`` ~15% faster (large ROIs have long runs, so this is the common case).
    """
    from scipy import ndimage  # here: the compiled kernel never needs it (~0.3 s to import)

    dtype = np.uint16 if start.size // 2 < np.iinfo(np.uint16).max else np.int32
    labels = np.empty(mask.shape, dtype=dtype)
    count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool), output=labels)
    return labels.ravel()[start].astype(np.intp), count


def _parity_codes(levels: np.ndarray) -> np.ndarray:
    """Flat ``2 * level + 1`` inside, 0 outside (uint8 when levels allow).

    For two such values a, b, ``t = a ^ b`` has bit 0 set iff exactly one is outside and,
    when both are inside, bit 1 set iff their levels differ in parity. So "both inside,
    different levels of the same parity" (a parity conflict) is ``t & 3 == 0 and t != 0``:
    three cheap uint8 passes per angle instead of a comparison per condition.
    """
    top = int(levels.max(initial=0))
    dtype = np.uint8 if 2 * top + 1 < 256 else np.uint16 if 2 * top + 1 < 1 << 16 else np.int64
    lf = levels.ravel().astype(dtype)
    enc = lf << 1
    enc |= lf != 0
    return enc


def _zones_parity(m: Mosaic, code: np.ndarray, length: np.ndarray,
                  start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    enc = _parity_codes(m.levels)
    size = enc.size
    conflict = np.zeros(size, dtype=bool)
    for d in flat_offsets(m.shape[1]):
        t = enc[: size - d] ^ enc[d:]
        bad = (t & 3) == 0
        bad &= t != 0
        conflict[: size - d] |= bad
        conflict[d:] |= bad
    loose = np.zeros(code.size, dtype=bool)
    loose[np.searchsorted(start, np.flatnonzero(conflict), side="right") - 1] = True
    loose_runs = np.flatnonzero(loose)
    # pixels of the loose runs, left out of both parity masks (union-find joins them)
    span = length[loose_runs]
    loose_pixels = (np.repeat(start[loose_runs] - np.cumsum(span) + span, span)
                    + np.arange(int(span.sum())))
    odd = (enc & 2).astype(bool)  # bit 1 of 2 * level + 1: the level is odd
    even = enc != 0
    even ^= odd  # inside and not odd
    even[loose_pixels] = False
    odd[loose_pixels] = False
    shape = m.shape
    label_even, n_even = _label_mask(even.reshape(shape), start)
    label_odd, n_odd = _label_mask(odd.reshape(shape), start)
    # a run is in at most one mask: its component is the even label, or the odd one after
    # all even labels; -1 for outside and loose runs (label 0 in both)
    comp = label_even.astype(np.intp)
    comp += np.where(label_odd > 0, label_odd + n_even, 0)
    comp -= 1
    return _merge_runs(m, code, length, start, comp, n_even + n_odd, loose_runs)


def _zones_colouring(m: Mosaic, code: np.ndarray, length: np.ndarray,
                     start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zones by colour classes: common colours are labelled on the canvas, rare colours (a
    few sharp-edged ROIs need 5-7 colours where the rest need 2-3) left to union-find."""
    n = m.n
    colour = colouring(m)
    n_colours = int(colour.max()) + 1
    inside = colour[:n, 1:] >= 0
    share = np.bincount(colour[:n, 1:][inside], m.level_counts[:, 1:][inside], n_colours)
    common = share >= RESIDUAL_SHARE * m.levels.size
    run_colour = colour.ravel()[code]  # outside -> -1
    comp = np.full(code.size, -1, dtype=np.intp)
    n_comp = 0
    for c in np.flatnonzero(common).tolist():
        chosen = run_colour == c
        label, count = _label_runs(m, chosen, length, start)
        comp[chosen] = label[chosen] - 1 + n_comp
        n_comp += count
    loose = np.flatnonzero((run_colour >= 0) & ~np.append(common, True)[run_colour])
    return _merge_runs(m, code, length, start, comp, n_comp, loose)


def _merge_runs(
    m: Mosaic, code: np.ndarray, length: np.ndarray, start: np.ndarray, comp: np.ndarray,
    n_comp: int, loose: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Zones from labelled components (``comp`` per run, -1 if none) and ``loose`` runs,
    joined by union-find to every equal-code run above or below them: (code, size)."""
    from scipy.sparse import coo_array  # numpy path only, as ndimage in _label_mask
    from scipy.sparse.csgraph import connected_components

    # bin 0 collects the runs without a component (-1): no masking passes over all runs
    comp_size = np.bincount(comp + 1, length, n_comp + 1)[1:].astype(np.int64)
    comp_code = np.empty(n_comp + 1, dtype=np.intp)
    comp_code[comp + 1] = code
    comp_code = comp_code[1:]
    if loose.size == 0:
        return comp_code, comp_size
    k = loose.size  # loose run i is node i; component c is node k + c until compacted
    rank = np.full(code.size, -1, dtype=np.intp)
    rank[loose] = np.arange(k)
    width = m.shape[1]
    first, last = start[loose], start[loose] + length[loose] - 1
    src, dst = [np.arange(k)], [np.arange(k)]
    for side in (-width, width):
        # runs of the row above/below that overlap columns first - 1 .. last + 1 (8-neighbours;
        # loose runs never touch the canvas border, so these columns stay in that row)
        lo = np.searchsorted(start, first - 1 + side, side="right") - 1
        hi = np.searchsorted(start, last + 1 + side, side="right") - 1
        span = hi - lo + 1
        owner = np.repeat(np.arange(k), span)
        cand = lo[owner] + (np.arange(owner.size) - np.repeat(np.cumsum(span) - span, span))
        same = np.flatnonzero(code[cand] == code[loose][owner])  # same ROI and level
        cand = cand[same]
        src.append(owner[same])
        dst.append(np.where(rank[cand] >= 0, rank[cand], k + comp[cand]))
    src_all, dst_all = np.concatenate(src), np.concatenate(dst)
    # compact the node ids: the loose runs, then only the components they touch
    touched = np.zeros(n_comp, dtype=bool)
    touched[dst_all[dst_all >= k] - k] = True
    comp_ids = np.flatnonzero(touched)
    index = np.full(k + n_comp, -1, dtype=np.intp)
    index[:k] = np.arange(k)
    index[k + comp_ids] = k + np.arange(comp_ids.size)
    n_nodes = k + comp_ids.size
    graph = coo_array((np.ones(src_all.size, dtype=np.int8), (src_all, index[dst_all])),
                      shape=(n_nodes, n_nodes))
    n_groups, group = connected_components(graph, directed=False)
    node_size = np.concatenate([length[loose], comp_size[comp_ids]])
    node_code = np.concatenate([code[loose], comp_code[comp_ids]])
    merged_code = np.empty(n_groups, dtype=np.intp)
    merged_code[group] = node_code
    merged_size = np.bincount(group, node_size, n_groups).astype(np.int64)
    return (np.concatenate([comp_code[~touched], merged_code]),
            np.concatenate([comp_size[~touched], merged_size]))


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


def _codes9(m: Mosaic) -> np.ndarray:
    """Flat ``codes * 9``: the key base of (ROI, level, 0..8 neighbours) counts."""
    if "codes9" not in m.cache:
        m.cache["codes9"] = np.multiply(m.codes.ravel(), 2 * N_ANGLES + 1, dtype=np.intp)
    return m.cache["codes9"]


def gldm_counts(m: Mosaic, alpha: int = 0) -> np.ndarray:
    """n x (G + 1) x 9: pixels per (ROI, level, number of dependent neighbours), cached."""
    key = ("gldm", alpha)
    if key in m.cache:
        return m.cache[key]
    n, g1 = m.n, m.n_levels + 1
    lv = m.levels.ravel()
    size = lv.size
    dep = np.zeros(size, dtype=np.uint8)
    for d in flat_offsets(m.shape[1]):
        a, b = lv[: size - d], lv[d:]
        if alpha == 0:
            same = a == b  # two outside pixels also match, but outside counts are dropped
        else:
            diff = np.abs(a.astype(np.int32) - b.astype(np.int32))
            same = (diff <= alpha) & (a != 0) & (b != 0)
        dep[: size - d] += same
        dep[d:] += same
    nd = 2 * N_ANGLES + 1
    counts = np.bincount(_codes9(m) + dep, minlength=(n + 1) * g1 * nd)
    m.cache[key] = counts[: n * g1 * nd].reshape(n, g1, nd)
    return m.cache[key]


def gldm(m: Mosaic, alpha: int = 0) -> dict[str, np.ndarray]:
    g1 = m.n_levels + 1
    nd = 2 * N_ANGLES + 1
    p = gldm_counts(m, alpha)[:, 1:, :].astype(np.float64)
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


def ngtdm_sums(m: Mosaic) -> np.ndarray:
    """n x (G + 1) x 9: sums of ``|C L - T|`` per (ROI, level L, C neighbours in the ROI),
    T the sum of those neighbours' levels (exact integers, as float64), cached."""
    if "ngtdm" in m.cache:
        return m.cache["ngtdm"]
    n, g1 = m.n, m.n_levels + 1
    width = m.shape[1]
    lv = m.levels.ravel().astype(np.int16 if 9 * g1 < 1 << 15 else np.int32)
    inside = (lv != 0).astype(np.int8)

    def box(a: np.ndarray) -> np.ndarray:
        """3 x 3 sums centred on flat positions W + 1 .. N - W - 2 (row ends wrap onto the
        border columns, which are outside and whose own sums are never used)."""
        rows = a[:-2] + a[1:-1] + a[2:]
        return rows[: -2 * width] + rows[width:-width] + rows[2 * width:]

    inner = slice(width + 1, lv.size - width - 1)
    centre = lv[inner]
    total = box(lv)
    total -= centre
    count = box(inside)
    count -= inside[inner]
    # s_i sums |L - T/C| = |C L - T| / C over the pixels of level i: sum the integers
    # |C L - T| per (ROI, level, C) and divide once per C (C = 0, no neighbour, adds 0)
    dev = centre * count.astype(centre.dtype)
    dev -= total
    np.abs(dev, out=dev)
    nd = 2 * N_ANGLES + 1
    sums = np.bincount(_codes9(m)[inner] + count, dev, (n + 1) * g1 * nd)
    m.cache["ngtdm"] = sums[: n * g1 * nd].reshape(n, g1, nd)
    return m.cache["ngtdm"]


def ngtdm(m: Mosaic) -> dict[str, np.ndarray]:
    n, g1 = m.n, m.n_levels + 1
    nd = 2 * N_ANGLES + 1
    per_count = np.zeros(nd)
    per_count[1:] = 1 / np.arange(1, nd)
    s_all = (ngtdm_sums(m).astype(np.float64) @ per_count)[:, 1:]
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
