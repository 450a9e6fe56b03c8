"""Honest skips (issue 15 #1): "done, skipping" only when the outputs are that run's."""

from __future__ import annotations

from pathlib import Path

from kacl_cli.workspace import Workspace


def _pretrain(ws: Workspace, seed: int) -> dict:
    from kacl_cli.stages import pretrain
    from kacl_cli.training.config import TrainConfig

    train = TrainConfig(epochs=1, batch_size=8, image_size=64, workers=0, device="cpu",
                        seed=seed)
    return pretrain.run(ws, pretrain.PretrainConfig(backbone="tiny", init="none", train=train))


def test_pretrain_seed_0_1_0_trains_again(pretrained_ws) -> None:
    """The fixture trained seed 0; seed 1 overwrites round-0; seed 0 again must not skip."""
    import json

    from kacl_cli.skips import checkpoint_hash

    assert not _pretrain(pretrained_ws, 1).get("skipped")
    assert json.loads((pretrained_ws.checkpoint_dir(0) / "meta.json").read_text())
    again = _pretrain(pretrained_ws, 0)
    assert not again.get("skipped")
    assert again["checkpoint_hash"] == checkpoint_hash(pretrained_ws, 0)
    assert _pretrain(pretrained_ws, 0).get("skipped") is True  # now it is that run's


def test_radiomics_default_bin10_default_recomputes(pretrained_ws, tmp_path: Path) -> None:
    from kacl_cli.stages.cam.stage import run_cam_stage
    from kacl_cli.stages.radiomics.settings import default_settings, settings_hash
    from kacl_cli.stages.radiomics.stage import run_radiomics_stage

    ws = pretrained_ws
    run_cam_stage(ws, 0, device="cpu")
    params = tmp_path / "p.yaml"
    params.write_text("setting:\n  binWidth: 10\n")
    first = run_radiomics_stage(ws, 0)
    assert not first.get("skipped")
    assert not run_radiomics_stage(ws, 0, params=params).get("skipped")
    third = run_radiomics_stage(ws, 0)
    assert not third.get("skipped")  # the rows were binWidth 10's
    hashes = {r[0] for r in ws.catalog.query(
        "SELECT DISTINCT settings_hash FROM radiomics WHERE round = 0")}
    assert hashes == {settings_hash(default_settings())}
    assert run_radiomics_stage(ws, 0).get("skipped") is True
