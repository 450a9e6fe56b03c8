"""`kacl radiomics` on the command line: JSON on stdout, skip, one-line errors, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from kacl_cli.app import app
from kacl_cli.findings import FINDINGS

runner = CliRunner()


def _cams(ws, round_: int = 0) -> None:
    ids = [r[0] for r in ws.catalog.query("SELECT image_id FROM images ORDER BY row")]
    with ws.catalog.connect() as con:
        for k, image_id in enumerate(ids):
            for j, f in enumerate(FINDINGS):
                box = [16.0 + k, 20.0, 80.0, 60.0] if j in (1, 4) else [None] * 4
                prob = 0.9 if j == 4 else 0.2
                con.execute(
                    "INSERT INTO cam_boxes VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1.0, 1.0, NULL)",
                    [round_, image_id, f, prob, *box],
                )


def test_help_has_an_example() -> None:
    result = runner.invoke(app, ["radiomics", "--help"])
    assert result.exit_code == 0 and "Example: kacl radiomics" in result.output


def test_json_run_then_skip_then_force(tiny_workspace) -> None:
    ws = tiny_workspace(n=4)
    _cams(ws)
    args = ["radiomics", "-w", str(ws.root), "--round", "0", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rois"] == 4 and summary["positive_rois"] == 4  # only Mass >= 0.5
    assert summary["failed"] == 0 and summary["backend"] == "fast"  # the default
    assert summary["rois_per_s"] > 0
    again = runner.invoke(app, args)
    assert again.exit_code == 0
    assert json.loads(again.stdout)["skipped"] is True
    assert "done, skipping" in again.stderr
    forced = runner.invoke(app, args + ["--force", "--min-prob", "0"])
    assert forced.exit_code == 0
    assert json.loads(forced.stdout)["rois"] == 8


def test_default_round_is_latest_cam_round_and_text_output(tiny_workspace) -> None:
    ws = tiny_workspace(n=4)
    _cams(ws, 0)
    _cams(ws, 2)
    result = runner.invoke(app, ["radiomics", "-w", str(ws.root), "--split", "train"])
    assert result.exit_code == 0, result.output
    assert "radiomics round 2" in result.stdout and "failed ROIs: 0" in result.stdout
    assert ws.catalog.query("SELECT DISTINCT round FROM rois") == [(2,)]


def test_missing_cams_one_line_error(tiny_workspace) -> None:
    ws = tiny_workspace(n=4)
    result = runner.invoke(app, ["radiomics", "-w", str(ws.root), "--round", "1"])
    assert result.exit_code == 1
    assert "kacl cam --round 1" in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_params_and_usage_errors(tiny_workspace, tmp_path: Path) -> None:
    ws = tiny_workspace(n=4)
    _cams(ws)
    params = tmp_path / "p.yaml"
    params.write_text("imageType:\n  Wavelet: {}\n")
    result = runner.invoke(app, ["radiomics", "-w", str(ws.root), "--params", str(params)])
    assert result.exit_code == 1 and "Wavelet is not supported" in result.stderr
    assert runner.invoke(app, ["radiomics", "-w", str(ws.root), "--roi", "box"]).exit_code == 2
    assert runner.invoke(app, ["radiomics", "-w", str(ws.root), "--backend", "x"]).exit_code == 2
    empty = runner.invoke(app, ["radiomics", "-w", str(tmp_path / "none")])
    assert empty.exit_code == 1 and "kacl prepare" in empty.stderr


def test_backend_choices_are_the_registry() -> None:
    """`--backend` / `--radiomics-backend` offer exactly the registered radiomics backends."""
    from kacl_cli.cli import RadiomicsBackend
    from kacl_cli.stages.radiomics.backends.base import BACKENDS

    assert tuple(b.value for b in RadiomicsBackend) == BACKENDS
    result = runner.invoke(app, ["radiomics", "--backend", "nope", "-w", "/nonexistent"])
    assert result.exit_code == 2
