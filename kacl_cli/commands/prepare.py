"""`kacl prepare`: ingest NIH ChestX-ray14 (or the built-in synthetic phantoms) into a workspace.

Thin CLI over :mod:`kacl_cli.stages.prepare.stage`; the rules (layouts, splits, missing vs
error, resume) are documented there and in docs/data.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kacl_cli.cli import (
    ForceOpt,
    JsonOpt,
    ShardOpt,
    WorkspaceOpt,
    err,
    handle_errors,
    out,
    report,
    shard_note,
)
from kacl_cli.imageio import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV
from kacl_cli.lock import workspace_lock
from kacl_cli.options import check_number
from kacl_cli.parallel import auto_workers
from kacl_cli.stages.prepare import stage as ingest
from kacl_cli.stages.prepare.phantoms import DEFAULT_DIFFICULTY
from kacl_cli.store import IMAGE_COMPRESSIONS
from kacl_cli.workspace import DEFAULT_WORKSPACE, Workspace

NAME = "prepare"

ROWS = [
    ("source", "source"),
    ("labels_file", "label file"),
    ("size", "store size (px)"),
    ("compression", "image compression"),
    ("split", "split"),
    ("csv_rows", "CSV rows"),
    ("ingested", "ingested now"),
    ("skipped_existing", "already in workspace"),
    ("missing", "missing (no image file)"),
    ("failed", "failed (unreadable, see errors table)"),
    ("unlisted", "image files not in the CSV"),
    ("over_limit", "left out by --limit"),
    ("images", "images in workspace"),
    ("train", "  train"),
    ("val", "  val"),
    ("test", "  test"),
    ("gt_boxes", "GT boxes"),
    ("images_with_boxes", "images with GT boxes"),
    ("generated", "phantoms generated"),
    ("generate_seconds", "  seconds to generate them"),
    ("difficulty", "phantom difficulty"),
    ("generator", "phantom generator"),
    ("label_flips", "labels flipped (--label-noise)"),
    ("seconds", "seconds to ingest"),
    ("images_per_s", "images/s"),
]


def _render(summary: dict[str, Any]) -> None:
    table = Table(title="kacl prepare", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    for key, label in ROWS:
        if key in summary and summary[key] is not None:
            table.add_row(label, str(summary[key]))
    out.print(table)


@handle_errors
def command(
    nih_dir: Annotated[Path | None, typer.Option(
        "--nih-dir", help="NIH ChestX-ray14 folder: Data_Entry_2017*.csv, BBox_List_2017.csv, "
                          "train_val_list.txt/test_list.txt and images/ (or images_0NN/images/)."
    )] = None,
    synthetic: Annotated[int | None, typer.Option(
        "--synthetic", metavar="N", help="Generate N synthetic chest X-ray phantoms instead."
    )] = None,
    size: Annotated[int, typer.Option("--size", help="Store image size S (S x S pixels).")] = 256,
    limit: Annotated[int | None, typer.Option(
        "--limit", help="Ingest at most N images (the first present ones, in CSV order).")] = None,
    workers: Annotated[int, typer.Option(
        "--workers", help="Decoding processes (0 = one per CPU core, at most 8).")] = 0,
    split: Annotated[str, typer.Option(
        "--split", help="official (train_val_list/test_list; val = 10% of train_val patients) "
                        "| random (70/10/20 by patient).")] = "official",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the val/random split and of "
                                                     "the phantoms.")] = 0,
    difficulty: Annotated[float, typer.Option(
        "--difficulty", help="Phantoms only: 0 (easy) .. 1 (hard): lower lesion contrast, "
                             "more noise.")] = DEFAULT_DIFFICULTY,
    enrich: Annotated[float, typer.Option(
        "--enrich", help="Phantoms only: fraction of images drawn to contain a uniformly chosen "
                         "finding (0 = the real prevalence).")] = 0.0,
    max_pixels: Annotated[int, typer.Option(
        "--max-pixels", envvar="KACL_MAX_PIXELS", min=1,
        help="Refuse images with more pixels than this, read from the file's header before "
             "decoding (default 50,000,000: over 3x the largest chest radiographs).")]
    = DEFAULT_MAX_PIXELS,
    generator: Annotated[int, typer.Option(
        "--generator", help="Phantoms only: generator version (2 = textures, lesion sizes and "
                            "noise in mm, visible at 128 px; 1 = the original).")] = 1,
    label_noise: Annotated[float, typer.Option(
        "--label-noise", help="Phantoms only: flip each train/val label with this probability "
                              "(true labels kept in the true_labels table).")] = 0.0,
    compression: Annotated[str | None, typer.Option(
        "--compression", help="Image chunks of a new store: none (default; reads 20x faster, "
                              "1.2-1.3x the disk of lzf on NIH) | lzf. An existing store keeps "
                              "its own.")] = None,
    shard: ShardOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
) -> None:
    """Ingest NIH ChestX-ray14 or synthetic phantoms into the workspace.

    Decodes the images present (8-bit gray, resized to --size), stores them in store.h5 and
    their labels, GT boxes and patient-level splits in catalog.duckdb. Partial downloads are
    fine: CSV rows without an image are counted as missing. Unreadable images are logged in the
    errors table and the rest ingested (exit 0 if anything was ingested, 1 if nothing was).
    Interrupted runs resume; finished ones are skipped unless --force.
    With --shard i/n only shard i of the images (every n-th by sorted image_id) is ingested,
    into WS/parts/prepare/shard-i-of-n; `kacl merge` then gives them the workspace rows an
    unsharded run would have.

    Example: kacl prepare --nih-dir /data/nih --size 256 --workers 8

    Example: kacl prepare --synthetic 600 --size 128
    """
    if (nih_dir is None) == (synthetic is None):
        raise typer.BadParameter("give exactly one of --nih-dir DIR or --synthetic N")
    if split not in ("official", "random"):
        raise typer.BadParameter(f"--split must be official or random, got {split!r}")
    check_number("--difficulty", difficulty, lo=0.0, hi=1.0)
    os.environ[MAX_PIXELS_ENV] = str(max_pixels)  # inherited by the decoder processes
    check_number("--enrich", enrich, lo=0.0, hi=1.0)
    check_number("--size", size, lo=16, hi=4096)
    if compression is not None and compression not in IMAGE_COMPRESSIONS:
        raise typer.BadParameter(f"--compression must be one of {', '.join(IMAGE_COMPRESSIONS)},"
                                 f" got {compression!r}")
    if synthetic is not None:
        check_number("--synthetic", synthetic, lo=1, hi=10_000_000)
    ws = Workspace(workspace)
    n_workers = auto_workers(workers or None)
    if shard is not None and synthetic is not None and shard.index >= synthetic:
        raise typer.BadParameter(f"--shard {shard}: shard {shard.index} of {synthetic} images "
                                 "would be empty (n at most the number of images)")
    # The writer lock (kacl_cli.lock) after the usage checks: a usage error creates nothing.
    with workspace_lock(ws.root, NAME, None if shard is None else shard.label, create=True):
        if synthetic is not None:
            summary = ingest.prepare_synthetic(
                ws, synthetic, size, seed, difficulty, enrich=enrich, workers=n_workers,
                force=force, shard=shard, generator=generator,
                label_noise=label_noise, compression=compression)
        else:
            assert nih_dir is not None
            summary = ingest.prepare_nih(ws, nih_dir, size=size, limit=limit,
                                         workers=n_workers, split=split, seed=seed,
                                         force=force, shard=shard, compression=compression)
    if shard is not None:
        shard_note(NAME, summary)
    if summary.get("failed") and not summary.get("skipped"):
        err.print(f"prepare: {summary['failed']} image(s) could not be read; the others were "
                  "ingested (reasons: SELECT * FROM errors WHERE stage = 'prepare')")
    if summary.get("missing") and not summary.get("skipped"):
        err.print(f"prepare: {summary['missing']} CSV row(s) have no image file (partial "
                  "download?); they are not in the workspace")
    report(NAME, summary, as_json, lambda: _render(summary))

