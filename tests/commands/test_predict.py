"""`kacl predict`: file formats (PNG 8/16-bit, JPEG, DICOM incl. MONOCHROME1), per-file errors,
--json, --boxes in the input's own pixels, overlays, and refusal of foreign checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from kacl_cli.app import app
from kacl_cli.findings import FINDINGS
from kacl_cli.models.checkpoint import model_meta, save_checkpoint
from kacl_cli.models.image_net import GRAY_MEAN, GRAY_STD, build_image_net
from kacl_cli.workspace import Workspace

runner = CliRunner()
H, W = 96, 80  # non-square on purpose: boxes need separate x and y scales


def _checkpoint(directory: Path, extra: dict | None = None, **meta_overrides) -> Path:
    """An untrained tiny net whose first four findings are confidently positive, with positive
    head weights on them so their Grad-CAM maps are non-empty."""
    torch.manual_seed(0)
    model = build_image_net("tiny")
    with torch.no_grad():
        model.head.weight[:4] = model.head.weight[:4].abs() + 0.05
        model.head.bias[:4] = 1.5
        model.head.bias[4:] = -1.5
    tensors = {f"image_net.{k}": v for k, v in model.state_dict().items()} | (extra or {})
    meta = model_meta("tiny", 32, 64, GRAY_MEAN, GRAY_STD, 0, "pretrain") | meta_overrides
    return save_checkpoint(directory, tensors, meta)


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    ws = Workspace(tmp_path / "ws")
    _checkpoint(ws.checkpoint_dir(0))
    return ws


@pytest.fixture
def pixels() -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    a = 127.5 + 127.5 * np.sin(xx / 7.0) * np.cos(yy / 11.0)
    a = np.rint(a).astype(np.uint8)
    a[0, 0], a[-1, -1] = 0, 255  # full range: the 16-bit and DICOM scalings are then exact
    return a


def _dicom(path: Path, stored: np.ndarray, photometric: str) -> Path:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def _predict(ws: Workspace, *args: str):
    return runner.invoke(app, ["predict", "-w", str(ws.root), "--device", "cpu", *args])


def _probs(doc: dict, i: int) -> np.ndarray:
    return np.array([f["probability"] for f in doc["images"][i]["findings"]])


def test_formats_agree_and_monochrome1_is_inverted(ws, pixels, tmp_path) -> None:
    png8 = tmp_path / "a.png"
    Image.fromarray(pixels).save(png8)
    png16 = tmp_path / "a16.png"
    Image.fromarray(pixels.astype(np.uint16) * 257).save(png16)
    assert Image.open(png16).mode.startswith("I")
    jpg = tmp_path / "a.jpg"
    Image.fromarray(pixels).save(jpg, quality=95)
    inverted = (255 - pixels.astype(np.uint16)) * 16  # 12-bit style stored values
    mono1 = _dicom(tmp_path / "m1.dcm", inverted, "MONOCHROME1")
    mono2 = _dicom(tmp_path / "m2.dcm", inverted, "MONOCHROME2")
    res = _predict(ws, str(png8), str(png16), str(jpg), str(mono1), str(mono2), "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["n_failed"] == 0 and doc["round"] == 0
    for i in range(5):
        img = doc["images"][i]
        assert (img["width"], img["height"]) == (W, H)
        assert [f["finding"] for f in img["findings"]] == list(FINDINGS)
    p8 = _probs(doc, 0)
    np.testing.assert_allclose(_probs(doc, 1), p8, atol=1e-6)  # 16-bit = same pixels
    np.testing.assert_allclose(_probs(doc, 2), p8, atol=0.05)  # JPEG: lossy, close
    np.testing.assert_allclose(_probs(doc, 3), p8, atol=1e-6)  # MONOCHROME1 inverted back
    assert np.abs(_probs(doc, 4) - p8).max() > 1e-4  # MONOCHROME2 is read as the negative
    pos = [f["positive"] for f in doc["images"][0]["findings"]]
    assert pos == [True] * 4 + [False] * 10


def test_bad_file_among_good_ones(ws, pixels, tmp_path) -> None:
    good1, good2 = tmp_path / "g1.png", tmp_path / "g2.png"
    Image.fromarray(pixels).save(good1)
    Image.fromarray(pixels[:50]).save(good2)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    res = _predict(ws, str(good1), str(bad), str(good2), "--json")
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert [("error" in img) for img in doc["images"]] == [False, True, False]
    assert doc["images"][2]["height"] == 50 and len(doc["images"][2]["findings"]) == 14
    err_lines = res.stderr.strip().splitlines()
    assert len(err_lines) == 1 and "broken.png" in err_lines[0]
    table = _predict(ws, str(good1), str(bad))
    assert table.exit_code == 1 and "Atelectasis" in table.stdout


def test_boxes_are_in_input_pixels_and_overlay(ws, square, tmp_path) -> None:
    # A hand-set net lights map cells x 2-3, y 3-4 for findings 0-2 (positive); the others are
    # negative. So each image's box is known in its own pixels, whatever its size.
    square.save_square_checkpoint(ws.checkpoint_dir(0), lit=[0, 1, 2])
    sizes = {"x.png": (H, W), "big.png": (4 * H, 3 * W), "wide.png": (50, 130)}
    paths = []
    for name, (h, w) in sizes.items():
        Image.fromarray(square.square_image(h, w)).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    res = _predict(ws, *paths, "--boxes", "--json", "--overlay", str(tmp_path / "ov"))
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    for img, (h, w) in zip(doc["images"], sizes.values(), strict=True):
        assert (img["height"], img["width"]) == (h, w)
        for k, f in enumerate(img["findings"]):
            assert f["positive"] == (k < 3), (h, w, k)
            if k >= 3:
                assert "box" not in f
                continue
            b = f["box"]
            assert (b["x"], b["y"], b["w"], b["h"]) == pytest.approx(square.expected_box(w, h))
        overlay = Path(img["overlay"])
        assert overlay.is_file()
        assert Image.open(overlay).size == (img["width"], img["height"])


def test_map_box_to_original_scales_each_axis() -> None:
    from kacl_cli.stages.predict import map_box_to_original

    # an 8 x 8 map over a 240 wide x 384 high image: cell (2, 1) spans x 60..90, y 48..96
    assert map_box_to_original((2, 1, 1, 1), (8, 8), 240, 384) == (60.0, 48.0, 30.0, 48.0)
    assert map_box_to_original((0, 0, 8, 8), (8, 8), 240, 384) == (0.0, 0.0, 240.0, 384.0)


def test_contrast_checkpoint_with_objective_tensors(ws, pixels, tmp_path) -> None:
    src = tmp_path / "x.png"
    Image.fromarray(pixels).save(src)
    _checkpoint(ws.checkpoint_dir(1), extra={"objective.radiomics.0.weight": torch.ones(8, 4)},
                round=1, stage="contrast")
    latest = json.loads(_predict(ws, str(src), "--json").stdout)
    assert latest["round"] == 1
    first = json.loads(_predict(ws, str(src), "--json", "--round", "0").stdout)
    np.testing.assert_allclose(_probs(latest, 0), _probs(first, 0))
    missing = _predict(ws, str(src), "--round", "5")
    assert missing.exit_code == 1 and "round 5" in missing.stderr


@pytest.mark.parametrize(
    "forge,message",
    [
        ({"findings": list(FINDINGS[:13]) + ["Covid"]}, "another vocabulary"),
        ({"backbone": "resnet18"}, "do not fit a resnet18"),
    ],
)
def test_foreign_checkpoints_refused(pixels, tmp_path, forge, message) -> None:
    src = tmp_path / "x.png"
    Image.fromarray(pixels).save(src)
    ckpt = _checkpoint(tmp_path / "other", **forge)
    res = runner.invoke(app, ["predict", str(src), "--checkpoint", str(ckpt)])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and not res.stdout


def test_non_kacl_files_refused(pixels, tmp_path) -> None:
    src = tmp_path / "x.png"
    Image.fromarray(pixels).save(src)
    notes = tmp_path / "weights.bin"
    notes.write_bytes(b"\x00" * 64)
    res = runner.invoke(app, ["predict", str(src), "--checkpoint", str(notes)])
    assert res.exit_code == 1 and "not a kacl checkpoint" in res.stderr
    res = runner.invoke(app, ["predict", str(src), "-w", str(tmp_path / "nows")])
    assert res.exit_code == 1 and "kacl pretrain" in res.stderr
