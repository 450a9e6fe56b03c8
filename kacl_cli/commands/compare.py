"""`kacl compare A B`: paired bootstrap of two rounds/workspaces on the same test images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kacl_cli.cli import JsonOpt, emit, handle_errors, out
from kacl_cli.errors import KaclError

NAME = "compare"


def parse_target(text: str) -> tuple[Path, int | None]:
    """``workspace[:round]`` (a trailing ``:N`` is a round; the latest round otherwise)."""
    head, sep, tail = text.rpartition(":")
    if sep and tail.isdigit() and head:
        return Path(head), int(tail)
    return Path(text), None


def load_target(text: str, split: str):
    from kacl_cli.stages.evaluate.stage import ensure_cams, load_eval_data
    from kacl_cli.workspace import Workspace

    path, round_ = parse_target(text)
    ws = Workspace(path)
    ws.require()
    rounds = ws.finished_rounds()
    if round_ is None:
        if not rounds:
            raise KaclError(f"{text}: no trained round in {path}")
        round_ = rounds[-1]
    elif round_ not in rounds:
        raise KaclError(f"{text}: round {round_} is missing in {path} (finished rounds: "
                        f"{', '.join(map(str, rounds)) or 'none'})")
    ensure_cams(ws, round_, split)
    return load_eval_data(ws, round_, split), round_


def _vocabulary(text: str) -> tuple[str, ...]:
    from kacl_cli.models.checkpoint import read_meta
    from kacl_cli.workspace import Workspace

    path, round_ = parse_target(text)
    ws = Workspace(path)
    rounds = ws.finished_rounds()
    r = rounds[-1] if round_ is None and rounds else round_
    if r is None or r not in rounds:
        return ()  # load_target says what is missing
    meta = read_meta(ws.checkpoint_dir(r))
    return tuple(meta.get("findings") or meta.get("labels") or ())


def _split_ids(text: str, split: str) -> list[str]:
    from kacl_cli.workspace import Workspace

    ws = Workspace(parse_target(text)[0])
    ws.require()
    return [r[0] for r in ws.catalog.query(
        "SELECT image_id FROM images WHERE split = ? ORDER BY image_id", [split])]


def compare(a: str, b: str, split: str = "test", n_boot: int = 2000, seed: int = 0
            ) -> dict[str, Any]:
    from kacl_cli.stages.evaluate.paired import CompareError, pair_eval, paired_bootstrap

    va, vb = _vocabulary(a), _vocabulary(b)
    if va and vb and va != vb:
        raise CompareError("the two models predict different finding vocabularies")
    ia, ib = _split_ids(a, split), _split_ids(b, split)
    if ia != ib:  # refused before any cam run: the one line is all the user sees
        raise CompareError(
            f"the test images differ ({len(ia)} vs {len(ib)} images, or other ids): a paired "
            "comparison needs the same prepared data and split")
    da, ra = load_target(a, split)
    db, rb = load_target(b, split)
    res = paired_bootstrap(pair_eval(da, db), n_boot, seed)
    return {"a": a, "b": b, "round_a": ra, "round_b": rb, "split": split, **res}


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
    and localization accuracy, each with a 95% paired-bootstrap CI.

    Refuses (exit 1) when the test images, labels or vocabularies differ, or a round is
    missing.

    Example: kacl compare ws:0 ws:2
    """
    doc = compare(a, b, split, bootstrap, seed)
    emit(doc, as_json, lambda: render(doc))
