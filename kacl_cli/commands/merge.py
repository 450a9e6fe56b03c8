"""`kacl merge`: fold the part files of sharded jobs (``--shard i/n``) into the workspace."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

import typer

from kacl_cli.cli import JsonOpt, WorkspaceOpt, emit, handle_errors, out
from kacl_cli.lock import writes_workspace
from kacl_cli.stages.shardable import NAMES, merge_parts
from kacl_cli.workspace import DEFAULT_WORKSPACE, Workspace

NAME = "merge"


# The stages that have part hooks (kacl_cli.stages.shardable), as a choice: Typer turns an
# Enum into one, so a bad value is a usage error (exit 2).
Stage = Enum("Stage", {name: name for name in NAMES}, type=str)  # type: ignore[misc]


def _render(result: dict[str, Any]) -> None:
    for g in result["merged"]:
        name = g["stage"] + ("" if g["round"] is None else f" round {g['round']}")
        rows = ", ".join(f"{n} {t}" for t, n in g["rows"].items())
        state = "merged" if g["changed"] else "already merged, nothing changed"
        out.print(f"{name}: {g['shards']} shards -> {state} ({rows})", highlight=False)
    if result.get("cleaned"):
        out.print("part files removed", highlight=False)


@handle_errors
@writes_workspace(NAME)
def command(
    stage: Annotated[Stage | None, typer.Option(
        "--stage", help="Only this stage's parts (default: every stage with parts, in the "
                        f"order {', '.join(NAMES)}).")] = None,
    round_: Annotated[int | None, typer.Option(
        "--round", min=0, help="Only the parts of this round (cam, radiomics).")] = None,
    clean: Annotated[bool, typer.Option(
        "--clean", help="Delete the merged part files afterwards (a later re-run of a shard "
                        "then starts from scratch).")] = False,
    as_json: JsonOpt = False,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
) -> None:
    """Fold the part files of sharded jobs (--shard i/n) into the workspace.

    Parts live in WS/parts/STAGE[-round-K]/shard-i-of-n/. Every shard 0..n-1 must be present
    and finished with the same settings; two parts holding the same rows with different
    content are refused. Nothing is written unless every check passes (exit 1 with a one-line
    reason otherwise). Merging again changes nothing. Prepare parts get their workspace rows
    here, in the order an unsharded run would have given them; radiomics statistics are
    recomputed over the merged rows.

    Example: kacl merge --stage radiomics --round 0
    """
    ws = Workspace(workspace)
    result = merge_parts(ws, stage.value if stage else None, round_, clean=clean)
    emit(result, as_json, lambda: _render(result))
