"""Weak labels, as in the real data: label noise on the phantoms and a labelled fraction.

NIH's labels are mined from reports: some are wrong, and a study may hold only part of its
images as trusted labels. Two knobs reproduce that on any workspace:

- :func:`apply_label_noise` (``prepare --synthetic ... --label-noise P``): every (image,
  finding) label of the train and val splits flips with probability P. The test split keeps
  its true labels (the benchmark measures against the truth), and the true labels of every
  image are kept apart in ``true_labels`` (same columns as ``labels``) for analysis; no
  training code reads that table.
- :func:`labelled_mask` (``pretrain/contrast --label-fraction F``): only a fraction F of the
  training images carry classification loss (a per-image mask the objectives read from the
  batch as ``label_mask``); the contrastive term still uses every image. The subset is a
  pure function of the image ids (a hash order), so pretrain, every contrast round and every
  study setting use the same labelled images.
"""

from __future__ import annotations

import hashlib

import numpy as np

from kacl_cli.catalog import quote_ident
from kacl_cli.errors import InputError
from kacl_cli.findings import FINDINGS

NOISY_SPLITS = ("train", "val")


def check_fraction(name: str, value: float, allow_zero: bool = True) -> None:
    lo_ok = value >= 0 if allow_zero else value > 0
    if not (lo_ok and value <= 1):
        raise InputError(f"{name} must be in {'[0' if allow_zero else '(0'}, 1], got {value}")


def labelled_mask(image_ids: list[str], fraction: float) -> np.ndarray:
    """Which images carry labels: the first round(F x n) in sha1(image_id) order."""
    n = len(image_ids)
    if fraction >= 1.0:
        return np.ones(n, bool)
    order = sorted(range(n), key=lambda i: hashlib.sha1(image_ids[i].encode()).hexdigest())
    keep = np.zeros(n, bool)
    keep[order[:int(round(fraction * n))]] = True
    return keep


def flip_labels(labels: np.ndarray, p: float, seed: int) -> np.ndarray:
    """``labels`` (n x F bool) with each entry flipped with probability ``p`` (seeded)."""
    rng = np.random.default_rng([seed, 0x401CE])
    flips = rng.random(labels.shape) < p
    return np.asarray(labels, bool) ^ flips


def apply_label_noise(ws, p: float, seed: int) -> dict[str, int]:
    """Flip train/val labels with probability ``p``; the truth goes to ``true_labels``.

    Idempotent: the noisy labels are always drawn from ``true_labels`` (made on first use),
    so re-running with another P or seed never compounds noise. "No Finding" follows the 14
    findings. Returns counts of flipped labels and images touched.
    """
    check_fraction("--label-noise", p)
    cols = [quote_ident(f) for f in FINDINGS]
    with ws.catalog.connect() as con:
        con.execute("CREATE TABLE IF NOT EXISTS true_labels AS SELECT * FROM labels")
        rows = con.execute(
            f"SELECT t.image_id, {', '.join('t.' + c for c in cols)} FROM true_labels t "
            "JOIN images i USING (image_id) WHERE i.split IN ('train', 'val') "
            "ORDER BY t.image_id").fetchall()
    ids = [str(r[0]) for r in rows]
    truth = np.array([r[1:] for r in rows], dtype=bool).reshape(len(rows), len(FINDINGS))
    noisy = flip_labels(truth, p, seed)
    no_finding = ~noisy.any(axis=1)
    with ws.catalog.connect() as con:
        con.execute("BEGIN TRANSACTION")
        con.execute("DELETE FROM labels WHERE image_id IN (SELECT image_id FROM true_labels)")
        con.execute("INSERT INTO labels SELECT * FROM true_labels")
        if ids:
            con.execute("DELETE FROM labels WHERE image_id IN (SELECT unnest(?::VARCHAR[]))",
                        [ids])
            names = ["image_id", *[quote_ident(f) for f in FINDINGS], quote_ident("No Finding")]
            args = [ids, *[noisy[:, j].tolist() for j in range(len(FINDINGS))],
                    no_finding.tolist()]
            sel = ", ".join(["unnest(?::VARCHAR[])"] + ["unnest(?::BOOLEAN[])"] * (len(names) - 1))
            con.execute(f"INSERT INTO labels ({', '.join(names)}) SELECT {sel}", args)
        con.execute("COMMIT")
    return {"label_flips": int((noisy != truth).sum()),
            "noisy_images": int((noisy != truth).any(axis=1).sum())}
