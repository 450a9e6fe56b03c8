"""The radiomics stage: ROIs of a round -> features in the catalog, and the loader for training.

Flow of :func:`run_radiomics_stage`:
1. resolve settings (defaults + ``--params``) and the ROI list (:mod:`.rois`);
2. ``ws.begin`` (an identical finished run is skipped);
3. write the ROI rows of the processed images, dropping ROIs (and their features) that
   changed since an earlier run;
4. compute the ROIs that have no feature row with these settings and this backend yet, in
   chunks of ``Backend.rois_per_task`` ROIs across ``workers`` processes; each chunk's rows
   are committed in one transaction, so a killed run resumes where it stopped and never
   duplicates rows;
5. per-feature training-split statistics over the positive ROIs (``radiomics_stats``).

Workers read their images from the store themselves (:class:`~kacl_cli.store.ImageReader`)
and return plain arrays; only the main process writes to the catalog (DuckDB: one writer).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kacl_cli import progress
from kacl_cli.catalog import ListRows, insert_columns
from kacl_cli.errors import InputError, KaclError, NotReadyError
from kacl_cli.parallel import pool_pays, process_pool
from kacl_cli.sharding.merge import run_sharded
from kacl_cli.sharding.parts import Shard, ddp_sharding
from kacl_cli.stages.radiomics import settings as settings_mod
from kacl_cli.stages.radiomics.backends.base import BACKENDS, DEFAULT_BACKEND, Backend, get_backend
from kacl_cli.stages.radiomics.backends.pyrad import single_threaded_sitk
from kacl_cli.stages.radiomics.parts import HOOKS
from kacl_cli.stages.radiomics.rois import (
    DEFAULT_MIN_PROB,
    ROI_MODES,
    Roi,
    build_rois,
    select_images,
)
from kacl_cli.stages.radiomics.stats import compute_stats
from kacl_cli.store import ImageReader
from kacl_cli.workspace import StageRun, Workspace, stable_json

STAGE = "radiomics"
# Work (estimated one-core seconds) short enough to keep the stage's catalog connection
# open across it: reopening costs ~50 ms, and other processes wait at most this long.
HOLD_CATALOG_S = 1.0


# -- worker side ----------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(store_path: str, backend_name: str, settings: dict[str, Any]) -> None:
    """Per-process state: one open store reader and one backend (built once, not per chunk).
    SimpleITK only for the backend that uses it (importing it costs ~0.2 s)."""
    if backend_name == "pyradiomics":
        single_threaded_sitk()
    _WORKER["reader"] = ImageReader(Path(store_path))
    _WORKER["backend"] = get_backend(backend_name)
    _WORKER["settings"] = settings


def _extract_chunk(
    task: tuple[int, list[int], list[tuple[int, int, int, int]], list[tuple[float, float]]],
) -> tuple[int, np.ndarray, list[str | None]]:
    """Features of one chunk: (chunk id, n x F float64, reasons)."""
    chunk_id, rows, boxes, spacings = task
    reader: ImageReader = _WORKER["reader"]
    backend: Backend = _WORKER["backend"]
    uniq, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
    pixels = reader.batch(uniq)
    images = [pixels[j] for j in inverse]
    res = backend.extract(images, boxes, _WORKER["settings"], spacings)
    return chunk_id, res.features, res.reasons


# -- main side ------------------------------------------------------------------------------
def _roi_fingerprint(rois: list[Roi], n_rows: int, size: int) -> str:
    h = hashlib.sha256(f"{n_rows}:{size}".encode())
    for r in rois:
        h.update(f"{r.image_id}|{r.finding}|{r.source}|{r.box}|{r.is_positive}|{r.spacing}\n"
                 .encode())
    return h.hexdigest()[:16]


def _sync_rois(ws: Workspace, round_: int, rois: list[Roi], image_ids: list[str],
               settings: dict[str, Any], names: list[str], force: bool) -> None:
    """Write the round's ROI rows for the processed images; drop changed ones' features."""
    shash = settings_mod.settings_hash(settings)
    settings_json = stable_json(settings)
    # whole columns as registered numpy views: one statement instead of one per row
    # (executemany costs ~4 ms a row; a full NIH round has ~10^5 ROIs), and no temp tables
    views = {
        "scope": {"image_id": np.array(image_ids, dtype=object)},
        "new_rois": {
            "image_id": np.array([r.image_id for r in rois], dtype=object),
            "finding": np.array([r.finding for r in rois], dtype=object),
            "source": np.array([r.source for r in rois], dtype=object),
            **{k: np.array([r.box[j] for r in rois], dtype=np.int64)
               for j, k in enumerate(("x0", "y0", "x1", "y1"))},
            "is_positive": np.array([r.is_positive for r in rois], dtype=bool),
        },
    }
    with ws.catalog.connect() as con:
        for name, columns in views.items():
            con.register(name, columns)
        try:
            con.execute("BEGIN TRANSACTION")
            if not force:  # with force every feature row of these images goes below anyway
                # features of ROIs whose rectangle changed (or vanished) are stale
                stale = (
                    "SELECT o.image_id, o.finding FROM rois o JOIN scope s USING (image_id) "
                    "LEFT JOIN new_rois n USING (image_id, finding) WHERE o.round = ? AND "
                    "(n.image_id IS NULL OR n.x0 <> o.x0 OR n.y0 <> o.y0 OR n.x1 <> o.x1 "
                    "OR n.y1 <> o.y1)"
                )
                con.execute(
                    f"DELETE FROM radiomics WHERE round = ? AND (image_id, finding) IN ({stale})",
                    [round_, round_],
                )
            if force:
                con.execute(
                    "DELETE FROM radiomics WHERE round = ? AND image_id IN (SELECT image_id FROM "
                    "scope)", [round_],
                )
            else:
                # features of ROIs that no longer exist in the new ROI set (orphans)
                con.execute(
                    "DELETE FROM radiomics WHERE round = ? AND image_id IN (SELECT image_id FROM "
                    "scope) AND (image_id, finding) NOT IN (SELECT image_id, finding FROM "
                    "new_rois)", [round_],
                )
            con.execute(
                "DELETE FROM rois WHERE round = ? AND image_id IN (SELECT image_id FROM scope)",
                [round_],
            )
            con.execute(
                "INSERT INTO rois SELECT ?, image_id, finding, source, x0, y0, x1, y1, "
                "is_positive FROM new_rois", [round_],
            )
            # the settings and their column names: rewritten only when they differ
            known = con.execute(
                "SELECT (SELECT settings_json FROM radiomics_settings WHERE settings_hash = ?), "
                "(SELECT list(name ORDER BY feature_index) FROM radiomics_features "
                "WHERE settings_hash = ?)", [shash, shash],
            ).fetchall()[0]
            if known != (settings_json, list(names)):
                con.execute("INSERT OR REPLACE INTO radiomics_settings VALUES (?, ?)",
                            [shash, settings_json])
                con.execute("DELETE FROM radiomics_features WHERE settings_hash = ?", [shash])
                insert_columns(con, "radiomics_features", {
                    "settings_hash": [shash] * len(names),
                    "feature_index": list(range(len(names))), "name": list(names),
                })
            con.execute("COMMIT")
        finally:
            for name in views:
                con.unregister(name)


def _todo(ws: Workspace, round_: int, rois: list[Roi], shash: str, backend: str) -> list[Roi]:
    """ROIs without a feature row computed with these settings by this backend."""
    done = {
        (r[0], r[1])
        for r in ws.catalog.query(
            "SELECT image_id, finding FROM radiomics WHERE round = ? AND settings_hash = ? "
            "AND backend = ?", [round_, shash, backend],
        )
    }
    return [r for r in rois if r.key not in done]


def _write_chunk(ws: Workspace, run: StageRun, round_: int, rois: list[Roi],
                 features: np.ndarray, reasons: list[str | None], backend: str,
                 shash: str) -> tuple[int, int]:
    """Commit one chunk's rows; return (failed ROIs, nonfinite values)."""
    failed_row = np.array([reason is not None for reason in reasons], dtype=bool)
    values = np.asarray(features, dtype=np.float64).reshape(len(rois), -1).astype(np.float32)
    counts = np.where(failed_row, 0, (~np.isfinite(features)).reshape(len(rois), -1).sum(1))
    with ws.catalog.connect() as con:
        # numpy columns (scanned, no list parameters to bind: issue 18's fixed cost)
        insert_columns(con, "radiomics", {
            "round": np.full(len(rois), round_, dtype=np.int64),
            "image_id": np.array([r.image_id for r in rois], dtype=object),
            "finding": np.array([r.finding for r in rois], dtype=object),
            "backend": np.full(len(rois), backend, dtype=object),
            "settings_hash": np.full(len(rois), shash, dtype=object),
            "features": ListRows(values, failed_row),
            "n_nonfinite": counts.astype(np.int64),
            "reason": np.array(list(reasons), dtype=object),
        }, replace=True)
    n_nonfinite = int(counts.sum())
    failed = [(f"{r.image_id}/{r.finding}", reason)
              for r, reason in zip(rois, reasons, strict=True) if reason is not None]
    run.errors(failed)
    return len(failed), n_nonfinite


def _chunks(rois: list[Roi], size: int) -> list[list[Roi]]:
    return [rois[i:i + size] for i in range(0, len(rois), size)]


def _compute(ws: Workspace, run: StageRun, round_: int, todo: list[Roi], backend: str,
             settings: dict[str, Any], workers: int, chunk: int) -> dict[str, Any]:
    shash = settings_mod.settings_hash(settings)
    chunks = _chunks(todo, chunk)
    tasks = [(i, [r.row for r in c], [r.box for r in c], [r.spacing for r in c])
             for i, c in enumerate(chunks)]
    failed = nonfinite = written = 0
    reasons: Counter[str] = Counter()
    init_args = (str(ws.store.path), backend, settings)
    with progress.bar(len(todo), f"radiomics round {round_}", unit="roi") as pb:
        def consume(result: tuple[int, np.ndarray, list[str | None]]) -> None:
            nonlocal failed, nonfinite, written
            cid, feats, why = result
            f, nf = _write_chunk(ws, run, round_, chunks[cid], feats, why, backend, shash)
            failed += f
            nonfinite += nf
            reasons.update(_reason_kind(w) for w in why if w is not None)
            pb.update(len(chunks[cid]))
            written += 1
            if written < len(chunks):  # more to compute: let other processes read meanwhile
                ws.catalog.release()

        est_s = len(todo) * get_backend(backend).seconds_per_roi
        if est_s > HOLD_CATALOG_S:  # else the catalog stays open across this short compute
            ws.catalog.release()
        if workers <= 1 or len(tasks) <= 1 or not pool_pays(est_s, workers):
            _init_worker(*init_args)
            try:
                for task in tasks:
                    consume(_extract_chunk(task))
            finally:
                _WORKER["reader"].close()
                _WORKER.clear()
        else:
            # no inherited h5py/duckdb handles or locks (see kacl_cli.parallel)
            with process_pool(min(workers, len(tasks)), _init_worker, init_args,
                              preload=(__name__,)) as pool:
                for result in pool.imap_unordered(_extract_chunk, tasks):
                    consume(result)
    return {"failed": failed, "nonfinite": nonfinite, "reasons": dict(reasons)}


def _reason_kind(reason: str) -> str:
    """Group reasons for the summary ("ROI thinner than 2 px (1x5)" -> "ROI thinner than 2 px")."""
    return reason.split(" (")[0].split(":")[0]


# -- the stage ------------------------------------------------------------------------------
def run_radiomics_stage(
    ws: Workspace,
    round_: int,
    *,
    roi: str = "cam",
    backend: str = DEFAULT_BACKEND,
    params: Path | str | None = None,
    workers: int = 1,
    split: str | list[str] | None = None,
    force: bool = False,
    shard: Shard | None = None,
    min_prob: float = DEFAULT_MIN_PROB,
    chunk: int | None = None,  # ROIs per task; None: the backend's ``rois_per_task``
    label_fraction: float = 1.0,  # roi labelled/oracle only (rois.py)
    normal_positive: str = "skip",  # roi labelled/oracle only
) -> dict[str, Any]:
    """Compute the round's radiomics; returns the summary (``skipped: True`` if already done).

    ``shard`` computes that shard's images (sorted image_id, positions i, i+n, ...) into a
    part of its own, folded in by ``kacl merge`` (which also recomputes the statistics);
    under torchrun rank r of N runs shard r/N and rank 0 merges
    (see :mod:`kacl_cli.stages.radiomics.parts`).
    """
    ws.require()
    if roi not in ROI_MODES:
        raise InputError(f"--roi must be one of {', '.join(ROI_MODES)}, got {roi!r}")
    if backend not in BACKENDS:
        raise InputError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    if not 0.0 <= min_prob <= 1.0:
        raise InputError(f"--min-prob must be in [0, 1], got {min_prob}")
    splits = [split] if isinstance(split, str) else (list(split) if split else None)
    whole = functools.partial(_run_whole, round_=round_, roi=roi, backend=backend,
                              params=params, workers=workers, splits=splits, force=force,
                              min_prob=min_prob, chunk=chunk, label_fraction=label_fraction,
                              normal_positive=normal_positive)
    if shard is not None or ddp_sharding():
        return run_sharded(ws, HOOKS, round_, shard, whole, force=force)
    return whole(ws)


def _run_whole(ws: Workspace, **kwargs: Any) -> dict[str, Any]:
    """The stage on ``ws`` (the workspace, or a shard's part), never sharded again; its
    bookkeeping shares one catalog connection (:meth:`Catalog.session`)."""
    with ws.catalog.session():
        return _run_whole_session(ws, **kwargs)


def _run_whole_session(ws: Workspace, *, round_: int, roi: str, backend: str,
                       params: Path | str | None, workers: int, splits: list[str] | None,
                       force: bool, min_prob: float, chunk: int | None, label_fraction: float,
                       normal_positive: str) -> dict[str, Any]:
    settings = settings_mod.load_settings(params)
    impl = get_backend(backend)  # fail early when a backend is unavailable
    names = impl.feature_names(settings)
    shash = settings_mod.settings_hash(settings)
    size = ws.store.image_size()

    images = select_images(ws, splits)
    if not images:
        raise InputError(f"no images in split(s) {', '.join(splits or ['any'])}")
    rois = build_rois(ws, round_, images, roi=roi, min_prob=min_prob,
                      spacing=settings_mod.spacing_mode(settings), size=size,
                      label_fraction=label_fraction, normal_positive=normal_positive)
    config = {"round": round_, "roi": roi, "backend": backend, "settings_hash": shash,
              "min_prob": min_prob, "split": splits}
    if roi in ("labelled", "oracle"):  # only there: older configs keep their hash
        config.update(label_fraction=label_fraction, normal_positive=normal_positive)
    fingerprint = _roi_fingerprint(rois, ws.store.n_rows(), size)
    # "done" is only worth skipping while every ROI still has its row with these settings:
    # a run with other settings since then replaced them (kacl_cli.skips).
    with ws.stage_run(STAGE, config, fingerprint, round_=round_, force=force,
                      intact=lambda done: not _todo(ws, round_, rois, shash, impl.name)) as run:
        if run.skipped:
            return run.result()
        t0 = time.perf_counter()
        _sync_rois(ws, round_, rois, list(images), settings, names, force)
        todo = _todo(ws, round_, rois, shash, impl.name)
        done = _compute(ws, run, round_, todo, impl.name, settings, workers,
                        chunk or impl.rois_per_task)
        n_train = compute_stats(ws, round_, shash, len(names))
        seconds = time.perf_counter() - t0
        summary = {
            "round": round_,
            "roi": roi,
            "backend": impl.name,
            "settings_hash": shash,
            "features": len(names),
            "images": len(images),
            "rois": len(rois),
            "positive_rois": sum(r.is_positive for r in rois),
            "gt_rois": sum(r.source == "gt" for r in rois),
            "computed": len(todo),
            "reused": len(rois) - len(todo),
            "failed": done["failed"],
            "failed_reasons": done["reasons"],
            "nonfinite_values": done["nonfinite"],
            "spacing_unknown_images": len({r.image_id for r in rois if not r.spacing_known}),
            "train_rows_for_stats": n_train,
            "workers": workers,
            "seconds": round(seconds, 3),
            "rois_per_s": round(len(todo) / seconds, 2) if seconds > 0 and todo else 0.0,
        }
        if todo and done["failed"] == len(rois):  # nothing usable came out (issue 15)
            reasons = ", ".join(f"{k}: {v}" for k, v in done["reasons"].items())
            raise KaclError(f"radiomics round {round_}: every one of the {len(rois)} ROIs "
                            f"failed ({reasons})")
        run.summary = summary
    return run.result()


# -- loading for training -------------------------------------------------------------------
@dataclass
class PositiveFeatures:
    """One row per image with a usable positive ROI, z-scored with training statistics."""

    image_ids: list[str]
    features: np.ndarray  # n x F float32, finite
    names: list[str]
    settings_hash: str
    n_nonfinite: int  # values that were NaN/inf and were set to 0 (the training mean)
    n_failed: int  # images whose positive ROI gave no features (left out)


def latest_settings_hash(ws: Workspace, round_: int) -> str:
    """Settings of the round's most recent finished radiomics run (else the only ones)."""
    rows = ws.catalog.query(
        "SELECT config_json FROM runs WHERE stage = ? AND round = ? AND status = 'done' "
        "ORDER BY finished_at DESC", [STAGE, round_],
    )
    stats = {r[0] for r in ws.catalog.query(
        "SELECT DISTINCT settings_hash FROM radiomics_stats WHERE round = ?", [round_])}
    for (cfg,) in rows:
        h = json.loads(cfg).get("settings_hash")
        if h in stats:
            return h
    if len(stats) == 1:
        return stats.pop()
    if not stats:
        raise NotReadyError(
            f"no radiomics statistics for round {round_}: run `kacl radiomics --round {round_}` "
            "(including the train split)"
        )
    raise KaclError(f"several radiomics settings for round {round_}; pass settings_hash")


def load_positive_features(ws: Workspace, round_: int,
                           settings_hash: str | None = None) -> PositiveFeatures:
    """The contrastive positives of a round: z-scored features of each image's positive ROI.

    NaN/inf never reach a model: they are counted and replaced by 0 (= the training mean
    after z-scoring). Images whose positive ROI failed are left out (counted in n_failed).
    """
    shash = settings_hash or latest_settings_hash(ws, round_)
    names = [r[0] for r in ws.catalog.query(
        "SELECT name FROM radiomics_features WHERE settings_hash = ? ORDER BY feature_index",
        [shash])]
    stats = ws.catalog.query(
        "SELECT mean, std FROM radiomics_stats WHERE round = ? AND settings_hash = ? "
        "ORDER BY feature_index", [round_, shash])
    if not names or len(stats) != len(names):
        raise NotReadyError(
            f"no radiomics statistics for round {round_} and settings {shash}: run "
            f"`kacl radiomics --round {round_}` (including the train split)"
        )
    rows = ws.catalog.query(
        "SELECT r.image_id, r.features FROM radiomics r JOIN rois o "
        "USING (round, image_id, finding) JOIN images i USING (image_id) "
        "WHERE r.round = ? AND r.settings_hash = ? AND o.is_positive ORDER BY i.row",
        [round_, shash],
    )
    ok = [(i, f) for i, f in rows if f is not None]
    mean = np.array([s[0] for s in stats], dtype=np.float64)
    std = np.array([s[1] for s in stats], dtype=np.float64)
    x = np.asarray([f for _, f in ok], dtype=np.float64).reshape(len(ok), len(names))
    z = (x - mean) / std
    finite = np.isfinite(z)
    n_nonfinite = int((~finite).sum())
    z = np.where(finite, z, 0.0).astype(np.float32)
    return PositiveFeatures([i for i, _ in ok], z, names, shash, n_nonfinite,
                            len(rows) - len(ok))
