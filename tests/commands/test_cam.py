"""`kacl cam` on the command line: JSON on stdout, skip note on stderr, one-line errors."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from kacl_cli.app import app
from kacl_cli.findings import FINDINGS
from kacl_cli.models.checkpoint import model_meta, save_checkpoint
from kacl_cli.models.image_net import GRAY_MEAN, GRAY_STD, build_image_net

runner = CliRunner()


def _checkpoint(ws) -> None:
    torch.manual_seed(0)
    model = build_image_net("tiny", n_classes=len(FINDINGS), init="none")
    save_checkpoint(
        ws.checkpoint_dir(0), {f"image_net.{k}": v for k, v in model.state_dict().items()},
        model_meta("tiny", 32, ws.store.image_size(), GRAY_MEAN, GRAY_STD, 0, "pretrain"),
    )


def test_help_has_an_example() -> None:
    result = runner.invoke(app, ["cam", "--help"])
    assert result.exit_code == 0 and "Example: kacl cam" in result.output


def test_json_run_then_skip(tiny_workspace) -> None:
    ws = tiny_workspace(n=8, size=32)
    _checkpoint(ws)
    args = ["cam", "-w", str(ws.root), "--split", "test", "--device", "cpu", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images"] == 2 and summary["round"] == 0
    assert summary["boxes"] + summary["empty_maps"] == 2 * len(FINDINGS)
    assert ws.catalog.count("cam_boxes") == 2 * len(FINDINGS)
    again = runner.invoke(app, args)
    assert again.exit_code == 0
    assert json.loads(again.stdout)["skipped"] is True
    assert "done, skipping" in again.stderr
    human = runner.invoke(app, args[:-1] + ["--force"])
    assert human.exit_code == 0 and "cam round 0 (test): 2 images" in human.stdout


def test_missing_checkpoint_is_one_line_and_bad_threshold_is_usage(tiny_workspace) -> None:
    ws = tiny_workspace(n=4, size=32)
    result = runner.invoke(app, ["cam", "-w", str(ws.root)])
    assert result.exit_code == 1
    assert "kacl pretrain" in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    bad = runner.invoke(app, ["cam", "-w", str(ws.root), "--threshold", "0"])
    assert bad.exit_code == 2
