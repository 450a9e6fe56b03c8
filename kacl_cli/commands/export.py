"""`kacl export`: ship a round's model (ONNX: probabilities + Grad-CAM maps) + JSON sidecar."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from kacl_cli.cli import JsonOpt, WorkspaceOpt, emit, handle_errors, out
from kacl_cli.workspace import DEFAULT_WORKSPACE, Workspace

NAME = "export"


class Format(str, Enum):
    onnx = "onnx"


@handle_errors
def command(
    round_: Annotated[int | None, typer.Option(
        "--round", min=0, help="Which round's checkpoint (default: the latest).")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="onnx (needs kacl[onnx]).")]
    = Format.onnx,
    checkpoint: Annotated[Path | None, typer.Option(
        "--checkpoint", help="Export this checkpoint directory instead of a round.")] = None,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Output directory (default: WS/export/round-K).")] = None,
    as_json: JsonOpt = False,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
) -> None:
    """Export a round as one ONNX model giving the 14 probabilities AND the 14 raw Grad-CAM
    maps in a single forward, plus a JSON sidecar (vocabulary, input size, normalisation, box
    rule and thresholds). docs/export.md shows how to run it without kacl.

    Example: kacl export --round 3 --format onnx
    """
    from kacl_cli.stages.export import export_round

    summary = export_round(Workspace(workspace), round_=round_, checkpoint=checkpoint,
                           fmt=fmt.value, out=out_dir)
    emit(summary, as_json, lambda: out.print(
        f"round {summary['round']} -> {summary['model']} (+ {summary['sidecar']})",
        highlight=False))
