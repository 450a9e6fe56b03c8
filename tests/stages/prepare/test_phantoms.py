"""Synthetic phantoms: determinism, real prevalence/co-occurrence, honest GT boxes, NIH layout."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from kacl_cli.boxes import iou
from kacl_cli.findings import BOX_FINDINGS, FINDINGS
from kacl_cli.stages.prepare import nih, phantoms


@pytest.fixture(scope="module")
def stats() -> dict:
    return phantoms.load_stats()


@pytest.mark.nih
def test_packaged_stats_come_from_the_real_label_files(nih_sample: Path, stats: dict) -> None:
    fresh = phantoms.compute_stats(nih_sample / "Data_Entry_2017_v2020.csv",
                                   nih_sample / "BBox_List_2017.csv")
    assert json.loads(json.dumps(fresh)) == stats  # regenerate with --recompute-stats


def test_stats_are_plausible(stats: dict) -> None:
    assert stats["findings"] == list(FINDINGS)
    p = stats["prevalence"]
    assert 0.15 < p["Infiltration"] < 0.2 and p["Hernia"] < 0.005 < p["Pneumonia"]
    assert 0.5 < stats["no_finding"] < 0.6
    for f in BOX_FINDINGS:
        assert stats["boxes"][f]["n"] == len(stats["boxes"][f]["xywh"]) > 50


def test_sampler_reproduces_prevalence_and_cooccurrence(stats: dict) -> None:
    masks = phantoms.LabelSampler(stats).sample(np.random.default_rng(0), 40000)
    onehot = (masks[:, None] >> np.arange(14)[None, :]) & 1
    prev = onehot.mean(axis=0)
    want = np.array([stats["prevalence"][f] for f in FINDINGS])
    assert np.allclose(prev, want, atol=0.006)
    co = onehot.T @ onehot / len(masks)
    assert np.allclose(co, np.array(stats["cooccurrence"]), atol=0.006)
    # Effusion and Infiltration co-occur far more than independence would give.
    e, i = FINDINGS.index("Effusion"), FINDINGS.index("Infiltration")
    assert co[e, i] > 1.5 * want[e] * want[i]


def test_enrich_lifts_rare_findings(stats: dict) -> None:
    masks = phantoms.LabelSampler(stats, enrich=0.5).sample(np.random.default_rng(1), 20000)
    hernia = ((masks >> FINDINGS.index("Hernia")) & 1).mean()
    assert hernia > 0.5 / 14 * 0.8  # ~1/28 of draws, vs 0.2% at the real prevalence


def test_plan_has_follow_ups_sharing_anatomy() -> None:
    specs = phantoms.plan(120, seed=5)
    assert len(specs) == 120 and len({s.image_id for s in specs}) == 120
    by_patient: dict[int, list] = {}
    for s in specs:
        by_patient.setdefault(s.patient, []).append(s)
    multi = [v for v in by_patient.values() if len(v) > 1]
    assert multi, "some patients should have follow-up images"
    for v in multi:
        assert len({s.patient_seed for s in v}) == 1 and len({s.seed for s in v}) == len(v)
        assert [s.follow_up for s in v] == list(range(len(v)))
        assert len({s.sex for s in v}) == 1


def test_render_is_deterministic_and_seed_dependent() -> None:
    spec = phantoms.plan(3, seed=11, enrich=1.0)[0]
    a, boxes_a = phantoms.render(spec, 64)
    b, boxes_b = phantoms.render(spec, 64)
    assert a.dtype == np.uint8 and a.shape == (64, 64)
    assert np.array_equal(a, b) and boxes_a == boxes_b
    other = phantoms.plan(3, seed=12, enrich=1.0)[0]
    assert not np.array_equal(a, phantoms.render(other, 64)[0])


@pytest.mark.parametrize("finding", BOX_FINDINGS)
def test_recorded_box_holds_the_drawn_lesion(finding: str) -> None:
    """Same image with and without the finding: the pixels that change lie in the GT box."""
    size = 128
    base = phantoms.plan(1, seed=21)[0]
    hits = 0
    for k in range(4):
        spec = replace(base, seed=base.seed + k, findings=(finding,))
        with_f, boxes = phantoms.render(spec, size, difficulty=0.3)
        without, none = phantoms.render(replace(spec, findings=()), size, difficulty=0.3)
        assert none == {} and set(boxes) == {finding}
        x, y, w, h = boxes[finding]
        assert 0 <= x and 0 <= y and x + w <= size and y + h <= size and w >= 1 and h >= 1
        diff = np.abs(with_f.astype(float) - without.astype(float))
        assert diff.sum() > 0
        m = 2  # the anti-aliased edge may spill a pixel or two
        inside = diff[max(0, int(y) - m):int(y + h) + m, max(0, int(x) - m):int(x + w) + m]
        # ... and the box is not much bigger than what changed.
        ys, xs = np.nonzero(diff >= 0.25 * diff.max())
        changed = np.array([xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1], dtype=float)
        hits += inside.sum() / diff.sum() > 0.9 and iou(changed, np.array(boxes[finding])) > 0.5
    assert hits >= 3


def test_every_box_finding_gets_exactly_one_box() -> None:
    specs = phantoms.plan(40, seed=2, enrich=1.0)
    for spec in specs[:20]:
        _, boxes = phantoms.render(spec, 48)
        assert set(boxes) == {f for f in spec.findings if f in BOX_FINDINGS}


def test_difficulty_lowers_lesion_contrast() -> None:
    spec = replace(phantoms.plan(1, seed=3)[0], findings=("Nodule",))
    clean = replace(spec, findings=())
    deltas = []
    for d in (0.0, 1.0):
        a, boxes = phantoms.render(spec, 96, difficulty=d)
        b, _ = phantoms.render(clean, 96, difficulty=d)
        x, y, w, h = (int(v) for v in boxes["Nodule"])
        deltas.append(float((a.astype(float) - b)[y:y + h, x:x + w].mean()))
    assert deltas[0] > 2 * deltas[1] > 0


def test_large_render_works() -> None:
    spec = phantoms.plan(2, seed=8, enrich=1.0)[1]
    img, boxes = phantoms.render(spec, 1024)
    assert img.shape == (1024, 1024) and 30 < img.mean() < 220
    for x, y, w, h in boxes.values():
        assert x + w <= 1024 and y + h <= 1024


def test_release_folder_is_a_valid_nih_folder(tmp_path: Path) -> None:
    info = phantoms.write_release(tmp_path, 30, 48, seed=4, difficulty=0.5, enrich=0.5)
    header = (tmp_path / "BBox_List_2017.csv").read_text().splitlines()[0]
    assert header == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    release = nih.read_release(tmp_path)  # the strict reader accepts it
    assert len(release.entries) == 30 and len(release.images) == 30
    assert sum(len(v) for v in release.boxes.values()) == info["boxes"] > 0
    for e in release.entries:
        boxed = {b.finding for b in release.boxes.get(e.image_id, [])}
        assert boxed == {f for f in e.findings if f in BOX_FINDINGS}
        assert (e.csv_width, e.csv_height) == (48, 48)
    tv, te = release.train_val, release.test
    assert tv and te and not (tv & te) and tv | te == set(release.images)
    pt = {e.patient_id for e in release.entries if e.image_id in te}
    ptv = {e.patient_id for e in release.entries if e.image_id in tv}
    assert not (pt & ptv)
    assert phantoms.release_is_complete(tmp_path, {"n": 30, "size": 48, "seed": 4})
    assert not phantoms.release_is_complete(tmp_path, {"n": 31})
    infiltrate = [r for r in csv.reader(open(tmp_path / "BBox_List_2017.csv"))
                  if r[1] in ("Infiltrate", "Infiltration")]
    assert all(r[1] == "Infiltrate" for r in infiltrate)  # the real file's spelling


def test_parallel_generation_matches_serial(tmp_path: Path) -> None:
    phantoms.write_release(tmp_path / "a", 6, 32, seed=9)
    phantoms.write_release(tmp_path / "b", 6, 32, seed=9, workers=2)
    for p in sorted((tmp_path / "a" / "images").glob("*.png")):
        assert p.read_bytes() == (tmp_path / "b" / "images" / p.name).read_bytes()
    assert ((tmp_path / "a" / "BBox_List_2017.csv").read_text()
            == (tmp_path / "b" / "BBox_List_2017.csv").read_text())
