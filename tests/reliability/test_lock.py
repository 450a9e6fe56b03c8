"""One writer per workspace (kacl_cli.lock): two writers, the busy line, stale locks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from kacl_cli.errors import KaclError
from kacl_cli.lock import LOCK_NAME, WorkspaceBusy, workspace_lock

REPO = Path(__file__).resolve().parents[2]


def _kacl(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "KACL_NO_PROGRESS": "1"}
    return subprocess.Popen([sys.executable, "-m", "kacl_cli.app", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_writers_exactly_one_works(pretrained_ws) -> None:
    root = pretrained_ws.root
    args = ("pretrain", "--backbone", "tiny", "--epochs", "3", "--batch-size", "8",
            "--workers", "0", "--device", "cpu", "--force", "-w", str(root))
    first = _kacl(*args)
    lock = root / LOCK_NAME
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until the first holds the lock
        if lock.exists() and lock.read_text().strip():
            break
        assert first.poll() is None, first.communicate()
        time.sleep(0.05)
    holder = json.loads(lock.read_text())
    assert holder["pid"] == first.pid and holder["command"] == "pretrain"
    second = _kacl(*args)
    out2, err2 = second.communicate(timeout=120)
    out1, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    assert second.returncode == 1
    lines = err2.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err2
    assert lines[0] == (f"error: workspace busy: kacl pretrain, pid {first.pid} on "
                        f"{socket.gethostname()} since {holder['started']}")
    con = duckdb.connect(str(root / "catalog.duckdb"), read_only=True)
    try:
        status = con.execute("SELECT status, count(*) FROM runs WHERE stage = 'pretrain' "
                             "GROUP BY status ORDER BY status").fetchall()
    finally:
        con.close()
    assert status == [("done", 2)]  # the fixture's run and the first writer's; none running
    assert lock.read_text() == ""  # released on exit


def test_read_only_commands_do_not_take_the_lock(pretrained_ws, tmp_path) -> None:
    """predict (and evaluate on finished rounds) run beside a writer."""
    from PIL import Image

    img = tmp_path / "a.png"
    Image.new("L", (64, 64), 90).save(img)
    with workspace_lock(pretrained_ws.root, "pretrain"):
        p = _kacl("predict", "--device", "cpu", "--json", "-w", str(pretrained_ws.root),
                  str(img))
        out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert json.loads(out)["n_failed"] == 0


def test_stale_lock_of_a_dead_pid_is_taken_over_with_a_note(tmp_path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({
        "pid": dead.pid, "host": socket.gethostname(), "command": "cam",
        "started": "2026-01-01 00:00:00 UTC"}))
    notes: list[str] = []
    with workspace_lock(tmp_path, "radiomics", note=notes.append):
        held = json.loads((tmp_path / LOCK_NAME).read_text())
        assert held["pid"] == os.getpid() and held["command"] == "radiomics"
    assert len(notes) == 1 and "stale" in notes[0] and f"pid {dead.pid}" in notes[0]


def test_lock_of_another_host_is_not_taken_over(tmp_path) -> None:
    (tmp_path / LOCK_NAME).write_text(json.dumps({
        "pid": 1, "host": "elsewhere", "command": "prepare", "started": "T"}))
    with pytest.raises(WorkspaceBusy, match="kacl prepare, pid 1 on elsewhere since T"):
        with workspace_lock(tmp_path, "cam"):
            pass


def test_lock_is_reentrant_in_one_process(tmp_path) -> None:
    """contrast runs cam and radiomics in-process under its own lock."""
    with workspace_lock(tmp_path, "contrast"):
        with workspace_lock(tmp_path, "cam"):
            assert json.loads((tmp_path / LOCK_NAME).read_text())["command"] == "contrast"
        assert (tmp_path / LOCK_NAME).read_text()
    assert (tmp_path / LOCK_NAME).read_text() == ""


def test_shards_lock_only_themselves(tmp_path) -> None:
    with workspace_lock(tmp_path, "cam", "0/2"):
        with workspace_lock(tmp_path, "cam", "1/2"):
            pass  # another shard of the same job: fine
        code = ("from kacl_cli.lock import workspace_lock\n"
                f"with workspace_lock({str(tmp_path)!r}, 'cam', '0/2'): pass\n")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
        assert p.returncode != 0 and "WorkspaceBusy" in p.stderr


def test_workspace_that_is_a_file_is_one_line(tmp_path) -> None:
    f = tmp_path / "ws"
    f.write_text("x")
    with pytest.raises(KaclError, match="is a file, not a directory"):
        with workspace_lock(f, "cam"):
            pass


def test_a_crashed_command_leaves_no_run_running(pretrained_ws, monkeypatch) -> None:
    """A non-KaclError inside a stage (a torch error) closes its run as failed."""
    from typer.testing import CliRunner

    from kacl_cli.app import app
    from kacl_cli.training import fit as fit_mod

    def boom(**kwargs):
        raise RuntimeError("CUDA error: device-side assert")

    monkeypatch.setattr(fit_mod, "fit", boom)
    r = CliRunner().invoke(app, ["pretrain", "--backbone", "tiny", "--epochs", "1",
                                 "--device", "cpu", "--workers", "0", "--force", "-w",
                                 str(pretrained_ws.root)])
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1 and "internal error: RuntimeError" in r.stderr
    assert pretrained_ws.catalog.count("runs", "status = 'running'") == 0
    assert pretrained_ws.catalog.count("runs", "stage = 'pretrain' AND status = 'failed'") == 1
