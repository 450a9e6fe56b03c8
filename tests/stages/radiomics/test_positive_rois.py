"""Positive choice: --positive-roi labelled / oracle, --normal-positive skip / lung."""

from __future__ import annotations

from kacl_cli.catalog import insert_rows, quote_ident
from kacl_cli.findings import FINDINGS
from kacl_cli.stages.contrast.weak import labelled_mask
from kacl_cli.stages.radiomics.rois import NORMAL, build_rois, select_images

TOP = "Hernia"  # the model's most confident finding on every image (never a label here)


def _with_cams(ws):
    """Every finding gets a CAM box; Hernia has the top probability, then FINDINGS order."""
    rows = []
    for (image_id,) in ws.catalog.query("SELECT image_id FROM images"):
        for j, f in enumerate(FINDINGS):
            p = 0.99 if f == TOP else 0.9 - 0.05 * j
            rows.append((0, image_id, f, p, 10.0 + j, 12.0, 40.0, 30.0, 1.0, 1.0, None))
    with ws.catalog.connect() as con:
        insert_rows(con, "cam_boxes", rows)
    # image 13 is positive for Hernia in the fixture; make it and image 27 finding-free
    cols = ", ".join(f"{quote_ident(f)} = false" for f in FINDINGS)
    ws.catalog.execute(f"UPDATE labels SET {cols} WHERE image_id IN "
                       "('00000013_000.png', '00000027_000.png')")
    return ws


def _labels(ws) -> dict[str, list[str]]:
    cols = ", ".join(quote_ident(f) for f in FINDINGS)
    return {r[0]: [f for f, v in zip(FINDINGS, r[1:], strict=True) if v]
            for r in ws.catalog.query(f"SELECT image_id, {cols} FROM labels")}


def test_labelled_positive_is_the_images_own_finding(tiny_workspace) -> None:
    ws = _with_cams(tiny_workspace(n=28))
    images = select_images(ws)
    labels = _labels(ws)
    rois = build_rois(ws, 0, images, roi="labelled", size=64)
    by_id = {r.image_id: r for r in rois}
    assert all(r.is_positive and r.source == "cam" for r in rois)
    for image_id, own in labels.items():
        if not own:
            assert image_id not in by_id  # skip: no contrastive term
            continue
        # highest probability among its labels = first in FINDINGS order here
        assert by_id[image_id].finding == min(own, key=FINDINGS.index)
    # the predicted rule takes the model's top guess instead
    cam = {r.image_id: r.finding for r in build_rois(ws, 0, images, roi="cam", size=64)
           if r.is_positive}
    assert set(cam.values()) == {TOP}


def test_normal_positive_lung_and_unlabelled_images(tiny_workspace) -> None:
    ws = _with_cams(tiny_workspace(n=28))
    images = select_images(ws)
    lung = {r.image_id: r for r in build_rois(ws, 0, images, roi="labelled", size=64,
                                              normal_positive="lung")}
    assert lung["00000013_000.png"].finding == NORMAL
    assert lung["00000013_000.png"].source == "lung"
    ids = list(images)
    mask = dict(zip(ids, labelled_mask(ids, 0.3).tolist(), strict=True))
    part = {r.image_id: r for r in build_rois(ws, 0, images, roi="labelled", size=64,
                                              label_fraction=0.3)}
    labels = _labels(ws)
    for image_id in ids:
        if not mask[image_id]:  # no labels to use: the model's top guess
            assert part[image_id].finding == TOP
        elif labels[image_id]:
            assert part[image_id].finding != TOP


def test_oracle_uses_gt_boxes_where_there_are_some(tiny_workspace) -> None:
    ws = _with_cams(tiny_workspace(n=28))
    images = select_images(ws)
    gt = {}
    for image_id, f in ws.catalog.query("SELECT image_id, finding FROM gt_boxes"):
        gt.setdefault(image_id, []).append(f)
    rois = {r.image_id: r for r in build_rois(ws, 0, images, roi="oracle", size=64)}
    assert gt
    for image_id, fs in gt.items():
        assert rois[image_id].source == "gt"
        assert rois[image_id].finding == min(fs, key=FINDINGS.index)
    others = [r for i, r in rois.items() if i not in gt]
    assert others and all(r.source == "cam" and r.finding != TOP for r in others)
