"""The ``evaluate`` stage: metrics of one round on one split, written three ways.

It makes sure the round's cam_boxes cover the split (running the cam stage when they are
missing or older than the checkpoint), reads the data (:mod:`~kacl_cli.stages.evaluate.data`),
computes the metrics document (:mod:`~kacl_cli.stages.evaluate.metrics`), and writes the
``metrics`` table, ``metrics.json`` and the HTML report
(:mod:`~kacl_cli.stages.evaluate.report`). Definitions in docs/evaluation.md.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

from kacl_cli.catalog import insert_rows, label_columns_sql
from kacl_cli.errors import KaclError, NotReadyError
from kacl_cli.models.checkpoint_files import META_FILE
from kacl_cli.progress import Note, note_stderr
from kacl_cli.stages.evaluate import comparisons
from kacl_cli.stages.evaluate.config import EvaluateConfig
from kacl_cli.stages.evaluate.data import load_eval_data
from kacl_cli.stages.evaluate.metrics import compute_metrics, metric_rows
from kacl_cli.workspace import Workspace, stable_json

STAGE = "evaluate"


def write_metrics(ws: Workspace, doc: dict[str, Any], run_id: str | None) -> None:
    """Replace the round+split's rows of the ``metrics`` table (one transaction)."""
    rows = metric_rows(doc, run_id)
    with ws.catalog.connect() as con:
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute("DELETE FROM metrics WHERE round = ? AND split = ?",
                        [doc["round"], doc["split"]])
            insert_rows(con, "metrics", rows)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise


def _cam_coverage(ws: Workspace, round_: int, split: str) -> tuple[int, int]:
    """(images of the split with cam_boxes rows for the round, images of the split)."""
    (covered, total), = ws.catalog.query(
        "SELECT count(DISTINCT c.image_id), (SELECT count(*) FROM images WHERE split = ?) "
        "FROM cam_boxes c JOIN images i USING (image_id) WHERE c.round = ? AND i.split = ?",
        [split, round_, split],
    )
    return int(covered), int(total)


def _cams_stale(ws: Workspace, round_: int) -> bool:
    """True when checkpoint round-K is newer than the last finished cam run of round K (the
    round was re-trained after its maps were made)."""
    meta = ws.checkpoint_dir(round_) / META_FILE
    if not meta.exists():
        return False
    rows = ws.catalog.query(
        "SELECT max(finished_at) FROM runs WHERE stage = 'cam' AND round = ? AND status = 'done'",
        [round_])
    last = rows[0][0] if rows else None
    if last is None:
        return False
    trained = dt.datetime.fromtimestamp(meta.stat().st_mtime, dt.timezone.utc).replace(tzinfo=None)
    return trained > last


def ensure_cams(ws: Workspace, round_: int, split: str, device: str = "auto",
                note: Note = note_stderr) -> None:
    """Run the cam stage for (round, split) when its cam_boxes are missing or stale."""
    covered, total = _cam_coverage(ws, round_, split)
    if total == 0:
        raise NotReadyError(f"split {split!r} has no images in {ws.root}")
    has_ckpt = round_ in ws.finished_rounds()
    if covered == total and not _cams_stale(ws, round_):
        return
    if not has_ckpt:
        if covered:
            return  # partial maps and nothing to recompute them from: evaluate, with a note
        raise NotReadyError(
            f"no cam_boxes for round {round_} on split {split!r} and no checkpoint round-"
            f"{round_} to compute them: run `kacl pretrain` / `kacl contrast` first"
        )
    note(f"evaluate: cam_boxes of round {round_} on split {split!r} "
         f"{'are older than the checkpoint' if covered == total else 'missing'}; "
         f"running the cam stage")
    from kacl_cli.lock import workspace_lock
    from kacl_cli.stages.cam.stage import run_cam_stage

    with workspace_lock(ws.root, "evaluate"):  # a writer now (kacl_cli.lock)
        run_cam_stage(ws, round_, split=split, device=device)


def fingerprint(ws: Workspace, round_: int, split: str) -> str:
    """Digest of the evaluation's inputs: the round's cam runs, cam_boxes and ranked boxes of
    the split, the split's labels, its GT boxes, the box-supervision set and the recorded
    paired comparisons of the round (``kacl compare``)."""
    cat = ws.catalog
    cat.ensure_tables("cam_boxes_ranked")
    parts = [
        cat.query("SELECT string_agg(run_id, ',' ORDER BY run_id) FROM runs "
                  "WHERE stage = 'cam' AND round = ? AND status = 'done'", [round_]),
        cat.query("SELECT count(*), bit_xor(hash(c.image_id, c.finding, c.probability, c.x, c.y, "
                  "c.w, c.h)) FROM cam_boxes c JOIN images i USING (image_id) "
                  "WHERE c.round = ? AND i.split = ?", [round_, split]),
        cat.query("SELECT count(*), bit_xor(hash(c.image_id, c.finding, c.rank, c.x, c.y, c.w, "
                  "c.h)) FROM cam_boxes_ranked c JOIN images i USING (image_id) "
                  "WHERE c.round = ? AND i.split = ?", [round_, split]),
        cat.query(f"SELECT count(*), bit_xor(hash(i.image_id, i.row, i.orig_width, i.orig_height, "
                  f"{label_columns_sql()})) FROM images i JOIN labels l USING (image_id) "
                  "WHERE i.split = ?", [split]),
        cat.query("SELECT count(*), bit_xor(hash(g.image_id, g.finding, g.x, g.y, g.w, g.h)) "
                  "FROM gt_boxes g JOIN images i USING (image_id) WHERE i.split = ?", [split]),
        cat.query("SELECT count(*), bit_xor(hash(image_id)) FROM box_supervision"),
        comparisons.digest(ws, round_, split),  # the report lists them: a new one rewrites it
    ]
    return hashlib.sha256(stable_json(parts).encode()).hexdigest()[:16]


def headline(ws: Workspace, round_: int, split: str = "test") -> dict[str, float | None]:
    """Mean AUC and mean localization accuracy over T(IoU) 0.1..0.7 of a round, computed from
    the current cam_boxes (running the cam stage if they are missing); no bootstrap, no
    report, nothing written. The figure benchmarks compare rounds and ablations by."""
    ensure_cams(ws, round_, split)
    doc = compute_metrics(load_eval_data(ws, round_, split), n_boot=0)
    return dict(doc["headline"])


def report_dir(ws: Workspace, round_: int, out: Path | None) -> Path:
    return Path(out) if out is not None else ws.reports / f"round-{round_}"


def run(ws: Workspace, round_: int, cfg: EvaluateConfig,
        note: Note = note_stderr) -> dict[str, Any]:
    """Evaluate one round: metrics table rows, metrics.json and report.html in the report dir.

    Returns the metrics document (with ``skipped: True`` when an identical finished run and its
    files exist, in which case nothing is recomputed).
    """
    from kacl_cli.stages.evaluate.report import (
        write_round_report,  # matplotlib: imported only when a report is made
    )

    if cfg.n_boot < 0:
        raise KaclError(f"--bootstrap must be >= 0, got {cfg.n_boot}")
    split = cfg.split
    ensure_cams(ws, round_, split, cfg.device, note)
    directory = report_dir(ws, round_, cfg.out)
    metrics_path = directory / "metrics.json"
    report_path = directory / "report.html"
    config = {"round": round_, "split": split, "bootstrap": cfg.n_boot, "seed": cfg.seed,
              "overlays": cfg.overlays, "out": str(directory.resolve())}
    fp = fingerprint(ws, round_, split)
    # An identical finished run is only skipped while its files are still there.
    files = metrics_path.exists() and report_path.exists()
    with ws.stage_run(STAGE, config, fp, round_=round_, force=cfg.force or not files) as run_:
        if run_.skipped:
            note(f"evaluate round {round_}: done, skipping (same config and inputs; "
                 "--force re-runs)")
            return {**json.loads(metrics_path.read_text()), "skipped": True}
        data = load_eval_data(ws, round_, split)
        doc = compute_metrics(data, n_boot=cfg.n_boot, seed=cfg.seed)
        doc["run_id"] = run_.run_id
        doc["workspace"] = str(ws.root)
        doc["report"] = str(report_path)
        doc["metrics_json"] = str(metrics_path)
        directory.mkdir(parents=True, exist_ok=True)
        write_round_report(ws, data, doc, report_path, max_overlays=cfg.overlays)
        tmp = metrics_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(metrics_path)
        write_metrics(ws, doc, run_.run_id)
        run_.summary = {"round": round_, "split": split, **doc["headline"],
                        "n_images": doc["n_images"],
                        "n_loc_pairs": doc["localization"]["n_pairs"],
                        "report": str(report_path)}
    return {**doc, "skipped": False}


def evaluate_round(ws: Workspace, round_: int, *, split: str = "test", out: Path | None = None,
                   n_boot: int = 1000, seed: int = 0, overlays: int = 12, force: bool = False,
                   device: str = "auto", note: Note = note_stderr) -> dict[str, Any]:
    """:func:`run` with keyword settings (tests, benchmarks)."""
    return run(ws, round_, EvaluateConfig(split=split, out=out, n_boot=n_boot, seed=seed,
                                          overlays=overlays, force=force, device=device), note)
