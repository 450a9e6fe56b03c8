"""prepare throughput and store read speed (and, optionally, the phantom difficulty curve).

1. ``kacl prepare`` on 1024 x 1024 PNGs (phantoms written once into benchmarks/out/, or the real
   NIH sample with ``--nih DIR``) with ``--workers W``, end to end (CSV parse, pool start-up,
   store + catalog commits), against the raw rate of decoding + resizing the same files with
   ``load_for_store`` in a warm pool of the same W processes. Target: >= 0.8 of raw.
2. Training-batch reads: random batches of 64 rows through ``ImageReader`` from the prepared
   256-px store, against decoding + resizing the PNGs of the same batches each time (one
   process each, as one DataLoader worker would). Target: >= 20x.
3. ``--calibrate``: mean test AUC of a logistic regression on 32 x 32 downsampled phantoms per
   difficulty (the "plain classifier" that the default difficulty should neither fail nor
   saturate).

Run: ``.venv/bin/python -m benchmarks.prepare_bench [--n 200] [--workers 2] [--nih DIR
[--copies K]]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kacl_cli.imageio import load_for_store
from kacl_cli.stages.prepare import nih, phantoms
from kacl_cli.stages.prepare import stage as ingest
from kacl_cli.stages.prepare.nih import scan_images
from kacl_cli.store import ImageReader
from kacl_cli.workspace import Workspace

OUT = Path(__file__).resolve().parent / "out"


def phantom_folder(n: int, size: int, workers: int) -> Path:
    """n phantoms of size px as an NIH folder, generated once and reused."""
    root = OUT / f"phantoms-{n}-{size}"
    expect = {"n": n, "size": size, "seed": 0, "generator": phantoms.GENERATOR_VERSION}
    if not phantoms.release_is_complete(root, expect):
        if root.exists():
            shutil.rmtree(root)
        t = time.perf_counter()
        phantoms.write_release(root, n, size, seed=0, enrich=0.3, workers=workers)
        print(f"# generated {n} phantoms at {size} px in {time.perf_counter() - t:.0f} s "
              f"({workers} workers)", file=sys.stderr)
    return root


def replicated_nih(src: Path, copies: int) -> Path:
    """``src`` (an NIH folder) with every image present ``copies`` times, as a new patient.

    Why: the real sample has 95 images, so prepare's per-run costs (reading the 112k-row
    label CSV, pool start-up, catalog) weigh as if the release were 95 images. Copies are the
    same real PNGs (same decode cost) under new ids; each copy gets the CSV row of its original
    with the image id and patient id changed, and joins the original's official list. Written
    once into benchmarks/out/ and reused.
    """
    root = OUT / f"nih-x{copies}-v2"
    done = root / ".complete"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    (root / "images").mkdir(parents=True)
    present = scan_images(src)
    for name in (nih.BBOX_FILE, nih.TRAIN_VAL_LIST, nih.TEST_LIST):
        if (src / name).exists():
            shutil.copyfile(src / name, root / name)
    label_file = nih.find_labels_file(src)
    lines = label_file.read_text().splitlines()
    rows = {line.split(",", 1)[0]: line for line in lines[1:]}
    test = (set((src / nih.TEST_LIST).read_text().split()) if (src / nih.TEST_LIST).exists()
            else set())
    extra, extra_test, extra_train = [], [], []
    for name, path in present.items():
        shutil.copyfile(path, root / "images" / name)
        pid, follow = name.split("_", 1)
        for k in range(1, copies):
            new_pid = k * 100_000 + int(pid)
            new = f"{new_pid:08d}_{follow}"
            shutil.copyfile(path, root / "images" / new)
            f = rows[name].split(",")
            f[0], f[3] = new, str(new_pid)
            extra.append(",".join(f))
            (extra_test if name in test else extra_train).append(new)
    # In image-id order, as the release's own file is: prepare decodes ahead in file-name
    # order and drops that stream when the label file lists the images in another order.
    body = sorted(lines[1:] + extra, key=lambda line: line.split(",", 1)[0])
    (root / label_file.name).write_text("\n".join([lines[0], *body]) + "\n")
    for list_name, ids in ((nih.TEST_LIST, extra_test), (nih.TRAIN_VAL_LIST, extra_train)):
        if (root / list_name).exists():
            with open(root / list_name, "a") as fh:
                fh.write("".join(i + "\n" for i in ids))
    done.touch()
    return root


def raw_rate(paths: list[str], size: int, workers: int) -> float:
    """images/s of decode + resize alone, pool already started (its start-up not counted)."""
    jobs = [(p, size) for p in paths]
    if workers <= 1:
        t = time.perf_counter()
        for p, s in jobs:
            load_for_store(p, s)
        return len(jobs) / (time.perf_counter() - t)
    with ingest.decode_pool(workers) as pool:
        pool.map(abs, range(workers * 4))  # warm: workers forked and idle
        t = time.perf_counter()
        for _ in pool.imap(_load, jobs, chunksize=4):
            pass
        return len(jobs) / (time.perf_counter() - t)


def _load(job: tuple[str, int]) -> None:
    load_for_store(job[0], job[1])


def bench_prepare(root: Path, size: int, workers: int, repeats: int,
                  compressions: list[str]) -> tuple[list[tuple], Path]:
    """Raw rate and prepare rate (once per store compression), interleaved ``repeats`` times;
    the ratio is taken within each run, and best of each is compared too.

    Best-of-k because the machine is shared: other jobs only ever make a run slower, so the
    fastest run is the closest to what the code itself costs.
    """
    paths = [str(p) for p in scan_images(root).values()]
    raw_1 = raw_rate(paths, size, 1)
    raws: list[float] = []
    walls: dict[str, list[float]] = {c: [] for c in compressions}
    loops: dict[str, list[float]] = {c: [] for c in compressions}
    store_bytes: dict[str, int] = {}
    tmp = Path(tempfile.mkdtemp(prefix="kacl-prepare-bench-"))
    for r in range(repeats):
        raws.append(raw_rate(paths, size, workers))
        for c in compressions:
            ws = Workspace(tmp / f"ws{r}-{c}")
            t = time.perf_counter()
            summary = ingest.prepare_nih(ws, root, size=size, workers=workers, compression=c)
            walls[c].append(summary["ingested"] / (time.perf_counter() - t))
            loops[c].append(summary["images_per_s"])
            store_bytes[c] = ws.store.path.stat().st_size
    n = summary["ingested"]
    raw_w = max(raws)
    rows = [
        ("images (1024 px PNG)", f"{n}"),
        ("raw decode+resize, 1 process", f"{raw_1:.1f} img/s"),
        (f"raw decode+resize, {workers} processes (warm pool, best of {repeats})",
         f"{raw_w:.1f} img/s  (runs: {', '.join(f'{x:.0f}' for x in raws)})"),
    ]
    for c in compressions:
        wall, loop = max(walls[c]), max(loops[c])
        rows += [
            (f"kacl prepare --workers {workers} --compression {c}, end to end "
             f"(best of {repeats})",
             f"{wall:.1f} img/s  (runs: {', '.join(f'{x:.0f}' for x in walls[c])})"),
            ("  ratio to raw (target >= 0.8)", f"{wall / raw_w:.2f}"),
            ("  ratio within each run (prepare_k / raw_k)",
             ", ".join(f"{w / r:.2f}" for w, r in zip(walls[c], raws, strict=True))),
            ("  its ingest loop alone (after the CSV parse; decoding starts before)",
             f"{loop:.1f} img/s"),
            ("  ratio to raw", f"{loop / raw_w:.2f}"),
            ("  store.h5 per image", f"{store_bytes[c] / n / 1024:.1f} KiB"),
        ]
    keep = tmp / f"ws0-{compressions[0]}"
    for d in tmp.iterdir():
        if d != keep:
            shutil.rmtree(d)
    return rows, keep


def bench_reads(ws: Workspace, root: Path, size: int, batches: int, batch: int) -> list[tuple]:
    """Random training batches from the store vs. decoding their PNGs again.

    Two store paths: ``reader[row]`` per item (what ``StoreDataset.__getitem__`` does inside a
    DataLoader) and ``reader.batch(rows)`` (h5py fancy indexing, used by batch stages).
    """
    rng = np.random.default_rng(0)
    ids_rows = ws.catalog.query("SELECT row, source_path FROM images ORDER BY row")
    rows = np.array([r[0] for r in ids_rows])
    paths = [r[1] for r in ids_rows]
    k = min(batch, len(rows))
    picks = [rng.choice(len(rows), size=k, replace=False) for _ in range(batches)]
    reader = ImageReader(ws.store.path)
    reader[int(rows[0])]  # open once, as a DataLoader worker does

    def rate(fn, items) -> float:
        t = time.perf_counter()
        for p in items:
            out = fn(p)
        assert out.shape == (k, size, size)
        return len(items) * k / (time.perf_counter() - t)

    per_item = rate(lambda p: np.stack([reader[int(rows[i])] for i in p]), picks)
    fancy = rate(lambda p: reader.batch(rows[p]), picks[: max(1, batches // 5)])
    # Decoding is slow: fewer batches give the same rate.
    png = rate(lambda p: np.stack([load_for_store(paths[i], size)[0] for i in p]),
               picks[: max(1, batches // 10)])
    reader.close()
    return [
        (f"store, {k} random rows via ImageReader[row] ({size} px)", f"{per_item:.0f} img/s"),
        (f"store, {k} random rows via ImageReader.batch", f"{fancy:.0f} img/s"),
        ("PNG decode+resize of the same batches", f"{png:.1f} img/s"),
        ("  speed-up of ImageReader[row] (target >= 20x)", f"{per_item / png:.0f}x"),
        ("  speed-up of ImageReader.batch", f"{fancy / png:.1f}x"),
    ]


def calibrate(n: int, size: int, difficulties: list[float]) -> list[tuple]:
    """Mean/min/max test AUC of per-finding logistic regressions on 32 x 32 pixels."""
    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    from kacl_cli.findings import FINDINGS

    specs = phantoms.plan(n, seed=0, enrich=0.5)
    y = np.array([[f in s.findings for f in FINDINGS] for s in specs])
    test = np.array([s.patient % 5 == 0 for s in specs])  # by patient
    rows = []
    for d in difficulties:
        x = np.array([np.asarray(Image.fromarray(phantoms.render(s, size, d)[0]).resize(
            (32, 32), Image.Resampling.BILINEAR), np.float32).ravel() for s in specs])
        sc = StandardScaler().fit(x[~test])
        xtr, xte = sc.transform(x[~test]), sc.transform(x[test])
        aucs = []
        for j in range(len(FINDINGS)):
            if y[~test, j].sum() >= 3 and 0 < y[test, j].sum() < test.sum():
                m = LogisticRegression(C=0.01, max_iter=300).fit(xtr, y[~test, j])
                aucs.append(roc_auc_score(y[test, j], m.decision_function(xte)))
        rows.append((f"difficulty {d:.2f}: logistic regression test AUC",
                     f"mean {np.mean(aucs):.3f} (min {min(aucs):.2f}, max {max(aucs):.2f}, "
                     f"{len(aucs)} findings)"))
    return rows


def table(title: str, rows: list[tuple]) -> None:
    print(f"\n{title}")
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.prepare_bench",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="1024-px phantom PNGs to ingest")
    ap.add_argument("--nih", type=Path, help="use this NIH folder instead of phantoms")
    ap.add_argument("--copies", type=int, default=1,
                    help="with --nih: every image K times under new ids (per-run costs amortised "
                         "as on a larger release; same real PNGs)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--compression", default="none",
                    help="store compressions to ingest with, comma-separated (none,lzf); the "
                         "first one's store is the one the read benchmark uses")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs (best is kept)")
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--calibrate", action="store_true",
                    help="also measure the phantom difficulty curve (slow: minutes)")
    ap.add_argument("--calibrate-n", type=int, default=1500)
    args = ap.parse_args(argv)
    os.environ.setdefault("KACL_NO_PROGRESS", "1")
    root = args.nih or phantom_folder(args.n, 1024, max(args.workers, 1))
    if args.nih and args.copies > 1:
        root = replicated_nih(args.nih, args.copies)
    print(f"prepare_bench: {root} | {os.cpu_count()} CPU cores visible, load average "
          f"{os.getloadavg()[0]:.1f} | workers {args.workers}")
    rows, ws_dir = bench_prepare(root, args.size, args.workers, args.repeats,
                                 args.compression.split(","))
    table("prepare throughput", rows)
    try:
        table("store reads for training",
              bench_reads(Workspace(ws_dir), root, args.size, args.batches, args.batch))
    finally:
        shutil.rmtree(ws_dir.parent, ignore_errors=True)
    if args.calibrate:
        table(f"phantom difficulty ({args.calibrate_n} images at 64 px, 20% patients held out)",
              calibrate(args.calibrate_n, 64, [0.0, 0.25, 0.5, 0.75, 1.0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
