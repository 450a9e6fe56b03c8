"""Fixed cost of the radiomics and cam stages: a whole stage call minus the work it does.

One run, side by side, ``--repeats`` times each (issue 18 item 3: at most 0.2 s):
- ``radiomics``: ``run_radiomics_stage`` end to end (settings, ROI list, run bookkeeping,
  ROI rows, store reads, extraction, catalog commits, statistics) on ``--rois`` real NIH
  boxes placed on real sample images (the workspace of
  :mod:`benchmarks.radiomics_pyrad_bench`; phantom images when the sample is missing),
  against ``backend.extract`` of the same ROIs on the same pixels, warm, in memory;
- ``cam``: ``run_cam_stage`` with a fixed ``--threshold`` (no box-rule fit) on ``--images``
  images of a tiny-backbone checkpoint, against the same model's forward + batched Grad-CAM
  + box cut on the same batches already in memory.
Each repeat is a fresh process, as a CLI command is: it first imports what the command has
loaded before it calls the stage (``kacl_cli.app``, and torch for cam: "CLI start", not
part of the stage), then times the stage's first call ("cold": lazy imports included), a
second call ("warm": a long-lived process) and the pure work. fixed = stage - work.

Usage: .venv/bin/python -m benchmarks.fixed_cost [--rois 500] [--images 100] [--repeats 3]
       [--workers 1] [--size 256] [--sample ../shared/nih-sample] [--only radiomics|cam]
       [--compare OLD_TREE]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("KACL_NO_PROGRESS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

DEFAULT_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "nih-sample"


def _phantom_workspace(root: Path, n_rois: int, size: int):
    """Fallback without the NIH sample: phantom pixels, random boxes of NIH-like sizes."""
    import numpy as np

    from kacl_cli.findings import FINDINGS
    from kacl_cli.stages.radiomics.rois import store_box
    from kacl_cli.workspace import Workspace

    rng = np.random.default_rng(0)
    n_images = -(-n_rois // len(FINDINGS)) * 2
    ws = Workspace(root)
    ws.init()
    ws.store.write_images(0, rng.integers(0, 256, (n_images, size, size), dtype=np.uint8), size)
    rois = []
    with ws.catalog.connect() as con:
        for row in range(n_images):
            con.execute("INSERT INTO images VALUES (?, ?, ?, 'train', 0, 'PA', 50, 'M', 1024, "
                        "1024, 0.143, 0.143, NULL)", [f"{row:08d}_000.png", row, str(row)])
        for k in range(n_rois):
            row, j = k % n_images, k // n_images
            x, y = rng.uniform(0, 700, 2)
            w, h = rng.uniform(60, 320, 2)
            con.execute("INSERT INTO cam_boxes VALUES (0, ?, ?, 0.9, ?, ?, ?, ?, 1.0, 1.0, NULL)",
                        [f"{row:08d}_000.png", FINDINGS[j], x, y, w, h])
            rois.append((row, store_box((x, y, w, h), 1024, 1024, size)))
    return ws, rois


def make_radiomics(root: Path, n_rois: int, size: int, sample: Path) -> str:
    """The radiomics workspace and its ROI list (``rois.json``); returns what it holds."""
    from benchmarks.radiomics_pyrad_bench import build_workspace

    if (sample / "images").is_dir():
        _, rois = build_workspace(root, sample, n_rois, size)
        source = "real NIH boxes on sample images"
    else:
        _, rois = _phantom_workspace(root, n_rois, size)
        source = "phantom pixels (NIH sample not found)"
    (root / "rois.json").write_text(json.dumps([[r, list(b)] for r, b in rois]))
    return f"{len(rois)} ROIs ({source}) at {size} px, fast backend"


def make_cam(root: Path, n_images: int, size: int) -> str:
    """A tiny workspace and a random-weight tiny-backbone checkpoint of round 0."""
    import torch

    from kacl_cli.findings import FINDINGS
    from kacl_cli.models.checkpoint import model_meta, save_checkpoint
    from kacl_cli.models.image_net import GRAY_MEAN, GRAY_STD, build_image_net

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import write_tiny_workspace

    ws = write_tiny_workspace(root, n=n_images, size=size, orig=1024)
    torch.manual_seed(0)
    model = build_image_net("tiny", n_classes=len(FINDINGS), init="none")
    save_checkpoint(ws.checkpoint_dir(0),
                    {f"image_net.{k}": v for k, v in model.state_dict().items()},
                    model_meta("tiny", size, size, GRAY_MEAN, GRAY_STD, 0, "pretrain"))
    return f"{n_images} images at {size} px, tiny backbone, threshold 0.5, 1 torch thread"


def child_radiomics(root: Path, workers: int) -> dict[str, float]:
    t0 = time.perf_counter()
    import kacl_cli.app  # noqa: F401  - what the CLI has loaded before the command runs

    cli = time.perf_counter() - t0
    from kacl_cli.stages.radiomics.stage import run_radiomics_stage
    from kacl_cli.workspace import Workspace

    ws = Workspace(root)
    n = len(json.loads((root / "rois.json").read_text()))

    def stage() -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        s = run_radiomics_stage(ws, 0, min_prob=0.0, workers=workers, force=True)
        assert s["computed"] == n, s
        return time.perf_counter() - t, time.process_time() - c

    (cold, cold_cpu), (warm, warm_cpu) = stage(), stage()
    from kacl_cli.stages.radiomics import settings as S
    from kacl_cli.stages.radiomics.backends.base import get_backend

    rois = json.loads((root / "rois.json").read_text())
    images = list(ws.store.read_images([r for r, _ in rois]))
    boxes = [tuple(b) for _, b in rois]
    settings, backend = S.load_settings(), get_backend("fast")
    work = []
    for _ in range(2):
        t, c = time.perf_counter(), time.process_time()
        backend.extract(images, boxes, settings)
        work.append((time.perf_counter() - t, time.process_time() - c))
    return _result(cli, cold, warm, min(work), cold_cpu, warm_cpu)


def _result(cli: float, cold: float, warm: float, work: tuple[float, float], cold_cpu: float,
            warm_cpu: float) -> dict[str, float]:
    """Wall seconds, and CPU seconds of the process (all its threads: DuckDB's too), which
    other sessions' load on the shared cores inflates far less than wall time."""
    return {"cli": cli, "cold": cold, "warm": warm, "work": work[0], "cold_cpu": cold_cpu,
            "warm_cpu": warm_cpu, "work_cpu": work[1]}


def child_cam(root: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    import torch

    import kacl_cli.app  # noqa: F401

    cli = time.perf_counter() - t0
    torch.set_num_threads(1)
    from kacl_cli.stages.cam import stage as cam_stage
    from kacl_cli.workspace import Workspace

    ws = Workspace(root)

    def stage() -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        s = cam_stage.run_cam_stage(ws, 0, threshold=0.5, device="cpu", force=True)
        assert s["computed"] == ws.store.n_rows(), s
        return time.perf_counter() - t, time.process_time() - c

    (cold, cold_cpu), (warm, warm_cpu) = stage(), stage()
    import numpy as np

    from kacl_cli.findings import FINDINGS
    from kacl_cli.models.checkpoint import load_image_net, preprocess
    from kacl_cli.stages.cam.config import CamConfig
    from kacl_cli.stages.cam.gradcam import batched_gradcam
    from kacl_cli.stages.cam.localize import BoxRule

    n = ws.store.n_rows()
    batch, cpu = CamConfig().batch_size, torch.device("cpu")
    model, meta = load_image_net(ws.checkpoint_dir(0), cpu)
    pixels = torch.from_numpy(ws.store.read_images(np.arange(n)))
    size = int(meta["image_size"])
    rules = [BoxRule(0.5, "peak")] * len(FINDINGS)
    ids = np.array([f"{i:08d}_000.png" for i in range(n)], dtype=object)
    orig = np.full(n, 1024)
    work = []
    for _ in range(2):
        t, c = time.perf_counter(), time.process_time()
        for lo in range(0, n, batch):
            x = preprocess(pixels[lo:lo + batch], meta, cpu)
            logits, maps = batched_gradcam(model, x)
            cam_stage._box_columns(0, ids[lo:lo + batch], torch.sigmoid(logits).double().numpy(),
                                   maps.to(torch.float16).numpy(), rules, orig[lo:lo + batch],
                                   orig[lo:lo + batch], size, cpu)
        work.append((time.perf_counter() - t, time.process_time() - c))
    return _result(cli, cold, warm, min(work), cold_cpu, warm_cpu)


def _table(name: str, rows: list[tuple[str, dict[str, float]]]) -> None:
    print(f"{name:<10}{'repeat':>7}{'CLI start':>10}{'cold s':>8}{'warm s':>8}{'work s':>8}"
          f"{'fixed cold':>11}{'fixed warm':>11}{'cpu: cold':>10}{'warm':>7}")
    trees = len({tree for tree, _ in rows})
    for i, (tree, r) in enumerate(rows):
        print(f"{tree:<10}{i // trees + 1:>7}{r['cli']:>10.2f}{r['cold']:>8.3f}{r['warm']:>8.3f}"
              f"{r['work']:>8.3f}{r['cold'] - r['work']:>11.3f}{r['warm'] - r['work']:>11.3f}"
              f"{r['cold_cpu'] - r['work_cpu']:>10.3f}{r['warm_cpu'] - r['work_cpu']:>7.3f}")


def _child(kind: str, root: Path, workers: int, tree: Path | None = None) -> dict[str, float]:
    """One fresh process; ``tree``: another source tree's kacl_cli (``--compare``)."""
    env = dict(os.environ, PYTHONPATH=str(tree or Path(__file__).resolve().parents[1]))
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--root", str(root),
         "--workers", str(workers)], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rois", type=int, default=500)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--size", type=int, default=256, help="radiomics store size")
    ap.add_argument("--cam-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1, help="radiomics --workers")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE)
    ap.add_argument("--only", choices=("radiomics", "cam"), default=None)
    ap.add_argument("--compare", type=Path, default=None, metavar="TREE",
                    help="also time another source tree's kacl_cli (e.g. an older checkout), "
                         "interleaved repeat by repeat so both see the same load")
    ap.add_argument("--child", choices=("radiomics", "cam"), help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "radiomics":
        print(json.dumps(child_radiomics(args.root, args.workers)))
        return
    if args.child == "cam":
        print(json.dumps(child_cam(args.root)))
        return
    t_start = time.perf_counter()
    print(f"cpu cores {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}; CLI start = "
          "import kacl_cli.app (+ torch for cam) in a fresh process, outside the stage; "
          "cpu = fixed CPU seconds of the process (all threads)"
          + (f"; before = {args.compare}" if args.compare else ""))
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("radiomics", "cam"):
            if args.only not in (None, kind):
                continue
            root = Path(tmp) / kind
            what = (make_radiomics(root, args.rois, args.size, args.sample) if kind == "radiomics"
                    else make_cam(root, args.images, args.cam_size))
            print(f"{kind}: {what}" + (f", {args.workers} worker(s)" if kind == "radiomics"
                                        else ""))
            rows = []
            for _ in range(args.repeats):
                if args.compare is not None:
                    rows.append(("before", _child(kind, root, args.workers, args.compare)))
                rows.append(("now", _child(kind, root, args.workers)))
            _table(kind, rows)
    print(f"(benchmark took {time.perf_counter() - t_start:.0f} s, load average "
          f"{os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
