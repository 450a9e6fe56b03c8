"""The round orchestration: planning, data assembly, objective continuation, ablations,
no-feedback, box supervision."""

from __future__ import annotations

import numpy as np
import pytest

from kacl_cli.errors import InputError, KaclError, NotReadyError
from kacl_cli.models.checkpoint import read_checkpoint
from kacl_cli.models.contrastive import ContrastSpec, build_objective
from kacl_cli.models.losses import ClassificationObjective
from kacl_cli.stages.contrast.stage import (
    ContrastConfig,
    _continue_objective,
    align_positives,
    plan_rounds,
    run_contrast,
    training_data,
)
from kacl_cli.stages.radiomics.stage import PositiveFeatures


def _cfg(**kw) -> ContrastConfig:
    base = dict(epochs_per_round=1, batch_size=8, workers=0, device="cpu",
                radiomics_backend="fast")
    return ContrastConfig(**{**base, **kw})


def quiet(_text: str) -> None:
    pass


@pytest.fixture
def ws(pretrained_ws):
    return pretrained_ws


def _stages(ws) -> list[tuple[str, int]]:
    return [(s, r) for s, r in ws.catalog.query(
        "SELECT stage, round FROM runs WHERE status = 'done' AND stage IN "
        "('cam', 'radiomics', 'contrast') ORDER BY started_at")]


# -- pure pieces ---------------------------------------------------------------------------
def test_validate_rejects_bad_settings() -> None:
    for bad in (dict(rounds=0), dict(temperature=0.0), dict(lam=-1.0), dict(positives="x"),
                dict(box_supervision=1.5), dict(fold=5), dict(backbone_lr_scale=0.0),
                dict(box_supervision=0.5, positives="none")):
        with pytest.raises(InputError):
            _cfg(**bad).validate()
    _cfg().validate()


def test_plan_rounds(tiny_workspace, tmp_path) -> None:
    ws = tiny_workspace(n=8)
    with pytest.raises(NotReadyError, match="pretrain"):
        plan_rounds(ws, _cfg(rounds=2))
    for k in (0, 1):  # fake finished checkpoints: plan_rounds only looks at the files
        d = ws.checkpoint_dir(k)
        d.mkdir(parents=True)
        (d / "meta.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"")
    assert plan_rounds(ws, _cfg(rounds=3)) == [2, 3]
    assert plan_rounds(ws, _cfg(rounds=1)) == []
    assert plan_rounds(ws, _cfg(rounds=3, from_round=2)) == [2, 3]
    assert plan_rounds(ws, _cfg(rounds=2, force=True)) == [1, 2]
    with pytest.raises(NotReadyError, match="round-2"):
        plan_rounds(ws, _cfg(rounds=4, from_round=3))


def test_training_data_moves_box_images(tiny_workspace) -> None:
    ws = tiny_workspace(n=24)
    train0, val0 = training_data(ws, set())
    test_ids = [r[0] for r in ws.catalog.query(
        "SELECT image_id FROM images WHERE split = 'test' ORDER BY row")]
    moved = {val0.image_ids[0], test_ids[0]}
    train, val = training_data(ws, moved)
    assert set(train.image_ids) == set(train0.image_ids) | moved
    assert set(val.image_ids) == set(val0.image_ids) - moved
    assert len(train.rows) == len(train.labels) == len(train.image_ids)
    j = train.image_ids.index(test_ids[0])
    row = ws.catalog.query("SELECT row FROM images WHERE image_id = ?", [test_ids[0]])[0][0]
    assert train.rows[j] == row


def test_align_positives() -> None:
    pos = PositiveFeatures(["b", "d"], np.array([[1, 2], [3, 4]], np.float32), ["f1", "f2"],
                           "h", 0, 0)
    feats, has = align_positives(["a", "b", "c", "d"], pos)
    assert has.tolist() == [False, True, False, True]
    assert feats.tolist() == [[0, 0], [1, 2], [0, 0], [3, 4]]


def test_objective_continues_only_when_compatible() -> None:
    spec = ContrastSpec("radiomics", feature_dim=64, proj_dim=16, n_features=10,
                        settings_hash="s", feature_names_hash="n")
    prev = build_objective(ClassificationObjective(), spec)
    tensors = {f"objective.{k}": v for k, v in prev.state_dict().items()}
    meta = {"objective": spec.to_dict()}
    same = build_objective(ClassificationObjective(), ContrastSpec(
        "radiomics", feature_dim=64, proj_dim=16, n_features=10, settings_hash="s",
        feature_names_hash="n", temperature=0.3))  # temperature does not shape weights
    assert _continue_objective(same, same.spec, tensors, meta) == "continued"
    assert all(np.allclose(v, same.state_dict()[k[len("objective."):]])
               for k, v in tensors.items())
    other = build_objective(ClassificationObjective(), ContrastSpec(
        "radiomics", feature_dim=64, proj_dim=16, n_features=10, settings_hash="other",
        feature_names_hash="other"))
    assert _continue_objective(other, other.spec, tensors, meta) == "fresh"
    assert _continue_objective(same, same.spec, {}, {}) == "fresh"  # round 0: no objective


# -- rounds on a real (tiny) workspace -----------------------------------------------------
def test_ablation_positives_augment_and_none(ws) -> None:
    res = run_contrast(ws, _cfg(rounds=1, positives="augment", lam=0.3), note=quiet)
    assert res["trained"] == [1]
    assert _stages(ws) == [("contrast", 1)]  # no cam, no radiomics
    tensors, meta = read_checkpoint(ws.checkpoint_dir(1))
    assert meta["objective"]["positives"] == "augment"
    assert any(k.startswith("objective.image_proj.") for k in tensors)
    assert not any(k.startswith("objective.radiomics_encoder.") for k in tensors)
    # the summary is the epoch's row, and the augment objective weights its term by lambda
    total, cls, con = ws.catalog.query(
        "SELECT train_loss, cls_loss, contrastive_loss FROM epochs WHERE round = 1")[0]
    assert res["rounds"][0]["contrastive_loss"] == pytest.approx(con) and con > 0.1
    assert meta["objective"]["lam"] == 0.3
    assert total == pytest.approx(cls + 0.3 * con, rel=1e-4)

    res = run_contrast(ws, _cfg(rounds=2, positives="none"), note=quiet)
    assert res["trained"] == [2]
    tensors, meta = read_checkpoint(ws.checkpoint_dir(2))
    assert meta["objective"]["positives"] == "none"
    assert not any(k.startswith("objective.") for k in tensors)
    assert res["rounds"][1]["contrastive_loss"] is None
    assert ws.catalog.count("epochs", "round = 2 AND contrastive_loss IS NULL") == 1


def test_no_feedback_reuses_round_zero(ws) -> None:
    res = run_contrast(ws, _cfg(rounds=2, feedback=False), note=quiet)
    assert res["trained"] == [1, 2]
    assert _stages(ws) == [("contrast", 1), ("cam", 0), ("radiomics", 0), ("contrast", 2)]
    for k in (1, 2):
        _, meta = read_checkpoint(ws.checkpoint_dir(k))
        assert meta["contrast"]["radiomics_round"] == 0 and meta["contrast"]["feedback"] is False
    assert res["rounds"][1]["objective_init"] == "continued"


def test_box_supervision_round(ws) -> None:
    n_train = ws.catalog.count("images", "split = 'train'")
    res = run_contrast(ws, _cfg(rounds=1, box_supervision=0.8, fold=1), note=quiet)
    r = res["rounds"][0]
    chosen = {row[0] for row in ws.catalog.query("SELECT image_id FROM box_supervision")}
    assert chosen and r["box_supervision"]["images"] == len(chosen)
    assert ws.catalog.query("SELECT DISTINCT fold, fraction FROM box_supervision") == [(1, 0.8)]
    # whole patients only
    per_patient = ws.catalog.query(
        "SELECT i.patient_id, count(DISTINCT i.image_id), count(DISTINCT b.image_id) "
        "FROM images i JOIN gt_boxes g USING (image_id) "
        "LEFT JOIN box_supervision b USING (image_id) GROUP BY 1")
    assert all(n_in in (0, n) for _, n, n_in in per_patient)
    assert any(n_in == 0 for _, _, n_in in per_patient)  # fold 1 is held out
    # their GT boxes are the ROIs, and the ones outside train join training
    gt_images = {row[0] for row in ws.catalog.query(
        "SELECT DISTINCT image_id FROM rois WHERE round = 0 AND source = 'gt'")}
    assert gt_images == chosen
    outside = ws.catalog.count(
        "images", "split <> 'train' AND image_id IN (SELECT image_id FROM box_supervision)")
    assert r["train_images"] == n_train + outside
    assert ws.catalog.query(
        "SELECT json_extract_string(config_json, '$.roi') FROM runs WHERE stage = 'radiomics'"
    ) == [("cam+gt",)]


def test_no_positive_roi_is_a_clear_error(ws, monkeypatch) -> None:
    import kacl_cli.stages.contrast.stage as contrast

    monkeypatch.setattr(contrast._Steps, "cam", lambda self, r: {})
    monkeypatch.setattr(contrast._Steps, "radiomics", lambda self, r, roi, split: {})

    def none_found(ws_, round_, settings_hash=None):
        raise NotReadyError("no radiomics statistics")

    monkeypatch.setattr(contrast, "load_positive_features", none_found)
    with pytest.raises(KaclError, match="no positive ROI"):
        run_contrast(ws, _cfg(rounds=1), note=quiet)
    assert ws.finished_rounds() == [0]
    assert ws.catalog.query(
        "SELECT status FROM runs WHERE stage = 'contrast'") == [("failed",)]


def test_skipped_round_summary_falls_back_to_checkpoint_meta(ws) -> None:
    from kacl_cli.stages.contrast.stage import previous_summary

    run_contrast(ws, _cfg(rounds=1, positives="none"), note=quiet)
    done = previous_summary(ws, 1)
    assert done["skipped"] and done["train_images"] > 0
    ws.catalog.execute("DELETE FROM runs WHERE stage = 'contrast'")
    meta_only = previous_summary(ws, 1)
    assert meta_only["val_mean_auc"] == pytest.approx(done["val_mean_auc"])
