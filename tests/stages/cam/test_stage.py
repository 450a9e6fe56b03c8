"""The cam stage: maps + a cam_boxes row for every (image, finding), original-pixel boxes,
skip / resume / force / stale-row handling, and one-line errors for missing or foreign
checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kacl_cli.boxes import scale_xywh
from kacl_cli.errors import CheckpointError, InputError, NotReadyError
from kacl_cli.findings import FINDINGS
from kacl_cli.models.checkpoint import load_image_net, model_meta, preprocess, save_checkpoint
from kacl_cli.models.image_net import GRAY_MEAN, GRAY_STD, build_image_net
from kacl_cli.sharding.parts import Shard
from kacl_cli.stages.cam import stage as cam_stage
from kacl_cli.stages.cam.box_rules import FittedRules
from kacl_cli.stages.cam.gradcam import batched_gradcam
from kacl_cli.stages.cam.localize import BoxRule, localize
from kacl_cli.workspace import Workspace

torch.set_num_threads(1)


def write_checkpoint(ws: Workspace, round_: int = 0, seed: int = 0, size: int = 64) -> None:
    torch.manual_seed(seed)
    model = build_image_net("tiny", n_classes=len(FINDINGS), init="none")
    tensors = {f"image_net.{k}": v for k, v in model.state_dict().items()}
    meta = model_meta("tiny", size, ws.store.image_size(), GRAY_MEAN, GRAY_STD, round_,
                      "pretrain")
    save_checkpoint(ws.checkpoint_dir(round_), tensors, meta)


def cam_rows(ws: Workspace, round_: int = 0) -> list[tuple]:
    return ws.catalog.query(
        "SELECT c.image_id, c.finding, c.probability, c.x, c.y, c.w, c.h, c.peak, c.mass, "
        "c.reason, i.row, i.orig_width, i.orig_height FROM cam_boxes c JOIN images i "
        "USING (image_id) WHERE c.round = ? ORDER BY i.row, c.finding", [round_],
    )


@pytest.fixture
def ws(tiny_workspace) -> Workspace:
    ws = tiny_workspace(n=12, size=64, orig=256)
    ws.catalog.execute("UPDATE images SET orig_width = 300 WHERE row = 1")  # anisotropic
    write_checkpoint(ws)
    return ws


def test_maps_and_rows_for_every_finding_match_the_model(ws: Workspace) -> None:
    summary = cam_stage.run_cam_stage(ws, 0, batch_size=5, chunk_size=8, device="cpu")
    assert summary["images"] == 12 and summary["computed"] == 12 and summary["reused"] == 0
    assert summary["boxes"] + summary["empty_maps"] == 12 * len(FINDINGS)
    assert summary["map_size"] == [8, 8]
    rows = cam_rows(ws)
    assert len(rows) == 12 * len(FINDINGS)
    maps = ws.store.read_cams(0, np.arange(12))
    assert maps.shape == (12, len(FINDINGS), 8, 8) and maps.dtype == np.float16

    model, meta = load_image_net(ws.checkpoint_dir(0))
    x = preprocess(torch.from_numpy(ws.store.read_images(np.arange(12))), meta)
    logits, ref = batched_gradcam(model, x)
    # raw maps, not min-max normalised: equal to the model's own maps at float16 precision
    assert np.allclose(maps.astype(np.float32), ref.numpy(), rtol=1e-3, atol=1e-6)
    assert maps.max() > 0 and not np.isclose(maps.reshape(-1, 64).max(axis=1), 1).all()
    probs = torch.sigmoid(logits).numpy()
    order = {f: i for i, f in enumerate(FINDINGS)}
    rules = {f: BoxRule(r["frac"], r["component"]) for f, r in summary["box_rules"].items()}
    for _image_id, finding, p, x0, y0, w, h, peak, mass, reason, row, ow, oh in rows:
        f = order[finding]
        assert p == pytest.approx(probs[row, f], abs=1e-5)
        # the same rule, at the net's input size (64), from the stored float16 map
        mb = localize(torch.from_numpy(maps[row, f][None]), (64, 64), rules[finding])[0][0]
        assert reason == mb.reason
        if mb.box is None:
            assert x0 is None and reason
        else:
            want = scale_xywh(np.array(mb.box), ow / 64, oh / 64)
            assert np.allclose([x0, y0, w, h], want)
            assert 0 <= x0 and x0 + w <= ow + 1e-9 and y0 + h <= oh + 1e-9
            assert peak == pytest.approx(mb.peak) and mass == pytest.approx(mb.mass)


def test_box_is_converted_to_original_pixels_per_axis(ws: Workspace, monkeypatch) -> None:
    """A single hot map pixel at (row 2, col 5) of an 8 x 8 map, image 300 x 256 px."""

    def fake(model, x):
        maps = torch.zeros(len(x), len(FINDINGS), 8, 8)
        maps[:, :, 2, 5] = 0.75
        maps[:, 3] = 0.0  # Infiltration: empty
        return torch.zeros(len(x), len(FINDINGS)), maps

    monkeypatch.setattr(cam_stage, "batched_gradcam", fake)
    cam_stage.run_cam_stage(ws, 0, device="cpu")
    got = ws.catalog.query(
        "SELECT c.finding, x, y, w, h, peak, mass, reason, probability FROM cam_boxes c "
        "JOIN images i USING (image_id) WHERE i.row = 1 ORDER BY c.finding"
    )
    by = {r[0]: r[1:] for r in got}
    # upsampled bilinearly to 64 px and cut at half its peak, one hot map cell gives exactly
    # that cell's box (pixel-edge frame); mass in map units stays near the cell's value
    assert by["Mass"][:5] == (5 * 300 / 8, 2 * 256 / 8, 300 / 8, 256 / 8, 0.75)
    assert 0.3 < by["Mass"][5] < 0.75 and by["Mass"][6] is None
    assert by["Infiltration"][:4] == (None, None, None, None)
    assert by["Infiltration"][6] == "empty map: no positive evidence"
    assert by["Mass"][7] == 0.5  # sigmoid(0)


def test_identical_rerun_is_skipped_and_force_recomputes(ws: Workspace) -> None:
    first = cam_stage.run_cam_stage(ws, device="cpu")  # round: the latest finished (0)
    assert first["round"] == 0 and not first.get("skipped")
    again = cam_stage.run_cam_stage(ws, 0, device="cpu")
    assert again["skipped"] is True and again["boxes"] == first["boxes"]
    assert ws.catalog.count("runs", "stage = 'cam' AND status = 'done'") == 1
    forced = cam_stage.run_cam_stage(ws, 0, device="cpu", force=True)
    assert not forced.get("skipped") and forced["computed"] == 12
    assert ws.catalog.count("cam_boxes") == 12 * len(FINDINGS)


def test_killed_run_resumes_from_the_last_committed_chunk(ws: Workspace, monkeypatch) -> None:
    # fit the box rules first (box_rules.json), so only the stage's own batches are counted
    cam_stage.box_rules_for(ws, 0, ws.checkpoint_dir(0), None, "cpu")
    calls = {"n": 0}
    real = cam_stage.batched_gradcam

    def dies_on_third_batch(model, x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(model, x)

    monkeypatch.setattr(cam_stage, "batched_gradcam", dies_on_third_batch)
    with pytest.raises(RuntimeError):
        cam_stage.run_cam_stage(ws, 0, batch_size=2, chunk_size=4, device="cpu")
    assert ws.catalog.count("cam_boxes") == 4 * len(FINDINGS)  # chunk 1 only
    assert ws.catalog.query("SELECT status FROM runs WHERE stage = 'cam'") == [("failed",)]
    kept = ws.store.read_cams(0, np.arange(4))
    monkeypatch.setattr(cam_stage, "batched_gradcam", real)
    resumed = cam_stage.run_cam_stage(ws, 0, batch_size=2, chunk_size=4, device="cpu")
    assert resumed["computed"] == 8 and resumed["reused"] == 4
    assert ws.catalog.count("cam_boxes") == 12 * len(FINDINGS)
    assert np.array_equal(ws.store.read_cams(0, np.arange(4)), kept)


def test_split_subset_then_all_reuses_the_done_images(ws: Workspace) -> None:
    test = cam_stage.run_cam_stage(ws, 0, split="test", device="cpu")
    n_test = ws.catalog.count("images", "split = 'test'")
    assert test["images"] == n_test == 3
    assert ws.catalog.query("SELECT DISTINCT split FROM cam_boxes JOIN images USING "
                            "(image_id)") == [("test",)]
    everything = cam_stage.run_cam_stage(ws, 0, split="all", device="cpu")
    assert everything["computed"] == 12 - n_test and everything["reused"] == n_test
    # the identical test-split run finished and its rows are intact: skipped outright
    rows = cam_rows(ws)
    again = cam_stage.run_cam_stage(ws, 0, split="test", device="cpu")
    assert again["skipped"] is True and cam_rows(ws) == rows
    # a split never run on its own: a new run, but every image is reused, none recomputed
    val = cam_stage.run_cam_stage(ws, 0, split="val", device="cpu")
    n_val = ws.catalog.count("images", "split = 'val'")
    assert not val.get("skipped") and n_val > 0
    assert (val["computed"], val["reused"], val["images"]) == (0, n_val, n_val)
    assert cam_rows(ws) == rows


def test_other_threshold_or_retrained_checkpoint_replaces_the_rows(ws: Workspace) -> None:
    cam_stage.run_cam_stage(ws, 0, threshold=0.5, device="cpu")
    before = {(r[0], r[1]): r[2:7] for r in cam_rows(ws)}
    low = cam_stage.run_cam_stage(ws, 0, threshold=0.2, device="cpu")
    assert low["computed"] == 12
    areas_low = {(r[0], r[1]): r[5] * r[6] for r in cam_rows(ws) if r[5] is not None}
    grew = [areas_low[k] >= before[k][3] * before[k][4] for k in areas_low
            if before[k][3] is not None]
    assert grew and sum(grew) >= 0.9 * len(grew)  # a lower threshold mostly widens the box
    # back to 0.5: the earlier finished run must NOT be skipped, its rows were replaced
    back = cam_stage.run_cam_stage(ws, 0, threshold=0.5, device="cpu")
    assert not back.get("skipped") and back["computed"] == 12
    assert {(r[0], r[1]): r[2:7] for r in cam_rows(ws)} == before
    write_checkpoint(ws, seed=1)  # retrained round 0: new weights, same round number
    retrained = cam_stage.run_cam_stage(ws, 0, device="cpu")
    assert retrained["computed"] == 12
    new_p = {(r[0], r[1]): r[2] for r in cam_rows(ws)}
    assert any(abs(new_p[k] - before[k][0]) > 1e-4 for k in before)
    assert json.loads(ws.catalog.query(
        "SELECT value FROM meta WHERE key = 'cam:round-0'")[0][0])["box_rules"] == FittedRules(
            {f: BoxRule(**r) for f, r in retrained["box_rules"].items()}, "").digest()


def test_missing_and_foreign_checkpoints_and_bad_options(tiny_workspace) -> None:
    ws = tiny_workspace(n=4, size=32)
    with pytest.raises(NotReadyError, match="kacl pretrain"):
        cam_stage.run_cam_stage(ws)
    with pytest.raises(NotReadyError, match="kacl pretrain"):
        cam_stage.run_cam_stage(ws, 0)
    write_checkpoint(ws, size=32)
    with pytest.raises(NotReadyError, match="round 2"):
        cam_stage.run_cam_stage(ws, 2)
    meta_path = ws.checkpoint_dir(0) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["findings"] = list(reversed(meta["findings"]))
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="vocabulary"):
        cam_stage.run_cam_stage(ws, 0, device="cpu")
    assert ws.catalog.count("cam_boxes") == 0
    with pytest.raises(InputError):
        cam_stage.run_cam_stage(ws, 0, split="holdout")
    with pytest.raises(InputError):
        cam_stage.run_cam_stage(ws, 0, threshold=0.0)
    with pytest.raises(CheckpointError, match="vocabulary"):  # a shard refuses it too
        cam_stage.run_cam_stage(ws, 0, shard=Shard(0, 2), device="cpu")
    assert ws.catalog.count("cam_boxes") == 0


def test_non_finite_logits_stop_the_stage_without_rows(ws: Workspace, monkeypatch) -> None:
    def broken(model, x):
        logits = torch.zeros(len(x), len(FINDINGS))
        logits[0, 2] = float("nan")
        return logits, torch.ones(len(x), len(FINDINGS), 8, 8)

    cam_stage.box_rules_for(ws, 0, ws.checkpoint_dir(0), None, "cpu")  # fitted beforehand
    monkeypatch.setattr(cam_stage, "batched_gradcam", broken)
    with pytest.raises(CheckpointError, match="non-finite logits"):
        cam_stage.run_cam_stage(ws, 0, device="cpu")
    assert ws.catalog.count("cam_boxes") == 0
    assert ws.catalog.query("SELECT status FROM runs WHERE stage = 'cam'") == [("failed",)]


def test_a_short_run_keeps_one_catalog_connection_a_long_one_releases_it(
        ws: Workspace, monkeypatch) -> None:
    """Issue 18 (fixed cost): a run whose model time is projected under HOLD_CATALOG_S opens
    the catalog once; a longer one closes it after the first batch, so other processes can
    read the catalog while the model runs, and reopens it to write."""
    import kacl_cli.catalog as catalog_mod

    opened, held_during_batches = [], []
    real_open, real_gradcam = catalog_mod._connect_with_retry, cam_stage.batched_gradcam
    monkeypatch.setattr(catalog_mod, "_connect_with_retry",
                        lambda *a, **k: opened.append(1) or real_open(*a, **k))
    monkeypatch.setattr(cam_stage, "batched_gradcam", lambda *a: held_during_batches.append(
        ws.catalog._held is not None) or real_gradcam(*a))
    cam_stage.run_cam_stage(ws, 0, threshold=0.5, batch_size=4, device="cpu", force=True)
    assert len(opened) == 1 and held_during_batches == [True] * 3
    opened.clear()
    held_during_batches.clear()
    monkeypatch.setattr(cam_stage, "HOLD_CATALOG_S", 0.0)
    cam_stage.run_cam_stage(ws, 0, threshold=0.5, batch_size=4, device="cpu", force=True)
    assert len(opened) == 2 and held_during_batches == [True, False, False]
