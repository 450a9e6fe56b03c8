"""`kacl import xrv FILE`: start from torchxrayvision's DenseNet-121 as round 0."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kacl_cli.cli import ForceOpt, JsonOpt, WorkspaceOpt, handle_errors, out, report
from kacl_cli.config_file import command_class
from kacl_cli.workspace import DEFAULT_WORKSPACE, Workspace

NAME = "import"

app = typer.Typer(
    name=NAME, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Import a pretrained model from another toolkit as a kacl checkpoint.",
)


def _render(summary: dict[str, Any]) -> None:
    out.print(f"imported {summary['source']}: {summary['mapped']}/14 findings mapped by name "
              f"-> {summary['checkpoint']}", highlight=False)
    if summary.get("missing"):
        out.print(f"fresh head rows (zero weights, prior bias from the "
                  f"{summary.get('fresh_rows_prior')}): {', '.join(summary['missing'])}",
                  highlight=False)
    if summary.get("untrained"):
        out.print(f"untrained in the source (NaN op_threshs): {', '.join(summary['untrained'])}",
                  highlight=False)
    if summary.get("unused"):
        out.print(f"source outputs kacl has no finding for: {', '.join(summary['unused'])}",
                  highlight=False)
    if summary.get("calibrated"):
        out.print("op_threshs folded into the head bias: p = 0.5 is xrv's operating point",
                  highlight=False)


@app.command("xrv", cls=command_class("import xrv"))
@handle_errors
def xrv(
    source: Annotated[Path, typer.Argument(
        help="A torchxrayvision DenseNet-121 state dict: .safetensors, or torch.save(model."
             "state_dict()) (read weights-only; pickled modules are never loaded).")],
    targets: Annotated[str | None, typer.Option(
        "--targets", help="Comma-separated output names of the source (model.targets; '' for "
        "untrained outputs). Default: the file's 'targets' metadata, else xrv's 18 "
        "default_pathologies.")] = None,
    calibrate: Annotated[bool, typer.Option(
        "--calibrate/--no-calibrate", help="Fold xrv's op_threshs into the head bias, so "
        "p = 0.5 is its operating point (maps unchanged).")] = False,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Refuse a source that lacks any of the 14 findings (default: fresh "
        "head rows, reported).")] = False,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Write a standalone checkpoint here (for predict --checkpoint) instead "
        "of the workspace's round-0.")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
) -> None:
    """Import a torchxrayvision DenseNet-121 (e.g. its NIH model) as checkpoint round-0.

    Outputs are matched to the 14 NIH findings by name; inputs are scaled to xrv's
    [-1024, 1024] (recorded in the checkpoint, applied by every stage). Then run
    `kacl contrast --rounds 3`. Convert xrv's pickled weights once, with xrv itself:
    python -c "import json, torchxrayvision as xrv, safetensors.torch as st;
    m = xrv.models.DenseNet(weights='densenet121-res224-nih');
    st.save_file(m.state_dict(), 'xrv-nih.safetensors',
    metadata={'targets': json.dumps(m.targets)})" (see docs/xrv.md)

    Example: kacl import xrv xrv-nih.safetensors && kacl contrast --rounds 3
    """
    from kacl_cli.stages.xrv_import import import_xrv

    names = None if targets is None else [t.strip() for t in targets.split(",")]
    ws = None if out_dir is not None else Workspace(workspace)
    summary = import_xrv(ws, source, targets=names, calibrate=calibrate, strict=strict,
                         out=out_dir, force=force)
    report("import", summary, as_json, lambda: _render(summary))
