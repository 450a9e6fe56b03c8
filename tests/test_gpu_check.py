"""benchmarks/gpu_check.sh --dry-run: the GPU check's commands, on the CPU with tiny settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path: Path) -> None:
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PY": sys.executable, "TORCHRUN": str(bindir / "torchrun"),
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run",
                          str(tmp_path / "check")], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    for stage in ("prepare", "bench", "pretrain", "cam", "contrast", "torchrun", "predict",
                  "total"):
        assert f"gpu_check {stage}" in out, out
    assert "dist_check: gloo x1 on cpu" in out and "img/s" in out
    assert "data path" in out  # the bench reports the data path's share of step time
    assert (tmp_path / "check" / "ws" / "checkpoints" / "round-1").is_dir()
