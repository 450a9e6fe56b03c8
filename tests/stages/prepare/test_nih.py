"""The NIH reader: CSV quirks of both label-file revisions and the box file, strict errors with
file:line, image layouts, and patient-level splits. Plus ingest of the real 95-image sample."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kacl_cli.errors import InputError, KaclError
from kacl_cli.findings import LABEL_COLUMNS
from kacl_cli.imageio import load_for_store
from kacl_cli.stages.prepare import nih
from kacl_cli.stages.prepare import stage as ingest
from kacl_cli.workspace import Workspace

V2020_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
                "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")
ORIG_HEADER = V2020_HEADER.rstrip("\n") + ",\n"
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- label file ----------------------------------------------------------------------------
def test_v2020_rows_parse_with_canonical_findings(tmp_path: Path) -> None:
    p = write(tmp_path / "Data_Entry_2017_v2020.csv", V2020_HEADER
              + "00000001_000.png,Emphysema|Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143\n"
              + "00000002_000.png,No Finding,0,00002,80,M,AP,2500,2048,0.171,0.171\n")
    a, b = nih.read_data_entry(p)
    assert a.findings == ("Cardiomegaly", "Emphysema")  # FINDINGS order, not CSV order
    assert (a.patient_id, a.age, a.sex, a.view_position) == ("1", 57, "M", "PA")
    assert (a.csv_width, a.csv_height, a.spacing_x) == (2682, 2749, 0.143)
    assert b.findings == () and b.patient_id == "2" and b.line == 3


def test_original_2017_file_with_trailing_empty_column(tmp_path: Path) -> None:
    p = write(tmp_path / "Data_Entry_2017.csv", ORIG_HEADER
              + "00000001_000.png,Cardiomegaly,000,00001,058Y,M,PA,2682,2749,0.143,0.143,\n")
    (e,) = nih.read_data_entry(p)
    assert e.age == 58 and e.follow_up == 0 and e.findings == ("Cardiomegaly",)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682\n", "expected 11 columns, found 8"),
        ("00000001_000.png,Cardiomegaly,0,1,old,M,PA,2682,2749,0.143,0.143\n", "Patient Age"),
        ("00000001_000.png,Broken Bone,0,1,57,M,PA,2682,2749,0.143,0.143\n", "unknown finding"),
        ("00000001_000.png,Mass,0,1,57,M,PA,2682,2749,0.143,0.143,surprise\n", "extra"),
        (",Mass,0,1,57,M,PA,2682,2749,0.143,0.143\n", "empty Image Index"),
        ("00000001_000.png,Mass,0,1,57,M,PA,2682,2749,abc,0.143\n", "pixel spacing x"),
    ],
)
def test_malformed_label_rows_name_file_and_line(tmp_path: Path, row: str, message: str) -> None:
    good = "00000009_000.png,No Finding,0,9,40,F,PA,2500,2048,0.168,0.168\n"
    p = write(tmp_path / "Data_Entry_2017_v2020.csv", V2020_HEADER + good + row)
    with pytest.raises(InputError) as exc:
        nih.read_data_entry(p)
    text = str(exc.value)
    assert f"{p}:3:" in text and message in text and "\n" not in text


def test_duplicate_image_and_foreign_header_are_errors(tmp_path: Path) -> None:
    row = "00000001_000.png,Mass,0,1,57,M,PA,2682,2749,0.143,0.143\n"
    p = write(tmp_path / "a.csv", V2020_HEADER + row + row)
    with pytest.raises(InputError, match=r"a\.csv:3: duplicate Image Index.*line 2"):
        nih.read_data_entry(p)
    q = write(tmp_path / "b.csv", "name,label\nx.png,Mass\n")
    with pytest.raises(InputError, match=r"b\.csv:1: not an NIH label file"):
        nih.read_data_entry(q)


def test_empty_files_and_a_foreign_box_header_are_errors(tmp_path: Path) -> None:
    blank = write(tmp_path / "blank.csv", "\n\n")
    with pytest.raises(InputError, match=r"blank\.csv: empty label file"):
        nih.read_data_entry(blank)
    with pytest.raises(InputError, match=r"blank\.csv: empty box file"):
        nih.read_bbox_list(blank)
    labels_as_boxes = write(tmp_path / "c.csv", V2020_HEADER)
    with pytest.raises(InputError, match=r"c\.csv:1: not an NIH box file .*Finding Label'"):
        nih.read_bbox_list(labels_as_boxes)
    header_only = write(tmp_path / "d.csv", "Image Index,Finding Label,x,y,w,h\n\n")
    assert nih.read_bbox_list(header_only) == {}


# -- box file ------------------------------------------------------------------------------
def test_bbox_file_header_quirks_and_infiltrate_alias(tmp_path: Path) -> None:
    p = write(tmp_path / "BBox_List_2017.csv", BBOX_HEADER
              + "00000001_000.png,Infiltrate,10.5,20,30,40\n"
              + "00000001_000.png,Mass,1,2,3,4\n")
    boxes = nih.read_bbox_list(p)
    assert [(b.finding, b.x, b.h) for b in boxes["00000001_000.png"]] == [
        ("Infiltration", 10.5, 40.0), ("Mass", 1.0, 4.0)]


@pytest.mark.parametrize(("row", "message"), [
    ("x.png,Mass,1,2,3\n", "expected 6 columns"),
    ("x.png,Tumour,1,2,3,4\n", "unknown finding"),
    ("x.png,Mass,1,two,3,4\n", "box y"),
])
def test_malformed_box_rows(tmp_path: Path, row: str, message: str) -> None:
    p = write(tmp_path / "BBox_List_2017.csv", BBOX_HEADER + row)
    with pytest.raises(InputError, match=rf"BBox_List_2017\.csv:2: .*{message}"):
        nih.read_bbox_list(p)


# -- layouts ---------------------------------------------------------------------------------
def test_flat_and_mirror_layouts_are_both_scanned(tmp_path: Path) -> None:
    img = Image.fromarray(np.zeros((8, 8), np.uint8))
    (tmp_path / "images").mkdir()
    img.save(tmp_path / "images" / "a.png")
    for k, name in ((1, "b.png"), (12, "c.png")):
        d = tmp_path / f"images_{k:03d}" / "images"
        d.mkdir(parents=True)
        img.save(d / name)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    found = nih.scan_images(tmp_path)
    assert sorted(found) == ["a.png", "b.png", "c.png"]
    assert found["c.png"].parent.parent.name == "images_012"


# -- splits ----------------------------------------------------------------------------------
def _entries(n_patients: int, per: int = 3) -> list[nih.Entry]:
    return [nih.Entry(f"{p:08d}_{k:03d}.png", (), k, str(p), 50, "M", "PA", 1024, 1024, 0.1,
                      0.1, 2 + p * per + k) for p in range(n_patients) for k in range(per)]


def _patients_by_split(entries: list[nih.Entry], splits: dict[str, str]) -> dict[str, set]:
    out: dict[str, set] = {"train": set(), "val": set(), "test": set()}
    for e in entries:
        out[splits[e.image_id]].add(e.patient_id)
    return out


def test_official_split_is_patient_disjoint_and_carves_val(tmp_path: Path) -> None:
    entries = _entries(400)
    # The lists are by image; make one inconsistent patient (images on both lists).
    test_ids = {e.image_id for e in entries if int(e.patient_id) % 5 == 0}
    test_ids.add("00000001_002.png")
    splits = nih.assign_splits(entries, "official", seed=3, test_ids=test_ids)
    by = _patients_by_split(entries, splits)
    assert not (by["train"] & by["val"]) and not (by["train"] & by["test"])
    assert not (by["val"] & by["test"])
    assert "1" in by["test"]  # one test image puts the whole patient in test
    assert all(splits[i] == "test" for i in test_ids)
    non_test = len(by["train"]) + len(by["val"])
    assert 0.05 < len(by["val"]) / non_test < 0.15
    assert nih.assign_splits(entries, "official", seed=3, test_ids=test_ids) == splits
    assert nih.assign_splits(entries, "official", seed=4, test_ids=test_ids) != splits


def test_random_split_fractions_and_stability_under_subsets() -> None:
    entries = _entries(3000, per=2)
    splits = nih.assign_splits(entries, "random", seed=0)
    by = _patients_by_split(entries, splits)
    assert sum(len(v) for v in by.values()) == 3000  # each patient exactly once
    fr = {k: len(v) / 3000 for k, v in by.items()}
    assert abs(fr["train"] - 0.7) < 0.04 and abs(fr["val"] - 0.1) < 0.03
    assert abs(fr["test"] - 0.2) < 0.03
    # A patient's split does not depend on who else is in the file (partial downloads).
    sub = entries[::7]
    sub_splits = nih.assign_splits(sub, "random", seed=0)
    assert all(sub_splits[e.image_id] == splits[e.image_id] for e in sub)


def test_tiny_files_still_get_every_split() -> None:
    entries = _entries(4)
    off = _patients_by_split(entries, nih.assign_splits(entries, "official", 0, test_ids={
        "00000000_000.png"}))
    assert [len(off[k]) for k in ("train", "val", "test")] == [2, 1, 1]
    for seed in range(5):
        rnd = _patients_by_split(entries, nih.assign_splits(entries, "random", seed))
        assert all(rnd[k] for k in ("train", "val", "test")), rnd


def test_official_split_without_lists_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="--split random"):
        nih.assign_splits(_entries(3), "official", seed=0, test_ids=None)


# -- the real sample -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample_ws(nih_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    ws = Workspace(tmp_path_factory.mktemp("nih") / "ws")
    summary = ingest.prepare_nih(ws, nih_sample, size=32, workers=1)
    return ws, summary


@pytest.mark.nih
def test_real_sample_ingest_counts(sample_ws: tuple, nih_sample: Path) -> None:
    ws, s = sample_ws
    n_rows = sum(1 for _ in open(nih_sample / "Data_Entry_2017_v2020.csv")) - 1
    assert (s["ingested"], s["failed"], s["images"]) == (95, 0, 95)
    assert s["missing"] == n_rows - 95 and s["csv_rows"] == n_rows
    assert ws.store.n_rows() == 95 and ws.store.image_size() == 32
    assert ws.catalog.count("images") == 95 and ws.catalog.count("errors") == 0
    assert (s["gt_boxes"], s["images_with_boxes"]) == (6, 6)
    assert s["train"] + s["val"] + s["test"] == 95 and min(s["train"], s["val"], s["test"]) > 0


@pytest.mark.nih
def test_real_sample_labels_boxes_and_splits_match_files(sample_ws: tuple,
                                                         nih_sample: Path) -> None:
    ws, _ = sample_ws
    cols = ", ".join(f'"{c}"' for c in LABEL_COLUMNS)
    got = {r[0]: r[1:] for r in ws.catalog.query(f"SELECT image_id, {cols} FROM labels")}
    rows = {r[0]: r for r in csv.reader(open(nih_sample / "Data_Entry_2017_v2020.csv"))
            if r[0] in got}
    assert len(rows) == 95
    for image_id, flags in got.items():
        names = set(rows[image_id][1].split("|"))
        assert flags == tuple(c in names for c in LABEL_COLUMNS), image_id
    boxes = ws.catalog.query("SELECT image_id, finding, x, y, w, h FROM gt_boxes")
    real = {(r[0], r[1].replace("Infiltrate", "Infiltration")): [float(v) for v in r[2:6]]
            for r in csv.reader(open(nih_sample / "BBox_List_2017.csv")) if r[0] in got}
    assert {(b[0], b[1]): list(b[2:]) for b in boxes} == real
    test_list = set((nih_sample / "test_list.txt").read_text().split())
    for image_id, split in ws.catalog.query(
            "SELECT image_id, split FROM images"):
        assert (split == "test") == (image_id in test_list)
    assert ws.catalog.query(
        "SELECT count(*) FROM (SELECT patient_id FROM images GROUP BY patient_id "
        "HAVING count(DISTINCT split) > 1)")[0][0] == 0


@pytest.mark.nih
def test_real_sample_geometry_and_rgba_pixels(sample_ws: tuple, nih_sample: Path) -> None:
    ws, _ = sample_ws
    rgba = [p for p in sorted((nih_sample / "images").glob("*.png"))
            if Image.open(p).mode == "RGBA"]
    assert len(rgba) == 3
    for p in rgba:
        (row, w, h, sx, path), = ws.catalog.query(
            "SELECT row, orig_width, orig_height, spacing_x, source_path FROM images "
            "WHERE image_id = ?", [p.name])
        assert (w, h) == (1024, 1024) and Path(path) == p.resolve()
        assert sx is not None and sx > 0.143  # CSV spacing rescaled to the 1024-px PNG
        stored = ws.store.read_images([row])[0]
        assert np.array_equal(stored, load_for_store(p, 32)[0]) and stored.std() > 5


def small_copy(nih_sample: Path, root: Path, n_images: int = 6) -> tuple[list[Path], list[str]]:
    """A copy of the sample with ``n_images`` PNGs and a cut-down real label file (the rows of
    the sample's images + 500 others), so tests don't parse 112k rows each time."""
    (root / "images").mkdir(parents=True)
    good = sorted((nih_sample / "images").glob("*.png"))[:n_images]
    sample_ids = {p.name for p in (nih_sample / "images").glob("*.png")}
    with open(nih_sample / "Data_Entry_2017_v2020.csv") as fh:
        lines = fh.readlines()
    keep = [ln for i, ln in enumerate(lines) if i <= 500 or ln.split(",", 1)[0] in sample_ids]
    (root / "Data_Entry_2017_v2020.csv").write_text("".join(keep))
    for name in ("BBox_List_2017.csv", "train_val_list.txt", "test_list.txt"):
        shutil.copy(nih_sample / name, root / name)
    for p in good:
        shutil.copy(p, root / "images" / p.name)
    return good, [ln.split(",", 1)[0] for ln in keep[1:]]


@pytest.mark.nih
def test_corrupt_and_empty_files_become_error_rows(nih_sample: Path, tmp_path: Path) -> None:
    root = tmp_path / "nih"
    good, listed = small_copy(nih_sample, root)
    # Two more CSV-listed images: one truncated mid-file, one zero bytes.
    spare = [i for i in listed if i not in {p.name for p in good}][:2]
    (root / "images" / spare[0]).write_bytes(good[0].read_bytes()[:3000])
    (root / "images" / spare[1]).write_bytes(b"")
    ws = Workspace(tmp_path / "ws")
    s = ingest.prepare_nih(ws, root, size=32)
    assert (s["ingested"], s["failed"], s["images"], s["errors"]) == (6, 2, 6, 2)
    assert s["missing"] == len(listed) - 8
    errors = dict(ws.catalog.query("SELECT item, reason FROM errors WHERE stage = 'prepare'"))
    assert set(errors) == set(spare)
    assert "zero-byte" in errors[spare[1]] and "unreadable" in errors[spare[0]]
    # Nothing readable at all: a failed run and a clear error (exit 1 in the CLI).
    for p in good:
        (root / "images" / p.name).unlink()
    with pytest.raises(KaclError, match="nothing ingested: none of the images could be read"):
        ingest.prepare_nih(Workspace(tmp_path / "ws2"), root, size=32)


@pytest.mark.nih
def test_limit_takes_first_present_rows_in_csv_order(nih_sample: Path, tmp_path: Path) -> None:
    good, listed = small_copy(nih_sample, tmp_path / "nih")
    ws = Workspace(tmp_path / "ws")
    s = ingest.prepare_nih(ws, tmp_path / "nih", size=16, limit=4)
    assert (s["ingested"], s["over_limit"]) == (4, 2)
    present = [i for i in listed if i in {p.name for p in good}]
    assert [r[0] for r in ws.catalog.query("SELECT image_id FROM images ORDER BY row")] == (
        present[:4])


def test_check_boxes_keeps_good_boxes_and_says_why_for_the_others() -> None:
    """Issue 15: outside, non-finite, non-positive, duplicate and unlabelled boxes are left out
    with a reason (an ``errors`` row at ingest); the sound ones are kept."""
    b = nih.Box
    good = b("Mass", 10, 10, 20, 20)
    boxes = [good, b("Mass", 5000, 5000, 10, 10), b("Mass", -500, -500, 10, 10),
             b("Mass", 1, 1, 1e300, 1e300), b("Mass", float("nan"), 1, 2, 2),
             b("Mass", 1, 1, 0, 4), b("Mass", 10, 10, 20, 20), b("Nodule", 1, 1, 5, 5)]
    kept, refused = nih.check_boxes(boxes, 100, 100, ("Mass",))
    assert kept == [good]
    reasons = [why for _, why in refused]
    assert len(reasons) == 7
    for word in ("outside", "outside", "far larger", "non-finite", "no area", "duplicate",
                 "not labelled"):
        assert any(word in r for r in reasons), word
