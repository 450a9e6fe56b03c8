"""`kacl predict`: classify X-ray files and localise findings with Grad-CAM boxes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from kacl_cli.cli import DeviceOpt, JsonOpt, WorkspaceOpt, emit, err, handle_errors, one_line, out
from kacl_cli.findings import POSITIVE_PROBABILITY
from kacl_cli.imageio import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV
from kacl_cli.options import check_number
from kacl_cli.stages.cam.config import CamConfig
from kacl_cli.workspace import DEFAULT_WORKSPACE, Workspace

NAME = "predict"


def _render(results: list, with_boxes: bool) -> None:
    for res in results:
        if res.error is not None:
            continue
        table = Table(title=f"{res.path} ({res.width} x {res.height})", title_justify="left")
        table.add_column("finding")
        table.add_column("probability", justify="right")
        table.add_column("positive?", justify="center")
        if with_boxes:
            table.add_column("box x, y, w, h (input px)")
        for f in res.findings:
            cells = [f.finding, f"{f.probability:.3f}", "yes" if f.positive else ""]
            if with_boxes:
                cells.append(
                    ", ".join(f"{v:.0f}" for v in f.box) if f.box is not None
                    else (f.box_reason or "") if f.positive else ""
                )
            table.add_row(*cells, style="bold" if f.positive else None)
        out.print(table)
        if res.overlay:
            out.print(f"overlay: {res.overlay}", highlight=False)


@handle_errors
def command(
    images: Annotated[list[Path], typer.Argument(
        help="X-ray files: PNG (8/16-bit, RGBA), JPEG or DICOM, any size.")],
    boxes: Annotated[bool, typer.Option(
        "--boxes", help="A Grad-CAM box per positive finding, in the input's pixels.")] = False,
    overlay: Annotated[Path | None, typer.Option(
        "--overlay", help="Write <name>.kacl.png with heatmap and boxes into this folder.")]
    = None,
    round_: Annotated[int | None, typer.Option(
        "--round", help="Use checkpoint round K of the workspace (default: the latest).")]
    = None,
    checkpoint: Annotated[Path | None, typer.Option(
        "--checkpoint", help="A checkpoint directory instead of the workspace's.")] = None,
    threshold: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Probability at or above which a finding is positive.")]
    = POSITIVE_PROBABILITY,
    cam_threshold: Annotated[float | None, typer.Option(
        "--cam-threshold", min=0.01, max=1.0,
        help="Box = the peak's region above this fraction of the map's peak (default: the "
             "checkpoint's fitted per-finding rules, box_rules.json; else 0.5).")]
    = CamConfig.threshold,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
    max_pixels: Annotated[int, typer.Option(
        "--max-pixels", envvar="KACL_MAX_PIXELS", min=1,
        help="Refuse images with more pixels than this, read from the file's header before "
             "decoding (default 50,000,000: over 3x the largest chest radiographs).")]
    = DEFAULT_MAX_PIXELS,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
) -> None:
    """Classify X-ray files (14 findings) and, with --boxes, localise the positive ones.

    An unreadable file gets an error line on stderr and the others are still answered
    (exit 1 if any failed). Boxes are x, y, w, h in the input image's own pixels.

    Example: kacl predict chest.png scan.dcm --boxes --overlay overlays/
    """
    from kacl_cli.device import resolve_device
    from kacl_cli.stages.predict import (
        load_for_predict,
        load_predict_rules,
        predict_files,
        resolve_checkpoint,
    )

    check_number("--threshold", threshold, lo=0.0, hi=1.0)
    if overlay is not None and overlay.exists() and not overlay.is_dir():
        raise typer.BadParameter(f"--overlay {overlay}: is a file, not a folder")
    os.environ[MAX_PIXELS_ENV] = str(max_pixels)
    check_number("--cam-threshold", cam_threshold, lo=0.01, hi=1.0)
    if round_ is not None and checkpoint is not None:
        raise typer.BadParameter("give --round or --checkpoint, not both")
    ws = Workspace(workspace)
    ckpt = resolve_checkpoint(ws, round_, checkpoint)
    dev = resolve_device(device)
    model, meta = load_for_predict(ckpt, dev)
    rules = load_predict_rules(ckpt, cam_threshold)

    def report(res: Any) -> None:
        if res.error is not None:
            err.print(f"[bold red]error:[/] {escape(one_line(res.error))}", highlight=False,
                      markup=True)

    results = predict_files(images, model, meta, dev, boxes=boxes, threshold=threshold,
                            rules=rules, overlay_dir=overlay,
                            batch_size=batch_size, on_result=report)
    doc = {
        "checkpoint": str(ckpt),
        "round": meta.get("round"),
        "backbone": meta.get("backbone"),
        "threshold": threshold,
        "cam_threshold": cam_threshold,
        "box_rules": rules.source,
        "images": [r.to_dict() for r in results],
        "n_failed": sum(r.error is not None for r in results),
    }
    emit(doc, as_json, lambda: _render(results, boxes))
    if doc["n_failed"]:
        raise typer.Exit(1)
