"""`kacl pretrain --box-supervision F --box-loss-weight W`: boxes reach the loss, the weight
is recorded, usage errors exit 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kacl_cli.app import app
from kacl_cli.models.checkpoint import read_meta

runner = CliRunner()
FAST = ["--backbone", "tiny", "--image-size", "32", "--batch-size", "4", "--workers", "0",
        "--device", "cpu", "--epochs", "1"]


def _pretrain(ws, *args: str):
    return runner.invoke(app, ["pretrain", "-w", str(ws.root), *FAST, *args])


def _config(ws) -> dict:
    (config,) = ws.catalog.query(
        "SELECT config_json FROM runs WHERE stage = 'pretrain' ORDER BY started_at DESC")[0]
    return json.loads(config)


def test_box_loss_weight_is_recorded_and_its_term_reported(tiny_workspace) -> None:
    ws = tiny_workspace(n=24, size=32)
    res = _pretrain(ws, "--box-supervision", "1", "--box-loss-weight", "1", "--json")
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    # -log of the spatial-softmax share inside the GT boxes: > 0, and finite
    assert 0.0 < summary["box_loss"] < 50.0
    config = _config(ws)
    assert config["box_loss_weight"] == 1.0 and config["box_supervision"] == 1.0
    assert config["box_loss_form"] == "softmax"
    assert "box_loss" in read_meta(ws.checkpoint_dir(0))["metrics"]["history"][-1]
    n_box = ws.catalog.count("box_supervision")
    assert n_box > 0 and "box supervision" in res.stderr
    # the box images joined training (all box patients: fraction 1)
    assert summary["train_images"] > ws.catalog.count("images", "split = 'train'")


def test_without_the_weight_the_hash_keys_and_the_term_stay_away(tiny_workspace) -> None:
    ws = tiny_workspace(n=16, size=32)
    res = _pretrain(ws, "--json")
    assert res.exit_code == 0, res.stderr
    assert "box_loss" not in json.loads(res.stdout)
    config = _config(ws)
    assert "box_loss_weight" not in config and "box_supervision" not in config
    assert "box_loss_form" not in config


@pytest.mark.parametrize("args", [["--box-loss-weight", "-1"], ["--box-loss-weight", "nan"],
                                  ["--box-supervision", "1.5"], ["--fold", "5"]])
def test_bad_box_options_are_usage_errors(tiny_workspace, args: list[str]) -> None:
    ws = tiny_workspace(n=8, size=32)
    res = _pretrain(ws, *args)
    assert res.exit_code == 2, res.output
    assert args[0] in res.stderr and "Traceback" not in res.output
    assert ws.catalog.count("runs") == 0


def test_contrast_refuses_a_negative_box_loss_weight(tiny_workspace) -> None:
    ws = tiny_workspace(n=8, size=32)
    res = runner.invoke(app, ["contrast", "-w", str(ws.root), "--box-loss-weight", "-0.5"])
    assert res.exit_code == 2 and "--box-loss-weight" in res.stderr


def test_box_supervision_alone_gets_the_measured_default_weight(tiny_workspace) -> None:
    from kacl_cli.training.config import DEFAULT_BOX_LOSS_WEIGHT

    ws = tiny_workspace(n=16, size=32)
    res = _pretrain(ws, "--box-supervision", "1", "--json")
    assert res.exit_code == 0, res.stderr
    config = _config(ws)
    assert config["box_loss_weight"] == DEFAULT_BOX_LOSS_WEIGHT > 0
    assert "box_loss" in json.loads(res.stdout)
