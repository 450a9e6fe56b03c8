"""`kacl pretrain` end to end on a tiny workspace (tiny backbone, 32 px, 1-2 epochs)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from kacl_cli.app import app
from kacl_cli.models.checkpoint import load_image_net, read_checkpoint

runner = CliRunner()
FAST = ["--backbone", "tiny", "--image-size", "32", "--batch-size", "4", "--workers", "0",
        "--device", "cpu"]


def _pretrain(ws, *args: str):
    return runner.invoke(app, ["pretrain", "-w", str(ws.root), *FAST, *args])


def test_pretrain_writes_checkpoint_and_skips_rerun(tiny_workspace) -> None:
    ws = tiny_workspace(n=16, size=32)
    res = _pretrain(ws, "--epochs", "2", "--json")
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["epochs"] == 2 and summary["best_epoch"] in (1, 2)
    assert summary["train_images"] == 8 and summary["val_images"] == 4
    model, meta = load_image_net(ws.checkpoint_dir(0))
    assert meta["backbone"] == "tiny" and meta["image_size"] == 32 and meta["round"] == 0
    assert meta["stage"] == "pretrain" and meta["normalisation"]["std"] > 0
    assert meta["metrics"]["best_epoch"] == summary["best_epoch"]
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 14)
    assert ws.catalog.count("epochs", "round = 0") == 2
    assert ws.finished_rounds()[-1] == 0

    again = _pretrain(ws, "--epochs", "2")
    assert again.exit_code == 0
    assert "done, skipping" in again.stderr
    assert ws.catalog.count("runs", "stage = 'pretrain'") == 1

    first, _ = read_checkpoint(ws.checkpoint_dir(0))
    forced = _pretrain(ws, "--epochs", "2", "--force")
    assert forced.exit_code == 0, forced.stderr
    assert "best epoch" in forced.stdout  # the human table
    second, _ = read_checkpoint(ws.checkpoint_dir(0))
    for key, value in first.items():  # same --seed on the CPU: the same weights
        assert torch.equal(second[key], value), key
    assert ws.catalog.count("runs", "stage = 'pretrain' AND status = 'done'") == 2


def test_pretrain_bce_loss(tiny_workspace) -> None:
    ws = tiny_workspace(n=16, size=32)
    res = _pretrain(ws, "--epochs", "1", "--loss", "bce", "--no-augment", "--json")
    assert res.exit_code == 0, res.stderr
    (config,) = ws.catalog.query("SELECT config_json FROM runs WHERE stage = 'pretrain'")[0]
    assert json.loads(config)["loss"] == "bce"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--backbone", "vgg"], "expected one of"),  # a usage error: exit 2 (issue 15)
        (["--image-size", "64"], "larger than the store"),
        (["--backbone", "resnet18", "--init", "imagenet"], "never downloads"),
        (["--init", "imagenet"], "no ImageNet weights exist for backbone 'tiny'"),
        (["--init", "/nonexistent/weights.pt"], "no such file"),
        (["--device", "cuda:7"], "cuda"),
    ],
)
def test_pretrain_refuses_with_one_line(tiny_workspace, monkeypatch, tmp_path, args,
                                        message) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ws = tiny_workspace(n=8, size=32)
    res = _pretrain(ws, "--epochs", "1", *args)
    assert res.exit_code == (2 if args[0] == "--backbone" and args[1] == "vgg" else 1)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert not ws.checkpoint_dir(0).exists()


def test_pretrain_needs_a_prepared_workspace(tmp_path) -> None:
    res = runner.invoke(app, ["pretrain", "-w", str(tmp_path / "empty"), *FAST])
    assert res.exit_code == 1 and "kacl prepare" in res.stderr


def test_pretrain_help_has_example() -> None:
    res = runner.invoke(app, ["pretrain", "--help"])
    assert res.exit_code == 0 and "Example:" in res.stdout
