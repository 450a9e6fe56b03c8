"""The feedback loop: ``kacl contrast --rounds N`` = rounds of cam -> radiomics -> joint training.

Round ``k`` (k >= 1) turns checkpoint ``round-(k-1)`` into ``round-k``:

1. ``cam --round k-1`` over every image (:func:`kacl_cli.stages.cam.stage.run_cam_stage`);
2. ``radiomics --round k-1`` of the CAM boxes (GT boxes for box-supervised images)
   (:func:`kacl_cli.stages.radiomics.stage.run_radiomics_stage`);
3. joint training initialised from ``round-(k-1)``: classification + lambda * NT-Xent between
   the image projection and the radiomics projection of the same X-ray
   (:mod:`kacl_cli.models.contrastive`), through the one training loop
   (:func:`kacl_cli.training.fit.fit`), which writes ``checkpoints/round-k``.

Steps 1 and 2 are the very stage functions the standalone subcommands run, so they record
their own ``runs`` rows and are skipped when an identical run finished; step 3 is the
``contrast`` row of round k. Rounds run from the one after the latest finished checkpoint (or
``--from-round``) up to ``--rounds`` (the total target, not a count), so killing ``contrast``
anywhere and re-running the same command continues where it stopped: finished stages are
skipped and training resumes from its last finished epoch (``round-k.partial``).

Ablations: ``positives="augment"`` (SimCLR: a second augmented view is the positive; no cam or
radiomics step), ``"none"`` (classification only, same epochs), and ``feedback=False`` (every
round trains on round 0's CAM boxes and radiomics instead of the previous round's).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np
import torch

from kacl_cli.errors import KaclError, NotReadyError
from kacl_cli.models.checkpoint import OBJECTIVE_PREFIX, load_image_net, read_checkpoint, read_meta
from kacl_cli.models.checkpoint_files import checkpoint_fingerprint
from kacl_cli.models.contrastive import ContrastSpec, build_objective
from kacl_cli.models.losses import ClassificationObjective, pos_weight_from_labels
from kacl_cli.progress import Note
from kacl_cli.skips import HASH_KEY, checkpoint_hash, checkpoint_is_theirs
from kacl_cli.stages.cam.stage import run_cam_stage
from kacl_cli.stages.contrast.config import POSITIVE_ROIS, ContrastConfig
from kacl_cli.stages.contrast.controls import shuffle_positives
from kacl_cli.stages.contrast.supervision import (
    BoxSupervision,
    current_box_supervision,
    select_box_supervision,
    write_box_supervision,
)
from kacl_cli.stages.contrast.weak import labelled_mask
from kacl_cli.stages.radiomics.stage import (
    PositiveFeatures,
    load_positive_features,
    run_radiomics_stage,
)
from kacl_cli.stages.rounds import resolve_round
from kacl_cli.training import distributed
from kacl_cli.training.box_targets import BOX_KEY, gt_box_array
from kacl_cli.training.fit import TrainConfig, fit, progress_note
from kacl_cli.training.loader import SplitData, StoreDataset, data_fingerprint, load_split
from kacl_cli.workspace import Workspace

STAGE = "contrast"
# Training settings a contrast round inherits from the checkpoint it starts from.
INHERITED = ("loss", "focal_alpha", "focal_gamma", "weight_decay", "augment", "warmup_fraction",
             "grad_clip")


def plan_rounds(ws: Workspace, cfg: ContrastConfig) -> list[int]:
    """The rounds this invocation trains (possibly none: all done).

    Default start: one after the latest finished checkpoint, so ``--rounds`` is the total
    target. ``--from-round K`` restarts at K (its own config/fingerprint check still skips an
    identical finished round); ``--force`` without ``--from-round`` restarts at round 1.
    """
    finished = ws.finished_rounds()
    if 0 not in finished:
        raise NotReadyError(
            f"no round-0 checkpoint in {ws.checkpoints}: run `kacl pretrain` first")
    start = cfg.from_round
    if start is None:
        start = 1 if cfg.force else max(finished) + 1
    if start - 1 not in finished:
        raise NotReadyError(
            f"--from-round {start} needs checkpoint round-{start - 1}, which does not exist "
            f"(finished rounds: {', '.join(map(str, finished))})")
    return list(range(start, cfg.rounds + 1))


def _feature_names_hash(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def _subset(data: SplitData, keep: np.ndarray) -> SplitData:
    return SplitData([i for i, k in zip(data.image_ids, keep, strict=True) if k],
                     data.rows[keep], data.labels[keep])


def _concat(a: SplitData, b: SplitData) -> SplitData:
    return SplitData(a.image_ids + b.image_ids, np.concatenate([a.rows, b.rows]),
                     np.concatenate([a.labels, b.labels]))


def training_data(ws: Workspace, box_ids: set[str]) -> tuple[SplitData, SplitData]:
    """(train, val): the train split plus the box-supervised images; val minus them."""
    train = load_split(ws, "train")
    val = load_split(ws, "val")
    if box_ids:
        others = load_split(ws, ["val", "test"])
        moved = _subset(others, np.array([i in box_ids for i in others.image_ids], bool))
        train = _concat(train, moved)
        val = _subset(val, np.array([i not in box_ids for i in val.image_ids], bool))
    return train, val


def align_positives(image_ids: list[str], pos: PositiveFeatures) -> tuple[np.ndarray, np.ndarray]:
    """(features n x F float32, has n bools) aligned to ``image_ids`` (zeros where absent)."""
    index = {i: j for j, i in enumerate(pos.image_ids)}
    feats = np.zeros((len(image_ids), len(pos.names)), np.float32)
    has = np.zeros(len(image_ids), bool)
    for r, image_id in enumerate(image_ids):
        j = index.get(image_id)
        if j is not None:
            feats[r] = pos.features[j]
            has[r] = True
    return feats, has


def _continue_objective(objective: torch.nn.Module, spec: ContrastSpec,
                        prev_tensors: dict[str, torch.Tensor], prev_meta: dict[str, Any]) -> str:
    """Load round k-1's objective weights when they fit ("continued"), else keep fresh ones."""
    prev = prev_meta.get("objective")
    own = objective.state_dict()
    if not own:
        return "none"
    if not isinstance(prev, dict):
        return "fresh"
    try:
        prev_key = ContrastSpec(**prev).weights_key()
    except TypeError:
        return "fresh"
    if prev_key != spec.weights_key():
        return "fresh"
    state = {k[len(OBJECTIVE_PREFIX):]: v for k, v in prev_tensors.items()
             if k.startswith(OBJECTIVE_PREFIX)}
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        return "fresh"
    objective.load_state_dict(state)
    return "continued"


class _Steps:
    """Runs cam/radiomics of a source round once per invocation (``--force`` included)."""

    def __init__(self, ws: Workspace, cfg: ContrastConfig, note: Note):
        self.ws, self.cfg, self.note = ws, cfg, note
        self.forced: set[tuple[str, int]] = set()

    def _force(self, stage: str, round_: int) -> bool:
        if not self.cfg.force or (stage, round_) in self.forced:
            return False
        self.forced.add((stage, round_))
        return True

    def cam(self, round_: int) -> dict[str, Any]:
        self.note(f"contrast: cam --round {round_} (all splits)")
        return run_cam_stage(self.ws, round_, split=None, batch_size=self.cfg.cam_batch_size,
                             device=self.cfg.device, force=self._force("cam", round_))

    def radiomics(self, round_: int, roi: str, split: str | None) -> dict[str, Any]:
        self.note(f"contrast: radiomics --round {round_} --roi {roi} "
                  f"({self.cfg.radiomics_backend})")
        return run_radiomics_stage(self.ws, round_, roi=roi, backend=self.cfg.radiomics_backend,
                                   params=self.cfg.radiomics_params,
                                   workers=max(1, self.cfg.workers), split=split,
                                   force=self._force("radiomics", round_),
                                   label_fraction=self.cfg.label_fraction,
                                   normal_positive=self.cfg.normal_positive)


def _brief(summary: dict[str, Any]) -> dict[str, Any]:
    keep = ("skipped", "seconds", "images", "rois", "positive_rois", "computed", "failed",
            "backend", "roi", "boxes", "empty")
    return {k: summary[k] for k in keep if k in summary}


def run_round(ws: Workspace, k: int, cfg: ContrastConfig, steps: _Steps,
              note: Note = progress_note) -> dict[str, Any]:
    """Train round ``k`` from ``round-(k-1)`` (or skip it when an identical run finished)."""
    t0 = time.perf_counter()
    ctx = distributed.from_env()
    prev_dir = ws.checkpoint_dir(k - 1)
    if k - 1 not in ws.finished_rounds():
        raise NotReadyError(f"contrast round {k} needs checkpoint round-{k - 1}")
    config = {**cfg.hashed(), "round": k}
    fingerprint = (f"checkpoint={checkpoint_fingerprint(prev_dir)};"
                   f"data={data_fingerprint(ws, ('train', 'val', 'test'))}")
    # A finished identical run is only skipped while its checkpoint is still there.
    have_ckpt = k in ws.finished_rounds()
    # Under torchrun: every rank has read its inputs; rank 0 records the run, the others
    # mirror it (runs.stage_run with a device), so only rank 0 ever writes the catalog.
    # "done" is only worth skipping while round-k on disk is the checkpoint that run wrote
    # (kacl_cli.skips); otherwise it trains again.
    with ws.stage_run(STAGE, config, fingerprint, round_=k,
                      force=cfg.force or not have_ckpt, device=cfg.device,
                      intact=lambda done: checkpoint_is_theirs(ws, k, done)) as run:
        if run.skipped:
            note(f"contrast round {k}: done, skipping (same config and inputs)")
            return run.result()
        summary = _train_round(ws, k, cfg, steps, run, ctx, note)
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        summary["run_id"] = run.run_id
        summary[HASH_KEY] = checkpoint_hash(ws, k)
        run.summary = summary
    return run.result()


def _train_round(ws: Workspace, k: int, cfg: ContrastConfig, steps: _Steps, run, ctx,
                 note: Note) -> dict[str, Any]:
    src = k - 1 if cfg.feedback else 0
    info: dict[str, Any] = {"round": k, "positives": cfg.positives, "feedback": cfg.feedback,
                            "radiomics_round": src if cfg.positives == "radiomics" else None}

    # -- box supervision (written before radiomics: its cam+gt ROI rule reads the table) --
    sel: BoxSupervision | None = None
    if cfg.box_supervision > 0:
        sel = select_box_supervision(ws, cfg.box_supervision, cfg.fold)
        if ctx.is_main and write_box_supervision(ws, sel, run.run_id):
            note(f"contrast: box supervision: {len(sel.image_ids)} of {sel.n_box_images} "
                 f"box images ({len(sel.patients)} of {sel.n_box_patients} patients, fold "
                 f"{cfg.fold}) train with their GT boxes and leave evaluation")
        info["box_supervision"] = {"fraction": cfg.box_supervision, "fold": cfg.fold,
                                   "images": len(sel.image_ids), "patients": len(sel.patients)}
    else:
        left = current_box_supervision(ws)
        if left:
            note(f"contrast: note: box_supervision holds {len(left)} images from an earlier "
                 "run; they stay excluded from evaluation (this round uses no GT boxes)")
    box_ids = set(sel.image_ids) if sel else set()

    # -- cam -> radiomics of the source round --
    # Under torchrun each rank computes its shard of both stages and rank 0 merges them
    # (kacl_cli.sharding.merge); the barrier lets rank 0's box-supervision rows land before the
    # shards read the catalog.
    pos: PositiveFeatures | None = None
    if cfg.positives == "radiomics":
        distributed.barrier(ctx)
        info["cam"] = _brief(steps.cam(src))
        roi = "cam+gt" if box_ids else POSITIVE_ROIS[cfg.positive_roi]
        # Only training images' radiomics are used; box supervision may pull test images in.
        summary = steps.radiomics(src, roi, None if box_ids else "train")
        info["radiomics"] = _brief(summary)
        try:  # this run's settings, not whichever ran last on the round
            pos = load_positive_features(ws, src, settings_hash=summary.get("settings_hash"))
        except NotReadyError:
            # The stage ran, so missing statistics mean no training image had a usable ROI.
            raise KaclError(
                f"contrast round {k}: radiomics of round {src} found no positive ROI on any "
                f"training image (empty Grad-CAM maps?); train round {src} longer, or use "
                "--positives augment|none") from None

    # -- data --
    train, val = training_data(ws, box_ids)
    if not len(train):
        raise KaclError("the train split is empty: nothing to train on")
    prev_tensors, prev_meta = read_checkpoint(ws.checkpoint_dir(k - 1))
    model, _ = load_image_net(ws.checkpoint_dir(k - 1), "cpu")
    prev_cfg = dict(prev_meta.get("config") or {})
    image_size = int(prev_meta["image_size"])
    extras: dict[str, np.ndarray] | None = None
    spec_extra: dict[str, Any] = {}
    if pos is not None:
        feats, has = align_positives(train.image_ids, pos)
        if cfg.shuffle_positives:  # the negative control: another image's radiomics
            feats = shuffle_positives(feats, has, cfg.seed + k)
        extras = {"radiomics": feats, "has_radiomics": has}
        spec_extra = {"n_features": len(pos.names), "settings_hash": pos.settings_hash,
                      "feature_names_hash": _feature_names_hash(pos.names)}
        info.update(train_with_positive=int(has.sum()), n_features=len(pos.names),
                    nonfinite_replaced=pos.n_nonfinite)
        if has.sum() < 2:
            note(f"contrast round {k}: only {int(has.sum())} training images have a radiomics "
                 "positive: the contrastive term is zero (classification only)")
    if cfg.label_fraction < 1.0:  # only F of the images carry classification loss
        extras = dict(extras or {})
        extras["label_mask"] = labelled_mask(train.image_ids, cfg.label_fraction)
        info["labelled_images"] = int(extras["label_mask"].sum())
    if box_ids and cfg.box_loss_weight > 0:  # GT boxes train the maps (models/box_loss.py)
        extras = {**(extras or {}), BOX_KEY: gt_box_array(ws, train.image_ids,
                                                          ws.store.image_size(), box_ids)}
    tcfg = TrainConfig(
        epochs=cfg.epochs_per_round, batch_size=cfg.batch_size, lr=cfg.lr,
        image_size=image_size, seed=cfg.seed + k, device=cfg.device, workers=cfg.workers,
        extra={"backbone_lr_scale": cfg.backbone_lr_scale},
        **{f: prev_cfg[f] for f in INHERITED if f in prev_cfg},
    )
    train_set = StoreDataset(ws.store.path, train.rows, train.labels, augment=tcfg.augment,
                             extras=extras, views=2 if cfg.positives == "augment" else 1,
                             image_size=image_size, seed=tcfg.seed)
    val_set = StoreDataset(ws.store.path, val.rows, val.labels, augment=False,
                           image_size=image_size) if len(val) else None

    # -- objective: classification (as round k-1 was trained) + lambda * NT-Xent --
    classification = ClassificationObjective(
        tcfg.loss, tcfg.focal_alpha, tcfg.focal_gamma,
        pos_weight=pos_weight_from_labels(train.labels) if tcfg.loss == "bce" else None,
        box_loss_weight=cfg.box_loss_weight, box_loss_form=cfg.box_loss_form)
    spec = ContrastSpec(positives=cfg.positives, feature_dim=model.feature_dim,
                        proj_dim=cfg.proj_dim, temperature=cfg.temperature, lam=cfg.lam,
                        **spec_extra)
    # Seeded: fresh heads must not depend on what ran before in this process (under torchrun
    # the sharded cam/radiomics steps draw other random numbers than a single process does).
    torch.manual_seed(tcfg.seed)
    objective = build_objective(classification, spec, backbone_lr_scale=cfg.backbone_lr_scale)
    info["objective_init"] = _continue_objective(objective, spec, prev_tensors, prev_meta)
    meta = {k_: v for k_, v in prev_meta.items()
            if k_ not in ("metrics", "run_id", "config", "kind", "version")}
    meta.update(round=k, stage=STAGE, objective=spec.to_dict(),
                contrast={"positives": cfg.positives, "feedback": cfg.feedback,
                          "radiomics_round": info["radiomics_round"],
                          "box_supervision": cfg.box_supervision, "fold": cfg.fold,
                          "from_round": k - 1})
    note(f"contrast round {k}: training from round-{k - 1} on {len(train)} images "
         f"({cfg.positives} positives, objective {info['objective_init']})")
    summary = fit(ws=ws, run=run, stage=STAGE, round_=k, model=model, objective=objective,
                  train_set=train_set, val_set=val_set, cfg=tcfg, meta=meta,
                  resume=not cfg.force)
    history = (read_meta(ws.checkpoint_dir(k)).get("metrics") or {}).get("history", [])
    last = history[-1] if history else {}
    return {**info, **{k_: summary[k_] for k_ in (
        "best_epoch", "val_mean_auc", "val_loss", "train_loss", "train_images", "val_images",
        "images_per_s", "checkpoint") if k_ in summary},
        "contrastive_loss": last.get("contrastive_loss"), "cls_loss": last.get("cls_loss")}


def previous_summary(ws: Workspace, k: int) -> dict[str, Any]:
    """What the latest finished contrast run of round ``k`` reported (for skipped rounds)."""
    import json

    rows = ws.catalog.query(
        "SELECT summary_json FROM runs WHERE stage = ? AND round = ? AND status = 'done' "
        "ORDER BY finished_at DESC LIMIT 1", [STAGE, k])
    if rows:
        return {**json.loads(rows[0][0] or "{}"), "round": k, "skipped": True}
    # A round made elsewhere (or killed between checkpoint and bookkeeping): its meta says enough.
    try:
        metrics = read_meta(ws.checkpoint_dir(k)).get("metrics") or {}
    except KaclError:
        metrics = {}
    history = metrics.get("history") or [{}]
    return {"round": k, "skipped": True, "val_mean_auc": metrics.get("val_mean_auc"),
            "contrastive_loss": history[-1].get("contrastive_loss")}


def run_contrast(ws: Workspace, cfg: ContrastConfig,
                 note: Note = progress_note) -> dict[str, Any]:
    """Run the rounds of ``cfg`` (see module docstring); returns one summary per round 1..N."""
    cfg.validate()
    ws.require()
    ctx = distributed.from_env()
    if ctx.active and not ctx.is_main:
        ws.writes = False
    todo = plan_rounds(ws, cfg)
    steps = _Steps(ws, cfg, note)
    rounds: list[dict[str, Any]] = []
    first = todo[0] if todo else cfg.rounds + 1
    for k in range(1, min(first, cfg.rounds + 1)):
        rounds.append(previous_summary(ws, k))
    if not todo:
        note(f"contrast: rounds 1..{cfg.rounds} are done, skipping (--from-round K or "
             "--force re-runs)")
    for k in todo:
        note(f"contrast: round {k}/{cfg.rounds}")
        rounds.append(run_round(ws, k, cfg, steps, note))
    return {"rounds": rounds, "latest_round": resolve_round(ws, None),
            "trained": [r["round"] for r in rounds if not r.get("skipped")],
            "config": cfg.hashed()}
