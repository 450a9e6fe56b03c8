"""`kacl study`: the ablation grid (with positive and negative controls) as one command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kacl_cli.cli import DeviceOpt, JsonOpt, WorkspaceOpt, emit, err, handle_errors, out
from kacl_cli.stages.study import DEFAULT_SETTINGS
from kacl_cli.workspace import DEFAULT_WORKSPACE, Workspace

NAME = "study"


def _f(v: Any, spec: str = "+.3f") -> str:
    return "-" if v is None else format(v, spec)


def _ci(d: dict[str, Any] | None, key: str) -> str:
    x = (d or {}).get(key)
    if not x:  # no pair, or a result document from before that metric existed
        return "-"
    lo, hi = x["ci"]
    return f"{_f(x['delta'])} [{_f(lo)}, {_f(hi)}]"


def render(doc: dict[str, Any]) -> None:
    """Plain fixed-width text (a log file or a narrow terminal must not wrap the CIs)."""
    cfg = doc["config"]
    lines = [f"kacl study {cfg['name']}: {len(cfg['seeds'])} seed(s), {cfg['rounds']} round(s) "
             f"x {cfg['epochs_per_round']} epoch(s), label fraction {cfg['label_fraction']}; "
             "test split; d = setting - none, paired, 95% CI (images and seeds resampled)"]
    head = (f"{'setting':<22} {'seeds':>11} {'test AUC':>9} {'probe AUC':>9} "
            f"{'d mean AUC [95% CI]':>27} {'d probe AUC [95% CI]':>27} "
            f"{'d loc acc [95% CI]':>27} {'d mean IoU [95% CI]':>27} {'s/cell':>7}")
    lines += [head, "-" * len(head)]
    r0 = doc["round0"]
    lines.append(f"{'round 0':<22} {'':>11} {_f(r0['mean_auc'], '.4f'):>9} "
                 f"{_f(r0.get('probe_auc'), '.4f'):>9}")
    for r in doc["rows"]:
        seeds = f"{len(r['seeds_done'])}/{len(cfg['seeds'])}"
        if r["seeds_failed"]:
            seeds += f" {len(r['seeds_failed'])}FAIL"
        vs = r.get("vs_none")
        lines.append(f"{r['setting']:<22} {seeds:>11} {_f(r['mean_auc'], '.4f'):>9} "
                     f"{_f(r.get('probe_auc'), '.4f'):>9} {_ci(vs, 'mean_auc'):>27} "
                     f"{_ci(vs, 'probe_auc'):>27} {_ci(vs, 'loc_acc'):>27} "
                     f"{_ci(vs, 'mean_iou'):>27} {_f(r['seconds'], '.0f'):>7}")
    net = [r for r in doc["rows"] if r.get("vs_shuffled")]
    if net:  # the knowledge effect net of the contrastive term (same machinery, own radiomics)
        lines.append("knowledge effect, setting - shuffled (paired, 95% CI):")
        for r in net:
            vs = r["vs_shuffled"]
            lines.append(f"  {r['setting']:<20} {'':>11} {'':>9} {'':>9} "
                         f"{_ci(vs, 'mean_auc'):>27} {_ci(vs, 'probe_auc'):>27} "
                         f"{_ci(vs, 'loc_acc'):>27} {_ci(vs, 'mean_iou'):>27}")
    lines.append(f"decision rule: {doc['decision']['rule']}")
    names = {"mean_auc": "mean AUC", "loc_acc": "loc acc", "probe_auc": "probe AUC"}
    lines += [f"result ({names.get(m, m)}): {d['verdict']}" for m, d in doc["decisions"].items()]
    for line in lines:
        out.print(line, highlight=False, markup=False, soft_wrap=True)


@handle_errors
def command(
    name: Annotated[str, typer.Option("--name", help="Study directory: WS/study/NAME.")]
    = "default",
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Number of training seeds.")] = 3,
    first_seed: Annotated[int, typer.Option(
        "--first-seed", min=0, help="Seeds run first-seed..first-seed+N-1 (split a study "
        "over processes; a later call over all seeds prints the pooled table).")] = 0,
    settings: Annotated[str, typer.Option(
        "--settings", help="Comma list of: none, augment, radiomics, radiomics-nofeedback, "
        "oracle (positive control), shuffled (negative control); and the positive choice: "
        "radiomics-labelled (--positive-roi labelled), radiomics-labelled-lung (also "
        "--normal-positive lung).")]
    = ",".join(DEFAULT_SETTINGS),
    backbone: Annotated[str, typer.Option(help="Image network of round 0.")] = "tiny",
    pretrain_epochs: Annotated[int, typer.Option("--pretrain-epochs", min=1)] = 8,
    pretrain_lr: Annotated[float, typer.Option("--pretrain-lr")] = 2e-3,
    augment: Annotated[bool, typer.Option(
        "--augment/--no-augment", help="Round 0's augmentation (the rounds inherit it; "
        "the augment setting needs it).")] = True,
    rounds: Annotated[int, typer.Option("--rounds", min=1)] = 2,
    epochs_per_round: Annotated[int, typer.Option("--epochs-per-round", min=1)] = 2,
    lr: Annotated[float, typer.Option("--lr", help="Contrast rounds' peak lr.")] = 2e-4,
    lam: Annotated[float | None, typer.Option("--lambda", help="Contrastive weight "
                                              "(default: contrast's).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2)] = 32,
    label_fraction: Annotated[float, typer.Option(
        "--label-fraction", help="Fraction of training images with classification loss "
        "(pretrain and rounds).")] = 1.0,
    positive_roi: Annotated[str, typer.Option(
        "--positive-roi", help="predicted | labelled: the radiomics settings' ROI rule.")]
    = "predicted",
    normal_positive: Annotated[str, typer.Option("--normal-positive", help="skip | lung")]
    = "skip",
    radiomics_params: Annotated[Path | None, typer.Option(
        "--radiomics-params", help="pyradiomics-format YAML params file for the radiomics "
        "cells' radiomics, e.g. kacl_cli/stages/radiomics/normalized_params.yaml.")] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=100)] = 1000,
    device: DeviceOpt = "cpu",
    workers: Annotated[int, typer.Option(help="DataLoader workers / radiomics processes.")]
    = 0,
    jobs: Annotated[int, typer.Option(
        "--jobs", min=1, help="Seeds trained at once, each in its own process (logs in "
        "WS/study/NAME/seed-S.log; OMP_NUM_THREADS = cores / jobs unless set).")] = 1,
    as_json: JsonOpt = False,
    workspace: WorkspaceOpt = DEFAULT_WORKSPACE,
) -> None:
    """The ablation grid with controls: per seed a shared round 0, one sub-workspace per setting.

    Settings: none, augment, radiomics, radiomics --no-feedback, oracle (positive control:
    GT-box radiomics), shuffled (negative control: another image's radiomics). Sub-workspaces
    share the workspace's store.h5 (HDF5 external links, never a copy). Re-running continues
    unfinished and failed cells. Prints paired differences vs none (95% CIs pooled over seeds)
    and the decision rule. Exit 1 when a cell failed.

    Example: kacl study --seeds 5 --label-fraction 0.2 --rounds 1 --epochs-per-round 3

    Example (2 cores, two seeds at a time): kacl study --seeds 5 --jobs 2 --settings
    none,oracle,shuffled,radiomics
    """
    from kacl_cli.errors import KaclError
    from kacl_cli.stages.study import StudyConfig, run_study

    cfg = StudyConfig(
        name=name, seeds=list(range(first_seed, first_seed + seeds)),
        settings=[s.strip() for s in settings.split(",") if s.strip()],
        backbone=backbone, pretrain_epochs=pretrain_epochs, pretrain_lr=pretrain_lr,
        augment=augment,
        rounds=rounds, epochs_per_round=epochs_per_round, lr=lr, lam=lam,
        batch_size=batch_size, label_fraction=label_fraction, positive_roi=positive_roi,
        normal_positive=normal_positive, device=device, workers=workers, n_boot=bootstrap,
        radiomics_params=None if radiomics_params is None else str(radiomics_params.resolve()))
    doc = run_study(Workspace(workspace), cfg, note=lambda t: err.print(t, highlight=False),
                    jobs=jobs)
    emit(doc, as_json, lambda: render(doc))
    failed = [(r["setting"], r["seeds_failed"]) for r in doc["rows"] if r["seeds_failed"]]
    if failed:
        raise KaclError("study: failed cells (re-run to retry): " + ", ".join(
            f"{s} seed(s) {','.join(map(str, f))}" for s, f in failed))
    if doc.get("seed_processes_failed"):
        raise KaclError("study: the process of seed(s) " + ",".join(
            map(str, doc["seed_processes_failed"])) + " failed (see WS/study/NAME/seed-S.log; "
            "re-run to continue)")
