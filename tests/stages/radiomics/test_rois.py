"""ROI rules: which rectangles get radiomics, in store pixels, and which one is positive."""

from __future__ import annotations

import pytest

from kacl_cli.errors import NotReadyError
from kacl_cli.findings import FINDINGS
from kacl_cli.stages.radiomics.rois import (
    ImageInfo,
    build_rois,
    positive_finding,
    select_images,
    store_box,
    store_spacing,
)


def add_cam_rows(ws, round_: int, rows: list[tuple]) -> None:
    """rows: (image_id, finding, probability, box xywh | None)."""
    with ws.catalog.connect() as con:
        for image_id, finding, prob, box in rows:
            x, y, w, h = box if box is not None else (None,) * 4
            reason = None if box is not None else "empty map"
            con.execute(
                "INSERT INTO cam_boxes VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1.0, 1.0, ?)",
                [round_, image_id, finding, prob, x, y, w, h, reason],
            )


def full_cam(ws, round_: int, image_id: str, probs: dict[str, float],
             boxes: dict[str, tuple]) -> None:
    add_cam_rows(ws, round_, [
        (image_id, f, probs.get(f, 0.01), boxes.get(f)) for f in FINDINGS
    ])


def test_store_box_and_spacing() -> None:
    # 1024 x 512 original -> 256 store: x scale 1/4, y scale 1/2, rounded outward
    assert store_box((100.0, 50.0, 41.0, 20.5), 1024, 512, 256) == (25, 25, 36, 36)
    assert store_box((1000.0, 500.0, 100.0, 100.0), 1024, 512, 256) == (250, 250, 256, 256)
    info = ImageInfo("a", 0, "train", 1024, 512, 0.143, 0.2)
    (sx, sy), known = store_spacing(info, 256, "store-mm")
    assert known and sx == pytest.approx(0.143 * 4) and sy == pytest.approx(0.2 * 2)
    assert store_spacing(info, 256, "pixel") == ((1.0, 1.0), True)
    unknown = ImageInfo("b", 1, "train", 1024, 1024, None, None)
    assert store_spacing(unknown, 256, "store-mm") == ((1.0, 1.0), False)


def test_positive_finding_ties_in_findings_order() -> None:
    assert positive_finding({"Mass": 0.7, "Effusion": 0.9}) == "Effusion"
    assert positive_finding({"Mass": 0.9, "Effusion": 0.9}) == "Effusion"
    assert positive_finding({}) is None


def test_cam_rule_min_prob_and_positive(tiny_workspace) -> None:
    ws = tiny_workspace(n=4)
    ids = [f"{i:08d}_000.png" for i in range(4)]
    # image 0: boxes for 3 findings, two >= 0.5, the best one is positive
    full_cam(ws, 0, ids[0], {"Mass": 0.8, "Effusion": 0.6, "Nodule": 0.2, "Hernia": 0.95},
             {"Mass": (0, 0, 64, 64), "Effusion": (64, 64, 32, 32), "Nodule": (8, 8, 16, 16)})
    # image 1: only low-probability boxes -> just its positive ROI
    full_cam(ws, 0, ids[1], {"Nodule": 0.3, "Mass": 0.1},
             {"Nodule": (10, 10, 40, 40), "Mass": (0, 0, 100, 100)})
    # image 2: no box at all -> no ROI; image 3: no cam rows
    full_cam(ws, 0, ids[2], {"Mass": 0.9}, {})
    images = select_images(ws)
    rois = build_rois(ws, 0, images, roi="cam", min_prob=0.5)
    got = {(r.image_id, r.finding): r for r in rois}
    assert set(got) == {(ids[0], "Mass"), (ids[0], "Effusion"), (ids[1], "Nodule")}
    assert got[(ids[0], "Mass")].is_positive and not got[(ids[0], "Effusion")].is_positive
    assert got[(ids[1], "Nodule")].is_positive
    # 256 px original -> 64 px store
    assert got[(ids[0], "Mass")].box == (0, 0, 16, 16)
    assert got[(ids[0], "Effusion")].box == (16, 16, 24, 24)
    assert all(r.source == "cam" for r in rois)
    # min_prob 0 keeps every boxed finding; positive unchanged
    rois0 = build_rois(ws, 0, images, roi="cam", min_prob=0.0)
    assert len(rois0) == 5
    assert {(r.image_id, r.finding) for r in rois0 if r.is_positive} == {
        (ids[0], "Mass"), (ids[1], "Nodule")}
    # exactly one positive per image with ROIs
    for rs in (rois, rois0):
        per_image = {}
        for r in rs:
            per_image[r.image_id] = per_image.get(r.image_id, 0) + r.is_positive
        assert set(per_image.values()) == {1}


def test_missing_cam_boxes_is_a_clear_error(tiny_workspace) -> None:
    ws = tiny_workspace(n=4)
    with pytest.raises(NotReadyError, match="kacl cam --round 3"):
        build_rois(ws, 3, select_images(ws), roi="cam")
    assert build_rois(ws, 3, select_images(ws), roi="gt")  # gt needs no CAMs


def test_gt_and_cam_plus_gt(tiny_workspace) -> None:
    ws = tiny_workspace(n=8)
    images = select_images(ws)
    gt_images = {r[0] for r in ws.catalog.query("SELECT image_id FROM gt_boxes")}
    assert gt_images
    for image_id in images:
        full_cam(ws, 0, image_id, {"Cardiomegaly": 0.9}, {"Cardiomegaly": (0, 0, 128, 128)})
    gt = build_rois(ws, 0, images, roi="gt")
    assert {r.image_id for r in gt} == gt_images
    assert all(r.source == "gt" for r in gt)
    for image_id in gt_images:
        mine = [r for r in gt if r.image_id == image_id]
        pos = [r for r in mine if r.is_positive]
        assert len(pos) == 1
        assert pos[0].finding == min((r.finding for r in mine), key=FINDINGS.index)
    # cam+gt: GT only for the box-supervised images
    supervised = sorted(gt_images)[0]
    with ws.catalog.connect() as con:
        con.execute("INSERT INTO box_supervision VALUES (?, 0, 0.1, 'test')", [supervised])
    mixed = build_rois(ws, 0, images, roi="cam+gt")
    assert {r.source for r in mixed if r.image_id == supervised} == {"gt"}
    assert {r.source for r in mixed if r.image_id != supervised} == {"cam"}
    assert len({r.image_id for r in mixed}) == len(images)
    gt_row = ws.catalog.query(
        "SELECT x, y, w, h FROM gt_boxes WHERE image_id = ? ORDER BY rowid LIMIT 1",
        [supervised])[0]
    first = [r for r in mixed if r.image_id == supervised and r.is_positive][0]
    assert first.box == store_box(gt_row, 256, 256, 64)


def test_select_images_split(tiny_workspace) -> None:
    ws = tiny_workspace(n=12)
    assert len(select_images(ws)) == 12
    train = select_images(ws, ["train"])
    assert len(train) == 6 and {i.split for i in train.values()} == {"train"}
