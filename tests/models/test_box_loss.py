"""The CAM-mass-inside-the-box term: masks in the pixel-edge frame, value, gradient direction."""

from __future__ import annotations

import math

import pytest
import torch

from kacl_cli.models.box_loss import box_masks, cam_box_loss, class_maps


def test_masks_cover_cells_by_the_fraction_the_box_covers() -> None:
    boxes = torch.tensor([[[16.0, 0.0, 16.0, 8.0], [float("nan")] * 4]])  # 64 px, 8x8 map
    m = box_masks(boxes, (8, 8), 64)
    assert m.shape == (1, 2, 8, 8)
    assert m[0, 0, 0, 2:4].tolist() == [1.0, 1.0] and m[0, 0].sum() == 2.0
    assert m[0, 1].sum() == 0  # no box of that finding
    half = box_masks(torch.tensor([[[4.0, 0.0, 8.0, 8.0]]]), (8, 8), 64)
    assert half[0, 0, 0, :2].tolist() == [0.5, 0.5]


def test_loss_is_the_share_outside_and_its_gradient_moves_mass_into_the_box() -> None:
    maps = torch.ones(1, 1, 4, 4, requires_grad=True)
    masks = torch.zeros(1, 1, 4, 4)
    masks[0, 0, :2, :2] = 1.0
    loss = cam_box_loss(maps, masks, "share")
    assert loss.item() == pytest.approx(0.75, abs=1e-5)
    loss.backward()
    g = maps.grad[0, 0]
    assert (g[:2, :2] < 0).all() and (g[2:, 2:] > 0).all()  # descent raises inside, lowers out
    # a map already inside the box costs nothing
    assert cam_box_loss(masks.clone(), masks, "share").item() == pytest.approx(0.0, abs=1e-5)


def test_softmax_form_is_minus_log_in_box_probability_and_leaves_the_logit_alone() -> None:
    """The default form: -log of the spatial-softmax mass inside the box. Its gradient sums
    to zero over the positions, so it cannot move the GAP logit (the share form can: it is
    also satisfied by pushing the map negative outside the box)."""
    torch.manual_seed(0)
    maps = torch.randn(2, 3, 4, 4, requires_grad=True)
    masks = torch.zeros(2, 3, 4, 4)
    masks[0, 1, :2, :2] = 1.0
    masks[1, 2, 1:3, 1:4] = 0.5  # partial coverage weighs the cells
    loss = cam_box_loss(maps, masks)
    p = torch.softmax(maps.detach().flatten(2), dim=2).reshape(2, 3, 4, 4)
    inside = [(p[0, 1] * masks[0, 1]).sum(), (p[1, 2] * masks[1, 2]).sum()]
    want = -(torch.log(inside[0]) + torch.log(inside[1])) / 2
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    g = maps.grad
    assert g.flatten(2).sum(dim=2).abs().max() < 1e-6  # logit-neutral, per (image, finding)
    assert (g[0, 1, :2, :2] < 0).all() and (g[0, 1, 2:, 2:] > 0).all()  # descent: mass inward
    assert g[0, 0].abs().sum() == 0 and g[1, 1].abs().sum() == 0  # unsupervised pairs
    share = (torch.rand(1, 1, 4, 4) + 0.1).requires_grad_(True)  # positive: relu passes
    m = torch.zeros(1, 1, 4, 4)
    m[0, 0, 0, 0] = 1.0
    cam_box_loss(share, m, "share").backward()
    assert share.grad.sum().abs() > 1e-4  # the share form does move the map's total
    with pytest.raises(ValueError, match="box loss form"):
        cam_box_loss(maps, masks, "mil")


def test_unsupervised_pairs_are_ignored_and_gradients_reach_the_head_and_features() -> None:
    torch.manual_seed(0)
    fmap = torch.rand(2, 3, 4, 4, requires_grad=True)
    weight = (torch.rand(2, 3) + 0.1).requires_grad_(True)  # positive maps: relu passes
    masks = torch.zeros(2, 2, 4, 4)
    assert cam_box_loss(class_maps(fmap, weight), masks).item() == 0.0
    masks[1, 0, 1:3, 1:3] = 1.0
    loss = cam_box_loss(class_maps(fmap, weight), masks)
    loss.backward()
    assert math.isfinite(loss.item()) and weight.grad.abs().sum() > 0
    assert fmap.grad[0].abs().sum() == 0 and fmap.grad[1].abs().sum() > 0


def test_classification_objective_adds_the_box_term_only_when_asked() -> None:
    from kacl_cli.models.image_net import build_image_net
    from kacl_cli.models.losses import ClassificationObjective

    torch.manual_seed(0)
    model = build_image_net("tiny", n_classes=14).eval()
    box = torch.full((2, 14, 4), float("nan"))
    box[0, 4] = torch.tensor([0.0, 0.0, 16.0, 16.0])  # Mass of image 0: top-left quarter
    batch = {"image": torch.randn(2, 1, 32, 32), "labels": torch.zeros(2, 14), "box": box}
    plain, parts = ClassificationObjective()(model, batch)
    assert set(parts) == {"cls"}
    total, parts = ClassificationObjective(box_loss_weight=0.5)(model, batch)
    assert set(parts) == {"cls", "box"} and parts["box"].item() >= 0.0
    assert total.item() == pytest.approx(plain.item() + 0.5 * parts["box"].item(), rel=1e-5)
    plain.backward()
    g_plain = model.head.weight.grad.clone()
    model.zero_grad()
    total.backward()
    # the box term changes the supervised finding's head row, and only rows with a box
    diff = (model.head.weight.grad - g_plain).abs().sum(dim=1)
    assert diff[4] > 0 and diff[torch.arange(14) != 4].max() < 1e-6
