"""Scale-out: cost per image of ``cam`` and ``radiomics`` as the workspace grows, and sharded
radiomics with 1 vs 2 processes (+ the merge).

What it shows: per-image cost stays flat from 1k to 16k images (no stage reads or writes
anything whose cost grows with the workspace per item: chunked catalog transactions, one
HDF5 chunk per image), and ``--shard`` jobs divide the work (on a machine with free cores).

Workspaces: ``--template`` real synthetic phantoms (``kacl prepare --synthetic``) at
``--size`` px, tiled with new image ids up to each N (generating 16k phantoms would take
longer than the stages measured). The checkpoint is a randomly initialised ``tiny`` backbone
(the cost does not depend on training; its near-0.5 probabilities give many ROIs per image,
a pessimistic radiomics load). Radiomics uses the ``fast`` backend unless ``--backend``.

Sharded radiomics: separate ``kacl radiomics --shard i/n`` processes on a copy of the largest
workspace, as a SLURM array would run them (Python start-up included), then ``kacl merge``.
Besides wall time it reports each shard's CPU seconds: on a machine whose cores are taken by
other work, wall time cannot improve, but the largest shard's CPU time (+ the merge) is the
critical path on free cores or separate nodes.

Usage: .venv/bin/python -m benchmarks.scaling_bench [--sizes 1000,4000] [--full]
       [--size 64] [--template 256] [--backend fast|pyradiomics] [--threads 1]
       [--shard-images N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kacl_cli.findings import FINDINGS
from kacl_cli.models.checkpoint import model_meta, save_checkpoint
from kacl_cli.models.image_net import GRAY_MEAN, GRAY_STD, build_image_net
from kacl_cli.sharding.parts import attach
from kacl_cli.stages.cam import stage as cam_stage
from kacl_cli.stages.prepare import stage as ingest
from kacl_cli.stages.radiomics.stage import run_radiomics_stage
from kacl_cli.workspace import Workspace


def tiled_workspace(template: Workspace, root: Path, n: int) -> Workspace:
    """A workspace of ``n`` images: the template's, repeated under new image ids."""
    ws = Workspace(root)
    ws.init()
    p = template.store.n_rows()
    size = template.store.image_size()
    pixels = template.store.read_images(np.arange(p))
    for start in range(0, n, 1024):
        rows = np.arange(start, min(n, start + 1024))
        ws.store.write_images(start, pixels[rows % p], size)
    with ws.catalog.connect() as con:
        attach(con, template.catalog.path, "t")
        copies = "(SELECT range AS k FROM range(?))"
        con.execute("BEGIN")
        con.execute(f"INSERT INTO images SELECT i.* REPLACE (i.image_id || '-' || k AS "
                    f"image_id, (i.row + k * {p})::INTEGER AS row) FROM t.images i, {copies} "
                    f"WHERE i.row + k * {p} < ? ORDER BY i.row + k * {p}", [n // p + 1, n])
        con.execute(f"INSERT INTO labels SELECT l.* REPLACE (l.image_id || '-' || k AS "
                    f"image_id) FROM t.labels l JOIN t.images i USING (image_id), {copies} "
                    f"WHERE i.row + k * {p} < ?", [n // p + 1, n])
        con.execute("INSERT INTO meta SELECT * FROM t.meta WHERE key <> 'schema_version'")
        con.execute("COMMIT")
        con.execute("DETACH t")
    torch.manual_seed(0)
    model = build_image_net("tiny", n_classes=len(FINDINGS), init="none")
    save_checkpoint(ws.checkpoint_dir(0), {f"image_net.{k}": v for k, v in
                                          model.state_dict().items()},
                    model_meta("tiny", size, size, GRAY_MEAN, GRAY_STD, 0, "pretrain"))
    return ws


def kacl(*args: str) -> subprocess.Popen:
    env = {**os.environ, "KACL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "kacl_cli.app", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_all(procs: list[subprocess.Popen], t0: float) -> tuple[float, list[float]]:
    """(wall s until every process finished, CPU s of each); fails on a non-zero exit."""
    cpu = []
    for proc in procs:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise SystemExit(f"kacl failed (exit {proc.returncode}): {proc.args}")
        cpu.append(usage.ru_utime + usage.ru_stime)
    return time.perf_counter() - t0, cpu


def sharded_radiomics(base: Workspace, root: Path, backend: str) -> list[tuple]:
    """Per process count (1, 2): (n, shard wall s, CPU s per shard, merge wall s, rows)."""
    out = []
    for n in (1, 2):
        ws = Workspace(shutil.copytree(base.root, root / f"shards-{n}"))
        t0 = time.perf_counter()
        wall, cpu = run_all([kacl("radiomics", "-w", str(ws.root), "--round", "0",
                                  "--backend", backend, "--shard", f"{i}/{n}")
                             for i in range(n)], t0)
        t0 = time.perf_counter()
        merge, _ = run_all([kacl("merge", "-w", str(ws.root), "--stage", "radiomics")], t0)
        out.append((n, wall, cpu, merge, ws.catalog.count("radiomics")))
        shutil.rmtree(ws.root)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,4000", help="comma-separated image counts")
    ap.add_argument("--full", action="store_true", help="also 16000 images")
    ap.add_argument("--size", type=int, default=64, help="image size (px)")
    ap.add_argument("--template", type=int, default=256, help="distinct phantoms generated")
    ap.add_argument("--backend", default="fast", choices=("fast", "pyradiomics"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads for cam")
    ap.add_argument("--shard-images", type=int, default=None,
                    help="workspace size for the 1-vs-2-process test (default: largest)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the workspaces here")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.full and 16000 not in sizes:
        sizes.append(16000)
    torch.set_num_threads(args.threads)
    root = args.keep or Path(tempfile.mkdtemp(prefix="kacl-scaling-"))
    root.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    print(f"# scaling_bench: {os.cpu_count()} cores, load {load:.1f}; {args.size} px, tiny "
          f"backbone, radiomics backend {args.backend}, torch threads {args.threads}")
    try:
        t0 = time.perf_counter()
        template = Workspace(root / "template")
        ingest.prepare_synthetic(template, args.template, args.size, seed=0, workers=2)
        print(f"# template: {args.template} phantoms in {time.perf_counter() - t0:.0f} s")
        print()
        print("| images | cam s | cam ms/img | radiomics s | ROIs/img | radiomics ms/img "
              "| ms/ROI |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        shard_n = args.shard_images or max(sizes)
        shard_base: Workspace | None = None
        for n in sizes:
            ws = tiled_workspace(template, root / f"ws-{n}", n)
            t = time.perf_counter()
            cam_stage.run_cam_stage(ws, 0, device="cpu", batch_size=64)
            cam_s = time.perf_counter() - t
            if n == shard_n:
                shard_base = Workspace(shutil.copytree(ws.root, root / "shard-base"))
            t = time.perf_counter()
            summary = run_radiomics_stage(ws, 0, backend=args.backend, workers=1)
            rad_s = time.perf_counter() - t
            rois = summary["rois"]
            print(f"| {n} | {cam_s:.1f} | {1000 * cam_s / n:.2f} | {rad_s:.1f} | "
                  f"{rois / n:.1f} | {1000 * rad_s / n:.2f} | {1000 * rad_s / rois:.2f} |",
                  flush=True)
            if args.keep is None:
                shutil.rmtree(ws.root)
        if shard_base is not None:
            print()
            print(f"sharded radiomics on {shard_n} images (separate processes, "
                  "Python start-up included):")
            print()
            print("| processes | shards wall s | CPU s per shard (max) | merge s | total s "
                  "| wall speed-up | critical-path speed-up |")
            print("|---:|---:|---:|---:|---:|---:|---:|")
            rows = sharded_radiomics(shard_base, root, args.backend)
            base_total = rows[0][1] + rows[0][3]
            base_cpu = max(rows[0][2]) + rows[0][3]
            for n, wall, cpu, merge, _ in rows:
                print(f"| {n} | {wall:.1f} | {max(cpu):.1f} | {merge:.1f} | {wall + merge:.1f} "
                      f"| {base_total / (wall + merge):.2f}x "
                      f"| {base_cpu / (max(cpu) + merge):.2f}x |", flush=True)
            counts = {r[4] for r in rows}
            assert len(counts) == 1, f"shard counts differ: {counts}"
        print(f"\n# load average at the end: {os.getloadavg()[0]:.1f}")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
