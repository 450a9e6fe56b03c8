"""The ``cam`` stage: Grad-CAM maps and boxes of every finding for the images of a split.

Inputs: checkpoint ``round-K`` and the store's images. Outputs: raw maps (float16, the feature
map's h x w, never min-max normalised) in ``store.h5:/cams/round-K``, and one ``cam_boxes``
row per (image, finding) with the sigmoid probability and the box in ORIGINAL pixel
coordinates (NULL box + reason for empty/flat maps). ``evaluate`` reads its AUC
probabilities from these rows, ``radiomics --round K`` its ROIs.

Resumable: images are processed in chunks; each chunk's maps are written first, then its
``cam_boxes`` rows in one transaction, so an image with rows is complete and a re-run skips
it. Which checkpoint (content hash) and threshold the round's rows were made with is kept in
the catalog's ``meta`` table (key ``cam:round-K``): rows made by an older checkpoint of the
same round or another threshold are dropped instead of being "resumed".
"""

from __future__ import annotations

import functools
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from kacl_cli import progress
from kacl_cli.boxes import scale_xywh
from kacl_cli.catalog import insert_columns
from kacl_cli.device import resolve_device
from kacl_cli.errors import CheckpointError, InputError, NotReadyError
from kacl_cli.findings import FINDINGS
from kacl_cli.models.checkpoint import load_image_net, preprocess
from kacl_cli.models.checkpoint_files import checkpoint_fingerprint
from kacl_cli.sharding.merge import run_sharded
from kacl_cli.sharding.parts import Shard, ddp_sharding
from kacl_cli.stages.cam import box_rules as br
from kacl_cli.stages.cam.config import CamConfig
from kacl_cli.stages.cam.gradcam import batched_gradcam
from kacl_cli.stages.cam.localize import BoxRule, check_max_boxes, localize
from kacl_cli.stages.cam.parts import HOOKS, state_key
from kacl_cli.stages.rounds import resolve_round
from kacl_cli.store import cam_key
from kacl_cli.training.loader import SPLITS, StoreDataset
from kacl_cli.workspace import StageRun, Workspace, stable_json

STAGE = "cam"
# Model time (seconds, projected from the chunk's first batch) short enough to keep the
# stage's catalog connection open across it: reopening costs ~50-80 ms (issue 18), and other
# processes wait at most this long. DataLoader workers (fork) never see it open.
HOLD_CATALOG_S = 1.0
_DEFAULTS = CamConfig()
# Bumped when the maps or the box rule change meaning, so old results are not reused.
METHOD = "gradcam-gap-linear/v2-upsampled"

_COLUMNS = ("round", "image_id", "finding", "probability", "x", "y", "w", "h", "peak", "mass",
            "reason")


def resolve_splits(split: str | None) -> tuple[str, list[str]]:
    """(name recorded in the config, splits to process); None means all splits."""
    name = split or "all"
    if name == "all":
        return name, list(SPLITS)
    if name not in SPLITS:
        raise InputError(f"--split {split!r}: expected train, val, test or all")
    return name, [name]


def run(ws: Workspace, cfg: CamConfig, shard: Shard | None = None) -> dict[str, Any]:
    """The cam stage with a :class:`CamConfig` (see :func:`run_cam_stage`)."""
    return run_cam_stage(ws, cfg.round, split=cfg.split, batch_size=cfg.batch_size,
                         threshold=cfg.threshold, device=cfg.device, force=cfg.force,
                         shard=shard, workers=cfg.workers, chunk_size=cfg.chunk_size,
                         max_boxes=cfg.max_boxes)


def run_cam_stage(
    ws: Workspace,
    round_: int | None = None,
    *,
    split: str | None = None,
    batch_size: int = _DEFAULTS.batch_size,
    threshold: float | None = _DEFAULTS.threshold,
    device: str = _DEFAULTS.device,
    force: bool = False,
    shard: Shard | None = None,
    workers: int = _DEFAULTS.workers,
    chunk_size: int = _DEFAULTS.chunk_size,
    max_boxes: int = _DEFAULTS.max_boxes,
    rules: br.FittedRules | None = None,
) -> dict[str, Any]:
    """Compute maps and boxes of all findings for the images of ``split`` (None = all).

    Returns the run summary (with ``skipped: True`` when an identical run had finished).
    With ``shard`` (or under torchrun: rank r of N = shard r/N, merged by rank 0) the
    shard's images are processed into a part (see :mod:`kacl_cli.stages.cam.parts`).
    """
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise InputError(f"--threshold {threshold}: must be a fraction of the peak in (0, 1]")
    check_max_boxes(max_boxes)
    if batch_size < 1 or chunk_size < 1 or workers < 0:
        raise InputError("--batch-size must be >= 1 and --workers >= 0")
    ws.require()
    sharded = shard is not None or ddp_sharding()
    # One catalog connection for the look-ups and, unsharded, the whole run (Catalog.session);
    # never held across a sharded run, whose other ranks read this catalog.
    with ws.catalog.session():
        ws.catalog.ensure_tables("box_rules", "box_rule_images", "cam_boxes_ranked")
        resolve_splits(split)
        round_ = resolve_round(ws, round_)
        if rules is None:
            # Before sharding: every part must cut its maps with the same rules.
            rules = box_rules_for(ws, round_, ws.checkpoint_dir(round_), threshold, device,
                                  batch_size, workers)
        whole = functools.partial(_run_whole, round_=round_, split=split,
                                  batch_size=batch_size, threshold=threshold, device=device,
                                  force=force, workers=workers, chunk_size=chunk_size,
                                  max_boxes=max_boxes, rules=rules)
        if not sharded:
            return whole(ws)
    return run_sharded(ws, HOOKS, round_, shard, whole, device=device, force=force)


def _run_whole(ws: Workspace, **kwargs: Any) -> dict[str, Any]:
    """The stage on ``ws`` (the workspace, or a shard's part), never sharded again; its
    bookkeeping shares one catalog connection, released while the model runs."""
    with ws.catalog.session():
        return _run_whole_session(ws, **kwargs)


def _run_whole_session(ws: Workspace, *, round_: int, split: str | None, batch_size: int,
                       threshold: float | None, device: str, force: bool, workers: int,
                       chunk_size: int, max_boxes: int, rules: br.FittedRules
                       ) -> dict[str, Any]:
    split_name, splits = resolve_splits(split)
    ckpt = ws.checkpoint_dir(round_)
    images = _images(ws, splits)
    if not len(images["image_id"]):
        raise NotReadyError(f"no images in split {split_name}: check `kacl prepare`'s splits")
    ckpt_hash = checkpoint_fingerprint(ckpt)
    config = {"round": round_, "threshold": threshold, "box_rules": rules.digest(),
              "box_rule_source": rules.source, "split": split_name, "method": METHOD,
              "max_boxes": int(max_boxes)}
    fingerprint = f"checkpoint={ckpt_hash};images={len(images['image_id'])}"
    state = stable_json({"checkpoint": ckpt_hash, "box_rules": rules.digest(),
                         "method": METHOD, "max_boxes": int(max_boxes)})
    # An identical finished run is only worth skipping if its rows are still there: a run with
    # another threshold (or a retrained checkpoint) since then has replaced them.
    intact = _rows_intact(ws, round_, state, images["image_id"])
    with ws.stage_run(STAGE, config, fingerprint, round_=round_,
                      force=force or not intact) as run:
        if run.skipped:
            return run.result()
        run.summary = _work(ws, run, round_, ckpt, state, images, config, batch_size,
                            device, force, workers, chunk_size, rules, max_boxes)
    return run.result()


def _images(ws: Workspace, splits: list[str]) -> dict[str, np.ndarray]:
    marks = ", ".join("?" * len(splits))
    return ws.catalog.query_df(
        "SELECT image_id, row, orig_width, orig_height FROM images "
        f"WHERE split IN ({marks}) ORDER BY row",
        splits,
    )


def _rows_intact(ws: Workspace, round_: int, state: str, image_ids: np.ndarray) -> bool:
    """Whether every requested image has all its rows, made under ``state``, plus maps."""
    old = ws.catalog.query("SELECT value FROM meta WHERE key = ?", [state_key(round_)])
    if not old or old[0][0] != state or not ws.store.has_cams(round_):
        return False
    with ws.catalog.connect(read_only=True) as con:
        con.register("requested", {"image_id": np.asarray(image_ids, dtype=object)})
        n = con.execute(
            "SELECT count(*) FROM cam_boxes WHERE round = ? AND image_id IN "
            "(SELECT image_id FROM requested)", [round_],
        ).fetchone()[0]
    return int(n) == len(image_ids) * len(FINDINGS)


def _prepare_rows(
    ws: Workspace, round_: int, state: str, image_ids: np.ndarray, force: bool
) -> set[str]:
    """Drop stale rows/maps of this round; return the requested images already done."""
    key = state_key(round_)
    old = ws.catalog.query("SELECT value FROM meta WHERE key = ?", [key])
    with ws.catalog.connect() as con:
        if not old or old[0][0] != state:
            # Made by another checkpoint/threshold/method (or unknown): none of it is reusable.
            con.execute("DELETE FROM cam_boxes WHERE round = ?", [round_])
            con.execute("DELETE FROM cam_boxes_ranked WHERE round = ?", [round_])
            ws.store.delete(cam_key(round_))
            con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, state])
            return set()
        con.register("requested", {"image_id": np.asarray(image_ids, dtype=object)})
        if force:
            for table in ("cam_boxes", "cam_boxes_ranked"):
                con.execute(
                    f"DELETE FROM {table} WHERE round = ? AND image_id IN "
                    "(SELECT image_id FROM requested)", [round_],
                )
            return set()
        done = con.execute(
            "SELECT DISTINCT image_id FROM cam_boxes WHERE round = ? AND image_id IN "
            "(SELECT image_id FROM requested)", [round_],
        ).fetchall()
    return {r[0] for r in done}


def _work(
    ws: Workspace, run: StageRun, round_: int, ckpt: Path, state: str,
    images: dict[str, np.ndarray], config: dict[str, Any], batch_size: int, device_spec: str,
    force: bool, workers: int, chunk_size: int, rules: br.FittedRules, max_boxes: int,
) -> dict[str, Any]:
    started = time.perf_counter()
    dev = resolve_device(device_spec)
    model, meta = load_image_net(ckpt, dev)
    ids = np.asarray(images["image_id"], dtype=object)
    done = _prepare_rows(ws, round_, state, ids, force)
    pending = np.array([i for i, image_id in enumerate(ids) if image_id not in done], dtype=int)
    n_store = ws.store.n_rows()
    computed = 0
    compute_s = 0.0
    map_shape: tuple[int, int] | None = None
    with progress.bar(len(pending), f"cam round {round_}") as pb:
        for start in range(0, len(pending), chunk_size):
            idx = pending[start:start + chunk_size]
            if workers > 0:  # no open catalog while DataLoader workers fork
                ws.catalog.release()
            t0 = time.perf_counter()
            # readers may open the catalog while the model runs, unless it runs ~1 s at most
            rows_out, maps, probs = _infer_chunk(
                ws, model, meta, dev, np.asarray(images["row"])[idx], batch_size, workers, pb,
                ckpt, release=ws.catalog.release,
            )
            map_shape = maps.shape[-2:]
            columns, ranked = _box_columns(
                round_, ids[idx], probs, maps, rules.rule_list(),
                np.asarray(images["orig_width"])[idx], np.asarray(images["orig_height"])[idx],
                int(meta["image_size"]), dev, max_boxes,
            )
            compute_s += time.perf_counter() - t0
            # Maps first, then rows: an image that has rows is complete on resume.
            ws.store.write_cams(round_, rows_out, maps, n_store)
            with ws.catalog.connect() as con:
                insert_columns(con, "cam_boxes", columns, replace=True)
                if len(ranked["round"]):
                    insert_columns(con, "cam_boxes_ranked", ranked, replace=True)
            computed += len(idx)
    summary = _summarise(ws, round_, ids)
    seconds = time.perf_counter() - started
    summary.update(
        round=round_, split=config["split"], threshold=config["threshold"],
        box_rules={f: r.to_dict() for f, r in rules.rules.items()},
        box_rule_source=rules.source, max_boxes=int(max_boxes),
        checkpoint=str(ckpt), computed=computed, reused=len(ids) - computed,
        map_size=list(map_shape) if map_shape is not None else _stored_map_size(ws, round_),
        errors=run.n_errors, seconds=round(seconds, 3),
        images_per_s=round(computed / compute_s, 2) if compute_s > 0 else None,
        device=str(dev),
    )
    return summary


def _infer_chunk(
    ws: Workspace, model: torch.nn.Module, meta: dict[str, Any], dev: torch.device,
    rows: np.ndarray, batch_size: int, workers: int, pb: Any, ckpt: Path,
    release: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(store rows, float16 maps k x F x h x w, probabilities k x F) of some store rows.

    ``release`` (the catalog's) is called after the first batch when the batches, at its
    pace, would take more than ``HOLD_CATALOG_S``: short chunks keep the connection.

    Non-finite logits stop the stage: pixels are uint8, so NaN/inf can only come from the
    weights (a diverged training run), and a made-up probability would poison evaluate's AUC.
    """
    dataset = StoreDataset(ws.store.path, rows, np.zeros((len(rows), len(FINDINGS)), np.float32),
                           augment=False)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=dev.type == "cuda")
    out_rows, out_maps, out_probs = [], [], []
    t0 = time.perf_counter()
    try:
        for batch in loader:
            x = preprocess(batch["image"], meta, dev)
            logits, maps = batched_gradcam(model, x)
            if not torch.isfinite(logits).all():
                raise CheckpointError(
                    f"{ckpt}: the model gives non-finite logits (NaN/inf), e.g. for store row "
                    f"{int(batch['row'][~torch.isfinite(logits).all(dim=1).cpu()][0])}: a "
                    "diverged training run? retrain this round"
                )
            out_rows.append(batch["row"].numpy())
            # float16 here, before the boxes: the stored map reproduces its box exactly.
            out_maps.append(maps.to(torch.float16).cpu().numpy())
            out_probs.append(torch.sigmoid(logits.float()).double().cpu().numpy())
            pb.update(len(x))
            if release is not None:
                projected = (time.perf_counter() - t0) * len(loader) / len(out_rows)
                if projected > HOLD_CATALOG_S:
                    release()
                release = None
    finally:
        # HDF5 refuses to open the store for writing while this process still reads it.
        dataset.reader.close()
    return np.concatenate(out_rows), np.concatenate(out_maps), np.concatenate(out_probs)


def _box_columns(
    round_: int, image_ids: np.ndarray, probs: np.ndarray, maps: np.ndarray,
    rules: list[BoxRule], orig_w: np.ndarray, orig_h: np.ndarray, image_size: int,
    dev: torch.device, max_boxes: int = 1,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``cam_boxes`` columns for a chunk (one row per (image, finding), the top box, original
    px) and ``cam_boxes_ranked`` columns (boxes 2..K). Boxes are cut from the float16 maps,
    upsampled to the network's input size (:func:`localize`), so a stored map reproduces its
    box."""
    k, n_f, map_h, map_w = maps.shape
    n = k * n_f
    found = localize(torch.from_numpy(np.ascontiguousarray(maps)).to(dev).reshape(n, map_h, map_w),
                     (image_size, image_size), rules[:n_f] * k, max_boxes)
    image = np.repeat(np.arange(k), n_f)
    sx = orig_w[image] / image_size
    sy = orig_h[image] / image_size
    top = np.array([mbs[0].box if mbs[0].box is not None else (np.nan,) * 4 for mbs in found],
                   dtype=np.float64).reshape(n, 4)
    boxes = scale_xywh(top, sx, sy)
    peak = np.array([mbs[0].peak for mbs in found], dtype=np.float64)
    mass = np.array([mbs[0].mass for mbs in found], dtype=np.float64)
    reason = np.array([mbs[0].reason for mbs in found], dtype=object)
    ids = np.repeat(np.asarray(image_ids, dtype=object), n_f)
    names = np.tile(np.asarray(FINDINGS[:n_f], dtype=object), k)

    # NaN becomes NULL in DuckDB's numpy scan; say so explicitly with masked arrays.
    def col(a: np.ndarray) -> np.ma.MaskedArray:
        return np.ma.masked_invalid(a)

    columns = {
        "round": np.full(n, round_, dtype=np.int32), "image_id": ids, "finding": names,
        "probability": probs.reshape(n).astype(np.float64),
        "x": col(boxes[:, 0]), "y": col(boxes[:, 1]), "w": col(boxes[:, 2]),
        "h": col(boxes[:, 3]), "peak": col(peak), "mass": col(mass), "reason": reason,
    }
    extra = [(i, r, mb) for i, mbs in enumerate(found) for r, mb in enumerate(mbs[1:], start=2)]
    at = np.array([i for i, _, _ in extra], dtype=np.int64)
    eb = scale_xywh(np.array([mb.box for _, _, mb in extra], dtype=np.float64).reshape(-1, 4),
                    sx[at], sy[at])
    ranked = {
        "round": np.full(len(extra), round_, dtype=np.int32), "image_id": ids[at],
        "finding": names[at], "rank": np.array([r for _, r, _ in extra], dtype=np.int32),
        "x": eb[:, 0], "y": eb[:, 1], "w": eb[:, 2], "h": eb[:, 3],
        "mass": np.array([mb.mass for _, _, mb in extra], dtype=np.float64),
    }
    return columns, ranked


def box_rules_for(
    ws: Workspace, round_: int, ckpt: Path, threshold: float | None, device: str,
    batch_size: int = 64, workers: int = 0,
) -> br.FittedRules:
    """The round's box rules: ``--threshold`` when given (peak component, all findings), else
    the rules fitted for this checkpoint and fit set (reused from ``box_rules.json`` when both
    match, refitted otherwise; see :mod:`kacl_cli.stages.cam.box_rules`)."""
    if threshold is not None:
        return br.uniform(BoxRule(float(threshold), "peak"), f"--threshold {threshold}")
    ckpt_hash = checkpoint_fingerprint(ckpt)
    gt = br.fit_set(ws)
    digest = br.fit_set_digest(gt)
    try:
        old = br.read_rules_file(ckpt, ckpt_hash)
    except CheckpointError:
        old = None  # another checkpoint's rules: refit below
    if old is not None and old.fit_set == digest and ws.catalog.query(
            "SELECT count(*) FROM box_rules WHERE round = ? AND checkpoint = ?",
            [round_, ckpt_hash])[0][0]:
        return old
    ws.catalog.release()  # the fit runs the model: let other processes read meanwhile
    dev = resolve_device(device)
    model, meta = load_image_net(ckpt, dev)

    def infer(rows: np.ndarray) -> np.ndarray:
        ws.catalog.release()  # no open catalog while DataLoader workers fork
        with progress.bar(len(rows), f"cam round {round_}: box-rule fit") as pb:
            _, maps, _ = _infer_chunk(ws, model, meta, dev, rows, batch_size, workers, pb, ckpt)
        return maps.astype(np.float32)

    fitted = br.fit_for_checkpoint(ws, gt, infer, int(meta["image_size"]))
    fitted.checkpoint, fitted.fit_set = ckpt_hash, digest
    br.write_rules(ws, round_, ckpt, fitted)
    return fitted


def _summarise(ws: Workspace, round_: int, image_ids: np.ndarray) -> dict[str, Any]:
    """Box counts over all requested images of the round (this run's and earlier chunks')."""
    with ws.catalog.connect(read_only=True) as con:
        con.register("requested", {"image_id": np.asarray(image_ids, dtype=object)})
        rows = con.execute(
            "SELECT reason, count(*) FROM cam_boxes WHERE round = ? AND image_id IN "
            "(SELECT image_id FROM requested) GROUP BY reason", [round_],
        ).fetchall()
    reasons = {str(r): int(c) for r, c in rows if r is not None}
    boxes = sum(int(c) for r, c in rows if r is None)
    return {"images": len(image_ids), "boxes": boxes, "empty_maps": sum(reasons.values()),
            "no_box_reasons": dict(Counter(reasons).most_common())}


def _stored_map_size(ws: Workspace, round_: int) -> list[int] | None:
    if not ws.store.has_cams(round_):
        return None
    with ws.store.open("r") as f:
        return list(f[cam_key(round_)].shape[-2:])


def read_state(ws: Workspace, round_: int) -> dict[str, Any] | None:
    """Checkpoint hash, threshold and method the round's stored maps/boxes were made with."""
    rows = ws.catalog.query("SELECT value FROM meta WHERE key = ?", [state_key(round_)])
    return json.loads(rows[0][0]) if rows else None


