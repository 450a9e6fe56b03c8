"""Focal and pos-weighted BCE losses, and the classification objective."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kacl_cli.errors import KaclError
from kacl_cli.models.image_net import build_image_net
from kacl_cli.models.losses import ClassificationObjective, focal_loss, pos_weight_from_labels


def test_focal_matches_formula() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 14)
    y = (torch.rand(4, 14) > 0.7).float()
    p = torch.sigmoid(logits)
    p_t = y * p + (1 - y) * (1 - p)
    a_t = y * 0.25 + (1 - y) * 0.75
    expected = (-a_t * (1 - p_t) ** 2 * torch.log(p_t)).mean()
    torch.testing.assert_close(focal_loss(logits, y, 0.25, 2.0), expected)


def test_focal_gamma0_no_alpha_is_bce() -> None:
    logits = torch.randn(3, 14)
    y = (torch.rand(3, 14) > 0.5).float()
    torch.testing.assert_close(focal_loss(logits, y, alpha=-1, gamma=0.0),
                               F.binary_cross_entropy_with_logits(logits, y))


def test_focal_downweights_easy_examples() -> None:
    easy = torch.full((1, 14), -6.0)  # confident, correct negatives
    y = torch.zeros(1, 14)
    bce = F.binary_cross_entropy_with_logits(easy, y)
    assert float(focal_loss(easy, y)) < 1e-3 * float(bce)


def test_pos_weight_from_labels() -> None:
    labels = np.zeros((10, 14), np.float32)
    labels[:2, 0] = 1  # 2 pos / 8 neg -> 4
    labels[:, 1] = 1  # all positive -> clipped up to 1
    labels[0, 2] = 1  # 1 pos / 9 neg -> 9
    w = pos_weight_from_labels(labels, max_weight=5.0)
    assert w[0] == pytest.approx(4.0)
    assert w[1] == pytest.approx(1.0)
    assert w[2] == pytest.approx(5.0)  # clipped
    assert w[3] == pytest.approx(1.0)  # no positives


def test_objective_focal_and_bce() -> None:
    torch.manual_seed(0)
    model = build_image_net("tiny")
    batch = {"image": torch.randn(3, 1, 32, 32), "labels": (torch.rand(3, 14) > 0.5).float()}
    loss, parts = ClassificationObjective("focal")(model, batch)
    assert loss.requires_grad and set(parts) == {"cls"}
    torch.testing.assert_close(parts["cls"], loss.detach())
    pw = torch.linspace(1, 3, 14)
    obj = ClassificationObjective("bce", pos_weight=pw)
    logits = model(batch["image"])
    torch.testing.assert_close(
        obj.classification_loss(logits, batch["labels"]),
        F.binary_cross_entropy_with_logits(logits, batch["labels"], pos_weight=pw),
    )
    assert "pos_weight" not in obj.state_dict()  # recomputed from data, never checkpointed


def test_unknown_loss() -> None:
    with pytest.raises(KaclError, match="focal, bce"):
        ClassificationObjective("hinge")
