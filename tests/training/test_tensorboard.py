"""--tensorboard DIR on pretrain/contrast: per-epoch scalars, optional dependency."""

from __future__ import annotations

import sys

import pytest
import yaml
from typer.testing import CliRunner

from kacl_cli.app import app
from kacl_cli.training import callbacks
from kacl_cli.training import tensorboard as tb

runner = CliRunner()
FAST = ["--backbone", "tiny", "--image-size", "32", "--batch-size", "4", "--workers", "0",
        "--device", "cpu"]


class FakeWriter:
    """Records what a SummaryWriter would have written."""

    made: list[FakeWriter] = []

    def __init__(self, log_dir: str):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_pretrain_writes_scalars_per_epoch(tiny_workspace, tmp_path, monkeypatch) -> None:
    FakeWriter.made.clear()
    monkeypatch.setattr(tb, "summary_writer_class", lambda: FakeWriter)
    ws = tiny_workspace(n=16, size=32)
    res = runner.invoke(app, ["pretrain", "-w", str(ws.root), *FAST, "--epochs", "2",
                              "--tensorboard", str(tmp_path / "tb")])
    assert res.exit_code == 0, res.stderr
    (writer,) = FakeWriter.made
    assert writer.log_dir == str(tmp_path / "tb" / "pretrain-round-0") and writer.closed
    tags = {(tag, step) for tag, _, step in writer.scalars}
    for tag in ("loss/train", "loss/cls", "loss/val", "lr", "throughput/images_per_s"):
        assert {(tag, 1), (tag, 2)} <= tags, tag
    rows = ws.catalog.query("SELECT epoch, train_loss, lr FROM epochs WHERE round = 0")
    logged = {(t, s): v for t, v, s in writer.scalars}
    for epoch, loss, lr in rows:
        assert logged[("loss/train", epoch)] == pytest.approx(loss)
        assert logged[("lr", epoch)] == pytest.approx(lr)
    assert callbacks._CALLBACKS == []  # removed when the command ended


def test_missing_tensorboard_is_one_clear_line(tiny_workspace, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import -> ImportError
    ws = tiny_workspace(n=8, size=32)
    res = runner.invoke(app, ["pretrain", "-w", str(ws.root), *FAST, "--epochs", "1",
                              "--tensorboard", str(tmp_path / "tb")])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'kacl[tensorboard]'" in lines[0]
    assert not ws.checkpoint_dir(0).exists()  # refused before any work


def test_contrast_has_the_option_and_config_files_may_set_it(tmp_path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(f"contrast:\n  tensorboard: {tmp_path / 'tb'}\n")
    res = runner.invoke(app, ["config", "contrast", "--config", str(f)])
    assert res.exit_code == 0, res.stderr
    assert yaml.safe_load(res.stdout)["contrast"]["tensorboard"] == str(tmp_path / "tb")
    bad = runner.invoke(app, ["config", "cam", "--config", str(f.with_name("x.yaml"))])
    assert bad.exit_code == 2


def test_real_tensorboard_event_files(tiny_workspace, tmp_path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard not installed "
                        "(pip install 'kacl[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ws = tiny_workspace(n=16, size=32)
    res = runner.invoke(app, ["pretrain", "-w", str(ws.root), *FAST, "--epochs", "2",
                              "--tensorboard", str(tmp_path / "tb")])
    assert res.exit_code == 0, res.stderr
    acc = EventAccumulator(str(tmp_path / "tb" / "pretrain-round-0"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss/train")] == [1, 2]
