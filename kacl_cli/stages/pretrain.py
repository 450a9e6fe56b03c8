"""The pretrain stage: supervised multi-label training of the image network (round 0).

``run(ws, PretrainConfig(...))`` builds the network (``--init`` none / imagenet / a state dict),
starts a fresh head at each finding's train prevalence, and trains it with the one training
loop (:func:`kacl_cli.training.fit.fit`: focal loss, best epoch by val mean AUC) into
``checkpoints/round-0``. Torch is imported inside :func:`run`, so the CLI can read this
module's defaults at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kacl_cli.errors import KaclError
from kacl_cli.progress import Note, note_stderr
from kacl_cli.skips import HASH_KEY, checkpoint_hash, checkpoint_is_theirs
from kacl_cli.stages.contrast.weak import check_fraction, labelled_mask
from kacl_cli.training.config import TrainConfig
from kacl_cli.workspace import Workspace

STAGE = "pretrain"
ROUND = 0
LOSSES = ("focal", "bce")
# Peak learning rates (docs/training.md, "Learning rate"): a net trained from scratch needs a
# larger step than one fine-tuned from pretrained weights; 5e-4 from scratch left the tiny
# demo net at chance after a demo's ~100-200 steps.
LR_SCRATCH = 2e-3
LR_FINETUNE = 5e-4


def default_lr(init: str) -> float:
    """The peak learning rate for ``--init``: LR_SCRATCH for ``none``, else LR_FINETUNE."""
    return LR_SCRATCH if init == "none" else LR_FINETUNE


def init_identity(init: str) -> str:
    """What ``--init`` means for the config hash: a path also by its size and mtime."""
    if init in ("none", "imagenet"):
        return init
    p = Path(init)
    if p.is_file():
        st = p.stat()
        return f"{p.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    return str(p.resolve())


def epoch_history(ws: Workspace, round_: int = ROUND) -> list[tuple]:
    """(epoch, train loss, val loss, val mean AUC, images/s) of a round's epochs, in order."""
    return ws.catalog.query(
        "SELECT epoch, train_loss, val_loss, val_mean_auc, images_per_s FROM epochs "
        "WHERE round = ? ORDER BY epoch", [round_]
    )


@dataclass
class PretrainConfig:
    """Resolved settings of ``kacl pretrain``; ``train`` holds the loop's (TrainConfig)."""

    backbone: str = "densenet121"
    init: str = "none"
    train: TrainConfig = field(default_factory=TrainConfig)
    force: bool = False
    resume: bool = True
    # Only this fraction of the training images carry classification loss (weak labels,
    # docs/contrast.md); in the config hash only below 1, so older runs keep their hash.
    label_fraction: float = 1.0
    # --box-supervision F --fold K: GT boxes of these images train the maps (the rule of
    # kacl_cli.stages.contrast.supervision; they leave evaluation). 0 = none.
    box_supervision: float = 0.0
    fold: int = 0

    def hashed_boxes(self) -> dict[str, Any]:
        """The box settings for the config hash: only when on (older runs keep their hash)."""
        if self.box_supervision <= 0:
            return {}
        return {"box_supervision": self.box_supervision, "fold": self.fold}


def run(ws: Workspace, cfg: PretrainConfig, note: Note = note_stderr) -> dict[str, Any]:
    """Train round 0 (or return the summary of the identical finished run, with skipped=True)."""
    import torch

    from kacl_cli.device import resolve_device
    from kacl_cli.models.checkpoint import model_meta
    from kacl_cli.models.image_net import (
        BACKBONES,
        GRAY_MEAN,
        GRAY_STD,
        build_image_net,
        init_head_bias,
    )
    from kacl_cli.models.losses import ClassificationObjective, pos_weight_from_labels
    from kacl_cli.stages.contrast.stage import training_data
    from kacl_cli.stages.contrast.supervision import select_box_supervision, write_box_supervision
    from kacl_cli.training.box_targets import BOX_KEY, gt_box_array
    from kacl_cli.training.fit import fit
    from kacl_cli.training.loader import StoreDataset, data_fingerprint

    backbone, init, train_cfg = cfg.backbone, cfg.init, cfg.train
    ws.require()
    if backbone not in BACKBONES:
        raise KaclError(f"--backbone {backbone!r}: expected one of {', '.join(BACKBONES)}")
    store_size = ws.store.image_size()
    if train_cfg.image_size is None or train_cfg.image_size <= 0:
        train_cfg.image_size = min(224, store_size)
    if train_cfg.image_size > store_size:
        raise KaclError(
            f"--image-size {train_cfg.image_size} is larger than the store's {store_size} px "
            "images"
        )
    sel = (select_box_supervision(ws, cfg.box_supervision, cfg.fold)
           if cfg.box_supervision > 0 else None)
    box_ids = set(sel.image_ids) if sel else set()
    train, val = training_data(ws, box_ids)
    if not len(train):
        raise KaclError("the workspace has no train split images: check `kacl prepare`")
    config = {**train_cfg.hashed(), "backbone": backbone, "init": init_identity(init),
              "store_size": store_size,
              "head_bias": "prior" if init in ("none", "imagenet") else "init",
              **cfg.hashed_boxes()}
    check_fraction("--label-fraction", cfg.label_fraction, allow_zero=False)
    extras = None
    if cfg.label_fraction < 1.0:  # only then: older runs keep their config hash
        config["label_fraction"] = cfg.label_fraction
        extras = {"label_mask": labelled_mask(train.image_ids, cfg.label_fraction)}
    resolve_device(train_cfg.device)
    # Built before the run is recorded: a bad --init fails without leaving a failed run.
    # Seeded first, so the random initialisation (and with it the whole run) follows --seed.
    torch.manual_seed(train_cfg.seed)
    model = build_image_net(backbone, init=init)
    if init in ("none", "imagenet"):
        # A fresh head starts at each finding's train prevalence (see init_head_bias); a
        # --init PATH keeps whatever head it brought.
        init_head_bias(model, train.labels if extras is None
                       else train.labels[extras["label_mask"]])  # the labelled ones only
    fingerprint = data_fingerprint(ws)
    # Under torchrun: every rank has read its inputs; rank 0 records the run, the others
    # mirror it, and only rank 0 touches the catalog from here on.
    # "done" is only worth skipping while round-0 on disk is the checkpoint that run wrote
    # (kacl_cli.skips): a later pretrain with other settings may have replaced it.
    with ws.stage_run(STAGE, config, fingerprint, round_=ROUND, force=cfg.force,
                      device=train_cfg.device,
                      intact=lambda done: checkpoint_is_theirs(ws, ROUND, done)) as run_:
        if run_.skipped:
            return run_.result()
        if sel is not None and ws.writes and write_box_supervision(ws, sel, run_.run_id):
            note(f"pretrain: box supervision: {len(sel.image_ids)} of {sel.n_box_images} box "
                 f"images ({len(sel.patients)} of {sel.n_box_patients} patients, fold "
                 f"{cfg.fold}) train with their GT boxes and leave evaluation")
        objective = ClassificationObjective(
            train_cfg.loss, train_cfg.focal_alpha, train_cfg.focal_gamma,
            pos_weight=pos_weight_from_labels(train.labels) if train_cfg.loss == "bce" else None,
            box_loss_weight=train_cfg.box_loss_weight,
            box_loss_form=train_cfg.box_loss_form,
        )
        if box_ids and train_cfg.box_loss_weight > 0:  # GT boxes train the maps
            extras = {**(extras or {}),
                      BOX_KEY: gt_box_array(ws, train.image_ids, store_size, box_ids)}
        if train_cfg.box_loss_weight > 0 and not box_ids:
            note("pretrain: note: --box-loss-weight acts on box-supervised images only; "
                 "without --box-supervision no batch carries a box")
        meta = model_meta(backbone, train_cfg.image_size, store_size, GRAY_MEAN, GRAY_STD,
                          ROUND, STAGE, init=init)
        train_set = StoreDataset(ws.store.path, train.rows, train.labels,
                                 augment=train_cfg.augment, image_size=train_cfg.image_size,
                                 seed=train_cfg.seed, extras=extras)
        val_set = StoreDataset(ws.store.path, val.rows, val.labels, augment=False,
                               image_size=train_cfg.image_size) if len(val) else None
        if val_set is None:
            note("pretrain: no val split images; the last epoch is kept")
        summary = fit(ws=ws, run=run_, stage=STAGE, round_=ROUND, model=model,
                      objective=objective, train_set=train_set, val_set=val_set, cfg=train_cfg,
                      meta=meta, resume=cfg.resume)
        run_.summary = {**summary, "backbone": backbone, "run_id": run_.run_id,
                        HASH_KEY: checkpoint_hash(ws, ROUND)}
    return run_.result()
