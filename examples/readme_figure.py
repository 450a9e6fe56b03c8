"""Make docs/img/overlays.png, the README's picture: a demo-like run's Grad-CAM overlays.

Runs (or reuses) a small phantom workspace: prepare -> pretrain (tiny backbone) -> cam ->
evaluate's overlay grid (ground truth green, predicted box red dashed), saved as a small PNG.

    python examples/readme_figure.py [WORKSPACE] [--images 1000] [--epochs 6]

The committed picture: 1000 phantoms at 128 px (seed 0), tiny backbone, 6 epochs (best 3),
round 0, test split.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "docs" / "img" / "overlays.png"


def kacl(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "kacl_cli.app", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workspace", nargs="?", default="readme-workspace")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--round", type=int, default=0)
    a = ap.parse_args()
    from kacl_cli.stages.evaluate.report import overlay_figure
    from kacl_cli.stages.evaluate.stage import load_eval_data, pair_overlaps
    from kacl_cli.workspace import Workspace

    w = ["-w", a.workspace]
    ws = Workspace(a.workspace)
    if not ws.exists():  # an existing demo workspace is reused as it is
        kacl("prepare", *w, "--synthetic", str(a.images), "--size", "128", "--seed", "0")
    if a.round not in ws.finished_rounds():
        kacl("pretrain", *w, "--backbone", "tiny", "--epochs", str(a.epochs), "--batch-size",
             "32", "--device", "cpu")
    kacl("cam", *w, "--round", str(a.round), "--split", "test", "--device", "cpu")
    data = load_eval_data(ws, a.round, "test")
    iou, _ = pair_overlaps(data.pair_pred, data.pair_gt)
    fig = overlay_figure(ws, data, iou, max_overlays=4)
    if fig is None:
        raise SystemExit("no overlays: no GT boxes on the test split or no stored maps")
    fig.set_size_inches(10, 3.2)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=80, bbox_inches="tight", metadata={"Software": None})
    from PIL import Image  # a 128-colour palette keeps the README light (< 200 kB)

    Image.open(OUT).convert("RGB").quantize(colors=128).save(OUT, optimize=True)
    print(f"{OUT} ({OUT.stat().st_size // 1024} kB)")


if __name__ == "__main__":
    main()
