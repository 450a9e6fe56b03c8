"""Ablation benchmark: does the radiomics positive (and its feedback loop) help?

For each seed, one phantom workspace is prepared and pre-trained (round 0); every setting
then starts from that same round-0 checkpoint (a paired design: the settings differ only in
the contrast rounds) and trains ``--rounds`` contrast rounds of ``--epochs-per-round`` epochs:

- ``radiomics``            the method: radiomics of the CAM region is the positive, feedback on;
- ``augment``              SimCLR ablation: a second augmented view is the positive;
- ``none``                 classification only, same epochs (isolates the contrastive term);
- ``radiomics-nofeedback`` radiomics positives from round 0's CAM boxes in every round.

Reported on the TEST split via ``kacl_cli.stages.evaluate.stage.headline``: mean AUC over
findings and mean localization accuracy over T(IoU) 0.1..0.7, as mean +- std over seeds,
plus round 0
(pre-training alone) as the common reference. Phantoms are built from known lesions, so the
numbers say whether the mechanics help on data where they can; they are not NIH results.

The defaults (600 phantoms at 64 px with label enrichment 0.5, tiny backbone, 8 pre-training
epochs, 2 rounds x 2 epochs, 3 seeds, fast radiomics backend) take about 15-25 minutes on 2
busy CPU cores.

Usage: .venv/bin/python -m benchmarks.ablation_bench [--images 600] [--size 64] [--seeds 3]
       [--backbone tiny|resnet18] [--pretrain-epochs 8] [--rounds 2] [--epochs-per-round 2]
       [--settings radiomics,augment,none,radiomics-nofeedback] [--device cpu|cuda]
       [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("KACL_NO_PROGRESS", "1")

SETTINGS = {
    "radiomics": {"positives": "radiomics", "feedback": True},
    "augment": {"positives": "augment", "feedback": True},
    "none": {"positives": "none", "feedback": True},
    "radiomics-nofeedback": {"positives": "radiomics", "feedback": False},
}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=600, help="phantoms per seed")
    ap.add_argument("--size", type=int, default=64, help="store/training resolution (px)")
    ap.add_argument("--difficulty", type=float, default=None,
                    help="phantom difficulty 0..1 (default: the generator's)")
    ap.add_argument("--enrich", type=float, default=0.5,
                    help="phantom label enrichment (0 = NIH prevalence: most findings would "
                    "have no test positives in a few hundred images)")
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("--pretrain-epochs", type=int, default=8)
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs-per-round", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--backend", default="fast", help="radiomics backend")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lambda", dest="lam", type=float, default=None,
                    help="contrastive weight (default: kacl contrast's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--keep", type=Path, default=None,
                    help="keep the workspaces under this directory (default: a temp dir)")
    args = ap.parse_args(argv)
    unknown = [s for s in args.settings.split(",") if s not in SETTINGS]
    if unknown:
        ap.error(f"unknown setting(s) {unknown}; choose from {', '.join(SETTINGS)}")
    return args


def base_workspace(root: Path, seed: int, args: argparse.Namespace):
    """Phantoms + round 0 for one seed (shared by every setting of that seed)."""
    from kacl_cli.stages import pretrain
    from kacl_cli.stages.prepare import phantoms
    from kacl_cli.stages.prepare.stage import prepare_synthetic
    from kacl_cli.training.config import TrainConfig
    from kacl_cli.workspace import Workspace

    ws = Workspace(root)
    difficulty = phantoms.DEFAULT_DIFFICULTY if args.difficulty is None else args.difficulty
    prepare_synthetic(ws, args.images, size=args.size, seed=seed, difficulty=difficulty,
                      enrich=args.enrich)
    cfg = TrainConfig(epochs=args.pretrain_epochs, batch_size=args.batch_size,
                      lr=args.pretrain_lr,
                      image_size=args.size, seed=seed, device=args.device,
                      workers=args.workers)
    pretrain.run(ws, pretrain.PretrainConfig(backbone=args.backbone, init="none", train=cfg))
    return ws


def run_setting(base, dest: Path, name: str, seed: int, args: argparse.Namespace
                ) -> dict[str, Any]:
    from kacl_cli.stages.contrast.stage import ContrastConfig, run_contrast
    from kacl_cli.stages.evaluate.stage import headline
    from kacl_cli.workspace import Workspace

    shutil.copytree(base.root, dest)
    ws = Workspace(dest)
    extra = {} if args.lam is None else {"lam": args.lam}
    cfg = ContrastConfig(rounds=args.rounds, epochs_per_round=args.epochs_per_round,
                         radiomics_backend=args.backend, batch_size=args.batch_size,
                         seed=seed, device=args.device, workers=args.workers,
                         **SETTINGS[name], **extra)
    t0 = time.perf_counter()
    res = run_contrast(ws, cfg, note=lambda _t: None)
    seconds = time.perf_counter() - t0
    h = headline(ws, args.rounds, "test")
    last = res["rounds"][-1]
    return {"auc": h.get("mean_auc"), "loc": h.get("mean_loc_acc"), "seconds": seconds,
            "val_auc": last.get("val_mean_auc"), "contrastive": last.get("contrastive_loss")}


def _ms(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.3f} +- {sd:.3f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(max(1, args.threads))
    from kacl_cli.stages.evaluate.stage import headline

    names = args.settings.split(",")
    root = args.keep or Path(tempfile.mkdtemp(prefix="kacl-ablation-"))
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in ["pretrain (round 0)", *names]}
    t_all = time.perf_counter()
    try:
        for seed in range(args.seeds):
            sdir = root / f"seed-{seed}"
            if sdir.exists():
                shutil.rmtree(sdir)
            t0 = time.perf_counter()
            base = base_workspace(sdir / "base", seed, args)
            log(f"seed {seed}: prepare + pretrain {time.perf_counter() - t0:.0f} s")
            for name in names:
                r = run_setting(base, sdir / name, name, seed, args)
                results[name].append(r)
                log(f"seed {seed} {name:>22}: test AUC {r['auc']:.3f} loc {r['loc']:.3f} "
                    f"({r['seconds']:.0f} s)")
            t0 = time.perf_counter()
            h0 = headline(base, 0, "test")  # after the clones: base's cam rows stay its own
            results["pretrain (round 0)"].append(
                {"auc": h0.get("mean_auc"), "loc": h0.get("mean_loc_acc"),
                 "seconds": None, "val_auc": None, "contrastive": None})
            log(f"seed {seed} {'round 0':>22}: test AUC {h0['mean_auc']:.3f} "
                f"loc {h0['mean_loc_acc']:.3f}")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    total = time.perf_counter() - t_all

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"ablation: {args.images} phantoms at {args.size} px, {args.backbone}, pretrain "
          f"{args.pretrain_epochs} ep, enrich {args.enrich}, {args.rounds} rounds x "
          f"{args.epochs_per_round} ep, "
          f"{args.seeds} seed(s), radiomics backend {args.backend}, device {args.device}; "
          f"test split; load {load:.1f} on {os.cpu_count()} cores; {total / 60:.1f} min")
    header = (f"{'setting':<24} {'test mean AUC':>16} {'loc acc T(IoU).1-.7':>20} "
              f"{'val AUC':>16} {'NT-Xent':>16} {'s/run':>7}")
    print(header)
    print("-" * len(header))
    for name, rows in results.items():
        secs = [r["seconds"] for r in rows if r["seconds"] is not None]
        print(f"{name:<24} {_ms([r['auc'] for r in rows]):>16} "
              f"{_ms([r['loc'] for r in rows]):>20} {_ms([r['val_auc'] for r in rows]):>16} "
              f"{_ms([r['contrastive'] for r in rows]):>16} "
              f"{(statistics.mean(secs) if secs else float('nan')):>7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
