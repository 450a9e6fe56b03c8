"""What the reliability tests compare: the rows bad input (or a kill) must not change."""

from __future__ import annotations

import hashlib
from pathlib import Path

import duckdb
import h5py
import numpy as np

SNAPSHOT = {
    "images": "SELECT * EXCLUDE (row, source_path) FROM images ORDER BY image_id",
    "labels": "SELECT * FROM labels ORDER BY image_id",
    "gt_boxes": "SELECT * FROM gt_boxes ORDER BY ALL",
    "cam_boxes": "SELECT * FROM cam_boxes ORDER BY ALL",
    "rois": "SELECT * FROM rois ORDER BY ALL",
    "radiomics": "SELECT round, image_id, finding, settings_hash, features::VARCHAR, reason "
                 "FROM radiomics ORDER BY ALL",
    "metrics": "SELECT count(*) FROM metrics",
}


def snapshot(ws: Path) -> dict[str, object]:
    """The rows that bad input must not touch, plus the store's pixels per image and the
    checkpoint bytes."""
    out: dict[str, object] = {}
    if not (ws / "catalog.duckdb").exists():
        return out
    con = duckdb.connect(str(ws / "catalog.duckdb"), read_only=True)
    try:
        for table, sql in SNAPSHOT.items():
            out[table] = con.execute(sql).fetchall()
        rows = dict(con.execute("SELECT image_id, row FROM images").fetchall())
    finally:
        con.close()
    images = np.zeros((0, 1, 1), np.uint8)
    if (ws / "store.h5").exists():
        with h5py.File(ws / "store.h5", "r") as f:
            if "images" in f:
                images = f["images"][...]
    out["pixels"] = {i: hashlib.sha256(images[r].tobytes()).hexdigest() for i, r in rows.items()}
    ckpt = ws / "checkpoints" / "round-0" / "model.safetensors"
    if ckpt.exists():
        out["checkpoint"] = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    if (ws / "store.h5").exists():
        with h5py.File(ws / "store.h5", "r") as f:
            cams = f.get("cams")
            if cams is not None:
                out["cams"] = {k: hashlib.sha256(np.asarray(cams[k]).tobytes()).hexdigest()
                               for k in cams if isinstance(cams[k], h5py.Dataset)}
    return out


def running_runs(ws: Path) -> list[tuple]:
    if not (ws / "catalog.duckdb").is_file():
        return []
    con = duckdb.connect(str(ws / "catalog.duckdb"), read_only=True)
    try:
        return con.execute("SELECT run_id, stage FROM runs WHERE status = 'running'").fetchall()
    finally:
        con.close()


def error_reasons(ws: Path) -> list[str]:
    if not (ws / "catalog.duckdb").is_file():
        return []
    con = duckdb.connect(str(ws / "catalog.duckdb"), read_only=True)
    try:
        return [r[0] for r in con.execute("SELECT reason FROM errors").fetchall()]
    finally:
        con.close()
