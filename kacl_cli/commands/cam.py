"""`kacl cam`: batched multi-label Grad-CAM maps and boxes from a round's checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from kacl_cli.cli import (
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    ShardOpt,
    WorkspaceOpt,
    handle_errors,
    out,
    report,
    shard_note,
)
from kacl_cli.lock import writes_workspace
from kacl_cli.options import check_choice
from kacl_cli.stages.cam.config import CamConfig
from kacl_cli.workspace import DEFAULT_WORKSPACE, Workspace

NAME = "cam"
_DEFAULTS = CamConfig()


def _fraction(value: float | None) -> float | None:
    if value is not None and not 0.0 < value <= 1.0:
        raise typer.BadParameter(f"{value} is not in (0, 1]")
    return value


@handle_errors
@writes_workspace(NAME)
def command(
    round_: Annotated[
        int | None,
        typer.Option("--round", min=0,
                     help="Checkpoint round-K to explain (default: the latest finished round)."),
    ] = None,
    split: Annotated[
        str, typer.Option("--split", help="train | val | test | all")
    ] = "all",
    threshold: Annotated[
        float | None,
        typer.Option("--threshold", callback=_fraction,
                     help="Box region: map values >= this fraction of the map's peak, in (0, 1], "
                          "for every finding (default: per-finding rules fitted on GT boxes "
                          "evaluation does not score; 0.5 when there are none)."),
    ] = _DEFAULTS.threshold,
    max_boxes: Annotated[
        int, typer.Option("--max-boxes", min=1,
                          help="Boxes per (image, finding): components ranked by mass; box 1 "
                               "in cam_boxes, boxes 2..K in cam_boxes_ranked.")
    ] = _DEFAULTS.max_boxes,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")]
    = _DEFAULTS.batch_size,
    workers: Annotated[
        int, typer.Option("--workers", min=0, help="DataLoader worker processes reading the store.")
    ] = _DEFAULTS.workers,
    device: DeviceOpt = _DEFAULTS.device,
    shard: ShardOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
) -> None:
    """Batched multi-label Grad-CAM maps and boxes from a round's checkpoint.

    One forward pass gives all 14 findings' maps (GAP + linear head). Raw maps go to
    store.h5 /cams/round-K; one cam_boxes row per (image, finding) holds the probability and
    the box in original pixels (NULL box + reason for empty or flat maps).

    With --shard i/n only shard i's images (sorted image_id, every n-th) are processed, into
    WS/parts/cam-round-K/shard-i-of-n; `kacl merge` folds the parts in. Under torchrun each
    rank takes its shard and rank 0 merges.

    Example: kacl cam --round 0 --split test
    """
    from kacl_cli.stages.cam.stage import run_cam_stage  # torch import only when the command runs

    check_choice("--split", split, ("train", "val", "test", "all"))
    ws = Workspace(workspace)
    result = run_cam_stage(ws, round_, split=split, batch_size=batch_size, threshold=threshold,
                           device=device, force=force, workers=workers, shard=shard,
                           max_boxes=max_boxes)
    if shard is not None:
        shard_note(NAME, result, result["round"])

    def render() -> None:
        rate = result.get("images_per_s")
        out.print(
            f"cam round {result['round']} ({result['split']}): {result['images']} images "
            f"({result['computed']} computed, {result['reused']} reused), "
            f"{result['boxes']} boxes, {result['empty_maps']} maps without a box, "
            f"{result['seconds']:.1f} s" + (f", {rate:.1f} images/s" if rate else ""),
            highlight=False,
        )
        out.print(f"  box rules: {result.get('box_rule_source')}", highlight=False)
        for reason, n in result.get("no_box_reasons", {}).items():
            out.print(f"  {n} x {reason}", highlight=False)

    report(NAME, result, as_json, render)
