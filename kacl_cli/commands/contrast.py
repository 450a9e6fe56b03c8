"""`kacl contrast`: knowledge-augmented contrastive training in rounds (the feedback loop)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kacl_cli.cli import (
    BoxLossFormOpt,
    BoxLossWeightOpt,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    RadiomicsBackend,
    WorkspaceOpt,
    emit,
    err,
    handle_errors,
    out,
    resolve_box_loss_weight,
)
from kacl_cli.lock import writes_workspace
from kacl_cli.models.contrast_spec import POSITIVES
from kacl_cli.options import check_number
from kacl_cli.stages.contrast.config import ContrastConfig
from kacl_cli.workspace import DEFAULT_WORKSPACE, Workspace

NAME = "contrast"


# Typer turns an Enum into a choice (a bad value is a usage error, exit 2); built from the
# objective's kinds of positives.
Positives = Enum("Positives", {p: p for p in POSITIVES}, type=str)
_DEFAULTS = ContrastConfig()


class PositiveRoi(str, Enum):
    predicted = "predicted"
    labelled = "labelled"
    oracle = "oracle"


class NormalPositive(str, Enum):
    skip = "skip"
    lung = "lung"


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(result: dict[str, Any]) -> None:
    """The per-round summary table on stdout."""
    table = Table(title=f"contrast: rounds 1..{len(result['rounds'])} "
                        f"({result['config']['positives']} positives"
                        f"{'' if result['config']['feedback'] else ', no feedback'})")
    for col in ("round", "status", "val mean AUC", "contrastive loss", "with positive",
                "objective", "seconds"):
        table.add_column(col, justify="right")
    for r in result["rounds"]:
        with_pos = r.get("train_with_positive")
        table.add_row(
            str(r["round"]),
            "skipped" if r.get("skipped") else "trained",
            _fmt(r.get("val_mean_auc"), ".3f"),
            _fmt(r.get("contrastive_loss"), ".4f"),
            "-" if with_pos is None else f"{with_pos}/{r.get('train_images', '?')}",
            str(r.get("objective_init", "-")),
            _fmt(r.get("seconds"), ".1f"),
        )
    out.print(table)
    out.print(f"latest checkpoint: round-{result['latest_round']}", highlight=False)


@handle_errors
@writes_workspace(NAME)
def command(
    rounds: Annotated[int, typer.Option(
        "--rounds", min=1, help="Total number of contrast rounds wanted (not a count to add): "
        "rounds already finished are skipped.")] = _DEFAULTS.rounds,
    from_round: Annotated[int | None, typer.Option(
        "--from-round", min=1, help="Restart at this round (needs checkpoint round-(K-1)).")]
    = _DEFAULTS.from_round,
    epochs_per_round: Annotated[int, typer.Option(
        "--epochs-per-round", min=1, help="Training epochs of each round.")]
    = _DEFAULTS.epochs_per_round,
    temperature: Annotated[float, typer.Option(
        "--temperature", help="NT-Xent temperature (in-range values: 0.05-0.5).")]
    = _DEFAULTS.temperature,
    lam: Annotated[float, typer.Option(
        "--lambda", help="Weight of the contrastive term: total = cls + lambda * NT-Xent.")]
    = _DEFAULTS.lam,
    proj_dim: Annotated[int, typer.Option(
        "--proj-dim", min=2, help="Projection dimensions of both heads.")] = _DEFAULTS.proj_dim,
    box_supervision: Annotated[float, typer.Option(
        "--box-supervision", min=0.0, max=1.0,
        help="Fraction of box-annotated images (by patient) whose GT boxes train as ROIs; "
        "they leave every evaluation. 0 = no boxes.")] = _DEFAULTS.box_supervision,
    fold: Annotated[int, typer.Option(
        "--fold", min=0, max=4, help="Which of the 5 patient folds is held out.")] = _DEFAULTS.fold,
    box_loss_weight: BoxLossWeightOpt = None,
    box_loss_form: BoxLossFormOpt = _DEFAULTS.box_loss_form,
    positives: Annotated[Positives, typer.Option(
        "--positives", help="radiomics (the method) | augment (SimCLR ablation) | none "
        "(classification only).")] = Positives(_DEFAULTS.positives),
    feedback: Annotated[bool, typer.Option(
        "--feedback/--no-feedback",
        help="--no-feedback: every round uses round 0's CAM boxes and radiomics.")]
    = _DEFAULTS.feedback,
    positive_roi: Annotated[PositiveRoi, typer.Option(
        "--positive-roi", help="Whose ROI is an image's radiomics positive: predicted (the "
        "model's most confident finding) | labelled (its own labelled finding with the "
        "highest probability) | oracle (the positive control: GT boxes where an image has "
        "them, labelled otherwise).")] = PositiveRoi.predicted,
    normal_positive: Annotated[NormalPositive, typer.Option(
        "--normal-positive", help="labelled/oracle ROIs of an image without findings: skip "
        "(no contrastive term) | lung (a fixed lung-field ROI).")] = NormalPositive.skip,
    shuffle_positives: Annotated[bool, typer.Option(
        "--shuffle-positives", help="The negative control: each image gets another image's "
        "radiomics positive.")] = False,
    label_fraction: Annotated[float, typer.Option(
        "--label-fraction", help="Only this fraction of the training images carry "
        "classification loss; the contrastive term uses all.")] = 1.0,
    radiomics_backend: Annotated[RadiomicsBackend, typer.Option(
        "--radiomics-backend", help="fast (default: pyradiomics' values, compiled and "
        "batched) | pyradiomics (the reference, ~70x slower).")]
    = RadiomicsBackend(_DEFAULTS.radiomics_backend),
    radiomics_params: Annotated[Path | None, typer.Option(
        "--radiomics-params", help="pyradiomics-format YAML params file for the rounds' "
        "radiomics (as `kacl radiomics --params`), e.g. kacl_cli/stages/radiomics/"
        "normalized_params.yaml (intensity normalisation).")] = None,
    backbone_lr_scale: Annotated[float, typer.Option(
        "--backbone-lr-scale", help="Image network learning rate = this x --lr (the new "
        "heads use --lr).")] = _DEFAULTS.backbone_lr_scale,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2)] = _DEFAULTS.batch_size,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate of each round.")]
    = _DEFAULTS.lr,
    device: DeviceOpt = _DEFAULTS.device,
    workers: Annotated[int | None, typer.Option(
        help="DataLoader workers and radiomics processes (default: cores, at most 8).")]
    = None,
    seed: int = _DEFAULTS.seed,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
) -> None:
    """Knowledge-augmented contrastive training in rounds (the feedback loop).

    Round k: cam --round k-1 -> radiomics --round k-1 -> joint training (focal +
    lambda * NT-Xent between image and radiomics projections) from round-(k-1) ->
    checkpoints/round-k. Finished steps are skipped; a killed run continues where it stopped.

    Example: kacl contrast --rounds 3 --epochs-per-round 2 --radiomics-backend fast
    """
    from kacl_cli.parallel import auto_workers
    from kacl_cli.stages.contrast.stage import run_contrast

    check_number("--temperature", temperature, lo=0.0, lo_open=True, hi=100.0)
    check_number("--lambda", lam, lo=0.0, hi=1e6)
    check_number("--lr", lr, lo=0.0, lo_open=True, hi=10.0)
    check_number("--backbone-lr-scale", backbone_lr_scale, lo=0.0, hi=1e6)
    check_number("--box-supervision", box_supervision, lo=0.0, hi=1.0)
    box_loss_weight = resolve_box_loss_weight(box_loss_weight, box_loss_form, box_supervision)
    cfg = ContrastConfig(
        rounds=rounds, from_round=from_round, epochs_per_round=epochs_per_round,
        temperature=temperature, lam=lam, proj_dim=proj_dim, box_supervision=box_supervision,
        fold=fold, box_loss_weight=box_loss_weight, box_loss_form=box_loss_form,
        positives=positives.value, feedback=feedback,
        radiomics_backend=radiomics_backend.value, backbone_lr_scale=backbone_lr_scale,
        batch_size=batch_size, lr=lr, seed=seed, device=device,
        workers=auto_workers(workers), force=force,
        positive_roi=positive_roi.value, normal_positive=normal_positive.value,
        shuffle_positives=shuffle_positives, label_fraction=label_fraction,
        radiomics_params=None if radiomics_params is None else str(radiomics_params.resolve()),
    )
    ws = Workspace(workspace)
    result = run_contrast(ws, cfg, note=lambda text: err.print(text, highlight=False))
    emit(result, as_json, lambda: render(result))
