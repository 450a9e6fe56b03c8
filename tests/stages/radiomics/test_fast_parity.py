"""The fast radiomics backend against the pyradiomics backend, feature by feature.

Every feature of every ROI must agree to 1e-4 relative (1e-6 absolute near zero), NaN where
pyradiomics gives NaN, with identical per-ROI reasons. The ROIs: a few hundred synthetic
textures of varied sizes (noise, smooth fields with saturated pixels, few-level patterns,
ramps, checkerboards, flat areas), chest phantoms, real NIH ROIs when the sample is present,
and degenerate ROIs (one grey level, 2-pixel-thin, 1-pixel lines, single pixels, ROIs that
touch or fill the image).
"""

from __future__ import annotations

import copy
import csv
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from kacl_cli.errors import InputError
from kacl_cli.stages.radiomics import settings as S
from kacl_cli.stages.radiomics.backends.base import Backend, BatchResult, get_backend
from kacl_cli.stages.radiomics.backends.fast import (
    backend as fast,
)
from kacl_cli.stages.radiomics.backends.fast import (
    kernel as fast_kernel,
)
from kacl_cli.stages.radiomics.backends.fast import (
    texture as fast_texture,
)
from kacl_cli.stages.radiomics.backends.fast.backend import FastBackend, extract_rois
from kacl_cli.stages.radiomics.backends.pyrad import PyradiomicsBackend

RTOL, ATOL = 1e-4, 1e-6
KINDS = ("noise", "smooth", "coarse", "levels3", "binary", "flat", "ramp", "checker", "stripes")


def texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A uint8 test image of one texture family (saturating where the family allows)."""
    if kind == "noise":
        img = rng.integers(0, 256, (size, size))
    elif kind in ("smooth", "coarse"):
        sigma = 1.5 if kind == "smooth" else 5.0
        field = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma)
        img = 128 + field / field.std() * rng.uniform(30, 90)  # tails clip at 0 and 255
    elif kind == "levels3":
        img = rng.integers(0, 3, (size, size)) * 60 + 20
    elif kind == "binary":
        img = rng.integers(0, 2, (size, size)) * rng.choice([25, 200]) + 10
    elif kind == "flat":
        img = np.full((size, size), rng.integers(0, 256))
    elif kind == "ramp":
        yy, xx = np.mgrid[0:size, 0:size]
        img = (xx * rng.uniform(0.5, 4) + yy * rng.uniform(0, 2)) % 256
    elif kind == "checker":
        yy, xx = np.mgrid[0:size, 0:size]
        img = ((yy + xx) % 2) * 120 + 60
    else:  # stripes
        img = np.repeat((np.arange(size) // rng.integers(1, 4) % 3 * 70)[:, None], size, 1)
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic(n: int, seed: int, size: int = 72) -> tuple[list, list, list]:
    """n (image, box, spacing) triples: all texture kinds, sizes 2..size, some at borders."""
    rng = np.random.default_rng(seed)
    images, boxes, spacings = [], [], []
    for k in range(n):
        img = texture(KINDS[k % len(KINDS)], size, rng)
        small = k % 5 == 0
        h, w = rng.integers(2, 8 if small else size, size=2)
        y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        if k % 11 == 0:
            y, x = 0, size - w  # touches two borders
        if k % 37 == 0:
            y, x, h, w = 0, 0, size, size  # the whole image
        images.append(img)
        boxes.append((int(x), int(y), int(x + w), int(y + h)))
        spacings.append((1.0, 1.0) if k % 2 else tuple(rng.uniform(0.2, 2.0, 2)))
    return images, boxes, spacings


def mismatches(ref: np.ndarray, got: np.ndarray, names: list[str]) -> list[str]:
    """Features outside the tolerance, each with its worst ROI."""
    diff = np.abs(got - ref)
    with np.errstate(invalid="ignore"):
        ok = (diff <= ATOL) | (diff <= RTOL * np.abs(ref)) | (ref == got)
    ok |= np.isnan(ref) & np.isnan(got)
    out = []
    for j in np.flatnonzero(~ok.all(axis=0)):
        i = np.flatnonzero(~ok[:, j])
        worst = i[np.argmax(np.nan_to_num(diff[i, j], nan=np.inf))]
        out.append(f"{names[j]}: {len(i)} ROIs, e.g. ROI {worst} ref {ref[worst, j]!r} "
                   f"fast {got[worst, j]!r}")
    return out


def check_parity(images, boxes, settings, spacings=None) -> tuple[BatchResult, BatchResult]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = PyradiomicsBackend().extract(images, boxes, settings, spacings)
    got = FastBackend().extract(images, boxes, settings, spacings)
    assert got.reasons == ref.reasons
    bad = mismatches(ref.features, got.features, FastBackend().feature_names(settings))
    assert not bad, "\n".join(bad)
    return ref, got


@pytest.fixture(params=["c", "numpy"])
def kernel(request, monkeypatch) -> str:
    """Each parity test runs through the compiled kernel and through the numpy path."""
    monkeypatch.setenv(fast_kernel.KERNEL_ENV, request.param)
    return request.param


@pytest.fixture(scope="module")
def settings() -> dict:
    return S.load_settings()


def test_registry_names_and_protocol(settings: dict) -> None:
    backend = get_backend("fast")
    assert isinstance(backend, Backend) and backend.name == "fast"
    assert backend.feature_names(settings) == PyradiomicsBackend().feature_names(settings)


@pytest.mark.usefixtures("kernel")
def test_synthetic_textures_match_pyradiomics(settings: dict) -> None:
    images, boxes, spacings = synthetic(240, seed=1)
    ref, got = check_parity(images, boxes, settings, spacings)
    assert ref.n_failed == 0
    assert np.isfinite(got.features).mean() > 0.99  # a real comparison, not NaN == NaN


@pytest.mark.parametrize(
    "setting",
    [
        {"binWidth": 10},
        {"binWidth": 7.5},
        {"binCount": 16},
        {"symmetricalGLCM": False},
        {"gldm_a": 1},
        {"voxelArrayShift": 300},
    ],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()),
)
@pytest.mark.usefixtures("kernel")
def test_other_settings_match_pyradiomics(settings: dict, setting: dict) -> None:
    custom = copy.deepcopy(settings)
    if "binCount" in setting:
        custom["setting"].pop("binWidth")
    custom["setting"].update(setting)
    images, boxes, spacings = synthetic(27, seed=sum(map(ord, str(setting))))
    check_parity(images, boxes, custom, spacings)


@pytest.mark.usefixtures("kernel")
def test_feature_subsets_keep_the_column_order(settings: dict) -> None:
    custom = copy.deepcopy(settings)
    custom["featureClass"] = {"glszm": ["ZoneEntropy", "SmallAreaEmphasis"],
                              "firstorder": ["Median"], "glcm": ["MCC"]}
    images, boxes, spacings = synthetic(9, seed=5)
    ref, got = check_parity(images, boxes, custom, spacings)
    assert got.features.shape == (9, 4)


@pytest.mark.usefixtures("kernel")
def test_phantom_rois_match_pyradiomics(settings: dict) -> None:
    phantoms = pytest.importorskip("kacl_cli.stages.prepare.phantoms")
    rng = np.random.default_rng(3)
    images, boxes = [], []
    for spec in phantoms.plan(6, seed=2):
        pixels, found = phantoms.render(spec, 128)
        for x, y, w, h in list(found.values()):
            x0, y0 = int(x), int(y)
            boxes.append((x0, y0, min(128, x0 + max(2, int(w))), min(128, y0 + max(2, int(h)))))
            images.append(pixels)
        for _ in range(6):
            w, h = rng.integers(4, 60, size=2)
            x, y = rng.integers(0, 128 - w), rng.integers(0, 128 - h)
            boxes.append((int(x), int(y), int(x + w), int(y + h)))
            images.append(pixels)
    check_parity(images, boxes, settings)


@pytest.mark.nih
@pytest.mark.usefixtures("kernel")
def test_real_nih_rois_match_pyradiomics(settings: dict, nih_sample: Path) -> None:
    """GT boxes of the 6 boxed sample images + random boxes on others, at store size 256."""
    from kacl_cli.imageio import load_for_store
    from kacl_cli.stages.radiomics.rois import store_box

    size = 256
    with open(nih_sample / "BBox_List_2017.csv", newline="") as fh:
        rows = [r for r in list(csv.reader(fh))[1:] if r]
    files = {p.name: p for p in (nih_sample / "images").glob("*.png")}
    cache: dict[str, tuple[np.ndarray, int, int]] = {}

    def load(name: str) -> tuple[np.ndarray, int, int]:
        if name not in cache:
            cache[name] = load_for_store(files[name], size)
        return cache[name]

    images, boxes = [], []
    for name, _finding, *xywh in rows:
        if name in files:
            px, w, h = load(name)
            images.append(px)
            boxes.append(store_box(tuple(float(v) for v in xywh[:4]), w, h, size))
    assert len(boxes) >= 6
    rng = np.random.default_rng(0)
    sizes = np.array([[float(v) for v in r[4:6]] for r in rows]) * size / 1024
    for name in sorted(files)[:: max(1, len(files) // 12)][:12]:
        px, _, _ = load(name)
        for w, h in sizes[rng.choice(len(sizes), 4)]:
            w, h = max(2, int(w)), max(2, int(h))
            x, y = rng.integers(0, size - w + 1), rng.integers(0, size - h + 1)
            images.append(px)
            boxes.append((int(x), int(y), int(x + w), int(y + h)))
    spacing = [(0.143 * 4, 0.143 * 4)] * len(boxes)
    ref, _ = check_parity(images, boxes, settings, spacing)
    assert ref.n_failed == 0


@pytest.mark.usefixtures("kernel")
def test_degenerate_rois_give_the_same_values_and_reasons(settings: dict) -> None:
    rng = np.random.default_rng(7)
    img = texture("smooth", 40, rng)
    flat = np.full((40, 40), 200, np.uint8)
    two = texture("binary", 40, rng)
    images = [img, img, img, img, img, img, img, flat, flat, two, two, img, img, img]
    boxes = [
        (5, 5, 5, 9),  # empty
        (3, 3, 4, 4),  # one pixel
        (3, 3, 4, 30),  # 1-px column
        (3, 3, 30, 4),  # 1-px row
        (30, 30, 50, 38),  # outside
        (0, 0, 2, 2),  # smallest valid ROI, in the corner
        (38, 0, 40, 40),  # 2-px wide, full height at the right border
        (2, 2, 30, 30),  # one grey level
        (0, 0, 40, 40),  # one grey level, whole image
        (10, 10, 12, 30),  # two grey levels, 2 px thin
        (0, 0, 40, 40),  # two grey levels, whole image
        (0, 38, 40, 40),  # 2-px high at the bottom border
        (17, 3, 19, 5),  # 2 x 2 inside
        (0, 0, 40, 40),  # whole textured image
    ]
    ref, got = check_parity(images, boxes, settings)
    assert [r is None for r in got.reasons] == [False] * 5 + [True] * 9
    names = FastBackend().feature_names(settings)
    row = dict(zip(names, got.features[7], strict=True))
    assert row["original_firstorder_Mean"] == 200 and row["original_glcm_Contrast"] == 0
    assert row["original_glszm_ZonePercentage"] == 1 / (28 * 28)


@pytest.mark.usefixtures("kernel")
def test_minimum_size_setting_gives_pyradiomics_reason(settings: dict) -> None:
    custom = copy.deepcopy(settings)
    custom["setting"]["minimumROISize"] = 50
    img = texture("smooth", 32, np.random.default_rng(0))
    ref, got = check_parity([img, img, img], [(0, 0, 5, 5), (0, 0, 10, 5), (0, 0, 20, 20)], custom)
    assert got.reasons[0] is not None and got.reasons[1] is not None and got.reasons[2] is None


@pytest.mark.usefixtures("kernel")
def test_one_pixel_lines_match_pyradiomics_when_allowed(settings: dict) -> None:
    """extract_rois takes 1-px lines; pyradiomics accepts them with minimumROIDimensions 1."""
    from radiomics import featureextractor

    custom = copy.deepcopy(settings)
    custom["setting"]["minimumROIDimensions"] = 1
    names = S.feature_names(custom)
    extractor = featureextractor.RadiomicsFeatureExtractor(
        binWidth=25, minimumROIDimensions=1, additionalInfo=False)
    extractor.disableAllFeatures()
    extractor.enableFeaturesByName(**{c: list(v) for c, v in custom["featureClass"].items()})
    logging.getLogger("radiomics").setLevel(logging.CRITICAL + 10)
    rng = np.random.default_rng(4)
    crops, ref = [], []
    for k in range(12):
        length = int(rng.integers(2, 30))
        shape = (length, 1) if k % 2 else (1, length)
        crop = (rng.integers(0, 3, shape) * 50 + (7 if k % 3 else 130)).astype(np.uint8)
        if k % 4 == 0:
            crop[:] = 90
        pad = np.pad(crop.astype(np.float64), 1)
        mask = np.pad(np.ones(shape, np.uint8), 1)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            res = extractor.execute(sitk.GetImageFromArray(pad), sitk.GetImageFromArray(mask))
        crops.append(crop)
        ref.append([float(res[n]) for n in names])
    got = extract_rois(crops, custom)
    bad = mismatches(np.array(ref), got, names)
    assert not bad, "\n".join(bad)
    assert np.isnan(extract_rois([np.zeros((1, 1), np.uint8)], custom)).all()


@pytest.mark.usefixtures("kernel")
def test_batching_does_not_change_values(settings: dict, monkeypatch) -> None:
    """A ROI's features don't depend on its neighbours on the canvas or on chunking."""
    images, boxes, spacings = synthetic(40, seed=9)
    crops = [im[y0:y1, x0:x1] for im, (x0, y0, x1, y1) in zip(images, boxes, strict=True)]
    together = extract_rois(crops, settings, spacings)
    alone = np.concatenate([extract_rois([c], settings, [s]) for c, s in zip(crops, spacings,
                                                                              strict=True)])
    monkeypatch.setattr(fast, "CHUNK_PIXELS", 500)
    monkeypatch.setattr(fast, "KERNEL_CHUNK_PIXELS", 500)
    chunked = extract_rois(crops, settings, spacings)
    reordered = extract_rois(crops[::-1], settings, spacings[::-1])[::-1]
    for other in (alone, chunked, reordered):
        np.testing.assert_allclose(other, together, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def mixed_rois(settings: dict) -> tuple[list, list, list, BatchResult]:
    """Smooth (parity-scheme) and noisy (colouring-scheme) ROIs with their reference."""
    rng = np.random.default_rng(11)
    images, boxes, spacings = [], [], []
    for k in range(24):
        img = texture(("smooth", "coarse", "noise", "levels3")[k % 4], 64, rng)
        h, w = rng.integers(2, 50, size=2)
        y, x = rng.integers(0, 64 - h + 1), rng.integers(0, 64 - w + 1)
        images.append(img)
        boxes.append((int(x), int(y), int(x + w), int(y + h)))
        spacings.append((1.0, 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = PyradiomicsBackend().extract(images, boxes, settings, spacings)
    return images, boxes, spacings, ref


@pytest.mark.parametrize(
    "knobs",
    [
        {"PARITY_MAX_SHARE": np.inf},  # parity labelling, with many conflicted runs
        {"PARITY_MAX_SHARE": 0.0},  # colouring, common colours labelled
        {"PARITY_MAX_SHARE": 0.0, "RESIDUAL_SHARE": 1.0},  # colouring, all by union-find
        {"MCC_EXACT_BELOW": np.inf},  # pyradiomics' own MCC arithmetic for every ROI
        {"DENSE_BUDGET": 1},  # dense GLCM/NGTDM features one ROI at a time
    ],
    ids=lambda k: ",".join(k),
)
def test_every_code_path_matches_pyradiomics(settings: dict, mixed_rois, monkeypatch,
                                             knobs: dict) -> None:
    """The numpy path's cheaper-path switches change the work, never the values."""
    monkeypatch.setenv(fast_kernel.KERNEL_ENV, "numpy")
    images, boxes, spacings, ref = mixed_rois
    for name, value in knobs.items():
        monkeypatch.setattr(fast_texture, name, value)
    got = FastBackend().extract(images, boxes, settings, spacings)
    bad = mismatches(ref.features, got.features, FastBackend().feature_names(settings))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "setting",
    [{"distances": [1, 2]}, {"weightingNorm": "euclidean"},
     {"resampledPixelSpacing": [1, 1]}, {"resegmentRange": [0, 100]}],
    ids=lambda s: next(iter(s)),
)
def test_unsupported_settings_are_refused(settings: dict, setting: dict) -> None:
    custom = copy.deepcopy(settings)
    custom["setting"].update(setting)
    img = texture("smooth", 16, np.random.default_rng(0))
    with pytest.raises(InputError, match="--backend pyradiomics"):
        FastBackend().extract([img], [(0, 0, 8, 8)], custom)


@pytest.mark.usefixtures("kernel")
def test_bad_pixels_become_reasons(settings: dict) -> None:
    img = texture("smooth", 16, np.random.default_rng(0))
    res = FastBackend().extract(
        [img.astype(np.float32), img.astype(np.int32) * 2, img.astype(np.int16)],
        [(0, 0, 8, 8)] * 3, settings)
    assert "8-bit" in res.reasons[0] and "0..255" in res.reasons[1]
    assert res.reasons[2] is None
    np.testing.assert_array_equal(
        res.features[2], FastBackend().extract([img], [(0, 0, 8, 8)], settings).features[0])


# ------------------------------------------------------------------ normalize (whole image)

NORMALIZED = {"normalize": True, "normalizeScale": 100, "removeOutliers": 3, "binWidth": 20}


def normalized(settings: dict, **setting) -> dict:
    custom = copy.deepcopy(settings)
    custom["setting"].update(setting)
    if "binCount" in setting:
        custom["setting"].pop("binWidth")
    return custom


@pytest.mark.parametrize(
    "setting",
    [
        NORMALIZED,
        {"normalize": True, "normalizeScale": 100, "binWidth": 25},  # no outlier clipping
        {"normalize": True, "binWidth": 0.2},  # normalizeScale 1: pyradiomics' default
        {"normalize": True, "normalizeScale": 100, "removeOutliers": 2, "binCount": 16},
        {**NORMALIZED, "voxelArrayShift": 300},
    ],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items() if k != "normalize"),
)
@pytest.mark.usefixtures("kernel")
def test_normalized_features_match_pyradiomics(settings: dict, setting: dict) -> None:
    """Every texture family, borders and flat images (a reason in both backends)."""
    images, boxes, spacings = synthetic(45, seed=sum(map(ord, str(setting))))
    ref, got = check_parity(images, boxes, normalized(settings, **setting), spacings)
    flat = [k for k, img in enumerate(images) if img.min() == img.max()]
    assert flat and all("one grey level" in (got.reasons[k] or "") for k in flat)
    assert np.isfinite(got.features).mean() > 0.8


@pytest.mark.usefixtures("kernel")
def test_normalized_phantom_rois_share_their_image_statistics(settings: dict) -> None:
    """Several ROIs per phantom: each is normalised by its whole image, not by its crop."""
    phantoms = pytest.importorskip("kacl_cli.stages.prepare.phantoms")
    rng = np.random.default_rng(5)
    images, boxes = [], []
    for spec in phantoms.plan(4, seed=3):
        pixels, _ = phantoms.render(spec, 128)
        for _ in range(8):
            w, h = rng.integers(4, 60, size=2)
            x, y = rng.integers(0, 128 - w), rng.integers(0, 128 - h)
            boxes.append((int(x), int(y), int(x + w), int(y + h)))
            images.append(pixels)
    custom = normalized(settings, **NORMALIZED)
    _, got = check_parity(images, boxes, custom)
    # the same rectangle alone on a canvas of its own pixels gets other statistics
    x0, y0, x1, y1 = boxes[0]
    alone = FastBackend().extract([images[0][y0:y1, x0:x1].copy()], [(0, 0, x1 - x0, y1 - y0)],
                                  custom)
    assert not np.allclose(alone.features[0], got.features[0], rtol=1e-3, equal_nan=True)


def test_pyrad_backend_normalizes_like_pyradiomics_on_the_whole_image(settings: dict) -> None:
    """The reference backend crops after normalising: the same values as pyradiomics given
    the whole image and a whole-image mask with ``normalize`` on (its own definition)."""
    from kacl_cli.stages.radiomics.backends.pyrad import make_extractor, to_sitk

    custom = normalized(settings, **NORMALIZED)
    rng = np.random.default_rng(8)
    img = texture("smooth", 48, rng)
    boxes = [(3, 4, 20, 30), (0, 0, 48, 10), (30, 30, 48, 48)]
    extractor = make_extractor(custom)
    extractor.settings["normalize"] = True  # make_extractor turns it off for the backend
    names = S.feature_names(custom)
    ref = []
    for x0, y0, x1, y1 in boxes:
        mask = np.zeros(img.shape, np.uint8)
        mask[y0:y1, x0:x1] = 1
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            res = extractor.execute(*to_sitk(img.astype(np.float64), mask), label=1)
        ref.append([float(res[n]) for n in names])
    got = PyradiomicsBackend().extract([img] * 3, boxes, custom)
    bad = mismatches(np.array(ref), got.features, names)
    assert not bad, "\n".join(bad)
    assert got.features[0, names.index("original_firstorder_Mean")] != pytest.approx(
        float(img[4:30, 3:20].mean()), rel=1e-2)  # normalised, not raw
