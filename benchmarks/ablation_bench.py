"""Ablation benchmark: ``kacl study`` on freshly prepared phantoms (a thin wrapper).

Prepares one phantom workspace (v2 generator, optional label noise) under ``--keep`` (or a
temp dir) and runs :func:`kacl_cli.stages.study.run_study` on it: per seed a shared round 0,
then the settings none / augment / radiomics / radiomics-nofeedback / oracle (positive
control) / shuffled (negative control), each a sub-workspace sharing the one store.h5; the
table gives paired differences against ``none`` with 95% CIs pooled over seeds and the
decision rule. Re-running with the same ``--keep`` continues unfinished cells. What the
settings mean, the decision rule and measured results: docs/contrast.md ("Study").

Usage: .venv/bin/python -m benchmarks.ablation_bench [--images 320] [--size 64] [--seeds 5]
       [--label-noise 0.03] [--label-fraction 0.5] [--difficulty 0.3] [--keep DIR]
       [any `kacl study` option, e.g. --settings none,radiomics,oracle,shuffled --rounds 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KACL_NO_PROGRESS", "1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=320)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--difficulty", type=float, default=0.3)
    ap.add_argument("--enrich", type=float, default=0.5)
    ap.add_argument("--label-noise", type=float, default=0.03)
    ap.add_argument("--generator", type=int, default=2)
    ap.add_argument("--keep", type=Path, default=None, help="workspace dir (default: temp)")
    args, study_args = ap.parse_known_args(argv)

    from typer.main import get_command

    from kacl_cli.app import app
    from kacl_cli.stages.prepare.stage import prepare_synthetic
    from kacl_cli.workspace import Workspace

    root = args.keep or Path(tempfile.mkdtemp(prefix="kacl-ablation-")) / "ws"
    t0 = time.perf_counter()
    prepare_synthetic(Workspace(root), args.images, size=args.size, seed=0,
                      difficulty=args.difficulty, enrich=args.enrich, workers=2,
                      generator=args.generator, label_noise=args.label_noise)
    print(f"prepared {args.images} phantoms (v{args.generator}, {args.size} px) in "
          f"{time.perf_counter() - t0:.0f} s at {root}", file=sys.stderr)
    defaults = ["--label-fraction", "0.5", "--seeds", "5"]
    given = {a.split("=")[0] for a in study_args if a.startswith("--")}
    extra = [x for i in range(0, len(defaults), 2) for x in defaults[i:i + 2]
             if defaults[i] not in given]
    cmd = get_command(app)
    return cmd.main(["study", "-w", str(root), *extra, *study_args], standalone_mode=False) \
        or 0


if __name__ == "__main__":
    sys.exit(main())
