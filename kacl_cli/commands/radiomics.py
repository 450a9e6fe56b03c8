"""`kacl radiomics`: radiomic features of the Grad-CAM (or ground-truth) regions of a round."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from kacl_cli.cli import (
    ForceOpt,
    JsonOpt,
    RadiomicsBackend,
    ShardOpt,
    WorkspaceOpt,
    err,
    handle_errors,
    out,
    report,
    shard_note,
)
from kacl_cli.lock import writes_workspace
from kacl_cli.options import check_number
from kacl_cli.stages.radiomics.backends.base import DEFAULT_BACKEND
from kacl_cli.stages.radiomics.rois import DEFAULT_MIN_PROB, ROI_MODES
from kacl_cli.stages.rounds import cam_round
from kacl_cli.workspace import DEFAULT_WORKSPACE, Workspace

NAME = "radiomics"


# Typer turns an Enum into a choice (a bad value is a usage error, exit 2); built from the
# stage's ROI modes, so the two cannot drift apart.
RoiMode = Enum("RoiMode", {mode.replace("+", "_"): mode for mode in ROI_MODES}, type=str)


@handle_errors
@writes_workspace(NAME)
def command(
    round_: Annotated[
        int | None,
        typer.Option("--round", "-r", help="Use the cam_boxes of this round (default: latest)."),
    ] = None,
    roi: Annotated[
        RoiMode,
        typer.Option(
            "--roi",
            help="cam: Grad-CAM boxes; gt: ground-truth boxes of every image that has them; "
            "cam+gt: GT boxes for box-supervised images, CAM boxes for the rest.",
        ),
    ] = RoiMode(ROI_MODES[0]),
    backend: Annotated[
        RadiomicsBackend,
    ShardOpt,
        typer.Option("--backend", help="fast (default: pyradiomics' values, compiled and "
                     "batched) | pyradiomics (the reference, ~70x slower)."),
    ] = RadiomicsBackend(DEFAULT_BACKEND),
    params: Annotated[
        Path | None,
        typer.Option("--params", help="pyradiomics-format YAML params file (Original only)."),
    ] = None,
    min_prob: Annotated[
        float,
        typer.Option(
            "--min-prob",
            help="Also compute ROIs of findings with probability >= this (the positive ROI, "
            "the image's most confident boxed finding, is always computed).",
        ),
    ] = DEFAULT_MIN_PROB,
    workers: Annotated[int, typer.Option("--workers", "-j", help="Worker processes.")] = 1,
    split: Annotated[
        list[str] | None,
        typer.Option("--split", help="Only images of this split (repeatable): train|val|test."),
    ] = None,
    shard: ShardOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
) -> None:
    """Radiomic features of the CAM (or ground-truth) regions.

    pyradiomics classes firstorder, shape2D, glcm, glrlm, glszm, gldm, ngtdm (binWidth 25)
    on the raw 8-bit store pixels of each ROI, as a true 2D image.
    Writes the catalog tables rois, radiomics, radiomics_features, radiomics_settings and
    radiomics_stats (training-split mean/std for z-scoring).
    Chunks are committed as they finish, so an interrupted run resumes.
    Failed ROIs (e.g. thinner than 2 px) are recorded with a reason; they do not fail the run.

    Example: kacl radiomics --round 1 --roi cam --workers 8
    """
    from kacl_cli.stages.radiomics.stage import run_radiomics_stage

    check_number("--min-prob", min_prob, lo=0.0, hi=1.0)
    check_number("--workers", workers, lo=1, hi=1024)
    if round_ is not None:
        check_number("--round", round_, lo=0)
    ws = Workspace(workspace)
    ws.require()
    round_ = cam_round(ws, round_)
    summary = run_radiomics_stage(
        ws, round_, roi=roi.value, backend=backend.value, params=params, workers=workers,
        split=split, force=force, shard=shard, min_prob=min_prob,
    )
    if shard is not None:
        shard_note(NAME, summary, round_)
    report(NAME, summary, as_json, lambda: _render(summary))


def _render(s: dict) -> None:
    out.print(
        f"radiomics round {s['round']} ({s['backend']}, roi {s['roi']}, settings "
        f"{s['settings_hash']}): {s['rois']} ROIs on {s['images']} images "
        f"({s['positive_rois']} positive, {s['gt_rois']} from GT boxes), "
        f"{s['features']} features",
        highlight=False,
    )
    out.print(
        f"computed {s['computed']} ({s['reused']} reused) in {s['seconds']:.1f} s "
        f"= {s['rois_per_s']:.1f} ROIs/s with {s['workers']} worker(s)",
        highlight=False,
    )
    out.print(
        f"failed ROIs: {s['failed']}"
        + (" (" + ", ".join(f"{k}: {v}" for k, v in s["failed_reasons"].items()) + ")"
           if s["failed_reasons"] else "")
        + f"; nonfinite values: {s['nonfinite_values']}; training rows for z-scoring: "
        f"{s['train_rows_for_stats']}",
        highlight=False,
    )
    if s["train_rows_for_stats"] == 0:
        err.print("warning: no training-split positive ROIs: z-scoring statistics are missing")
