"""--config FILE on every command, and `kacl config COMMAND` / `--run RUN_ID`."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from kacl_cli.app import app
from kacl_cli.models.checkpoint import read_meta

runner = CliRunner()


def _resolved(*args: str) -> dict:
    res = runner.invoke(app, ["config", *args])
    assert res.exit_code == 0, res.stderr
    return yaml.safe_load(res.stdout)


def test_file_values_replace_defaults_and_command_line_wins(tmp_path) -> None:
    f = tmp_path / "exp.yaml"
    f.write_text("device: cpu\nseed: 7\npretrain:\n  epochs: 3\n  batch-size: 8\n"
                 "contrast:\n  rounds: 5\n  lambda: 0.3\n")
    got = _resolved("pretrain", "--config", str(f), "--epochs", "4")["pretrain"]
    assert got["epochs"] == 4 and got["batch-size"] == 8  # command line wins; file beats default
    assert got["device"] == "cpu" and got["seed"] == 7 and got["backbone"] == "densenet121"
    c = _resolved("contrast", "--config", str(f))["contrast"]
    assert c["rounds"] == 5 and c["lambda"] == 0.3 and c["seed"] == 7
    assert _resolved("contrast")["contrast"]["rounds"] == 3  # no file: the defaults


def test_toml_tool_table_and_nested_command(tmp_path) -> None:
    f = tmp_path / "pyproject.toml"
    f.write_text('[project]\nname = "x"\n[tool.kacl]\nworkspace = "/data/ws"\n'
                 '[tool.kacl.cam]\nthreshold = 0.4\n[tool.kacl.import.xrv]\ncalibrate = true\n')
    assert _resolved("cam", "--config", str(f))["cam"]["threshold"] == 0.4
    xrv = _resolved("import", "xrv", "--config", str(f))["import"]["xrv"]
    assert xrv["calibrate"] is True and xrv["workspace"] == "/data/ws"
    # a command's own --format passes through (the printed file's format is --as)
    res = runner.invoke(app, ["config", "export", "--format", "onnx", "--as", "toml"])
    assert res.exit_code == 0 and '[tool.kacl.export]\nround' not in res.stdout
    assert 'format = "onnx"' in res.stdout


def test_printed_config_reproduces_itself(tmp_path) -> None:
    first = runner.invoke(app, ["config", "contrast", "--rounds", "4", "--positives", "augment",
                                "--no-feedback", "--as", "toml"])
    assert first.exit_code == 0, first.stderr
    f = tmp_path / "c.toml"
    f.write_text(first.stdout)
    again = runner.invoke(app, ["config", "contrast", "--config", str(f), "--as", "toml"])
    assert again.exit_code == 0, again.stderr
    strip = [ln for ln in again.stdout.splitlines() if not ln.startswith("#")]
    assert strip == [ln for ln in first.stdout.splitlines() if not ln.startswith("#")]
    assert 'positives = "augment"' in first.stdout and "feedback = false" in first.stdout


def test_config_really_drives_a_run(tiny_workspace, tmp_path) -> None:
    ws = tiny_workspace(n=8, size=32)
    f = tmp_path / "exp.yaml"
    f.write_text(f"workspace: {ws.root}\ndevice: cpu\npretrain:\n  backbone: tiny\n"
                 "  image-size: 32\n  epochs: 1\n  batch-size: 4\n  workers: 0\n")
    res = runner.invoke(app, ["pretrain", "--config", str(f), "--json"])
    assert res.exit_code == 0, res.stderr
    meta = read_meta(ws.checkpoint_dir(0))
    assert meta["backbone"] == "tiny" and meta["image_size"] == 32
    assert json.loads(res.stdout)["epochs"] == 1


@pytest.mark.parametrize("text, key", [
    ("pretrain:\n  epoch: 3\n", "pretrain.epoch"),
    ("pretrain:\n  epochs: many\n", "epochs"),
    ("pretrain:\n  epochs: 2.5\n", "epochs"),
    ("pretrain:\n  lr: true\n", "lr"),
    ("pretrain:\n  epochs: 0\n", "epochs"),         # below min=1
    ("pretrain:\n  loss: [focal]\n", "loss"),
    ("colour: red\n", "colour"),
    ("pretrian:\n  epochs: 3\n", "pretrian"),
    ("pretrain: [\n", "unreadable"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, text: str, key: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    for args in (["pretrain", "--config", str(f)], ["config", "pretrain", "--config", str(f)]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.stdout, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and key in lines[0], res.stderr


def test_missing_file_is_exit_2(tmp_path) -> None:
    res = runner.invoke(app, ["cam", "--config", str(tmp_path / "nope.toml")])
    assert res.exit_code == 2 and "no such file" in res.stderr


def test_config_of_a_recorded_run(tiny_workspace) -> None:
    ws = tiny_workspace(n=4, size=32)
    run = ws.begin("pretrain", {"epochs": 7, "batch_size": 4, "backbone": "tiny", "lr": 0.01,
                                "store_size": 32}, "fp", round_=0)
    run.finish({})
    got = _resolved("--run", run.run_id, "-w", str(ws.root))
    assert list(got) == ["pretrain"]
    p = got["pretrain"]
    assert p["epochs"] == 7 and p["batch-size"] == 4 and p["backbone"] == "tiny"
    assert p["lr"] == 0.01 and p["workspace"] == str(ws.root)
    res = runner.invoke(app, ["config", "--run", run.run_id, "-w", str(ws.root)])
    assert "store_size=32" in res.stdout  # recorded, but not an option: said, not dropped
    bad = runner.invoke(app, ["config", "--run", "nope", "-w", str(ws.root)])
    assert bad.exit_code == 2 and "no such run" in bad.stderr
