"""Box-supervision selection: by patient, deterministic, five folds disjoint and covering."""

from __future__ import annotations

import math

import pytest

from kacl_cli.errors import InputError
from kacl_cli.stages.contrast.supervision import (
    current_box_supervision,
    patient_folds,
    select_box_supervision,
    select_patients,
    write_box_supervision,
)

PATIENTS = [f"p{i:03d}" for i in range(23)]


def test_folds_disjoint_covering_and_balanced() -> None:
    folds = patient_folds(PATIENTS)
    assert len(folds) == 5
    flat = [p for f in folds for p in f]
    assert sorted(flat) == sorted(PATIENTS)  # covering, no duplicates
    assert len(set(flat)) == len(flat)
    sizes = sorted(len(f) for f in folds)
    assert sizes[-1] - sizes[0] <= 1
    # shuffled, not just the sorted order cut into pieces
    assert flat != sorted(PATIENTS)


def test_deterministic_and_order_independent() -> None:
    a = select_patients(PATIENTS, 0.8, 2)
    b = select_patients(list(reversed(PATIENTS)), 0.8, 2)
    assert a == b
    assert select_patients(PATIENTS, 0.8, 2, seed=1) != a


def test_eighty_percent_is_four_folds_other_than_k() -> None:
    folds = patient_folds(PATIENTS)
    held_out_union = []
    for k in range(5):
        chosen = select_patients(PATIENTS, 0.8, k)
        assert set(chosen) == set(PATIENTS) - set(folds[k])
        held_out = set(PATIENTS) - set(chosen)
        held_out_union.extend(held_out)
    # every patient is held out exactly once over the five folds
    assert sorted(held_out_union) == sorted(PATIENTS)


def test_other_fractions_take_ceil_of_rotated_order() -> None:
    folds = patient_folds(PATIENTS)
    for k in range(5):
        chosen = select_patients(PATIENTS, 0.3, k)
        assert len(chosen) == math.ceil(0.3 * len(PATIENTS))
        # rotated by fold: fold k's patients are the last to be taken
        assert not set(chosen) & set(folds[k])
    assert select_patients(PATIENTS, 0.0, 0) == []
    assert sorted(select_patients(PATIENTS, 1.0, 3)) == sorted(PATIENTS)
    assert len(select_patients(PATIENTS, 0.4, 1)) == len(folds[2]) + len(folds[3])


def test_bad_fraction_or_fold() -> None:
    with pytest.raises(InputError):
        select_patients(PATIENTS, 1.5, 0)
    with pytest.raises(InputError):
        select_patients(PATIENTS, 0.8, 5)


def test_workspace_selection_is_by_patient(tiny_workspace) -> None:
    ws = tiny_workspace(n=40)
    box_rows = ws.catalog.query(
        "SELECT DISTINCT i.patient_id, i.image_id FROM images i JOIN gt_boxes USING (image_id)"
    )
    patient_of = {img: pat for pat, img in box_rows}
    sel = select_box_supervision(ws, 0.8, 0)
    assert sel.n_box_images == len(patient_of)
    assert 0 < len(sel.image_ids) < sel.n_box_images
    # whole patients: every box image of a chosen patient is in, none of the others
    chosen = set(sel.patients)
    assert {i for i, p in patient_of.items() if p in chosen} == set(sel.image_ids)

    assert write_box_supervision(ws, sel, "run-x") is True
    assert current_box_supervision(ws) == list(sel.image_ids)
    assert write_box_supervision(ws, sel, "run-y") is False  # identical: untouched
    none = select_box_supervision(ws, 0.0, 0)
    assert write_box_supervision(ws, none, "run-z") is True
    assert current_box_supervision(ws) == []


def test_no_boxes_is_a_clear_error(tiny_workspace) -> None:
    ws = tiny_workspace(n=8)
    ws.catalog.execute("DELETE FROM gt_boxes")
    with pytest.raises(InputError, match="ground-truth boxes"):
        select_box_supervision(ws, 0.8, 0)
