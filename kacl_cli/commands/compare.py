"""`kacl compare A B`: paired bootstrap of two rounds/workspaces on the same test images."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from kacl_cli.cli import JsonOpt, emit, err, handle_errors, out
from kacl_cli.stages.compare import compare

NAME = "compare"


def _row(name: str, x: dict[str, Any]) -> tuple[str, str, str]:
    lo, hi = x["ci"]

    def f(v: float) -> str:
        return "n/a" if v is None or v != v else f"{v:+.4f}"

    return name, f(x["delta"]), f"[{f(lo)}, {f(hi)}]"


def render(doc: dict[str, Any]) -> None:
    t = Table(title=f"{doc['a']} (round {doc['round_a']}) - {doc['b']} (round {doc['round_b']})"
                    f", {doc['split']} split, {doc['n_images']} images, paired bootstrap "
                    f"{doc['n_boot']}x")
    for col in ("metric", "A - B", "95% CI"):
        t.add_column(col, justify="right")
    for key, label in (("mean_auc", "mean AUC"), ("loc_acc", "loc. acc. T(IoU) .1-.7"),
                       ("mean_iou", "mean IoU")):
        t.add_row(*_row(label, doc[key]))
    for f, x in doc["per_finding_auc"].items():
        if x["delta"] == x["delta"]:
            t.add_row(*_row(f"AUC {f}", x))
    out.print(t)
    if doc.get("recorded_in"):
        out.print(f"recorded in {doc['recorded_in']} (comparisons): `kacl evaluate` lists it "
                  "in the report's 'Paired comparisons'", highlight=False, markup=False)
    elif doc.get("not_recorded"):
        err.print(f"not recorded: {doc['not_recorded']}", highlight=False, markup=False)


@handle_errors
def command(
    a: Annotated[str, typer.Argument(help="workspace[:round] (default: its latest round)")],
    b: Annotated[str, typer.Argument(help="workspace[:round]")],
    split: Annotated[str, typer.Option("--split")] = "test",
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=100)] = 2000,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Paired comparison A - B on the same images: delta mean AUC, per-finding AUC, mean IoU
    and localization accuracy, each with a 95% paired-bootstrap CI. The result is kept in
    A's catalog; `kacl evaluate` lists it in the report's "Paired comparisons".

    Refuses (exit 1) when the test images, labels or vocabularies differ, or a round is
    missing.

    Example: kacl compare ws:0 ws:2
    """
    doc = compare(a, b, split, bootstrap, seed)
    emit(doc, as_json, lambda: render(doc))
