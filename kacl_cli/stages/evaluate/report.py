"""The HTML evaluation report: one self-contained file per round, and a summary across rounds.

Self-contained on purpose: the report is copied off clusters, mailed and archived, so plots are
embedded as base64 PNG, the CSS is inline, and nothing refers to the network (no fonts, no
scripts, no links to external resources). Plots use matplotlib's object API (``Figure`` +
Agg canvas), never pyplot, so no display and no global backend state is touched.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from sklearn.metrics import roc_curve

from kacl_cli import boxes as bx
from kacl_cli.findings import BOX_FINDINGS, FINDINGS
from kacl_cli.stages.evaluate import comparisons
from kacl_cli.stages.evaluate.baselines import (
    IOU_THRESHOLDS,
    OTHER_MEAN_AUC,
    WANG2017_AUC,
    WANG2017_LOC_IOBB,
    WANG2017_LOC_IOU,
)
from kacl_cli.stages.evaluate.data import EvalData
from kacl_cli.stages.evaluate.metrics import ALL, accuracy_at, pair_overlaps
from kacl_cli.stages.prepare.stage import DATASET_KEY
from kacl_cli.workspace import Workspace

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } td.name, th.name { text-align: left; }
tr.mean td { font-weight: bold; background: #fafafa; }
caption { caption-side: top; text-align: left; font-size: 0.9em; color: #555; padding: 4px 0; }
.published td { color: #666; font-style: italic; }
.note { background: #fff8e1; border-left: 4px solid #f0c040; padding: 6px 10px; margin: 6px 0; }
.headline { font-size: 1.1em; background: #eef6ee; padding: 8px 12px; border-radius: 4px; }
img.plot { max-width: 100%; border: 1px solid #eee; }
.side { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
"""

NA = "n/a"


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def fmt(value: float | None, digits: int = 4) -> str:
    """A number as the report prints it (the papers' 4 decimals); "n/a" for undefined."""
    if value is None or not np.isfinite(value):
        return NA
    return f"{value:.{digits}f}"


def _e(text: Any) -> str:
    return html.escape(str(text))


def _table(headers: list[str], rows: list[list[str]], *, table_id: str, caption: str = "",
           row_classes: list[str] | None = None, css_class: str = "") -> str:
    """An HTML table; the first column is left-aligned (names), cells are pre-escaped."""
    head = "".join(
        f'<th class="name">{_e(h)}</th>' if i == 0 else f"<th>{_e(h)}</th>"
        for i, h in enumerate(headers))
    body = []
    for r, row in enumerate(rows):
        cls = (row_classes or [""] * len(rows))[r]
        cells = "".join(
            f'<td class="name">{c}</td>' if i == 0 else f"<td>{c}</td>" for i, c in enumerate(row))
        body.append(f'<tr class="{cls}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
    cap = f"<caption>{caption}</caption>" if caption else ""
    klass = f' class="{css_class}"' if css_class else ""
    return (f'<table id="{table_id}"{klass}>{cap}<thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def png_data_uri(fig: Figure, dpi: int = 90) -> str:
    """Render a figure to an embedded PNG (no Software/URL metadata in the file)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str) -> str:
    return f'<img class="plot" alt="{_e(alt)}" src="{uri}">'


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head>"
            f"<body>{body}</body></html>\n")


def _write(path: Path, text: str) -> None:
    """Atomic write, so a killed run never leaves a half report that looks finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def dataset_note(ws: Workspace) -> str:
    """What this workspace's numbers are measured on, from the identity `prepare` recorded.

    Printed beside every published number: phantoms are another dataset, and NIH results are
    only comparable to the published ones on the official split with all test images.
    """
    rows = ws.catalog.query("SELECT value FROM meta WHERE key = ?", [DATASET_KEY])
    try:
        ident = json.loads(rows[0][0]) if rows else {}
    except (ValueError, TypeError):
        ident = {}
    size = f", stored at {ident['size']} px" if ident.get("size") else ""
    if ident.get("source") == "synthetic":
        return ("synthetic chest X-ray phantoms generated by kacl (seed "
                f"{ident.get('seed')}){size}: another dataset than NIH ChestX-ray14")
    if ident.get("source") == "nih":
        split = ident.get("split", "?")
        how = ("official patient split (train_val_list.txt / test_list.txt)"
               if split == "official" else f"{split} patient split (seed {ident.get('seed')})")
        return (f"NIH ChestX-ray14 ({ident.get('nih_dir', '?')}), {how}{size}; the images "
                "present in this workspace only")
    return "this workspace's images and split (dataset identity not recorded)"


def _workspace_section(ws: Workspace) -> str:
    """Which data and split the numbers come from (prepare's identity and split counts)."""
    splits = ws.catalog.query("SELECT split, count(*) FROM images GROUP BY 1 ORDER BY 1")
    rows = [[_e(s), str(n)] for s, n in splits]
    table = _table(["split", "images"], rows, table_id="splits",
                   caption="Images per split in this workspace")
    return f'<p id="dataset">Data: {_e(dataset_note(ws))}.</p>{table}'


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def roc_figure(data: EvalData) -> Figure | None:
    """ROC curves of every finding with both classes present."""
    fig = Figure(figsize=(7.5, 5.5))
    ax = fig.add_subplot(1, 1, 1)
    cmap = colormaps["tab10"]
    drawn = 0
    for j, f in enumerate(FINDINGS):
        keep = np.isfinite(data.probs[:, j])
        y = data.labels[keep, j]
        if y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, data.probs[keep, j])
        ax.plot(fpr, tpr, color=cmap(j % 10), ls="-" if j < 10 else "--", lw=1.3, label=f)
        drawn += 1
    if not drawn:
        return None
    ax.plot([0, 1], [0, 1], color="#999", ls=":", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1),
           title=f"ROC curves, round {data.round}, split {data.split}")
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    return fig


def accuracy_figure(iou: np.ndarray, iobb: np.ndarray, pair_finding: np.ndarray,
                    thresholds: dict[str, tuple[float, ...]]) -> Figure | None:
    """Localization accuracy as a function of the threshold, per box finding (IoU and IoBB)."""
    if len(iou) == 0:
        return None
    grid = np.linspace(0.0, 1.0, 101)
    fig = Figure(figsize=(11, 4.2))
    cmap = colormaps["tab10"]
    for p, (name, ov) in enumerate((("IoU", iou), ("IoBB", iobb))):
        ax = fig.add_subplot(1, 2, p + 1)
        for k, f in enumerate(BOX_FINDINGS):
            sel = pair_finding == k
            if not sel.any():
                continue
            ax.plot(grid, accuracy_at(ov[sel], grid), color=cmap(k), lw=1.4,
                    label=f"{f} (n={int(sel.sum())})")
            marks = np.asarray(thresholds[name.lower()])
            ax.plot(marks, accuracy_at(ov[sel], marks), "o", color=cmap(k), ms=3)
        ax.set(xlabel=f"T({name})", ylabel="accuracy", xlim=(0, 1), ylim=(-0.02, 1.02),
               title=f"accuracy vs T({name}) (correct when {name} > T)")
        ax.grid(alpha=0.3)
    fig.axes[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    return fig


def pick_overlay_pairs(data: EvalData, max_overlays: int) -> list[int]:
    """Pair indices for the overlay grid: round-robin over the box findings, in catalog order,
    so every finding with boxes shows up before any shows twice."""
    queues = [list(np.flatnonzero(data.pair_finding == k)) for k in range(len(BOX_FINDINGS))]
    picked: list[int] = []
    while len(picked) < max_overlays and any(queues):
        for q in queues:
            if q and len(picked) < max_overlays:
                picked.append(int(q.pop(0)))
    return picked


def overlay_figure(ws: Workspace, data: EvalData, iou: np.ndarray,
                   max_overlays: int) -> Figure | None:
    """A grid of Grad-CAM overlays with the predicted (red) and ground-truth (green) boxes."""
    picked = pick_overlay_pairs(data, max_overlays)
    if not picked or not ws.store.has_cams(data.round):
        return None
    rows = data.rows[data.pair_image[picked]]
    images = ws.store.read_images(rows)
    cams = ws.store.read_cams(data.round, rows).astype(np.float32)
    size = images.shape[1]
    ncol = min(4, len(picked))
    nrow = int(np.ceil(len(picked) / ncol))
    fig = Figure(figsize=(3.1 * ncol, 3.4 * nrow))
    for i, p in enumerate(picked):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        img_i, k = data.pair_image[p], data.pair_finding[p]
        f = BOX_FINDINGS[k]
        j = FINDINGS.index(f)
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255, extent=(0, size, size, 0))
        cam = cams[i, j]
        peak = float(cam.max()) if cam.size else 0.0
        if peak > 0:  # scaled for display only; thresholds use the raw map
            ax.imshow(cam / peak, cmap="jet", alpha=0.35, vmin=0, vmax=1,
                      extent=(0, size, size, 0), interpolation="bilinear")
        sx = size / data.orig_size[img_i, 0]
        sy = size / data.orig_size[img_i, 1]
        gt = bx.scale_xywh(data.pair_gt[p], sx, sy)
        ax.add_patch(Rectangle(gt[:2], gt[2], gt[3], fill=False, ec="lime", lw=1.6))
        pred = data.pred[img_i, j]
        if np.isfinite(pred).all():
            pb = bx.scale_xywh(pred, sx, sy)
            ax.add_patch(Rectangle(pb[:2], pb[2], pb[3], fill=False, ec="red", lw=1.6, ls="--"))
        prob = data.probs[img_i, j]
        score = f"IoU {fmt(iou[p], 3)}" if np.isfinite(iou[p]) else "no predicted box"
        ax.set_title(f"{f}\n{data.image_ids[img_i]}  {score}  p {fmt(prob, 2)}",
                     fontsize=7, parse_math=False)  # an image id may hold "$...$"
        ax.set_xlim(0, size)
        ax.set_ylim(size, 0)
        ax.axis("off")
    return fig


# --------------------------------------------------------------------------------------------
# the round report
# --------------------------------------------------------------------------------------------
def auc_table(ws: Workspace, doc: dict[str, Any]) -> str:
    cls = doc["classification"]
    rows, classes = [], []
    for c in cls["findings"]:
        ci = (f"{fmt(c['ci_low'])} – {fmt(c['ci_high'])}" if c["ci_low"] is not None else NA)
        rows.append([_e(c["finding"]), fmt(c["auc"]), ci, f"{c['n_pos']} / {c['n']}",
                     fmt(WANG2017_AUC.auc.get(c["finding"]))])
        classes.append("")
    lo, hi = cls["mean_auc_ci"]
    rows.append([f"mean ({cls['n_findings_in_mean']} findings)", fmt(cls["mean_auc"]),
                 f"{fmt(lo)} – {fmt(hi)}" if lo is not None else NA, "", fmt(WANG2017_AUC.mean)])
    classes.append("mean")
    caption = (
        f"ROC AUC on the <b>{_e(doc['split'])}</b> split ({doc['n_images']} images) of "
        f"{_e(dataset_note(ws))}; {int(doc['ci_level'] * 100)}% percentile bootstrap CI over "
        f"{doc['bootstrap']} image resamples. Last column: published, "
        f"<i>{_e(WANG2017_AUC.name)}</i> on {_e(WANG2017_AUC.dataset_split)}: measured on "
        "another dataset and/or split and with another model, context only, not a "
        "like-for-like comparison."
    )
    return _table(["finding", "AUC", "95% CI", "positives / images",
                   "published AUC (Wang et al. 2017, official split)"],
                  rows, table_id="auc-table", caption=caption, row_classes=classes)


def loc_table(doc: dict[str, Any], kind: str) -> str:
    """The papers' layout: rows T, columns the 8 box findings (+ their mean)."""
    loc = doc["localization"]
    thresholds = loc[f"{kind}_thresholds"]
    name = "IoU" if kind == "iou" else "IoBB"
    findings = loc["findings"]
    rows, classes = [], []
    for t_i, t in enumerate(thresholds):
        rows.append([f"T({name}) = {t:g}"] + [fmt(c[f"acc_{kind}"][t_i]) for c in findings]
                    + [fmt(loc[f"mean_acc_{kind}"][t_i])])
        classes.append("")
    rows.append([f"mean {name}"] + [fmt(c[f"mean_{kind}"]) for c in findings] + [""])
    if kind == "iou" and any(c.get("ceiling_iou") is not None for c in findings):
        rows.append(["grid ceiling IoU"] + [fmt(c.get("ceiling_iou")) for c in findings] + [""])
        rows.append(["grid ceiling acc 0.1-0.7"] + [fmt(c.get("ceiling_acc")) for c in findings]
                    + [""])
    rows.append(["GT boxes"] + [str(c["n"]) for c in findings] + [str(loc["n_pairs"])])
    rows.append(["no predicted box"] + [str(c["n_missing"]) for c in findings]
                + [str(loc["n_missing_pred"])])
    classes += ["mean"] * (len(rows) - len(classes) - 2) + ["", ""]
    caption = (f"Localization accuracy (correct when {name} &gt; T; a ground-truth box without "
               f"a predicted box counts as wrong), round {doc['round']}, split "
               f"<b>{_e(doc['split'])}</b>")
    return _table(["T"] + [c["finding"] for c in findings] + ["mean"], rows,
                  table_id=f"loc-{kind}", caption=caption, row_classes=classes)


def any_of_k_table(doc: dict[str, Any]) -> str:
    """The "any of K" column as its own table in the papers' layout (rows T(IoU), columns the
    box findings), so the protocol's top-box table stays as published; "" without K > 1."""
    loc = doc["localization"]
    any_k = loc.get("any_of_k")
    if not any_k:
        return ""
    findings = loc["findings"]
    rows = [[f"T(IoU) = {t:g}"] + [fmt(c["any_of_k"]["acc_iou"][i]) for c in findings]
            + [fmt(any_k["mean_acc_iou"][i])] for i, t in enumerate(loc["iou_thresholds"])]
    rows.append(["mean IoU, best of K"] + [fmt(c["any_of_k"]["mean_iou"]) for c in findings]
                + [""])
    rows.append(["mean acc 0.1-0.7"] + [fmt(_mean_of(c["any_of_k"]["acc_iou"]))
                                        for c in findings] + [fmt(any_k["mean_loc_acc"])])
    caption = (f"Any of K = {any_k['k']} ranked boxes (<code>cam --max-boxes {any_k['k']}</code>"
               "): a ground-truth box counts as hit when any of the K boxes of its (image, "
               "finding) has IoU &gt; T. Not the protocol: the table above scores the top box.")
    classes = [""] * len(loc["iou_thresholds"]) + ["mean", "mean"]
    return _table([f"T (any of K={any_k['k']})"] + [c["finding"] for c in findings] + ["mean"],
                  rows, table_id="loc-iou-any", caption=caption, row_classes=classes)


def _mean_of(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def baseline_loc_table(kind: str) -> str:
    base = WANG2017_LOC_IOU if kind == "iou" else WANG2017_LOC_IOBB
    name = "IoU" if kind == "iou" else "IoBB"
    rows = [[f"T({name}) = {t:g}"] + [fmt(base.at(f, t)) for f in BOX_FINDINGS]
            for t in base.thresholds]
    caption = (f"Published: <i>{_e(base.name)}</i>, {_e(base.source)}, on "
               f"{_e(base.dataset_split)}. Another dataset and/or split: context only.")
    return _table(["T"] + list(BOX_FINDINGS), rows, table_id=f"baseline-loc-{kind}",
                  caption=caption, css_class="published")


def _signed(x: dict[str, Any] | None) -> tuple[str, str]:
    """(delta, "[lo, hi]") of one compare metric, signed: A - B."""
    if not x or x.get("delta") is None:
        return NA, NA
    lo, hi = x["ci"]

    def s(v: float | None) -> str:
        return NA if v is None else f"{v:+.4f}"

    return s(x["delta"]), f"[{s(lo)}, {s(hi)}]"


def comparisons_section(found: list[dict[str, Any]]) -> str:
    """The "Paired comparisons" section: every recorded ``kacl compare`` involving the
    report's round(s) (:mod:`~kacl_cli.stages.evaluate.comparisons`); "" when there is none."""
    if not found:
        return ""
    rows = []
    for c in found:
        cells = [f"<code>{_e(c['a'])}</code> (round {c['round_a']})",
                 f"<code>{_e(c['b'])}</code> (round {c['round_b']})"]
        for key in comparisons.HEADLINE:
            cells += list(_signed(c.get(key)))
        cells += [str(c["n_images"]), str(c["n_boot"]), _e(c["compared_at"][:19])]
        rows.append(cells)
    table = _table(["A", "B", "Δ mean AUC", "95% CI", "Δ loc. acc. T(IoU) 0.1–0.7", "95% CI",
                    "Δ mean IoU", "95% CI", "images", "resamples", "compared (UTC)"],
                   rows, table_id="comparisons",
                   caption="A − B on the same test images, paired bootstrap (images resampled "
                   "once for both); a CI that excludes 0 is a difference the test set resolves")
    per = _table(["finding"] + [f"{c['a']} − {c['b']}" for c in found],
                 [[_e(f)] + [" ".join(_signed(c["per_finding_auc"].get(f))) for c in found]
                  for f in FINDINGS],
                 table_id="comparisons-auc", caption="Δ AUC per finding [95% CI]")
    return (f'<h2 id="paired-comparisons">Paired comparisons</h2><p>Recorded by '
            f"<code>kacl compare A B</code> (kept in A's catalog, table <code>comparisons"
            f"</code>).</p>{table}{per}")


def render_round_html(ws: Workspace, doc: dict[str, Any], figures: dict[str, str | None]) -> str:
    """The round report's HTML from its metrics document and embedded figures."""
    loc = doc["localization"]
    h = doc["headline"]
    notes = "".join(f'<div class="note">{_e(n)}</div>' for n in doc["notes"])
    other = "".join(f"<li>{_e(m)}: mean AUC {_e(v)} ({_e(s)})</li>" for m, v, s in OTHER_MEAN_AUC)

    def fig(key: str, alt: str, missing: str) -> str:
        uri = figures.get(key)
        return _img(uri, alt) if uri else f"<p>{_e(missing)}</p>"

    body = f"""
<h1>kacl evaluation: round {doc['round']}, split {_e(doc['split'])}</h1>
<p class="headline" id="headline">mean AUC <b>{fmt(h['mean_auc'])}</b> ·
mean localization accuracy over T(IoU) 0.1–0.7 <b>{fmt(h['mean_loc_acc'])}</b></p>
<p>Workspace <code>{_e(doc.get('workspace', ws.root))}</code>, run <code>{_e(doc.get('run_id'))}
</code>. Probabilities and boxes: <code>cam_boxes</code> of round {doc['round']} (Grad-CAM of
checkpoint round-{doc['round']}). Definitions: docs/evaluation.md.</p>
{notes}
<h2>Data</h2>
{_workspace_section(ws)}
<h2>Classification</h2>
{auc_table(ws, doc)}
<p>Other published mean AUCs (no per-finding tables):</p><ul>{other}</ul>
{fig('roc', 'ROC curves', 'No finding has both classes on this split: no ROC curve.')}
<h2>Localization</h2>
<p>{loc['n_pairs']} ground-truth boxes on {loc['n_images']} images; each box is one
(image, finding) pair scored against the predicted box of that finding, whatever its
probability. {loc['n_excluded_images']} image(s) of box-supervision patients
({loc['n_excluded_pairs']} boxes) excluded because their boxes supervised training.</p>
<h3>T(IoU)</h3>
<div class="side">{loc_table(doc, 'iou')}{baseline_loc_table('iou')}</div>
{any_of_k_table(doc)}
<h3>T(IoBB) (intersection over the predicted box's area)</h3>
<div class="side">{loc_table(doc, 'iobb')}{baseline_loc_table('iobb')}</div>
{fig('accuracy', 'accuracy vs threshold', 'No ground-truth boxes: no accuracy curves.')}
<h2>Grad-CAM overlays</h2>
<p>Store image with the raw Grad-CAM map of the pair's finding (scaled to its own peak for
display), the ground-truth box in green and the predicted box in red (dashed), both scaled from
original to store pixel coordinates.</p>
{fig('overlays', 'Grad-CAM overlays',
     'No overlays: no ground-truth boxes on this split, or no stored maps for this round.')}
{comparisons_section(comparisons.load(ws, doc['round'], doc['split']))}
"""
    return _page(f"kacl round {doc['round']} ({doc['split']})", body)


def write_round_report(ws: Workspace, data: EvalData, doc: dict[str, Any], path: Path,
                       max_overlays: int = 12) -> Path:
    """Make the plots and write the one-file report of a round."""
    iou, iobb = pair_overlaps(data.pair_pred, data.pair_gt)
    figures: dict[str, str | None] = {}
    loc = doc["localization"]
    for key, make in (
        ("roc", lambda: roc_figure(data)),
        ("accuracy", lambda: accuracy_figure(
            iou, iobb, data.pair_finding,
            {"iou": tuple(loc["iou_thresholds"]), "iobb": tuple(loc["iobb_thresholds"])})),
        ("overlays", lambda: overlay_figure(ws, data, iou, max_overlays)),
    ):
        f = make()
        figures[key] = png_data_uri(f) if f is not None else None
    _write(path, render_round_html(ws, doc, figures))
    return path


# --------------------------------------------------------------------------------------------
# the summary across rounds
# --------------------------------------------------------------------------------------------
def _metric_lookup(ws: Workspace, split: str, rounds: list[int]) -> dict[tuple, tuple]:
    """{(round, metric, finding, threshold): (value, ci_low, ci_high, n)} from the catalog."""
    if not rounds:
        return {}
    marks = ", ".join("?" * len(rounds))
    rows = ws.catalog.query(
        f"SELECT round, metric, finding, threshold, value, ci_low, ci_high, n FROM metrics "
        f"WHERE split = ? AND round IN ({marks})", [split, *rounds])
    return {(r, m, f, None if t is None else round(t, 6)): (v, lo, hi, n)
            for r, m, f, t, v, lo, hi, n in rows}


def rounds_figure(rounds: list[int], mean_auc: list[float | None],
                  mean_loc: list[float | None]) -> Figure:
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot(1, 1, 1)
    for values, label, marker in ((mean_auc, "mean AUC", "o"),
                                  (mean_loc, "mean loc. acc. T(IoU) 0.1–0.7", "s")):
        y = [np.nan if v is None else v for v in values]
        ax.plot(rounds, y, marker=marker, label=label)
    ax.set(xlabel="round", ylabel="value", title="change across rounds", ylim=(0, 1))
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def write_summary_report(ws: Workspace, split: str, rounds: list[int], path: Path,
                         round_reports: dict[int, Path] | None = None) -> Path:
    """Compare rounds on one split from the ``metrics`` table (evaluate each round first)."""
    look = _metric_lookup(ws, split, rounds)

    def val(r: int, metric: str, finding: str = ALL, t: float | None = None) -> tuple:
        return look.get((r, metric, finding, None if t is None else round(t, 6)),
                        (None, None, None, None))

    present = [r for r in rounds if val(r, "mean_auc")[3] is not None
               or val(r, "n_images")[0] is not None]
    rows, aucs, locs = [], [], []
    for r in present:
        v, lo, hi, _ = val(r, "mean_auc")
        loc = val(r, "mean_loc_acc")[0]
        aucs.append(v)
        locs.append(loc)
        link = str(r)
        if round_reports and r in round_reports:
            rel = os.path.relpath(round_reports[r], path.parent)
            link = f'<a href="{_e(rel)}">{r}</a>'
        rows.append([link, fmt(v), f"{fmt(lo)} – {fmt(hi)}" if lo is not None else NA,
                     fmt(loc), fmt(val(r, "mean_loc_acc_iou", ALL, 0.1)[0]),
                     fmt(val(r, "mean_loc_acc_iou", ALL, 0.5)[0]),
                     str(int(val(r, "n_images")[0] or 0)), str(int(val(r, "n_loc_pairs")[0] or 0))])
    table = _table(["round", "mean AUC", "95% CI", "mean loc. acc. T(IoU) 0.1–0.7",
                    "loc. acc. T(IoU)=0.1", "loc. acc. T(IoU)=0.5", "images", "GT boxes"],
                   rows, table_id="rounds",
                   caption=f"Headline metrics per round on split <b>{_e(split)}</b>")
    per_finding = _table(
        ["finding"] + [f"round {r}" for r in present],
        [[_e(f)] + [fmt(val(r, "auc", f)[0]) for r in present] for f in FINDINGS],
        table_id="rounds-auc", caption="Per-finding AUC per round")
    def loc_mean(r: int, f: str) -> float | None:
        values = [val(r, "loc_acc_iou", f, t)[0] for t in IOU_THRESHOLDS]
        return None if any(v is None for v in values) else float(np.mean(values))

    per_loc = _table(
        ["finding"] + [f"round {r}" for r in present],
        [[_e(f)] + [fmt(loc_mean(r, f)) for r in present] for f in BOX_FINDINGS],
        table_id="rounds-loc", caption="Per-finding localization accuracy, mean over "
        "T(IoU) 0.1–0.7, per round")
    plot = _img(png_data_uri(rounds_figure(present, aucs, locs)), "change across rounds") \
        if present else "<p>No evaluated rounds.</p>"
    body = f"""
<h1>kacl evaluation: rounds {', '.join(map(str, present)) or 'none'}, split {_e(split)}</h1>
<p>Round 0 is supervised pre-training; round k &ge; 1 is the k-th contrastive round (trained on the
radiomics of round k-1's Grad-CAM boxes). Each round is evaluated with its own checkpoint's
probabilities and Grad-CAM boxes.</p>
<h2>Data</h2>
{_workspace_section(ws)}
<h2>Across rounds</h2>
{table}
{plot}
<div class="side">{per_finding}{per_loc}</div>
{comparisons_section(comparisons.load(ws, None, split))}
"""
    _write(path, _page(f"kacl rounds ({split})", body))
    return path
