"""Weak labels: label noise (true labels kept apart), the labelled fraction and its loss mask,
and the negative control's shuffled positives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kacl_cli.catalog import quote_ident
from kacl_cli.errors import InputError
from kacl_cli.findings import FINDINGS
from kacl_cli.models.losses import ClassificationObjective
from kacl_cli.stages.contrast.controls import derangement, shuffle_positives
from kacl_cli.stages.contrast.stage import ContrastConfig
from kacl_cli.stages.contrast.weak import apply_label_noise, flip_labels, labelled_mask


def _labels(ws, table: str = "labels") -> dict[str, tuple]:
    cols = ", ".join(quote_ident(f) for f in FINDINGS)
    return {r[0]: tuple(r[1:]) for r in ws.catalog.query(f"SELECT image_id, {cols} FROM {table}")}


def test_labelled_mask_fraction_is_stable_and_nested() -> None:
    ids = [f"{i:08d}_000.png" for i in range(200)]
    m20 = labelled_mask(ids, 0.2)
    assert m20.sum() == 40
    assert np.array_equal(m20, labelled_mask(list(ids), 0.2))  # a pure function of the ids
    assert not (m20 & ~labelled_mask(ids, 0.5)).any()  # 20% is inside 50%
    rev = labelled_mask(ids[::-1], 0.2)[::-1]  # order of the list does not matter
    assert np.array_equal(rev, m20)
    assert labelled_mask(ids, 1.0).all()


def test_flip_labels_rate_and_seed() -> None:
    y = np.zeros((400, 14), bool)
    a = flip_labels(y, 0.1, 0)
    assert 0.08 < a.mean() < 0.12
    assert np.array_equal(a, flip_labels(y, 0.1, 0))
    assert not np.array_equal(a, flip_labels(y, 0.1, 1))


def test_label_noise_keeps_truth_apart_and_test_clean(tiny_workspace) -> None:
    ws = tiny_workspace(n=40)
    before = _labels(ws)
    res = apply_label_noise(ws, 0.3, seed=0)
    after = _labels(ws)
    assert _labels(ws, "true_labels") == before
    splits = dict(ws.catalog.query("SELECT image_id, split FROM images"))
    changed = {i for i in before if before[i] != after[i]}
    assert changed and res["noisy_images"] == len(changed)
    assert all(splits[i] in ("train", "val") for i in changed)
    # "No Finding" follows the findings
    nf = dict(ws.catalog.query(f"SELECT image_id, {quote_ident('No Finding')} FROM labels"))
    assert all(nf[i] == (not any(after[i])) for i in after)
    # idempotent: drawn from the truth, never compounded; 0 restores it
    apply_label_noise(ws, 0.3, seed=0)
    assert _labels(ws) == after
    apply_label_noise(ws, 0.0, seed=0)
    assert _labels(ws) == before


def test_masked_loss_ignores_unlabelled_images() -> None:
    obj = ClassificationObjective("focal")
    logits = torch.randn(4, 14, requires_grad=True)
    labels = (torch.rand(4, 14) < 0.3).float()
    mask = torch.tensor([True, False, True, False])
    loss = obj.masked_loss(logits, {"labels": labels, "label_mask": mask})
    assert loss.item() == pytest.approx(
        obj.classification_loss(logits[mask], labels[mask]).item())
    loss.backward()
    assert logits.grad[~mask].abs().sum() == 0 and logits.grad[mask].abs().sum() > 0
    none = obj.masked_loss(logits, {"labels": labels, "label_mask": torch.zeros(4, dtype=bool)})
    assert none.item() == 0 and none.requires_grad
    full = obj.masked_loss(logits, {"labels": labels})
    assert full.item() == pytest.approx(obj.classification_loss(logits, labels).item())


def test_derangement_and_shuffled_positives() -> None:
    rng = np.random.default_rng(0)
    for m in (2, 3, 10, 57):
        p = derangement(m, rng)
        assert sorted(p.tolist()) == list(range(m)) and not (p == np.arange(m)).any()
    feats = np.arange(12, dtype=np.float32).reshape(6, 2)
    has = np.array([True, True, False, True, True, False])
    out = shuffle_positives(feats, has, seed=0)
    assert np.array_equal(out[~has], feats[~has])  # no positive: untouched
    assert sorted(map(tuple, out[has])) == sorted(map(tuple, feats[has]))  # same set
    assert not (out[has] == feats[has]).all(axis=1).any()  # nobody keeps their own


def test_contrast_config_new_options_validate_and_keep_old_hashes() -> None:
    base = ContrastConfig()
    assert "label_fraction" not in base.hashed() and "positive_roi" not in base.hashed()
    assert ContrastConfig(positive_roi="oracle").hashed()["positive_roi"] == "oracle"
    for bad in (dict(label_fraction=0.0), dict(positive_roi="x"), dict(normal_positive="x"),
                dict(positives="none", shuffle_positives=True),
                dict(positives="augment", positive_roi="labelled"),
                dict(box_supervision=0.5, positive_roi="oracle")):
        with pytest.raises(InputError):
            ContrastConfig(**bad).validate()
