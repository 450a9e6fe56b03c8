"""The pyradiomics reference backend and the radiomics settings."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from radiomics import featureextractor

from kacl_cli.errors import InputError, KaclError
from kacl_cli.stages.radiomics import settings as S
from kacl_cli.stages.radiomics.backends.base import (
    REASON_EMPTY,
    REASON_OUTSIDE,
    REASON_THIN,
    Backend,
    get_backend,
)
from kacl_cli.stages.radiomics.backends.pyrad import PyradiomicsBackend, roi_arrays

logging.getLogger("radiomics").setLevel(logging.CRITICAL + 10)
CLASSES = ("firstorder", "shape2D", "glcm", "glrlm", "glszm", "gldm", "ngtdm")


def textured_image(size: int = 96, seed: int = 0) -> np.ndarray:
    """Smooth structure + noise, with saturated white pixels (the uint8 binning trap)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = 120 + 80 * np.sin(xx / 7.0) * np.cos(yy / 11.0) + rng.normal(0, 20, (size, size))
    img = np.clip(base, 0, 255).astype(np.uint8)
    img[10:14, 10:40] = 255
    return img


def direct(image: np.ndarray, box, spacing=(1.0, 1.0), dtype=np.float64, **setting) -> dict:
    """pyradiomics called directly on the full image and a full-size rectangle mask."""
    x0, y0, x1, y1 = box
    mask = np.zeros(image.shape, dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    im = sitk.GetImageFromArray(image.astype(dtype))
    mk = sitk.GetImageFromArray(mask)
    im.SetSpacing(spacing)
    mk.SetSpacing(spacing)
    ex = featureextractor.RadiomicsFeatureExtractor(**{"binWidth": 25, **setting})
    ex.disableAllFeatures()
    for cls in CLASSES:
        ex.enableFeatureClassByName(cls)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        result = ex.execute(im, mk)
    return {k: float(v) for k, v in result.items() if not k.startswith("diagnostics")}


@pytest.fixture(scope="module")
def settings() -> dict:
    return S.load_settings()


def test_backend_satisfies_protocol_and_registry() -> None:
    backend = get_backend("pyradiomics")
    assert isinstance(backend, Backend)
    assert backend.name == "pyradiomics"
    with pytest.raises(KaclError, match="unknown radiomics backend"):
        get_backend("nope")


def test_default_feature_names_match_pyradiomics(settings: dict) -> None:
    names = PyradiomicsBackend().feature_names(settings)
    ref = direct(textured_image(), (20, 20, 60, 70))
    assert sorted(names) == sorted(ref)  # every non-deprecated default feature, nothing else
    assert len(names) == len(set(names)) == len(ref)
    # fixed order: classes in CLASS_ORDER, names sorted inside a class
    classes = [n.split("_")[1] for n in names]
    assert classes == sorted(classes, key=S.CLASS_ORDER.index)
    for cls in S.CLASS_ORDER:
        inside = [n for n in names if n.split("_")[1] == cls]
        assert inside == sorted(inside)


@pytest.mark.parametrize(
    "box", [(20, 20, 60, 70), (0, 0, 30, 25), (70, 80, 96, 96), (0, 30, 96, 50)]
)
def test_features_equal_direct_pyradiomics(settings: dict, box) -> None:
    """Cropping with a margin + padding changes nothing, including at the image border."""
    img = textured_image()
    res = PyradiomicsBackend().extract([img], [box], settings)
    assert res.reasons == [None]
    ref = direct(img, box)
    names = S.feature_names(settings)
    np.testing.assert_array_equal(res.features[0], np.array([ref[n] for n in names]))


def test_full_image_roi_works_where_direct_call_refuses(settings: dict) -> None:
    img = textured_image(48)
    with pytest.raises(ValueError, match="No labels found"):
        direct(img, (0, 0, 48, 48))
    res = PyradiomicsBackend().extract([img], [(0, 0, 48, 48)], settings)
    assert res.reasons == [None]
    # same values as the direct call on the image padded with one non-ROI pixel
    padded = np.pad(img, 1)
    ref = direct(padded, (1, 1, 49, 49))
    np.testing.assert_array_equal(res.features[0], [ref[n] for n in S.feature_names(settings)])


def test_roi_arrays_pads_mask_border() -> None:
    img = textured_image(32)
    crop, mask = roi_arrays(img, (0, 0, 32, 32))
    assert crop.shape == mask.shape == (34, 34)
    assert mask.sum() == 32 * 32 and mask[0].sum() == 0 and mask[:, -1].sum() == 0
    crop, mask = roi_arrays(img, (10, 12, 20, 15), margin=2)
    assert crop.shape == (7, 14) and mask.sum() == 30
    np.testing.assert_array_equal(crop[mask.astype(bool)].reshape(3, 10), img[12:15, 10:20])


def test_force2d_on_a_2d_image_computes_row_wise_texture() -> None:
    """The pitfall: force2D on a 2D image keeps only horizontal neighbours."""
    stripes = np.repeat((np.arange(32) % 2 * 200).astype(np.uint8)[:, None], 32, axis=1)
    rows_const = np.zeros((40, 40), np.uint8)
    rows_const[4:36, 4:36] = stripes  # each row constant, alternating rows
    box = (4, 4, 36, 36)
    true_2d = direct(rows_const, box)
    forced = direct(rows_const, box, force2D=True)
    assert true_2d["original_glcm_Contrast"] > 0  # vertical/diagonal neighbours differ
    assert forced["original_glcm_Contrast"] == 0.0  # only neighbours within a row remain
    # the transposed image (columns constant) is seen as maximally contrasted instead
    forced_t = direct(rows_const.T.copy(), box, force2D=True)
    assert forced_t["original_glcm_Contrast"] > true_2d["original_glcm_Contrast"]
    # on a real texture the whole texture family changes, first-order and shape do not
    img = textured_image()
    a, b = direct(img, (20, 20, 60, 70)), direct(img, (20, 20, 60, 70), force2D=True)
    changed = {k.split("_")[1] for k in a if not np.isclose(a[k], b[k])}
    assert {"glcm", "glrlm"} <= changed
    assert not changed & {"firstorder", "shape2D"}


def test_uint8_input_corrupts_pyradiomics_binning() -> None:
    """Why the backend casts to float64: uint8 wraps max + 2 * binWidth around 255."""
    img = textured_image()
    box = (5, 5, 60, 60)  # contains the 255 stripe
    as_u8 = direct(img, box, dtype=np.uint8)
    as_f = direct(img, box)
    assert as_u8["original_glcm_Contrast"] != pytest.approx(as_f["original_glcm_Contrast"])
    res = PyradiomicsBackend().extract([img], [box], S.load_settings())
    names = S.feature_names(S.load_settings())
    assert res.features[0, names.index("original_glcm_Contrast")] == as_f["original_glcm_Contrast"]


def test_degenerate_rois_give_reasons_not_crashes(settings: dict) -> None:
    img = textured_image(64)
    flat = np.full((64, 64), 77, np.uint8)
    images = [img, img, img, img, img, img, flat, img]
    boxes = [
        (10, 10, 10, 20),  # empty
        (30, 30, 31, 31),  # one pixel
        (5, 5, 6, 50),  # one-pixel-wide line
        (5, 5, 50, 6),  # one-pixel-high line
        (50, 50, 80, 60),  # outside
        (-1, 0, 10, 10),  # negative
        (5, 5, 30, 30),  # one grey level: well-defined values
        (0, 0, 2, 2),  # 2 x 2 at the corner: smallest valid ROI
    ]
    res = PyradiomicsBackend().extract(images, boxes, settings)
    assert res.reasons[0].startswith(REASON_EMPTY)
    assert res.reasons[1].startswith(REASON_THIN)
    assert res.reasons[2].startswith(REASON_THIN) and res.reasons[3].startswith(REASON_THIN)
    assert res.reasons[4].startswith(REASON_OUTSIDE) and res.reasons[5].startswith(REASON_OUTSIDE)
    assert res.reasons[6] is None and res.reasons[7] is None
    assert res.n_failed == 6
    assert np.isnan(res.features[:6]).all()
    names = S.feature_names(settings)
    flat_row = dict(zip(names, res.features[6], strict=True))
    assert flat_row["original_firstorder_Mean"] == 77.0
    assert flat_row["original_glcm_Contrast"] == 0.0
    assert np.isfinite(res.features[7]).sum() > 0.9 * len(names)


def test_pyradiomics_error_becomes_reason(settings: dict) -> None:
    """A failure inside pyradiomics is caught per ROI; the other ROIs keep their values."""
    img = textured_image(64)
    custom = S.load_settings()
    custom["setting"]["minimumROISize"] = 50  # pyradiomics raises on smaller masks
    res = PyradiomicsBackend().extract([img, img], [(0, 0, 5, 5), (0, 0, 20, 20)], custom)
    assert res.reasons[0] is not None and "extraction failed" in res.reasons[0]
    assert res.reasons[1] is None and np.isfinite(res.features[1]).any()
    np.testing.assert_array_equal(
        PyradiomicsBackend().extract_batch([img], [(0, 0, 20, 20)], custom)[0], res.features[1]
    )


def test_spacing_changes_only_shape_and_total_energy(settings: dict) -> None:
    img = textured_image()
    box = (20, 20, 60, 70)
    b = PyradiomicsBackend()
    one = b.extract([img], [box], settings, [(1.0, 1.0)]).features[0]
    mm = b.extract([img], [box], settings, [(0.5, 0.25)]).features[0]
    names = S.feature_names(settings)
    for n, u, v in zip(names, one, mm, strict=True):
        if n.startswith("original_shape2D_"):
            continue
        if n == "original_firstorder_TotalEnergy":  # Energy x pixel area
            assert v == pytest.approx(u * 0.5 * 0.25)
            continue
        assert u == v, n
    area = names.index("original_shape2D_PixelSurface")
    assert one[area] == 40 * 50 and mm[area] == pytest.approx(40 * 50 * 0.5 * 0.25)
    ref = direct(img, box, spacing=(0.5, 0.25))
    np.testing.assert_array_equal(mm, [ref[n] for n in names])


# -- settings -----------------------------------------------------------------------------
def test_settings_defaults_and_hash(settings: dict) -> None:
    assert settings["setting"]["binWidth"] == 25
    assert list(settings["featureClass"]) == list(CLASSES)
    assert S.spacing_mode(settings) == "store-mm"
    assert S.settings_hash(settings) == S.settings_hash(S.load_settings())
    assert len(S.settings_hash(settings)) == 16


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


def test_params_file_overrides(tmp_path: Path, settings: dict) -> None:
    p = write(tmp_path, "setting:\n  binWidth: 10\nfeatureClass:\n  glcm: [Idm, Contrast]\n"
                        "  firstorder:\nkacl:\n  spacing: pixel\n")
    custom = S.load_settings(p)
    assert custom["setting"]["binWidth"] == 10
    assert custom["setting"]["label"] == 1  # untouched defaults kept
    assert list(custom["featureClass"]) == ["firstorder", "glcm"]
    names = S.feature_names(custom)
    assert names[-2:] == ["original_glcm_Contrast", "original_glcm_Idm"]
    assert len(names) == 18 + 2
    assert S.spacing_mode(custom) == "pixel"
    assert S.settings_hash(custom) != S.settings_hash(settings)
    # same meaning spelled differently -> same hash
    p2 = write(tmp_path, "kacl: {spacing: pixel}\nfeatureClass: {firstorder: [], glcm: [Contrast,"
                         " Idm]}\nsetting: {binWidth: 10}\nimageType: {Original: {}}\n")
    assert S.settings_hash(S.load_settings(p2)) == S.settings_hash(custom)
    img = textured_image()
    res = PyradiomicsBackend().extract([img], [(20, 20, 60, 70)], custom)
    ref = direct(img, (20, 20, 60, 70), binWidth=10)
    assert res.features.shape == (1, 20)
    np.testing.assert_array_equal(res.features[0], [ref[n] for n in names])


@pytest.mark.parametrize(
    "text, match",
    [
        ("imageType:\n  Wavelet: {}\n  Original: {}\n", "Wavelet is not supported"),
        ("imageType:\n  LoG: {sigma: [1.0]}\n", "LoG is not supported"),
        ("setting:\n  force2D: true\n", "force2D is refused"),
        ("setting:\n  binwidth: 3\n", "unknown pyradiomics setting"),
        ("featureClass:\n  shape: []\n", "use shape2D"),
        ("featureClass:\n  glcm: [Nope]\n", "unknown glcm feature"),
        ("voxelSetting:\n  kernelRadius: 2\n", "voxel-based"),
        ("kacl:\n  spacing: cm\n", "kacl.spacing"),
        ("setting: [1, 2\n", "invalid YAML"),
        ("- a\n- b\n", "mapping at the top level"),
    ],
)
def test_bad_params_files_are_refused(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(InputError, match=match):
        S.load_settings(write(tmp_path, text))


def test_missing_params_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        S.load_settings(tmp_path / "absent.yaml")
