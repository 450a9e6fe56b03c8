"""`kacl pretrain`: supervised multi-label training of the image network (round 0)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from kacl_cli.cli import (
    BoxLossFormOpt,
    BoxLossWeightOpt,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    WorkspaceOpt,
    err,
    handle_errors,
    out,
    report,
    resolve_box_loss_weight,
)
from kacl_cli.lock import writes_workspace
from kacl_cli.options import check_choice, check_number
from kacl_cli.parallel import auto_workers
from kacl_cli.stages import pretrain as stage
from kacl_cli.stages.pretrain import LR_FINETUNE, LR_SCRATCH, PretrainConfig
from kacl_cli.training.config import TrainConfig
from kacl_cli.workspace import DEFAULT_WORKSPACE, Workspace

NAME = "pretrain"
_TRAIN = TrainConfig()  # the loop's defaults: one home (kacl_cli.training.config)
_STAGE = PretrainConfig()


def _render(summary: dict[str, Any], ws: Workspace) -> None:
    rows = stage.epoch_history(ws)
    table = Table(title=f"pretrain ({summary.get('backbone')}): round {stage.ROUND}")
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
@writes_workspace(NAME)
def command(
    backbone: Annotated[str, typer.Option(
        help="densenet121 | resnet50 | resnet18 | tiny (a small CNN for tests and demos).")]
    = _STAGE.backbone,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = _TRAIN.epochs,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = _TRAIN.batch_size,
    lr: Annotated[float | None, typer.Option(help=(
        "Peak AdamW learning rate (warm-up, cosine decay). Default: "
        f"{LR_SCRATCH:g} from scratch (--init none), {LR_FINETUNE:g} when fine-tuning."))]
    = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = _TRAIN.weight_decay,
    loss: Annotated[str, typer.Option(
        help="focal (alpha/gamma below) | bce (pos_weight from train prevalence).")]
    = _TRAIN.loss,
    focal_alpha: Annotated[float, typer.Option("--focal-alpha")] = _TRAIN.focal_alpha,
    focal_gamma: Annotated[float, typer.Option("--focal-gamma")] = _TRAIN.focal_gamma,
    init: Annotated[str, typer.Option(
        help="none | imagenet (torch hub cache only, never downloads) | PATH to a state dict.")]
    = _STAGE.init,
    image_size: Annotated[int | None, typer.Option(
        "--image-size", help="Training resolution (default: min(224, store size)).")] = None,
    augment: Annotated[bool, typer.Option(
        "--augment/--no-augment", help="Small affine + brightness/contrast; no flips.")]
    = _TRAIN.augment,
    device: DeviceOpt = _TRAIN.device,
    workers: Annotated[int | None, typer.Option(
        help="DataLoader worker processes (default: cores, at most 8; 0 = in-process).")]
    = None,
    seed: int = _TRAIN.seed,
    label_fraction: Annotated[float, typer.Option(
        "--label-fraction", help="Only this fraction of the training images carry "
                                 "classification loss (a fixed, hash-chosen subset).")]
    = _STAGE.label_fraction,
    box_supervision: Annotated[float, typer.Option(
        "--box-supervision",
        help="Fraction (0-1) of box-annotated patients whose images train with their GT boxes "
        "(the box term below); they leave every evaluation. 0 = no boxes.")]
    = _STAGE.box_supervision,
    fold: Annotated[int, typer.Option(
        help="Which of 5 patient folds is held out of box supervision (0-4).")] = _STAGE.fold,
    box_loss_weight: BoxLossWeightOpt = None,
    box_loss_form: BoxLossFormOpt = _TRAIN.box_loss_form,
    resume: Annotated[bool, typer.Option(
        "--resume/--no-resume", help="Continue a killed run from its last finished epoch.")]
    = _STAGE.resume,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
) -> None:
    """Train the image classifier (round 0): 14 findings, focal loss, best epoch by val AUC.

    Writes checkpoints/round-0 (model.safetensors + meta.json) and one `epochs` row per
    epoch. A killed run resumes from its last epoch; a finished one is skipped (--force).

    Example: kacl pretrain --backbone densenet121 --epochs 10 --device cuda
    """
    from kacl_cli.models.image_net import BACKBONES
    from kacl_cli.training.distributed import from_env

    # Usage checks before any work (issue 15): exit 2, one line, no run row.
    check_choice("--backbone", backbone, list(BACKBONES))
    check_choice("--loss", loss, list(stage.LOSSES))
    check_number("--lr", lr, lo=0.0, lo_open=True, hi=10.0)
    check_number("--weight-decay", weight_decay, lo=0.0, hi=10.0)
    check_number("--focal-alpha", focal_alpha, lo=0.0, hi=1.0)
    check_number("--focal-gamma", focal_gamma, lo=0.0, hi=100.0)
    check_number("--image-size", image_size, lo=0, hi=4096)
    check_number("--workers", workers, lo=0, hi=256)
    check_number("--box-supervision", box_supervision, lo=0.0, hi=1.0)
    check_number("--fold", fold, lo=0, hi=4)
    box_loss_weight = resolve_box_loss_weight(box_loss_weight, box_loss_form, box_supervision)
    # Under torchrun only rank 0 writes the catalog and checkpoints.
    main_rank = from_env().is_main
    ws = Workspace(workspace, writes=main_rank)
    train = TrainConfig(
        epochs=epochs, batch_size=batch_size,
        lr=stage.default_lr(init) if lr is None else lr,
        weight_decay=weight_decay, loss=loss,
        focal_alpha=focal_alpha, focal_gamma=focal_gamma, image_size=image_size or 0,
        augment=augment, seed=seed, device=device,
        workers=auto_workers(workers), box_loss_weight=box_loss_weight,
        box_loss_form=box_loss_form,
    )
    cfg = PretrainConfig(backbone=backbone, init=init, train=train, force=force, resume=resume,
                         label_fraction=label_fraction, box_supervision=box_supervision,
                         fold=fold)
    summary = stage.run(ws, cfg, note=lambda text: err.print(text, highlight=False))
    if not main_rank:
        return  # rank 0 reports for the whole torchrun job
    report(stage.STAGE, summary, as_json, lambda: _render(summary, ws))
