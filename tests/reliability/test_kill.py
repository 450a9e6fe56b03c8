"""kill -9 at a seeded random point of each stage, then a re-run: the catalog rows, the store
and the checkpoint are those of an uninterrupted run (issue 15: this already held; it must
stay so)."""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("reliability_rows",
                                               Path(__file__).with_name("rows.py"))
rows = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rows)

STAGES = {
    "prepare": ["prepare", "--synthetic", "40", "--size", "64", "--workers", "1"],
    "pretrain": ["pretrain", "--backbone", "tiny", "--epochs", "3", "--batch-size", "8",
                 "--workers", "0", "--device", "cpu", "--force"],
    "cam": ["cam", "--round", "0", "--device", "cpu", "--batch-size", "4"],
    "radiomics": ["radiomics", "--round", "0"],
}
NEEDS = {"prepare": [], "pretrain": [], "cam": [], "radiomics": ["cam"]}


def _run(args: list[str], ws: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "KACL_NO_PROGRESS": "1"}
    return subprocess.Popen([sys.executable, "-m", "kacl_cli.app", *args, "-w", str(ws)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _finish(args: list[str], ws: Path) -> None:
    p = _run(args, ws)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err


def _inputs(stage: str, base: Path, dest: Path) -> Path | None:
    """The workspace the stage starts from (None: prepare starts from nothing)."""
    if stage == "prepare":
        return None
    shutil.copytree(base, dest)
    for before in NEEDS[stage]:
        _finish(STAGES[before], dest)
    return dest


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_kill_9_then_rerun_equals_an_uninterrupted_run(stage, pretrained_base, tmp_path) -> None:
    rng = random.Random(f"kill-{stage}")
    start = _inputs(stage, pretrained_base.root, tmp_path / "start")
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    if start is not None:
        shutil.copytree(start, clean)
        shutil.copytree(start, killed)
    _finish(STAGES[stage], clean)
    p = _run(STAGES[stage], killed)
    lock = killed / ".kacl.lock"
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text().strip()) and p.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 1.5))  # somewhere in the stage's work
    p.send_signal(signal.SIGKILL)
    p.wait()
    _finish(STAGES[stage], killed)  # resumes (the stale lock is taken over)
    assert rows.running_runs(killed) == []
    want, got = rows.snapshot(clean), rows.snapshot(killed)
    assert got == want
