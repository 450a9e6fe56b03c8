"""`kacl evaluate`: per-finding AUC with bootstrap CIs, localization accuracy, HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from kacl_cli.cli import DeviceOpt, ForceOpt, JsonOpt, WorkspaceOpt, emit, err, handle_errors, out
from kacl_cli.stages import rounds as rounds_mod
from kacl_cli.stages.evaluate.config import EvaluateConfig
from kacl_cli.workspace import DEFAULT_WORKSPACE, Workspace

NAME = "evaluate"
_DEFAULTS = EvaluateConfig()


def _fmt(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def parse_rounds(ws: Workspace, spec: str, split: str) -> tuple[list[int], bool]:
    """``K`` | ``latest`` | ``all`` -> (rounds, is_all); which rounds: stages.rounds."""
    spec = spec.strip().lower()
    if spec not in (rounds_mod.ALL, rounds_mod.LATEST):
        try:
            k = int(spec)
        except ValueError:
            raise typer.BadParameter(f"--round must be a number, 'latest' or 'all', got {spec!r}",
                                     param_hint="--round") from None
        if k < 0:
            raise typer.BadParameter("--round must be >= 0", param_hint="--round")
        return [k], False
    return rounds_mod.evaluation_rounds(ws, spec, split), spec == rounds_mod.ALL


def render_round(doc: dict[str, Any]) -> None:
    """The per-finding AUC table, the localization tables and the headline, on stdout."""
    skipped = " (done earlier, unchanged)" if doc.get("skipped") else ""
    cls = doc["classification"]
    t = Table(title=f"Round {doc['round']}, split {doc['split']}: ROC AUC "
                    f"({doc['n_images']} images){skipped}", title_justify="left")
    for col, just in (("finding", "left"), ("AUC", "right"), ("95% CI", "right"),
                      ("pos / n", "right")):
        t.add_column(col, justify=just)
    for c in cls["findings"]:
        ci = f"{_fmt(c['ci_low'], 3)}–{_fmt(c['ci_high'], 3)}" if c["ci_low"] is not None else ""
        t.add_row(c["finding"], _fmt(c["auc"]), ci, f"{c['n_pos']} / {c['n']}")
    lo, hi = cls["mean_auc_ci"]
    t.add_row(f"mean ({cls['n_findings_in_mean']})", _fmt(cls["mean_auc"]),
              f"{_fmt(lo, 3)}–{_fmt(hi, 3)}" if lo is not None else "", "", style="bold")
    out.print(t)
    loc = doc["localization"]
    for kind, name in (("iou", "IoU"), ("iobb", "IoBB")):
        # findings as rows (the report has the papers' layout): fits an 80-column terminal
        lt = Table(title=f"Localization accuracy, {name} > T ({loc['n_pairs']} GT boxes, "
                         f"{loc['n_excluded_images']} box-supervised images excluded)",
                   title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1), pad_edge=False)
        lt.add_column("finding", no_wrap=True)
        lt.add_column("n", justify="right")
        for thr in loc[f"{kind}_thresholds"]:
            lt.add_column(f"{thr:g}", justify="right")
        lt.add_column(f"m{name}", justify="right")
        for c in loc["findings"]:
            lt.add_row(c["finding"], str(c["n"]), *[_fmt(a, 3) for a in c[f"acc_{kind}"]],
                       _fmt(c[f"mean_{kind}"], 3))
        lt.add_row("mean", str(loc["n_pairs"]), *[_fmt(a, 3) for a in loc[f"mean_acc_{kind}"]],
                   "", style="bold")
        out.print(lt)
        if kind == "iou" and loc.get("any_of_k"):
            render_any_of_k(loc)
    for note in doc["notes"]:
        out.print(f"note: {note}", highlight=False)
    h = doc["headline"]
    out.print(f"round {doc['round']}: mean AUC [bold]{_fmt(h['mean_auc'])}[/], mean localization "
              f"accuracy T(IoU) 0.1-0.7 [bold]{_fmt(h['mean_loc_acc'])}[/]", markup=True)
    out.print(f"report: {doc.get('report')}", highlight=False)


def render_any_of_k(loc: dict[str, Any]) -> None:
    """The "any of K" column (cam --max-boxes K), as its own table after the top-box one."""
    any_k = loc["any_of_k"]
    lt = Table(title=f"Any of K={any_k['k']} ranked boxes, IoU > T (not the protocol: "
                     "the table above scores the top box)",
               title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1), pad_edge=False)
    lt.add_column("finding", no_wrap=True)
    lt.add_column("n", justify="right")
    for thr in loc["iou_thresholds"]:
        lt.add_column(f"{thr:g}", justify="right")
    lt.add_column(f"mIoU@{any_k['k']}", justify="right")
    for c in loc["findings"]:
        lt.add_row(c["finding"], str(c["n"]), *[_fmt(a, 3) for a in c["any_of_k"]["acc_iou"]],
                   _fmt(c["any_of_k"]["mean_iou"], 3))
    lt.add_row("mean", str(loc["n_pairs"]), *[_fmt(a, 3) for a in any_k["mean_acc_iou"]], "",
               style="bold")
    out.print(lt)


def render_all(docs: list[dict[str, Any]], summary: Path) -> None:
    for doc in docs:
        render_round(doc)
        out.print()
    t = Table(title="Across rounds", title_justify="left")
    for col in ("round", "mean AUC", "95% CI", "mean loc. acc. T(IoU) 0.1-0.7"):
        t.add_column(col, justify="right")
    for doc in docs:
        lo, hi = doc["classification"]["mean_auc_ci"]
        t.add_row(str(doc["round"]), _fmt(doc["headline"]["mean_auc"]),
                  f"{_fmt(lo, 3)}–{_fmt(hi, 3)}" if lo is not None else "",
                  _fmt(doc["headline"]["mean_loc_acc"]))
    out.print(t)
    out.print(f"summary report: {summary}", highlight=False)


@handle_errors
def command(
    round_spec: Annotated[str, typer.Option(
        "--round", help="Round K to evaluate, 'latest' (default), or 'all' (each round plus a "
        "summary report across rounds).")] = rounds_mod.LATEST,
    split: Annotated[str, typer.Option("--split", help="Split to evaluate on.")]
    = _DEFAULTS.split,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Report directory (default WORKSPACE/reports/round-K; with --round all, "
        "DIR/round-K and DIR/summary).")] = None,
    bootstrap: Annotated[int, typer.Option(
        "--bootstrap", min=0, help="Bootstrap resamples for the AUC CIs (0 = no CIs).")]
    = _DEFAULTS.n_boot,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap.")] = _DEFAULTS.seed,
    overlays: Annotated[int, typer.Option(
        "--overlays", min=0, help="Grad-CAM overlays in the report's grid.")]
    = _DEFAULTS.overlays,
    device: DeviceOpt = _DEFAULTS.device,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
) -> None:
    """AUC (+ bootstrap CIs) and localization accuracy per round, with an HTML report.

    AUC per finding from the round's cam_boxes probabilities (the cam stage runs first when
    they are missing), localization accuracy at T(IoU) 0.1-0.7 and T(IoBB) 0.1-0.9 on the
    split's ground-truth boxes (images used for box supervision excluded). Results go to the
    catalog's metrics table, metrics.json and one self-contained report.html.

    Example: kacl evaluate --round all --split test
    """
    from kacl_cli.stages.evaluate import stage
    from kacl_cli.stages.evaluate.report import write_summary_report

    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise typer.BadParameter(f"--out {out_dir}: is a file, not a folder")
    ws = Workspace(workspace)
    ws.require()
    rounds, is_all = parse_rounds(ws, round_spec, split)
    docs = []
    for k in rounds:
        where = (out_dir / f"round-{k}") if (is_all and out_dir is not None) else out_dir
        cfg = EvaluateConfig(split=split, out=where, n_boot=bootstrap, seed=seed,
                             overlays=overlays, force=force, device=device)
        docs.append(stage.run(ws, k, cfg, note=lambda text: err.print(text, highlight=False)))
    if not is_all:
        emit(docs[0], as_json, lambda: render_round(docs[0]))
        return
    summary = (out_dir if out_dir is not None else ws.reports) / "summary" / "report.html"
    write_summary_report(ws, split, rounds, summary,
                         {d["round"]: Path(d.get("report") or stage.report_dir(ws, d["round"], None)
                                           / "report.html") for d in docs})
    emit({"split": split, "rounds": docs, "summary_report": str(summary)}, as_json,
         lambda: render_all(docs, summary))
