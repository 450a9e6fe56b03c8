"""Fast vs pyradiomics radiomics backends on the same ROIs of the real NIH box distribution.

ROIs: rows of ``BBox_List_2017.csv`` (real sizes and positions, 1024 px frame) drawn with
replacement and placed on real sample images resized to each store size (256 and 512 px by
default), exactly as the stage crops them. Both backends get the same (image, box) list:
- 1 worker: ``backend.extract`` in this process;
- N workers: the list split into N contiguous parts, one per forked process of a warm pool
  (what a stage with ``--workers N`` does), timed from submit to last result.
The fast backend runs with its compiled kernel (``KACL_RADIOMICS_KERNEL=auto``); with 1
worker its numpy path (``KACL_RADIOMICS_KERNEL=numpy``, the fallback where the kernel is not
built) is timed too. Every ROI's features are also compared (max relative difference of the
fast backend to pyradiomics over all features, |x| >= 1e-6), so a speed figure never hides a
parity loss.
Then one radiomics round on the full NIH set (112,120 images) is extrapolated from the
measured rates for a few ROIs-per-image assumptions (1 = the positive ROI only; 1.5 = a
second confident finding on half the images; 14 = every finding's CAM box).

Usage: .venv/bin/python -m benchmarks.radiomics_bench [--rois 240] [--sizes 256,512]
       [--workers 1,2] [--repeats 3] [--sample ../shared/nih-sample] [--params FILE]
(``--params kacl_cli/stages/radiomics/normalized_params.yaml``: the same with pyradiomics'
intensity normalisation, whose cost is one image statistic per image and per-ROI tables.)
"""

from __future__ import annotations

import os

# one core per worker: BLAS pools would blur the 1- vs 2-worker comparison
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.radiomics_pyrad_bench import DEFAULT_SAMPLE, NIH_IMAGES, read_boxes  # noqa: E402
from kacl_cli.imageio import load_for_store  # noqa: E402
from kacl_cli.stages.radiomics import settings as S  # noqa: E402
from kacl_cli.stages.radiomics.backends.base import get_backend  # noqa: E402
from kacl_cli.stages.radiomics.backends.fast import kernel as fast_kernel  # noqa: E402
from kacl_cli.stages.radiomics.backends.pyrad import single_threaded_sitk  # noqa: E402
from kacl_cli.stages.radiomics.rois import store_box  # noqa: E402

# Set before the pool forks, read by the workers (no pickling of the images per task).
_JOB: dict = {}


def make_rois(sample: Path, n: int, size: int, seed: int = 0) -> tuple[list, list]:
    """n (image, box) pairs: real NIH boxes on real sample images at the store size."""
    rng = np.random.default_rng(seed)
    boxes = read_boxes(sample)
    files = sorted((sample / "images").glob("*.png"))
    chosen = rng.choice(len(files), min(len(files), 24), replace=False)
    pixels = [load_for_store(files[i], size)[0] for i in chosen]
    picks = rng.choice(len(boxes), n, replace=True)
    images = [pixels[k % len(pixels)] for k in range(n)]
    rois = [store_box(tuple(boxes[b]), 1024, 1024, size) for b in picks]
    return images, rois


def _work(part: tuple[str, int, int]) -> np.ndarray:
    """Features of ROIs lo..hi through one backend; "fast-numpy" is the fast backend's
    numpy path (its compiled kernel switched off for this call)."""
    name, lo, hi = part
    single_threaded_sitk()  # as the stage's workers do: one core per worker
    backend = get_backend("fast" if name == "fast-numpy" else name)
    before = os.environ.get(fast_kernel.KERNEL_ENV)
    if name == "fast-numpy":
        os.environ[fast_kernel.KERNEL_ENV] = "numpy"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return backend.extract(_JOB["images"][lo:hi], _JOB["boxes"][lo:hi],
                                   _JOB["settings"]).features
    finally:
        if before is None:
            os.environ.pop(fast_kernel.KERNEL_ENV, None)
        else:
            os.environ[fast_kernel.KERNEL_ENV] = before


def run(name: str, workers: int, pool: ProcessPoolExecutor | None,
        repeats: int = 1) -> tuple[float, float | None, np.ndarray]:
    """All ROIs through one backend with ``workers`` processes: (wall seconds, CPU seconds
    of this process when in-process, features). The best of ``repeats`` timings is kept."""
    n = len(_JOB["boxes"])
    best_wall, best_cpu, out = np.inf, None, None
    if workers == 1:
        _work((name, 0, min(n, 2)))  # warm-up: imports, extractor
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            out = _work((name, 0, n))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if wall < best_wall:
                best_wall, best_cpu = wall, cpu
        return best_wall, best_cpu, out
    bounds = np.linspace(0, n, workers + 1).astype(int)
    parts = [(name, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    list(pool.map(_work, [(name, 0, 2)] * workers))  # warm every worker
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = np.concatenate(list(pool.map(_work, parts)))
        best_wall = min(best_wall, time.perf_counter() - t0)
    return best_wall, None, out


def max_rel_diff(ref: np.ndarray, got: np.ndarray) -> float:
    both = np.isfinite(ref) & np.isfinite(got)
    diff = np.abs(got - ref)[both] / np.maximum(np.abs(ref[both]), 1e-6)
    nan_mismatch = (np.isnan(ref) != np.isnan(got)).sum()
    return float("inf") if nan_mismatch else float(diff.max(initial=0.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rois", type=int, default=240)
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE)
    ap.add_argument("--repeats", type=int, default=3, help="timings of the fast backend")
    ap.add_argument("--params", type=Path, default=None,
                    help="radiomics params file (default: kacl's defaults)")
    args = ap.parse_args()
    if not (args.sample / "images").is_dir():
        print(f"NIH sample not found at {args.sample}: nothing to measure")
        return
    workers = [int(w) for w in args.workers.split(",")]
    settings = S.load_settings(args.params)
    _JOB["settings"] = settings
    kernel = "compiled kernel" if fast_kernel.use_kernel() else "numpy path (kernel not built)"
    which = "default settings" if args.params is None else f"settings of {args.params.name}"
    print(f"{len(S.feature_names(settings))} features ({which}), {os.cpu_count()} cpu "
          f"cores, {args.rois} ROIs per size; fast backend: {kernel}")
    rows, rates = [], {}
    for size in [int(s) for s in args.sizes.split(",")]:
        images, boxes = make_rois(args.sample, args.rois, size)
        sides = np.array([(b[2] - b[0], b[3] - b[1]) for b in boxes])
        print(f"store {size} px: ROI sides median {np.median(sides[:, 0]):.0f} x "
              f"{np.median(sides[:, 1]):.0f}, range {sides.min()}..{sides.max()} px, "
              f"mean area {np.mean(sides[:, 0] * sides[:, 1]):.0f} px")
        _JOB.update(images=images, boxes=boxes)
        pool = ProcessPoolExecutor(max(workers), mp_context=_fork()) if max(workers) > 1 else None
        try:
            for w in workers:
                t_ref, c_ref, ref = run("pyradiomics", w, pool)
                t_fast, c_fast, got = run("fast", w, pool, repeats=args.repeats)
                n = len(boxes)
                rates[(size, w)] = (n / t_ref, n / t_fast)
                cpu = f"{c_ref / c_fast:.1f}x" if c_ref and c_fast else "-"
                diff = max_rel_diff(ref, got)
                numpy_rate = numpy_ratio = "-"
                if w == 1:
                    t_np, _, got_np = run("fast-numpy", 1, None, repeats=args.repeats)
                    numpy_rate, numpy_ratio = f"{n / t_np:.1f}", f"{t_ref / t_np:.1f}x"
                    diff = max(diff, max_rel_diff(ref, got_np))
                rows.append((size, w, n, n / t_ref, n / t_fast, t_ref / t_fast, cpu,
                             numpy_rate, numpy_ratio, diff))
        finally:
            if pool is not None:
                pool.shutdown()
    print()
    print(f"{'size':>5}{'workers':>8}{'ROIs':>6}{'pyrad ROIs/s':>14}{'fast ROIs/s':>13}"
          f"{'speed-up':>10}{'(cpu time)':>11}{'numpy path':>12}{'speed-up':>10}"
          f"{'max rel diff':>14}")
    for size, w, n, r_ref, r_fast, ratio, cpu, r_np, ratio_np, diff in rows:
        print(f"{size:>5}{w:>8}{n:>6}{r_ref:>14.1f}{r_fast:>13.1f}{ratio:>9.1f}x{cpu:>11}"
              f"{r_np:>12}{ratio_np:>10}{diff:>14.1e}")
    print(f"(ROIs/s from wall time; pyradiomics timed once, fast best of {args.repeats}; "
          "cpu time: in-process runs only, robust to other load on the machine; numpy path: "
          "the fast backend without its compiled kernel, 1 worker)")
    print()
    print(f"one radiomics round on {NIH_IMAGES:,} NIH images, hours (measured rates, "
          f"{', '.join(map(str, workers))} worker(s)):")
    print(f"{'size':>5}{'ROIs/image':>11}" + "".join(
        f"{f'pyrad {w}w':>11}{f'fast {w}w':>10}" for w in workers))
    for size in sorted({k[0] for k in rates}):
        for per_image in (1.0, 1.5, 14.0):
            n = NIH_IMAGES * per_image
            cells = "".join(
                f"{n / rates[(size, w)][0] / 3600:>11.2f}{n / rates[(size, w)][1] / 3600:>10.3f}"
                for w in workers)
            print(f"{size:>5}{per_image:>11.1f}{cells}")


def _fork():
    import multiprocessing

    return multiprocessing.get_context("fork")


if __name__ == "__main__":
    main()
