"""Box supervision: which box-annotated images may lend their ground-truth boxes to training.

The paper frames the method as semi-supervised (image labels for all images, boxes for few),
and Li et al. 2018 evaluate with a fraction of the box-annotated images (e.g. 80%, five-fold)
used for training and the rest for testing. ``contrast --box-supervision F --fold K`` selects
those images here; their GT boxes replace the CAM boxes as radiomics ROIs, they join the
training set, and ``evaluate`` excludes them (it reads the ``box_supervision`` table).

Selection is by PATIENT, never by image, so no patient's X-rays sit on both sides (the NIH
follow-ups of one patient are near-duplicates). The rule, deterministic for a given seed:

1. Patients that own at least one GT box, sorted by id, then shuffled with
   ``numpy.random.default_rng(seed)``; the shuffled order is cut into 5 folds with
   ``numpy.array_split`` (sizes differ by at most one).
2. The order is *rotated by fold*: folds K+1, K+2, ..., 4, 0, ..., K (fold K comes last).
3. When ``5 * F`` is a whole number (0.2, 0.4, 0.6, 0.8, 1.0) whole folds are taken from the
   rotated order: F = 0.8 is exactly "the four folds other than K", the five-fold protocol.
   Any other F takes the first ``ceil(F * n_patients)`` patients of the rotated order, so the
   held-out patients are again those of fold K first.

The fold seed is fixed (:data:`FOLD_SEED`), independent of the training ``--seed``, so runs
with different training seeds are evaluated on the same held-out patients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kacl_cli.catalog import insert_rows
from kacl_cli.errors import InputError
from kacl_cli.workspace import Workspace

N_FOLDS = 5
FOLD_SEED = 0


@dataclass(frozen=True)
class BoxSupervision:
    """The selected images (and their patients) for one (fraction, fold)."""

    fraction: float
    fold: int
    patients: tuple[str, ...]
    image_ids: tuple[str, ...]
    n_box_patients: int
    n_box_images: int


def patient_folds(patients: list[str] | tuple[str, ...], seed: int = FOLD_SEED,
                  n_folds: int = N_FOLDS) -> list[list[str]]:
    """The seeded patient folds (sorted ids, shuffled, split into near-equal parts)."""
    order = sorted(set(patients))
    perm = np.random.default_rng(seed).permutation(len(order))
    shuffled = [order[i] for i in perm]
    return [list(part) for part in np.array_split(np.array(shuffled, dtype=object), n_folds)]


def select_patients(patients: list[str] | tuple[str, ...], fraction: float, fold: int,
                    seed: int = FOLD_SEED, n_folds: int = N_FOLDS) -> list[str]:
    """Patients whose boxes supervise training for ``fraction`` and ``fold`` (module rule)."""
    if not 0.0 <= fraction <= 1.0:
        raise InputError(f"--box-supervision must be in [0, 1], got {fraction}")
    if not 0 <= fold < n_folds:
        raise InputError(f"--fold must be in 0..{n_folds - 1}, got {fold}")
    if fraction == 0.0:
        return []
    folds = patient_folds(patients, seed, n_folds)
    rotated = folds[fold + 1:] + folds[: fold + 1]
    whole = fraction * n_folds
    if abs(whole - round(whole)) < 1e-9:
        return [p for part in rotated[: int(round(whole))] for p in part]
    flat = [p for part in rotated for p in part]
    return flat[: math.ceil(fraction * len(flat) - 1e-9)]


def select_box_supervision(ws: Workspace, fraction: float, fold: int,
                           seed: int = FOLD_SEED) -> BoxSupervision:
    """Select the box-supervision images of a workspace (see the module docstring)."""
    rows = ws.catalog.query(
        "SELECT DISTINCT i.patient_id, i.image_id FROM images i "
        "JOIN gt_boxes g USING (image_id) ORDER BY 1, 2"
    )
    by_patient: dict[str, list[str]] = {}
    for patient, image_id in rows:
        by_patient.setdefault(str(patient), []).append(str(image_id))
    if fraction > 0 and not by_patient:
        raise InputError(
            "--box-supervision needs ground-truth boxes, but this workspace has none "
            "(gt_boxes is empty)"
        )
    chosen = select_patients(list(by_patient), fraction, fold, seed)
    image_ids = sorted(i for p in chosen for i in by_patient[p])
    return BoxSupervision(
        fraction=float(fraction), fold=int(fold), patients=tuple(sorted(chosen)),
        image_ids=tuple(image_ids), n_box_patients=len(by_patient),
        n_box_images=sum(len(v) for v in by_patient.values()),
    )


def current_box_supervision(ws: Workspace) -> list[str]:
    """Image ids in the ``box_supervision`` table (sorted)."""
    return [str(r[0]) for r in ws.catalog.query(
        "SELECT image_id FROM box_supervision ORDER BY image_id")]


def write_box_supervision(ws: Workspace, sel: BoxSupervision, run_id: str | None) -> bool:
    """Make the ``box_supervision`` table hold exactly ``sel``; True when it changed.

    Replaced in one transaction so ``evaluate`` never sees a half-written selection. An
    identical selection is left untouched (its run_id keeps naming the run that made it).
    """
    if current_box_supervision(ws) == list(sel.image_ids):
        return False
    if not ws.writes:
        return True
    with ws.catalog.connect() as con:
        con.execute("BEGIN TRANSACTION")
        con.execute("DELETE FROM box_supervision")
        insert_rows(con, "box_supervision",
                    [(i, sel.fold, sel.fraction, run_id) for i in sel.image_ids])
        con.execute("COMMIT")
    return True
