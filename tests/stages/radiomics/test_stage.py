"""The radiomics stage: catalog rows, resume, skip/force, z-scoring, real NIH GT boxes."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kacl_cli import parallel
from kacl_cli.errors import NotReadyError
from kacl_cli.findings import FINDINGS, normalise_finding
from kacl_cli.imageio import load_for_store
from kacl_cli.stages.radiomics import settings as S
from kacl_cli.stages.radiomics import stage as stage_mod
from kacl_cli.stages.radiomics.backends.pyrad import PyradiomicsBackend
from kacl_cli.stages.radiomics.stage import load_positive_features, run_radiomics_stage
from kacl_cli.stages.radiomics.stats import finite_stats
from kacl_cli.workspace import Workspace


def write_cams(ws: Workspace, round_: int = 0, seed: int = 0, tiny_for: str | None = None) -> None:
    """One cam_boxes row per (image, finding): two boxed findings per image, one confident."""
    rng = np.random.default_rng(seed)
    ids = [r[0] for r in ws.catalog.query("SELECT image_id FROM images ORDER BY row")]
    with ws.catalog.connect() as con:
        for image_id in ids:
            boxed = set(rng.choice(len(FINDINGS), size=2, replace=False).tolist())
            for j, f in enumerate(FINDINGS):
                p = float(rng.uniform(0.6, 0.99)) if j == min(boxed) else float(
                    rng.uniform(0.0, 0.4))
                if j in boxed:
                    x, y = rng.uniform(0, 128, 2)
                    w, h = rng.uniform(40, 120, 2)
                    if image_id == tiny_for and j == min(boxed):
                        x, w, h = 40.0, 2.0, 30.0  # -> 1 store pixel wide: degenerate
                    box = [float(x), float(y), float(w), float(h)]
                else:
                    box = [None] * 4
                con.execute(
                    "INSERT INTO cam_boxes VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1.0, 1.0, ?)",
                    [round_, image_id, f, p, *box, None if box[0] is not None else "flat"],
                )


def features_table(ws: Workspace, round_: int = 0) -> dict[tuple[str, str], tuple]:
    rows = ws.catalog.query(
        "SELECT image_id, finding, backend, settings_hash, features, n_nonfinite, reason "
        "FROM radiomics WHERE round = ?", [round_])
    return {(r[0], r[1]): r[2:] for r in rows}


def test_stage_writes_rows_equal_to_backend(tiny_workspace) -> None:
    ws = tiny_workspace(n=8)
    write_cams(ws)
    s = run_radiomics_stage(ws, 0, min_prob=0.5, backend="pyradiomics")
    # min_prob 0.5 -> only the confident (positive) box of each image
    assert s["rois"] == s["positive_rois"] == s["computed"] == 8
    assert s["failed"] == 0 and s["features"] == 102
    settings = S.load_settings()
    shash = S.settings_hash(settings)
    names = [r[0] for r in ws.catalog.query(
        "SELECT name FROM radiomics_features WHERE settings_hash = ? ORDER BY feature_index",
        [shash])]
    assert names == S.feature_names(settings)
    stored = ws.catalog.query("SELECT settings_json FROM radiomics_settings")
    assert len(stored) == 1 and '"binWidth":25' in stored[0][0]
    # one ROI's stored features == the backend on the store image
    image_id, finding, x0, y0, x1, y1 = ws.catalog.query(
        "SELECT image_id, finding, x0, y0, x1, y1 FROM rois WHERE round = 0 ORDER BY image_id "
        "LIMIT 1")[0]
    row = ws.catalog.query("SELECT row FROM images WHERE image_id = ?", [image_id])[0][0]
    img = ws.store.read_images([row])[0]
    spacing = (0.143 * 256 / 64, 0.143 * 256 / 64)  # catalog spacing x orig / store size
    ref = PyradiomicsBackend().extract([img], [(x0, y0, x1, y1)], settings, [spacing])
    got = features_table(ws)[(image_id, finding)]
    assert got[0] == "pyradiomics" and got[1] == shash and got[3] == 0 and got[4] is None
    np.testing.assert_allclose(got[2], ref.features[0].astype(np.float32), rtol=0, atol=0)


def test_min_prob_zero_adds_every_boxed_finding(tiny_workspace) -> None:
    ws = tiny_workspace(n=4)
    write_cams(ws)
    s = run_radiomics_stage(ws, 0, min_prob=0.0)
    assert s["rois"] == 8 and s["positive_rois"] == 4


def test_rerun_skips_force_recomputes(tiny_workspace) -> None:
    ws = tiny_workspace(n=4)
    write_cams(ws)
    first = run_radiomics_stage(ws, 0)
    again = run_radiomics_stage(ws, 0)
    assert again["skipped"] is True and again["rois"] == first["rois"]
    forced = run_radiomics_stage(ws, 0, force=True)
    assert "skipped" not in forced and forced["computed"] == first["rois"]
    assert ws.catalog.count("radiomics") == first["rois"]


def test_resume_after_interruption_does_not_duplicate(tiny_workspace, monkeypatch) -> None:
    ws = tiny_workspace(n=8)
    write_cams(ws)
    real = stage_mod._write_chunk
    calls = {"n": 0}

    def dying(*args, **kwargs):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(stage_mod, "_write_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        run_radiomics_stage(ws, 0, min_prob=0.0, chunk=3)
    assert ws.catalog.count("radiomics") == 6  # two committed chunks of 3
    assert ws.catalog.query("SELECT status FROM runs WHERE stage = 'radiomics'") == [("failed",)]
    before = features_table(ws)
    monkeypatch.setattr(stage_mod, "_write_chunk", real)
    s = run_radiomics_stage(ws, 0, min_prob=0.0, chunk=3)
    assert s["reused"] == 6 and s["computed"] == s["rois"] - 6 == 10
    after = features_table(ws)
    assert len(after) == ws.catalog.count("radiomics") == s["rois"]
    for key, value in before.items():  # committed rows are kept, not recomputed
        assert after[key] == value


def test_changed_roi_drops_stale_features(tiny_workspace) -> None:
    ws = tiny_workspace(n=4)
    write_cams(ws)
    run_radiomics_stage(ws, 0)
    image_id, finding = ws.catalog.query(
        "SELECT image_id, finding FROM rois WHERE is_positive ORDER BY image_id LIMIT 1")[0]
    ws.catalog.execute(
        "UPDATE cam_boxes SET x = 0, y = 0, w = 200, h = 200 WHERE round = 0 AND image_id = ? "
        "AND finding = ?", [image_id, finding])
    s = run_radiomics_stage(ws, 0)
    assert s["computed"] == 1 and s["reused"] == s["rois"] - 1
    assert ws.catalog.query(
        "SELECT x0, y0, x1, y1 FROM rois WHERE image_id = ? AND finding = ?",
        [image_id, finding]) == [(0, 0, 50, 50)]


def test_degenerate_roi_recorded_with_reason(tiny_workspace) -> None:
    ws = tiny_workspace(n=4)
    write_cams(ws, tiny_for="00000001_000.png")
    s = run_radiomics_stage(ws, 0)
    assert s["failed"] == 1 and s["failed_reasons"] == {"ROI thinner than 2 px": 1}
    row = [v for (i, _), v in features_table(ws).items() if i == "00000001_000.png"][0]
    assert row[2] is None and row[4].startswith("ROI thinner than 2 px")
    errors = ws.catalog.query("SELECT stage, item, reason FROM errors")
    assert len(errors) == 1 and errors[0][0] == "radiomics"
    assert errors[0][1].startswith("00000001_000.png/")
    pf = load_positive_features(ws, 0)
    assert pf.n_failed == 1 and "00000001_000.png" not in pf.image_ids
    assert len(pf.image_ids) == 3


def test_zscore_stats_from_train_split_only(tiny_workspace) -> None:
    ws = tiny_workspace(n=12)
    write_cams(ws)
    run_radiomics_stage(ws, 0)
    shash = S.settings_hash(S.load_settings())
    rows = ws.catalog.query(
        "SELECT i.split, r.features FROM radiomics r JOIN images i USING (image_id) "
        "JOIN rois o USING (round, image_id, finding) WHERE o.is_positive")
    train = np.array([f for s, f in rows if s == "train"], dtype=np.float64)
    everything = np.array([f for _, f in rows], dtype=np.float64)
    assert len(train) == 6 and len(everything) == 12
    stats = ws.catalog.query(
        "SELECT mean, std, n FROM radiomics_stats WHERE round = 0 AND settings_hash = ? "
        "ORDER BY feature_index", [shash])
    mean = np.array([s[0] for s in stats])
    std = np.array([s[1] for s in stats])
    assert {s[2] for s in stats} == {6}
    np.testing.assert_allclose(mean, train.mean(axis=0), rtol=1e-9)
    expected_std = train.std(axis=0)
    np.testing.assert_allclose(std, np.where(expected_std > 0, expected_std, 1.0), rtol=1e-9)
    assert not np.allclose(mean, everything.mean(axis=0))  # val/test did not contribute
    pf = load_positive_features(ws, 0)
    assert pf.features.dtype == np.float32 and pf.features.shape == (12, 102)
    assert pf.settings_hash == shash and pf.names[0].startswith("original_firstorder_")
    train_ids = {r[0] for r in ws.catalog.query("SELECT image_id FROM images WHERE split='train'")}
    z_train = pf.features[[i in train_ids for i in pf.image_ids]]
    np.testing.assert_allclose(z_train.mean(axis=0), 0, atol=1e-4)
    # each image's row is its raw features z-scored with the train statistics (sign included:
    # a mean of 0 over train holds for -z too)
    raw = dict(ws.catalog.query(
        "SELECT r.image_id, r.features FROM radiomics r JOIN rois o "
        "USING (round, image_id, finding) WHERE o.is_positive"))
    for image_id, z in zip(pf.image_ids, pf.features, strict=True):
        want = (np.asarray(raw[image_id], dtype=np.float64) - train.mean(axis=0)) / np.where(
            expected_std > 0, expected_std, 1.0)
        np.testing.assert_allclose(z, want, rtol=1e-4, atol=1e-4)


def test_nonfinite_values_are_counted_and_zeroed(tiny_workspace) -> None:
    ws = tiny_workspace(n=4)
    write_cams(ws)
    run_radiomics_stage(ws, 0)
    image_id = ws.catalog.query("SELECT image_id FROM rois WHERE is_positive LIMIT 1")[0][0]
    feats = ws.catalog.query(
        "SELECT features FROM radiomics WHERE image_id = ?", [image_id])[0][0]
    feats[2] = float("nan")
    ws.catalog.execute(
        "UPDATE radiomics SET features = ?::FLOAT[] WHERE image_id = ?", [feats, image_id])
    pf = load_positive_features(ws, 0)
    assert pf.n_nonfinite == 1
    assert np.isfinite(pf.features).all()
    assert pf.features[pf.image_ids.index(image_id), 2] == 0.0


def test_finite_stats_ignores_nan_and_constant_columns() -> None:
    x = np.array([[1.0, 5.0, np.nan], [3.0, 5.0, np.nan], [np.inf, 5.0, np.nan]])
    mean, std, n = finite_stats(x)
    assert mean.tolist() == [2.0, 5.0, 0.0] and std.tolist() == [1.0, 1.0, 1.0]
    assert n.tolist() == [2, 3, 0]


def test_missing_cam_boxes_and_no_stats(tiny_workspace) -> None:
    ws = tiny_workspace(n=4)
    with pytest.raises(NotReadyError, match="kacl cam --round 2"):
        run_radiomics_stage(ws, 2)
    with pytest.raises(NotReadyError, match="kacl radiomics --round 2"):
        load_positive_features(ws, 2)


def test_two_workers_equal_one(tiny_workspace, monkeypatch) -> None:
    ws = tiny_workspace(n=6)
    write_cams(ws)
    run_radiomics_stage(ws, 0, min_prob=0.0, workers=1)
    one = features_table(ws)
    monkeypatch.setattr(parallel, "POOL_START_S", 0.0)  # a pool even for 12 ROIs
    started = []
    real_pool = stage_mod.process_pool
    monkeypatch.setattr(stage_mod, "process_pool", lambda *a, **k: started.append(a) or
                        real_pool(*a, **k))
    s = run_radiomics_stage(ws, 0, min_prob=0.0, workers=2, chunk=4, force=True)
    assert s["computed"] == 12 and s["workers"] == 2 and started
    assert features_table(ws) == one


def test_a_job_smaller_than_a_pool_start_runs_in_process(tiny_workspace, monkeypatch) -> None:
    ws = tiny_workspace(n=6)
    write_cams(ws)

    def no_pool(*_args, **_kwargs):
        raise AssertionError("a pool for 12 ROIs of the fast backend")

    monkeypatch.setattr(stage_mod, "process_pool", no_pool)
    s = run_radiomics_stage(ws, 0, min_prob=0.0, workers=2, chunk=4)
    assert s["computed"] == 12 and s["failed"] == 0


def test_the_fast_stage_does_not_import_torch(tiny_workspace) -> None:
    """torch (seconds) was a fixed cost of every radiomics run outside torchrun, and
    pyradiomics with SimpleITK (~0.2 s) one of every fast-backend run (feature names)."""
    ws = tiny_workspace(n=4)
    write_cams(ws)
    code = ("import sys; from kacl_cli.workspace import Workspace; "
            "from kacl_cli.stages.radiomics.stage import run_radiomics_stage; "
            f"s = run_radiomics_stage(Workspace({str(ws.root)!r}), 0, min_prob=0.0); "
            "assert s['computed'] == 8, s; "
            "print([m in sys.modules for m in ('torch', 'radiomics', 'SimpleITK')])")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[3], check=True)
    assert out.stdout.strip().splitlines()[-1] == "[False, False, False]"


def test_gt_rois_split_filter(tiny_workspace) -> None:
    ws = tiny_workspace(n=8)
    s = run_radiomics_stage(ws, 0, roi="gt", split="train")
    train_gt = ws.catalog.query(
        "SELECT count(DISTINCT (g.image_id, g.finding)) FROM gt_boxes g JOIN images i "
        "USING (image_id) WHERE i.split = 'train'")[0][0]
    assert s["rois"] == s["gt_rois"] == train_gt > 0
    assert {r[0] for r in ws.catalog.query(
        "SELECT DISTINCT i.split FROM rois JOIN images i USING (image_id)")} == {"train"}


# -- the real NIH sample ---------------------------------------------------------------------
def ingest_boxed_sample(root: Path, sample: Path, size: int = 256) -> tuple[Workspace, int]:
    """The sample's images that have GT boxes, written straight into a tiny workspace."""
    with open(sample / "BBox_List_2017.csv", newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        boxes = [r for r in reader if r and (sample / "images" / r[0]).exists()]
    ids = sorted({r[0] for r in boxes})
    ws = Workspace(root)
    ws.init()
    pixels = []
    with ws.catalog.connect() as con:
        for row, image_id in enumerate(ids):
            px, w, h = load_for_store(sample / "images" / image_id, size)
            pixels.append(px)
            con.execute(
                "INSERT INTO images VALUES (?, ?, ?, 'train', 0, 'PA', 50, 'M', ?, ?, 0.143, "
                "0.143, ?)", [image_id, row, image_id.split("_")[0], w, h, image_id])
            con.execute(
                f"INSERT INTO labels VALUES (?, {', '.join(['false'] * 15)})", [image_id])
        for r in boxes:
            con.execute("INSERT INTO gt_boxes VALUES (?, ?, ?, ?, ?, ?)",
                        [r[0], normalise_finding(r[1]), *map(float, r[2:6])])
    ws.store.write_images(0, np.stack(pixels), size)
    return ws, len(boxes)


@pytest.mark.nih
def test_real_sample_gt_boxes_give_features(nih_sample: Path, tmp_path: Path) -> None:
    ws, n_boxes = ingest_boxed_sample(tmp_path / "nih", nih_sample)
    n_images = ws.catalog.count("images")
    assert n_images >= 1 and n_boxes >= n_images
    s = run_radiomics_stage(ws, 0, roi="gt")
    assert s["images"] == n_images and s["positive_rois"] == n_images
    assert s["failed"] == 0 and s["rois"] >= n_images
    rows = ws.catalog.query(
        "SELECT features, n_nonfinite FROM radiomics ORDER BY image_id, finding")
    feats = np.array([r[0] for r in rows])
    assert feats.shape == (s["rois"], 102) and np.isfinite(feats).all()
    names = S.feature_names(S.load_settings())
    area = feats[:, names.index("original_shape2D_PixelSurface")]
    mm_per_px = 0.143 * 1024 / 256
    # shape features are in mm: each ROI's area in store pixels x (mm per store pixel)^2
    roi_px = np.array([(r[2] - r[0]) * (r[3] - r[1]) for r in ws.catalog.query(
        "SELECT x0, y0, x1, y1 FROM rois r JOIN radiomics USING (round, image_id, finding) "
        "ORDER BY image_id, finding")])
    np.testing.assert_allclose(area, roi_px * mm_per_px**2, rtol=1e-5)
    mean = feats[:, names.index("original_firstorder_Mean")]
    assert ((mean > 0) & (mean < 255)).all()
    assert not math.isclose(float(np.std(mean)), 0.0)
    pf = load_positive_features(ws, 0)
    assert len(pf.image_ids) == n_images and pf.n_nonfinite == 0


def test_statistics_do_not_depend_on_the_tables_physical_order(tiny_workspace) -> None:
    """compute_stats sums in store-row order: the same bits after the radiomics rows are
    rewritten in another physical order (a merge or a re-run lays them out differently)."""
    from kacl_cli.stages.radiomics.stats import compute_stats

    ws = tiny_workspace(n=24)
    write_cams(ws)
    s = run_radiomics_stage(ws, 0, min_prob=0.0)
    stats_sql = "SELECT * FROM radiomics_stats ORDER BY feature_index"
    before = ws.catalog.query(stats_sql)
    with ws.catalog.connect() as con:
        for table in ("radiomics", "rois", "images"):
            con.execute(f"CREATE TEMP TABLE t_{table} AS SELECT * FROM {table} "
                        "ORDER BY hash(image_id)")
            con.execute(f"DELETE FROM {table}")
            con.execute(f"INSERT INTO {table} SELECT * FROM t_{table}")
    assert compute_stats(ws, 0, s["settings_hash"], s["features"]) == s["train_rows_for_stats"]
    assert repr(ws.catalog.query(stats_sql)) == repr(before)
