"""How much label knowledge do a study cell's radiomics positives carry, against what the
image model already knows? The headroom check of `kacl study`.

The study's positive control (oracle: radiomics of the true lesion box) can only beat
classification-only training if those radiomics know more about the labels than the round-0
network does. This measures both sides on the same workspace:

- *probe*: a cross-validated (5-fold) logistic regression from each training image's positive
  radiomics (z-scored with train statistics, clipped to +-5 like the encoder's input) to the
  image's **true** labels (``true_labels`` when ``--label-noise`` made one, else ``labels``),
  per finding with >= 10 positives, mean AUC over those findings. It reads labels of every
  training image, which the method never does: it is an upper-end estimate of what the
  positives could teach, not a result.
- *round 0*: the cell's round-0 test mean AUC (``cell.json``/``round0.json`` of the study, or
  ``--round0-auc``).

Headroom = probe - round 0. Measured (docs/contrast.md): 0.75 vs 0.73 at 64 px, where no
setting moved AUC; 0.78 vs 0.64 at 128 px with more label noise.

Usage: python -m benchmarks.knowledge_probe WS/study/NAME/seed-0/oracle [--round 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import duckdb
import numpy as np

from kacl_cli.findings import FINDINGS


def positives(catalog: Path, round_: int) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(features, true labels, ROI sources) of the training images' positive ROIs."""
    con = duckdb.connect(str(catalog), read_only=True)
    try:
        has_true = con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'true_labels'"
        ).fetchone()[0]
        table = "true_labels" if has_true else "labels"
        cols = ", ".join(f'l."{f}"' for f in FINDINGS)
        rows = con.execute(
            f"SELECT r.features, ro.source, {cols} FROM radiomics r "
            "JOIN rois ro USING (round, image_id, finding) "
            f"JOIN {table} l USING (image_id) JOIN images i USING (image_id) "
            "WHERE r.round = ? AND ro.is_positive AND r.features IS NOT NULL "
            "AND i.split = 'train'", [round_]).fetchall()
    finally:
        con.close()
    x = np.nan_to_num(np.array([r[0] for r in rows], dtype=float))
    y = np.array([r[2:] for r in rows], dtype=int)
    sources: dict[str, int] = {}
    for r in rows:
        sources[r[1]] = sources.get(r[1], 0) + 1
    return x, y, sources


def probe(x: np.ndarray, y: np.ndarray, min_pos: int = 10) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict

    x = np.clip((x - x.mean(0)) / (x.std(0) + 1e-9), -5, 5)
    out = {}
    for j, f in enumerate(FINDINGS):
        if y[:, j].sum() < min_pos or (len(y) - y[:, j].sum()) < min_pos:
            continue
        p = cross_val_predict(LogisticRegression(C=0.1, max_iter=2000), x, y[:, j], cv=5,
                              method="predict_proba")[:, 1]
        out[f] = float(roc_auc_score(y[:, j], p))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cell", type=Path, help="a study cell (or any workspace with radiomics)")
    ap.add_argument("--round", type=int, default=0, help="whose radiomics (the cell's input)")
    ap.add_argument("--round0-auc", type=float, default=None)
    args = ap.parse_args(argv)
    x, y, sources = positives(args.cell / "catalog.duckdb", args.round)
    per = probe(x, y)
    mean = float(np.mean(list(per.values()))) if per else float("nan")
    r0 = args.round0_auc
    if r0 is None:
        r0_file = args.cell.parent / "round0.json"
        if r0_file.exists():
            r0 = json.loads(r0_file.read_text()).get("mean_auc")
    for f, a in per.items():
        print(f"{f:<20} probe AUC {a:.3f}")
    print(f"positives {len(x)} ({', '.join(f'{k} {v}' for k, v in sorted(sources.items()))})")
    print(f"mean probe AUC {mean:.3f}; round-0 test mean AUC "
          f"{'-' if r0 is None else format(r0, '.3f')}; headroom "
          f"{'-' if r0 is None else format(mean - r0, '+.3f')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
