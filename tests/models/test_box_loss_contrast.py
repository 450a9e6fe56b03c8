"""The contrast objectives add the classification objective's box term on boxed batches."""

from __future__ import annotations

import pytest
import torch

from kacl_cli.models.contrastive import ContrastSpec, build_objective
from kacl_cli.models.image_net import build_image_net
from kacl_cli.models.losses import ClassificationObjective


def _batch(with_box: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    batch = {"image": torch.randn(4, 1, 32, 32), "image2": torch.randn(4, 1, 32, 32),
             "labels": torch.zeros(4, 14), "radiomics": torch.randn(4, 6),
             "has_radiomics": torch.ones(4, dtype=torch.bool)}
    if with_box:
        box = torch.full((4, 14, 4), float("nan"))
        box[1, 4] = torch.tensor([0.0, 0.0, 16.0, 16.0])
        batch["box"] = box
    return batch


@pytest.mark.parametrize("positives", ["radiomics", "augment", "none"])
def test_contrast_objectives_add_the_weighted_box_term(positives: str) -> None:
    torch.manual_seed(0)
    model = build_image_net("tiny", n_classes=14).eval()
    spec = ContrastSpec(positives=positives, feature_dim=model.feature_dim, proj_dim=8,
                        n_features=6 if positives == "radiomics" else 0)
    torch.manual_seed(0)
    plain = build_objective(ClassificationObjective(), spec).eval()
    torch.manual_seed(0)
    boxed = build_objective(ClassificationObjective(box_loss_weight=2.0), spec).eval()
    base, parts0 = plain(model, _batch(True))
    assert "box" not in parts0  # weight 0: boxes ignored
    total, parts = boxed(model, _batch(True))
    assert parts["box"].item() > 0.0  # -log of an in-box probability below 1
    assert total.item() == pytest.approx(base.item() + 2.0 * parts["box"].item(), rel=1e-5)
    _, no_box = boxed(model, _batch(False))
    assert "box" not in no_box  # a batch without boxes (validation) has no term
