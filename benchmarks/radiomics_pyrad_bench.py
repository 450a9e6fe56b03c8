"""Radiomics backend throughput, alone and in the stage, on ROIs of the real NIH box sizes.

ROIs: the rows of ``BBox_List_2017.csv`` (real sizes and positions, 1024 px frame) placed on
real sample images resized to the store resolution (256 px by default), written as hand-made
``cam_boxes`` rows into a throw-away workspace. Two measurements:
- ``backend``: ``extract`` alone, in-process (no I/O, no catalog); pyradiomics by default,
  ``--backend fast`` for the default backend of the stage;
- ``stage``: ``run_radiomics_stage`` end to end (store reads, worker pool, catalog commits)
  with 1 and 2 worker processes.
Then the cost of one round on the full NIH set (112,120 images) is extrapolated for a few
ROIs-per-image assumptions (1 = positive ROI only; 1.5 = the default --min-prob 0.5 with a
fraction of images having a second confident finding; 14 = --min-prob 0, every map's box).

Usage: .venv/bin/python -m benchmarks.radiomics_pyrad_bench [--rois 240] [--size 256]
       [--workers 1,2] [--backend pyradiomics|fast] [--sample ../shared/nih-sample]
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from kacl_cli.findings import FINDINGS
from kacl_cli.imageio import load_for_store
from kacl_cli.stages.radiomics import settings as S
from kacl_cli.stages.radiomics.backends.base import BACKENDS, get_backend
from kacl_cli.stages.radiomics.rois import store_box
from kacl_cli.stages.radiomics.stage import run_radiomics_stage
from kacl_cli.workspace import Workspace

NIH_IMAGES = 112_120
DEFAULT_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "nih-sample"


def read_boxes(sample: Path) -> np.ndarray:
    with open(sample / "BBox_List_2017.csv", newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        return np.array([[float(v) for v in r[2:6]] for r in reader if r], dtype=np.float64)


def build_workspace(root: Path, sample: Path, n_rois: int, size: int,
                    seed: int = 0) -> tuple[Workspace, list[tuple[int, tuple]]]:
    """Images + cam_boxes rows: ``n_rois`` real NIH boxes spread over sample images."""
    rng = np.random.default_rng(seed)
    boxes = read_boxes(sample)
    files = sorted((sample / "images").glob("*.png"))
    per_image = len(FINDINGS)
    n_images = min(len(files), -(-n_rois // per_image) * 2)
    chosen = [files[i] for i in rng.choice(len(files), n_images, replace=False)]
    ws = Workspace(root)
    ws.init()
    pixels, rois = [], []
    picks = rng.choice(len(boxes), n_rois, replace=True)
    with ws.catalog.connect() as con:
        for row, path in enumerate(chosen):
            px, w, h = load_for_store(path, size)
            pixels.append(px)
            con.execute(
                "INSERT INTO images VALUES (?, ?, ?, 'train', 0, 'PA', 50, 'M', ?, ?, 0.143, "
                "0.143, ?)", [path.name, row, path.name[:8], w, h, str(path)])
        for k, b in enumerate(picks):
            row, j = k % n_images, k // n_images
            x, y, w, h = boxes[b]
            con.execute(
                "INSERT INTO cam_boxes VALUES (0, ?, ?, 0.9, ?, ?, ?, ?, 1.0, 1.0, NULL)",
                [chosen[row].name, FINDINGS[j], x, y, w, h])
            rois.append((row, store_box((x, y, w, h), 1024, 1024, size)))
    ws.store.write_images(0, np.stack(pixels), size)
    return ws, rois


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rois", type=int, default=240)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE)
    ap.add_argument("--backend", default="pyradiomics", choices=sorted(BACKENDS))
    args = ap.parse_args()
    if not (args.sample / "images").is_dir():
        print(f"NIH sample not found at {args.sample}: nothing to measure")
        return
    os.environ.setdefault("KACL_NO_PROGRESS", "1")
    settings = S.load_settings()
    with tempfile.TemporaryDirectory() as tmp:
        ws, rois = build_workspace(Path(tmp) / "ws", args.sample, args.rois, args.size)
        sides = np.array([(b[2] - b[0], b[3] - b[1]) for _, b in rois])
        print(f"{len(rois)} ROIs of the NIH GT-box distribution at {args.size} px: "
              f"median {np.median(sides[:, 0]):.0f} x {np.median(sides[:, 1]):.0f} px, "
              f"range {sides.min()}..{sides.max()} px; {len(S.feature_names(settings))} "
              f"features, backend {args.backend}, cpu cores {os.cpu_count()}, load average "
              f"{os.getloadavg()[0]:.1f}")
        images = ws.store.read_images([r for r, _ in rois])
        backend = get_backend(args.backend)
        backend.extract([images[0]], [rois[0][1]], settings)  # warm-up (imports, extractor)
        t0 = time.perf_counter()
        res = backend.extract(list(images), [b for _, b in rois], settings)
        t_backend = time.perf_counter() - t0
        results = [("backend (in-process)", 1, len(rois), t_backend, res.n_failed)]
        for w in [int(v) for v in args.workers.split(",")]:
            s = run_radiomics_stage(ws, 0, min_prob=0.0, workers=w, force=True,
                                    backend=args.backend)
            results.append((f"stage, {w} worker(s)", w, s["computed"], s["seconds"],
                            s["failed"]))
    print()
    print(f"{'path':<24}{'ROIs':>6}{'seconds':>9}{'ROIs/s':>9}{'s/1000 ROIs':>13}{'failed':>8}")
    for name, _, n, sec, failed in results:
        print(f"{name:<24}{n:>6}{sec:>9.2f}{n / sec:>9.1f}{1000 * sec / n:>13.1f}{failed:>8}")
    print()
    print(f"one round on {NIH_IMAGES:,} NIH images (stage rates above, linear in workers):")
    print(f"{'ROIs/image':>10}{'ROIs':>12}" + "".join(
        f"{f'{w} worker(s) h':>16}" for _, w, *_ in results[1:]) + f"{'32 workers h*':>15}")
    best = max(results[1:], key=lambda r: r[2] / r[3] / r[1])
    per_worker = best[2] / best[3] / best[1]
    for per_image in (1.0, 1.5, 14.0):
        n = NIH_IMAGES * per_image
        cells = "".join(f"{n / (r[2] / r[3]) / 3600:>16.2f}" for r in results[1:])
        print(f"{per_image:>10.1f}{n:>12,.0f}{cells}{n / (per_worker * 32) / 3600:>15.2f}")
    print("* best measured per-worker rate x 32, assuming 32 free cores and linear scaling")


if __name__ == "__main__":
    main()
