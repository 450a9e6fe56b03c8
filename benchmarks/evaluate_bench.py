"""Speed of the evaluation metrics at NIH scale: AUC bootstrap and localization accuracy.

The bootstrap resamples images (multiplicities) and computes every resample's AUC from one sort
per finding (weighted Mann-Whitney), instead of one sklearn call per resample and finding.
This prints both on the same data, and the agreement of the two.

Run: .venv/bin/python -m benchmarks.evaluate_bench [--images 25596] [--boot 1000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from kacl_cli.findings import FINDINGS
from kacl_cli.stages.evaluate.metrics import (
    IOU_THRESHOLDS,
    accuracy_at,
    bootstrap_aucs,
    bootstrap_weights,
    pair_overlaps,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=25596, help="test images (NIH official: 25596)")
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--sklearn-boot", type=int, default=20,
                    help="resamples timed for the sklearn loop (extrapolated to --boot)")
    ap.add_argument("--pairs", type=int, default=984, help="GT boxes (NIH: 984)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n, f = args.images, len(FINDINGS)
    y = rng.random((n, f)) < rng.uniform(0.002, 0.2, f)
    s = np.round(y * 0.7 + rng.normal(0, 1, (n, f)), 3)

    t0 = time.perf_counter()
    boot = bootstrap_aucs(y, s, args.boot, seed=0)
    t_vec = time.perf_counter() - t0

    t0 = time.perf_counter()
    k = args.sklearn_boot
    ref = np.full((k, f), np.nan)
    rows = 0
    for w in bootstrap_weights(n, k, seed=0):  # same resamples as the first k above
        for b in range(len(w)):
            idx = np.repeat(np.arange(n), w[b])
            for j in range(f):
                yy = y[idx, j]
                if yy.any() and not yy.all():
                    ref[rows + b, j] = roc_auc_score(yy, s[idx, j])
        rows += len(w)
    t_sk = (time.perf_counter() - t0) * args.boot / k
    diff = np.nanmax(np.abs(ref - boot[:k]))

    gt = np.c_[rng.uniform(0, 600, (args.pairs, 2)), rng.uniform(50, 400, (args.pairs, 2))]
    pred = gt + rng.normal(0, 60, gt.shape)
    t0 = time.perf_counter()
    iou, iobb = pair_overlaps(pred, gt)
    accuracy_at(iou, IOU_THRESHOLDS)
    t_loc = time.perf_counter() - t0

    print(f"| what ({n} images x {f} findings, {args.boot} resamples) | seconds |")
    print("|---|---|")
    print(f"| bootstrap AUC, vectorised (kacl) | {t_vec:.2f} |")
    print(f"| bootstrap AUC, sklearn loop (extrapolated from {k}) | {t_sk:.1f} |")
    print(f"| speed-up | {t_sk / t_vec:.0f}x |")
    print(f"| max abs difference to sklearn | {diff:.1e} |")
    print(f"| IoU/IoBB + accuracy, {args.pairs} GT boxes | {t_loc:.4f} |")


if __name__ == "__main__":
    main()
