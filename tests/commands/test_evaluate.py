"""`kacl evaluate` end to end on hand-written rounds: output, JSON, skip, --round all, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kacl_cli.app import app

runner = CliRunner()


def kacl(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_round_all_over_two_rounds_json_then_skip(tiny_workspace, fakes) -> None:
    ws = tiny_workspace(n=48, size=32)
    fakes.write_fake_round(ws, 0)
    fakes.write_fake_round(ws, 1, seed=4, signal=0.3, with_cams=False)
    res = kacl("evaluate", "-w", str(ws.root), "--round", "all", "--bootstrap", "30",
               "--overlays", "2", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert [d["round"] for d in doc["rounds"]] == [0, 1]
    assert doc["rounds"][0]["headline"]["mean_auc"] > doc["rounds"][1]["headline"]["mean_auc"]
    summary = Path(doc["summary_report"])
    text = summary.read_text()
    assert summary == ws.reports / "summary" / "report.html"
    for d in doc["rounds"]:
        assert Path(d["report"]).exists()
        assert f"{d['headline']['mean_auc']:.4f}" in text
    n_runs = ws.catalog.count("runs", "stage = 'evaluate'")
    assert n_runs == 2

    again = kacl("evaluate", "-w", str(ws.root), "--round", "all", "--bootstrap", "30",
                 "--overlays", "2", "--json")
    assert again.exit_code == 0
    assert "done, skipping" in again.stderr
    assert all(d["skipped"] for d in json.loads(again.stdout)["rounds"])
    assert ws.catalog.count("runs", "stage = 'evaluate'") == n_runs


def test_single_round_tables_on_stdout_and_out_dir(tiny_workspace, tmp_path, fakes) -> None:
    ws = tiny_workspace(n=48, size=32)
    fakes.write_fake_round(ws, 0, with_cams=False)
    out = tmp_path / "rep"
    res = kacl("evaluate", "-w", str(ws.root), "--round", "0", "--bootstrap", "0",
               "--out", str(out))
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "report.html").exists()
    for finding in ("Cardiomegaly", "Pneumothorax", "Hernia"):
        assert finding in res.stdout
    assert "Localization accuracy, IoU > T" in res.stdout
    assert f"mean AUC {metrics['headline']['mean_auc']:.4f}" in res.stdout
    assert f"report: {out / 'report.html'}" in res.stdout
    assert ws.catalog.count("metrics", "round = 0 AND split = 'test'") > 0


def test_bad_input_is_one_line_error(tiny_workspace) -> None:
    ws = tiny_workspace(n=8, size=32)
    res = kacl("evaluate", "-w", str(ws.root), "--round", "0")
    assert res.exit_code == 1
    assert "no cam_boxes for round 0" in res.stderr and "Traceback" not in res.output
    assert len(res.stderr.strip().splitlines()) == 1
    res = kacl("evaluate", "-w", str(ws.root), "--round", "all")
    assert res.exit_code == 1 and "nothing to evaluate" in res.stderr
    assert kacl("evaluate", "-w", str(ws.root), "--round", "x").exit_code == 2
    res = kacl("evaluate", "-w", str(ws.root / "nope"))
    assert res.exit_code == 1 and "kacl prepare" in res.stderr


@pytest.mark.slow
def test_runs_the_cam_stage_when_maps_are_missing_or_older_than_the_checkpoint(
        tiny_workspace) -> None:
    import torch

    from kacl_cli.findings import FINDINGS
    from kacl_cli.models.checkpoint import model_meta, save_checkpoint
    from kacl_cli.models.image_net import GRAY_MEAN, GRAY_STD, build_image_net

    torch.set_num_threads(1)
    ws = tiny_workspace(n=16, size=32)

    def train(seed: int) -> None:  # stands in for pretrain: a tiny random checkpoint round-0
        torch.manual_seed(seed)
        model = build_image_net("tiny", n_classes=len(FINDINGS), init="none")
        save_checkpoint(ws.checkpoint_dir(0),
                        {f"image_net.{k}": v for k, v in model.state_dict().items()},
                        model_meta("tiny", 32, 32, GRAY_MEAN, GRAY_STD, 0, "pretrain"))

    train(0)
    args = ("evaluate", "-w", str(ws.root), "--bootstrap", "0", "--overlays", "2",
            "--device", "cpu", "--json")
    res = kacl(*args)  # --round latest = 0, the only checkpoint
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["round"] == 0 and "running the cam stage" in res.stderr
    assert ws.catalog.count("runs", "stage = 'cam' AND status = 'done'") == 1
    n_test = ws.catalog.count("images", "split = 'test'")
    assert ws.catalog.count("cam_boxes", "round = 0") >= n_test * len(FINDINGS)
    assert doc["report"].endswith("round-0/report.html")
    assert kacl(*args).exit_code == 0
    assert ws.catalog.count("runs", "stage = 'cam'") == 1  # nothing stale: no new cam run

    train(1)  # re-trained round: its maps are stale, so evaluate re-runs cam and re-evaluates
    res = kacl(*args)
    assert res.exit_code == 0, res.output
    assert ws.catalog.count("runs", "stage = 'cam' AND status = 'done'") == 2
    assert not json.loads(res.stdout)["skipped"]


def test_single_round_json_skip_still_prints_the_document(tiny_workspace, fakes) -> None:
    """A script reading `evaluate --json` must get the metrics on a re-run too (skipped)."""
    ws = tiny_workspace(n=48, size=32)
    fakes.write_fake_round(ws, 0)
    args = ("evaluate", "-w", str(ws.root), "--round", "0", "--bootstrap", "20", "--json")
    first = kacl(*args)
    assert first.exit_code == 0, first.output
    again = kacl(*args)
    assert again.exit_code == 0 and "done, skipping" in again.stderr
    doc, doc0 = json.loads(again.stdout), json.loads(first.stdout)
    assert doc["skipped"] is True and doc0["skipped"] is False
    assert doc["headline"] == doc0["headline"]
