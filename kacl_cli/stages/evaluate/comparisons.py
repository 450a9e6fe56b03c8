"""The ``comparisons`` table: where ``kacl compare A B`` keeps its result, and what evaluate's
HTML reports list as "Paired comparisons".

Why in the catalog of A, and shown by ``evaluate``: the workspace's report is the one document
people archive and mail (see :mod:`kacl_cli.stages.evaluate.report`), and a paired comparison
is a statement about that workspace's rounds. Keeping the numbers as rows (not a second HTML
file) lets the round report, the summary across rounds and ``--json`` consumers read the same
figures, and lets evaluate's fingerprint notice a new comparison, so the next ``evaluate``
rewrites the report with it.

Long format, one row per metric (``mean_auc``, ``loc_acc``, ``mean_iou``, ``auc/<finding>``);
a new compare of the same (A, B, split), resolved to workspace paths and rounds, replaces the
old rows in one transaction. Nothing is written when the compare fails.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from typing import Any

from kacl_cli.catalog import insert_rows
from kacl_cli.workspace import Workspace, stable_json

TABLE = "comparisons"
HEADLINE = ("mean_auc", "loc_acc", "mean_iou")
AUC_PREFIX = "auc/"


def resolved(root: Path | str) -> str:
    """The workspace path as the table keys it (absolute, symlinks resolved)."""
    return str(Path(root).resolve())


def record(ws: Workspace, doc: dict[str, Any], b_root: Path | str) -> int:
    """Upsert the result of ``kacl compare`` (its document ``doc``, A = ``ws``) into A's
    catalog; returns the number of rows written."""
    ws.catalog.ensure_tables(TABLE)
    a_root = resolved(ws.root)
    b_key = resolved(b_root)
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    metrics = [(m, doc[m]) for m in HEADLINE]
    metrics += [(AUC_PREFIX + f, x) for f, x in doc["per_finding_auc"].items()]
    rows = []
    for name, x in metrics:
        lo, hi = x["ci"]
        rows.append((doc["a"], doc["b"], a_root, int(doc["round_a"]), b_key,
                     int(doc["round_b"]), doc["split"], name, _finite(x["delta"]),
                     _finite(lo), _finite(hi), int(doc["n_images"]), int(doc["n_boot"]),
                     doc.get("seed"), now))
    with ws.catalog.connect() as con:
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(f"DELETE FROM {TABLE} WHERE a_root = ? AND round_a = ? AND b_root = ? "
                        "AND round_b = ? AND split = ?",
                        [a_root, int(doc["round_a"]), b_key, int(doc["round_b"]), doc["split"]])
            n = insert_rows(con, TABLE, rows)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    return n


def _finite(v: float | None) -> float | None:
    return None if v is None or v != v else float(v)


def _has_table(ws: Workspace) -> bool:
    return bool(ws.catalog.query(
        "SELECT 1 FROM duckdb_tables() WHERE table_name = ? AND schema_name = 'main'", [TABLE]))


def _where(ws: Workspace, round_: int | None, split: str) -> tuple[str, list[Any]]:
    """Comparisons of ``split`` in which this workspace's ``round_`` (None: any round) is A or
    B (the rows sit in A's catalog: B is this workspace only when both are)."""
    root = resolved(ws.root)
    if round_ is None:
        return "split = ?", [split]
    return ("split = ? AND ((a_root = ? AND round_a = ?) OR (b_root = ? AND round_b = ?))",
            [split, root, round_, root, round_])


def load(ws: Workspace, round_: int | None, split: str) -> list[dict[str, Any]]:
    """The recorded comparisons (one dict per (A, B): headline metrics and per-finding AUC
    deltas, each ``{"delta", "ci"}``), newest first; [] without any (read only)."""
    if not ws.catalog.path.exists() or not _has_table(ws):
        return []
    where, params = _where(ws, round_, split)
    rows = ws.catalog.query(
        "SELECT a, b, a_root, round_a, b_root, round_b, metric, delta, ci_low, ci_high, "
        f"n_images, n_boot, seed, compared_at FROM {TABLE} WHERE {where} "
        "ORDER BY compared_at DESC, a_root, round_a, b_root, round_b, metric", params)
    out: dict[tuple, dict[str, Any]] = {}
    for a, b, ar, ra, br, rb, metric, delta, lo, hi, n, n_boot, seed, at in rows:
        c = out.setdefault((ar, ra, br, rb), {
            "a": a, "b": b, "round_a": ra, "round_b": rb, "n_images": n, "n_boot": n_boot,
            "seed": seed, "compared_at": str(at), "per_finding_auc": {}})
        x = {"delta": delta, "ci": [lo, hi]}
        if metric.startswith(AUC_PREFIX):
            c["per_finding_auc"][metric[len(AUC_PREFIX):]] = x
        else:
            c[metric] = x
    return list(out.values())


def digest(ws: Workspace, round_: int, split: str) -> list:
    """What evaluate's fingerprint takes of the comparisons its report would list."""
    if not _has_table(ws):
        return []
    where, params = _where(ws, round_, split)
    (n, h), = ws.catalog.query(
        f"SELECT count(*), bit_xor(hash(a, b, a_root, round_a, b_root, round_b, metric, delta, "
        f"ci_low, ci_high, n_images, n_boot, compared_at)) FROM {TABLE} WHERE {where}", params)
    return [int(n), hashlib.sha256(stable_json([h]).encode()).hexdigest()[:16]]
