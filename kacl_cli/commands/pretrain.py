"""`kacl pretrain`: supervised multi-label training of the image network (round 0)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kacl_cli.cli import DeviceOpt, ForceOpt, JsonOpt, WorkspaceOpt, emit, err, handle_errors, out
from kacl_cli.cli import skipped as print_skipped
from kacl_cli.errors import KaclError
from kacl_cli.workspace import DEFAULT_WORKSPACE, Workspace

NAME = "pretrain"
STAGE = "pretrain"
# Peak learning rates (docs/training.md, "Learning rate"): a net trained from scratch needs a
# larger step than one fine-tuned from pretrained weights; 5e-4 from scratch left the tiny
# demo net at chance after a demo's ~100-200 steps.
LR_SCRATCH = 2e-3
LR_FINETUNE = 5e-4


def default_lr(init: str) -> float:
    """The peak learning rate for ``--init``: LR_SCRATCH for ``none``, else LR_FINETUNE."""
    return LR_SCRATCH if init == "none" else LR_FINETUNE


def default_workers() -> int:
    """DataLoader workers: one per core up to 8 (HDF5 decoding + augmentation per item)."""
    return max(0, min(8, (os.cpu_count() or 1)))


def init_identity(init: str) -> str:
    """What ``--init`` means for the config hash: a path also by its size and mtime."""
    if init in ("none", "imagenet"):
        return init
    p = Path(init)
    if p.is_file():
        st = p.stat()
        return f"{p.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    return str(p.resolve())


def run_pretrain(ws: Workspace, *, backbone: str, init: str, cfg, force: bool = False,
                 resume: bool = True, label_fraction: float = 1.0) -> dict[str, Any]:
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
    from kacl_cli.training import distributed
    from kacl_cli.training.fit import fit
    from kacl_cli.training.loader import StoreDataset, data_fingerprint, load_split

    ws.require()
    if backbone not in BACKBONES:
        raise KaclError(f"--backbone {backbone!r}: expected one of {', '.join(BACKBONES)}")
    store_size = ws.store.image_size()
    if cfg.image_size is None or cfg.image_size <= 0:
        cfg.image_size = min(224, store_size)
    if cfg.image_size > store_size:
        raise KaclError(
            f"--image-size {cfg.image_size} is larger than the store's {store_size} px images"
        )
    train, val = load_split(ws, "train"), load_split(ws, "val")
    if not len(train):
        raise KaclError("the workspace has no train split images: check `kacl prepare`")
    config = {**cfg.hashed(), "backbone": backbone, "init": init_identity(init),
              "store_size": store_size,
              "head_bias": "prior" if init in ("none", "imagenet") else "init"}
    from kacl_cli.stages.contrast.weak import check_fraction, labelled_mask

    check_fraction("--label-fraction", label_fraction, allow_zero=False)
    extras = None
    if label_fraction < 1.0:  # only then: older runs keep their config hash
        config["label_fraction"] = label_fraction
        extras = {"label_mask": labelled_mask(train.image_ids, label_fraction)}
    resolve_device(cfg.device)
    # Built before the run is recorded: a bad --init fails without leaving a failed run.
    # Seeded first, so the random initialisation (and with it the whole run) follows --seed.
    torch.manual_seed(cfg.seed)
    model = build_image_net(backbone, init=init)
    if init in ("none", "imagenet"):
        # A fresh head starts at each finding's train prevalence (see init_head_bias); a
        # --init PATH keeps whatever head it brought.
        init_head_bias(model, train.labels if extras is None
                       else train.labels[extras["label_mask"]])  # only the labelled ones
    fingerprint = data_fingerprint(ws)
    # Under torchrun: every rank has read its inputs; rank 0 records the run, the others
    # mirror it, and only rank 0 touches the catalog from here on.
    begun = distributed.begin_stage(ws, cfg.device, STAGE, config, fingerprint, round_=0,
                                    force=force)
    if isinstance(begun, dict):
        return {**begun, "skipped": True}
    run = begun
    try:
        objective = ClassificationObjective(
            cfg.loss, cfg.focal_alpha, cfg.focal_gamma,
            pos_weight=pos_weight_from_labels(train.labels) if cfg.loss == "bce" else None,
        )
        meta = model_meta(backbone, cfg.image_size, store_size, GRAY_MEAN, GRAY_STD, 0, STAGE,
                          init=init)
        train_set = StoreDataset(ws.store.path, train.rows, train.labels, augment=cfg.augment,
                                 image_size=cfg.image_size, seed=cfg.seed, extras=extras)
        val_set = StoreDataset(ws.store.path, val.rows, val.labels, augment=False,
                               image_size=cfg.image_size) if len(val) else None
        if val_set is None:
            err.print("pretrain: no val split images; the last epoch is kept")
        summary = fit(ws=ws, run=run, stage=STAGE, round_=0, model=model, objective=objective,
                      train_set=train_set, val_set=val_set, cfg=cfg, meta=meta, resume=resume)
    except KaclError as exc:
        run.fail(str(exc))
        raise
    summary = {**summary, "backbone": backbone, "run_id": run.run_id}
    run.finish(summary)
    return summary


def _render(summary: dict[str, Any], ws: Workspace) -> None:
    rows = ws.catalog.query(
        "SELECT epoch, train_loss, val_loss, val_mean_auc, images_per_s FROM epochs "
        "WHERE round = 0 ORDER BY epoch"
    )
    table = Table(title=f"pretrain ({summary.get('backbone')}): round 0")
    for col in ("epoch", "train loss", "val loss", "val mean AUC", "img/s"):
        table.add_column(col, justify="right")
    for epoch, tl, vl, auc, ips in rows:
        mark = " *" if epoch == summary.get("best_epoch") else ""
        table.add_row(f"{epoch}{mark}", f"{tl:.4f}", "-" if vl is None else f"{vl:.4f}",
                      "-" if auc is None else f"{auc:.3f}", f"{ips:.1f}")
    out.print(table)
    auc = summary.get("val_mean_auc")
    out.print(f"best epoch {summary.get('best_epoch')} (val mean AUC "
              f"{'n/a' if auc is None else f'{auc:.3f}'}) -> {summary.get('checkpoint')}",
              highlight=False)


@handle_errors
def command(
    backbone: Annotated[str, typer.Option(
        help="densenet121 | resnet50 | resnet18 | tiny (a small CNN for tests and demos).")]
    = "densenet121",
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    lr: Annotated[float | None, typer.Option(help=(
        "Peak AdamW learning rate (warm-up, cosine decay). Default: "
        f"{LR_SCRATCH:g} from scratch (--init none), {LR_FINETUNE:g} when fine-tuning."))]
    = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 1e-4,
    loss: Annotated[str, typer.Option(
        help="focal (alpha/gamma below) | bce (pos_weight from train prevalence).")] = "focal",
    focal_alpha: Annotated[float, typer.Option("--focal-alpha")] = 0.25,
    focal_gamma: Annotated[float, typer.Option("--focal-gamma")] = 2.0,
    init: Annotated[str, typer.Option(
        help="none | imagenet (torch hub cache only, never downloads) | PATH to a state dict.")]
    = "none",
    image_size: Annotated[int | None, typer.Option(
        "--image-size", help="Training resolution (default: min(224, store size)).")] = None,
    augment: Annotated[bool, typer.Option(
        "--augment/--no-augment", help="Small affine + brightness/contrast; no flips.")] = True,
    device: DeviceOpt = "auto",
    workers: Annotated[int | None, typer.Option(
        help="DataLoader worker processes (default: cores, at most 8; 0 = in-process).")]
    = None,
    seed: int = 0,
    label_fraction: Annotated[float, typer.Option(
        "--label-fraction", help="Only this fraction of the training images carry "
                                 "classification loss (a fixed, hash-chosen subset).")] = 1.0,
    resume: Annotated[bool, typer.Option(
        "--resume/--no-resume", help="Continue a killed run from its last finished epoch.")]
    = True,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
) -> None:
    """Train the image classifier (round 0): 14 findings, focal loss, best epoch by val AUC.

    Writes checkpoints/round-0 (model.safetensors + meta.json) and one `epochs` row per
    epoch. A killed run resumes from its last epoch; a finished one is skipped (--force).

    Example: kacl pretrain --backbone densenet121 --epochs 10 --device cuda
    """
    from kacl_cli.training.distributed import from_env
    from kacl_cli.training.fit import TrainConfig

    # Under torchrun only rank 0 writes the catalog and checkpoints.
    main_rank = from_env().is_main
    ws = Workspace(workspace, writes=main_rank)
    cfg = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=default_lr(init) if lr is None else lr,
        weight_decay=weight_decay, loss=loss,
        focal_alpha=focal_alpha, focal_gamma=focal_gamma, image_size=image_size or 0,
        augment=augment, seed=seed, device=device,
        workers=default_workers() if workers is None else workers,
    )
    if loss not in ("focal", "bce"):
        raise typer.BadParameter(f"--loss {loss!r}: expected focal or bce")
    summary = run_pretrain(ws, backbone=backbone, init=init, cfg=cfg, force=force, resume=resume,
                           label_fraction=label_fraction)
    if not main_rank:
        return  # rank 0 reports for the whole torchrun job
    if summary.get("skipped"):
        summary.pop("skipped")
        print_skipped(STAGE, summary, as_json)
        return
    emit(summary, as_json, lambda: _render(summary, ws))
