"""pyradiomics' ``normalize`` in kacl: the shared helpers, the settings checks, the shipped
params file, and the point of it all (features that ignore an image's exposure). Parity of
the values with pyradiomics: test_fast_parity.py (the ``normalize`` section)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import SimpleITK as sitk
from radiomics import imageoperations
from scipy import ndimage

from kacl_cli.errors import InputError
from kacl_cli.stages.radiomics import settings as S
from kacl_cli.stages.radiomics.backends import normalize as N
from kacl_cli.stages.radiomics.backends.fast.backend import FastBackend, extract_rois


def smooth_image(seed: int, size: int = 48, lo: int = 20, hi: int = 120) -> np.ndarray:
    """A textured uint8 image with values in lo..hi (room to change its exposure)."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=(size, size)), 2)
    field = (field - field.min()) / (field.max() - field.min())
    return np.round(lo + field * (hi - lo)).astype(np.uint8)


@pytest.mark.parametrize("setting", [{"normalizeScale": 100}, {"removeOutliers": 1.5},
                                     {"normalizeScale": 7.5, "removeOutliers": 2}])
def test_value_table_is_pyradiomics_normalize_image(setting: dict) -> None:
    img = smooth_image(1)
    ref = sitk.GetArrayFromImage(imageoperations.normalizeImage(
        sitk.GetImageFromArray(img.astype(np.float64)), **setting))
    table = N.image_table(img, N.Normalization.from_setting({"normalize": True, **setting}))
    np.testing.assert_array_equal(table[img], ref)  # bit for bit: bins' edges are exact
    assert (np.diff(table) >= 0).all()
    np.testing.assert_array_equal(N.normalized_image(img, {"normalize": True, **setting}), ref)


def test_normalization_off_and_flat_images() -> None:
    assert N.Normalization.from_setting({"normalizeScale": 100}) is None
    assert N.Normalization.from_setting({"normalize": False}) is None
    assert N.Normalization.from_setting({"normalize": True}) == N.Normalization(1.0, None)
    assert N.image_problem(np.full((4, 4), 9, np.uint8)).endswith("one grey level")
    assert N.image_problem(smooth_image(2)) is None


def test_normalized_features_ignore_the_exposure() -> None:
    """x -> 2x + 10 (an exposure and contrast change, exact in uint8) leaves normalised
    features unchanged; raw first-order Mean changes. What the option exists for."""
    settings = S.load_settings(S.NORMALIZED_PARAMS)
    raw = S.load_settings()
    img = smooth_image(3)
    brighter = (img.astype(np.int64) * 2 + 10).astype(np.uint8)
    boxes = [(2, 3, 30, 25), (20, 20, 48, 48)]
    a = FastBackend().extract([img, img], boxes, settings).features
    b = FastBackend().extract([brighter, brighter], boxes, settings).features
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)
    names = S.feature_names(raw)
    mean = names.index("original_firstorder_Mean")
    ra = FastBackend().extract([img, img], boxes, raw).features
    rb = FastBackend().extract([brighter, brighter], boxes, raw).features
    np.testing.assert_allclose(rb[:, mean], 2 * ra[:, mean] + 10)


def test_extract_rois_needs_value_tables_exactly_when_normalizing() -> None:
    settings = S.load_settings(S.NORMALIZED_PARAMS)
    crop = smooth_image(4)[:10, :10]
    with pytest.raises(ValueError, match="value table"):
        extract_rois([crop], settings)
    with pytest.raises(ValueError, match="value table"):
        extract_rois([crop], S.load_settings(), values=np.zeros((1, 256)))
    with pytest.raises(ValueError, match="shape"):
        extract_rois([crop], settings, values=np.zeros((2, 256)))
    table = N.image_table(smooth_image(4), N.Normalization(100.0, 3.0))
    row = extract_rois([crop], settings, values=table[None])[0]
    assert np.isfinite(row).all()


def test_shipped_params_file() -> None:
    s = S.load_settings(S.NORMALIZED_PARAMS)["setting"]
    assert s["normalize"] is True and s["normalizeScale"] == 100 and s["removeOutliers"] == 3
    span, _ = S.intensity_range(s)
    assert 10 <= span / s["binWidth"] <= 20  # about the default's 10 bins over 0..255
    assert S.settings_hash(S.load_settings(S.NORMALIZED_PARAMS)) != S.settings_hash(
        S.load_settings())


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("setting: {normalize: true}", "binWidth 25 gives 0.24 gray-level bins"),
        ("setting: {normalize: yes please}", "normalize must be true or false"),
        ("setting: {normalize: true, normalizeScale: -1}", "normalizeScale must be a positive"),
        ("setting: {normalize: true, normalizeScale: 100, removeOutliers: 0}",
         "removeOutliers must be a positive"),
        ("setting: {normalize: true, normalizeScale: 100, binWidth: 0.1}",
         "6000 gray-level bins over the normalised range"),
    ],
)
def test_bad_normalize_settings_are_one_line_errors(tmp_path, yaml_text: str,
                                                    message: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml_text)
    with pytest.raises(InputError, match=message) as exc:
        S.load_settings(path)
    assert "\n" not in str(exc.value)


def test_normalized_binwidth_is_fine_with_a_bin_count(tmp_path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("setting: {normalize: true, binCount: 16}")
    settings = S.load_settings(path)
    custom = copy.deepcopy(settings)
    custom["setting"].pop("binWidth")
    img = smooth_image(5)
    res = FastBackend().extract([img], [(0, 0, 20, 20)], custom)
    assert res.reasons == [None]


def test_image_key_sees_views_of_one_image_as_one() -> None:
    batch = np.stack([smooth_image(6), smooth_image(7)])
    assert N.image_key(batch[0]) == N.image_key(batch[0])  # two view objects, same pixels
    assert N.image_key(batch[0]) != N.image_key(batch[1])
    assert N.image_key(batch[0]) != N.image_key(batch[0, :10])


def test_image_stats_are_itks_bit_for_bit() -> None:
    rng = np.random.default_rng(9)
    images = [rng.integers(0, 256, (h, w)).astype(np.uint8)
              for h, w in rng.integers(2, 300, size=(40, 2))]
    images += [smooth_image(k, size=int(s)) for k, s in enumerate(rng.integers(8, 512, 10))]
    for img in images:
        stats = sitk.StatisticsImageFilter()
        stats.Execute(sitk.GetImageFromArray(img.astype(np.float64)))
        assert N.image_stats(img) == (stats.GetMean(), stats.GetSigma())
    float_img = images[0].astype(np.float32) / 7
    stats = sitk.StatisticsImageFilter()
    stats.Execute(sitk.GetImageFromArray(float_img.astype(np.float64)))
    assert N.image_stats(float_img) == (stats.GetMean(), stats.GetSigma())
