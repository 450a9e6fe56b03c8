"""NT-Xent, masking, and the contrastive objectives' gradients."""

from __future__ import annotations

import math

import pytest
import torch

from kacl_cli.models.contrastive import (
    AugmentObjective,
    ClassificationOnly,
    ContrastiveObjective,
    ContrastSpec,
    build_objective,
    nt_xent,
)
from kacl_cli.models.image_net import build_image_net
from kacl_cli.models.losses import ClassificationObjective


def test_nt_xent_hand_computed() -> None:
    eye = torch.eye(2)
    # a == b, T = 1: logits = I; each row: -log(e / (e + 1)) = log(1 + e^-1)
    assert float(nt_xent(eye, eye, 1.0)) == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)
    # b's rows both point along x: logits = [[1, 1], [0, 0]]
    b = torch.tensor([[2.0, 0.0], [3.0, 0.0]])  # normalisation makes the length irrelevant
    a_to_b = math.log(2.0)  # both rows: two equal logits
    b_to_a = 0.5 * (math.log1p(math.exp(-1)) + math.log1p(math.e))
    assert float(nt_xent(eye, b, 1.0)) == pytest.approx(0.5 * (a_to_b + b_to_a), abs=1e-6)
    # temperature scales the logits: T = 0.5 on a == b gives log(1 + e^-2)
    assert float(nt_xent(eye, eye, 0.5)) == pytest.approx(math.log1p(math.exp(-2)), abs=1e-6)


def test_nt_xent_permutation_equivariant_and_symmetric() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    perm = torch.randperm(8, generator=g)
    base = nt_xent(a, b, 0.1)
    assert torch.allclose(nt_xent(a[perm], b[perm], 0.1), base, atol=1e-5)
    assert torch.allclose(nt_xent(b, a, 0.1), base, atol=1e-5)  # both directions averaged


def test_perfect_alignment_gives_low_loss() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 64, generator=g)
    aligned = float(nt_xent(a, a * 3.0, 0.1))
    shuffled = float(nt_xent(a, a[torch.roll(torch.arange(16), 1)], 0.1))
    random_b = float(nt_xent(a, torch.randn(16, 64, generator=g), 0.1))
    assert aligned < 0.05
    assert shuffled > math.log(16)  # positives are the worst match: above chance
    assert aligned < random_b


def test_mask_equals_subset_and_ignores_masked_rows() -> None:
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    mask = torch.tensor([True, False, True, True, False, True])
    masked = nt_xent(a, b, 0.2, mask)
    assert torch.allclose(masked, nt_xent(a[mask], b[mask], 0.2), atol=1e-6)
    b2 = b.clone()
    b2[~mask] = 1000.0  # masked rows are not negatives either
    assert torch.allclose(nt_xent(a, b2, 0.2, mask), masked, atol=1e-6)
    assert not torch.allclose(nt_xent(a, b2, 0.2), nt_xent(a, b, 0.2))


def test_fewer_than_two_pairs_is_a_connected_zero() -> None:
    a = torch.randn(4, 8, requires_grad=True)
    b = torch.randn(4, 8, requires_grad=True)
    loss = nt_xent(a, b, 0.1, torch.tensor([False, True, False, False]))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert a.grad is not None and b.grad is not None


def _batch(n: int = 6, n_features: int = 10, has=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    labels = torch.zeros(n, 14)
    labels[torch.arange(n), torch.arange(n) % 14] = 1.0
    return {
        "image": torch.randn(n, 1, 32, 32, generator=g),
        "labels": labels,
        "radiomics": torch.randn(n, n_features, generator=g),
        "has_radiomics": torch.ones(n, dtype=torch.bool) if has is None else has,
    }


def _spec(positives: str = "radiomics", **kw) -> ContrastSpec:
    return ContrastSpec(positives=positives, feature_dim=64, proj_dim=16, image_hidden=32,
                        n_features=10 if positives == "radiomics" else 0,
                        radiomics_hidden=32, radiomics_embed=32, **kw)


def test_gradient_flows_into_both_encoders() -> None:
    torch.manual_seed(0)
    model = build_image_net("tiny")
    obj = ContrastiveObjective(ClassificationObjective("focal"), _spec(lam=0.3,
                                                                      temperature=0.2))
    batch = _batch()
    total, parts = obj(model, batch)
    assert set(parts) == {"cls", "contrastive"}
    # both parts from their own definitions: the focal loss and NT-Xent at T = 0.2
    logits, z_img, z_rad = obj.embed(model, batch)
    assert torch.allclose(parts["cls"], obj.classification_loss(logits, batch["labels"]))
    assert torch.allclose(parts["contrastive"], nt_xent(z_img, z_rad, 0.2), atol=1e-6)
    assert not torch.allclose(parts["contrastive"], nt_xent(z_img, z_rad, 0.1), atol=1e-4)
    assert torch.allclose(total, parts["cls"] + 0.3 * parts["contrastive"])
    assert not torch.allclose(total, parts["cls"] + parts["contrastive"])  # lambda is used
    total.backward()
    groups = {
        "image backbone": model.features.parameters(),
        "image projection": obj.image_proj.parameters(),
        "radiomics encoder": obj.radiomics_encoder.parameters(),
        "radiomics projection": obj.radiomics_proj.parameters(),
    }
    for name, params in groups.items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), name


def test_images_without_positive_get_classification_only() -> None:
    torch.manual_seed(0)
    model = build_image_net("tiny")
    obj = ContrastiveObjective(ClassificationObjective("focal"), _spec(lam=0.5))
    batch = _batch(has=torch.zeros(6, dtype=torch.bool))
    total, parts = obj(model, batch)
    assert float(parts["contrastive"]) == 0.0
    assert torch.allclose(total, parts["cls"])
    # the radiomics of unmasked rows matter; those of masked rows do not
    batch = _batch(has=torch.tensor([True, True, True, False, False, False]))
    model.eval()  # fixed BatchNorm statistics so both passes see the same image embeddings
    _, p1 = obj(model, batch)
    batch["radiomics"][3:] += 50.0
    _, p2 = obj(model, batch)
    batch["radiomics"][:3] += 5.0
    _, p3 = obj(model, batch)
    assert torch.allclose(p1["contrastive"], p2["contrastive"], atol=1e-6)
    assert not torch.allclose(p1["contrastive"], p3["contrastive"], atol=1e-4)


def test_validation_batches_without_radiomics() -> None:
    model = build_image_net("tiny")
    obj = ContrastiveObjective(ClassificationObjective("bce"), _spec())
    batch = _batch()
    del batch["radiomics"], batch["has_radiomics"]
    total, parts = obj(model, batch)
    assert set(parts) == {"cls"}
    logits = model(batch["image"])
    assert torch.allclose(obj.validation_loss(model, batch, logits),
                          obj.classification_loss(logits, batch["labels"]))


def test_augment_objective_two_views() -> None:
    torch.manual_seed(0)
    model = build_image_net("tiny")
    obj = AugmentObjective(ClassificationObjective("focal"),
                           _spec("augment", lam=0.3, temperature=0.2))
    batch = _batch()
    batch["image2"] = batch["image"] + 0.1 * torch.randn_like(batch["image"])
    total, parts = obj(model, batch)
    # NT-Xent between the two views' projections at T = 0.2, weighted by lambda = 0.3
    model.eval()
    with torch.no_grad():
        _, pooled, _ = model.forward_all(torch.cat([batch["image"], batch["image2"]]))
        z = obj.image_proj(pooled)
        _, eval_parts = obj(model, batch)
    model.train()
    assert torch.allclose(eval_parts["contrastive"], nt_xent(z[:6], z[6:], 0.2), atol=1e-5)
    assert torch.allclose(total, parts["cls"] + 0.3 * parts["contrastive"])
    assert not torch.allclose(total, parts["cls"] + parts["contrastive"])  # lambda is used
    total.backward()
    assert any(p.grad.abs().sum() > 0 for p in obj.image_proj.parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.features.parameters())
    # classification is scored on the first view only
    model.eval()
    with torch.no_grad():
        _, parts = obj(model, batch)
        cls_first = obj.classification_loss(model(batch["image"]), batch["labels"])
    assert torch.allclose(parts["cls"], cls_first, atol=1e-6)


def test_build_objective() -> None:
    cls = ClassificationObjective("focal")
    none = build_objective(cls, _spec("none"))
    assert isinstance(none, ClassificationOnly) and not none.state_dict()
    assert isinstance(build_objective(cls, _spec("augment")), AugmentObjective)
    obj = build_objective(cls, _spec("radiomics"))
    assert isinstance(obj, ContrastiveObjective)
    keys = set(obj.state_dict())
    assert any(k.startswith("radiomics_encoder.") for k in keys)
    assert not any(k.startswith("classification.") for k in keys)  # pos_weight not persisted
    with pytest.raises(ValueError):
        build_objective(cls, _spec("nonsense"))


def test_param_groups_scale_the_backbone() -> None:
    model = build_image_net("tiny")
    obj = build_objective(ClassificationObjective("focal"), _spec("radiomics"),
                          backbone_lr_scale=0.1)
    groups = obj.param_groups(model, 1e-3)
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 1e-3])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters())) + len(
        list(obj.parameters()))
    none = build_objective(ClassificationObjective("focal"), _spec("none"), 0.5)
    assert [g["lr"] for g in none.param_groups(model, 1e-3)] == pytest.approx([5e-4])
