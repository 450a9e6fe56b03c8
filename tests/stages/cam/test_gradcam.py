"""Grad-CAM: the one-forward batched maps equal textbook autograd Grad-CAM, they localise a
known region, and map -> box follows its documented rule on hand-made maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from kacl_cli.boxes import iou, scale_xywh
from kacl_cli.models.image_net import build_image_net
from kacl_cli.stages.cam.gradcam import (
    REASON_EMPTY,
    REASON_FLAT,
    REASON_NONFINITE,
    autograd_gradcam,
    batched_gradcam,
    gap_linear_maps,
    is_gap_linear,
    map_to_box,
    maps_to_boxes,
)

torch.set_num_threads(1)


class GapNet(nn.Module):
    """A small module with the ImageNet interface (features / head / forward / forward_all)."""

    def __init__(self, n_classes: int = 14, pool: str = "avg") -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(16, n_classes)
        self.pool = pool

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward_all(self, x: torch.Tensor):
        fmap = self.features(x)
        # "sq": a generalised-mean-like pooling, whose gradient depends on the activations
        pooled = fmap.mean(dim=(2, 3)) if self.pool == "avg" else fmap.pow(2).mean(dim=(2, 3))
        return fmap, pooled, self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[2]


class MlpHeadNet(GapNet):
    """GAP followed by a two-layer head: the fast path is not valid for it."""

    def __init__(self, n_classes: int = 5) -> None:
        super().__init__(n_classes)
        self.head = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, n_classes))


def _eval(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for p in model.parameters():  # BatchNorm running stats too, so eval mode is not identity
        nn.init.normal_(p, std=0.5)
    return model.eval()


def _x(b: int = 3, s: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 1, s, s, generator=torch.Generator().manual_seed(seed))


# -- batched == autograd ---------------------------------------------------------------------
def test_batched_equals_autograd_gradcam_on_gap_linear_module() -> None:
    model = _eval(GapNet())
    x = _x()
    logits, maps = batched_gradcam(model, x)
    ref_logits, ref_maps = autograd_gradcam(model, x)
    assert maps.shape == (3, 14, 12, 12)
    assert torch.allclose(logits, model(x), atol=1e-6)
    assert torch.allclose(logits, ref_logits, atol=1e-6)
    assert (maps - ref_maps).abs().max() < 1e-5
    assert (maps >= 0).all() and maps.max() > 0
    # a class subset of the reference path is the same maps
    _, sub = autograd_gradcam(model, x, classes=[3, 0])
    assert (sub - maps[:, [3, 0]]).abs().max() < 1e-5


def test_unrelu_map_spreads_the_logit_over_the_image() -> None:
    """Why the 1/(h w) factor: before the ReLU the map sums to logit - bias."""
    model = _eval(GapNet())
    x = _x()
    fmap, _, logits = model.forward_all(x)
    h, w = fmap.shape[-2:]
    raw = torch.einsum("fc,bchw->bfhw", model.head.weight, fmap) / (h * w)
    assert torch.allclose(raw.sum(dim=(2, 3)), logits - model.head.bias, atol=1e-5)
    assert torch.allclose(gap_linear_maps(fmap, model.head.weight), torch.relu(raw), atol=1e-6)


@pytest.mark.parametrize("backbone,size", [("tiny", 64), ("resnet18", 96)])
def test_batched_equals_autograd_on_real_image_net(backbone: str, size: int) -> None:
    torch.manual_seed(0)
    model = build_image_net(backbone, n_classes=14, init="none").eval()
    x = _x(b=2, s=size, seed=2)
    logits, maps = batched_gradcam(model, x)
    fmap, pooled, ref_out = model.forward_all(x)
    assert is_gap_linear(model, fmap, pooled, ref_out)
    ref_logits, ref_maps = autograd_gradcam(model, x)
    assert maps.shape == (2, 14) + tuple(fmap.shape[-2:])
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert (maps - ref_maps).abs().max() < 1e-5
    assert maps.max() > 0


def test_fast_path_detection_falls_back_for_other_heads() -> None:
    x = _x(b=2)
    mlp = _eval(MlpHeadNet())
    fmap, pooled, logits = mlp.forward_all(x)
    assert not is_gap_linear(mlp, fmap, pooled, logits)
    got_logits, got = batched_gradcam(mlp, x)
    ref_logits, ref = autograd_gradcam(mlp, x)
    assert got.shape == (2, 5, 12, 12)
    assert torch.allclose(got, ref, atol=1e-6) and torch.allclose(got_logits, ref_logits)
    # head IS an nn.Linear, but on another pooling: the numeric check must catch it, and the
    # fallback gives textbook Grad-CAM, which differs from the GAP formula here.
    sqnet = _eval(GapNet(pool="sq"))
    fmap, pooled, logits = sqnet.forward_all(x)
    assert not is_gap_linear(sqnet, fmap, pooled, logits)
    _, got = batched_gradcam(sqnet, x)
    _, ref = autograd_gradcam(sqnet, x)
    assert (got - ref).abs().max() < 1e-5
    assert (got - gap_linear_maps(fmap, sqnet.head.weight)).abs().max() > 1e-3


def test_autograd_gradcam_with_a_forward_hook_on_a_plain_module() -> None:
    torch.manual_seed(3)
    act = nn.ReLU()
    plain = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), act, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)
    ).eval()
    x = _x(b=2, s=10)
    for p in plain.parameters():
        p.requires_grad_(False)  # frozen weights must not stop the gradients
    logits, maps = autograd_gradcam(plain, x, target_layer=act)
    fmap = act(plain[0](x))
    assert torch.allclose(logits, plain(x))
    assert (maps - gap_linear_maps(fmap, plain[4].weight)).abs().max() < 1e-6


# -- a known answer --------------------------------------------------------------------------
class BrightSquareNet(GapNet):
    """Hand-set ImageNet-like module: channel 0 fires on bright pixels, channel 1 on dark ones.

    Class 0 = "bright" (+channel 0), class 1 = "not bright" (-channel 0: its map must be empty),
    class 2 = "dark" (+channel 1). Stride-4 pooling gives a 16 x 16 map for a 64 px image.
    """

    def __init__(self) -> None:
        super().__init__(n_classes=3)
        conv = nn.Conv2d(1, 2, 3, padding=1)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[0].fill_(1 / 9)
            conv.weight[1].fill_(-1 / 9)
            conv.bias.copy_(torch.tensor([-0.5, 0.5]))
            self.head = nn.Linear(2, 3)
            self.head.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]))
            self.head.bias.zero_()
        self.body = nn.Sequential(conv, nn.ReLU(), nn.AvgPool2d(4))


def test_cam_box_lands_on_the_region_that_holds_the_evidence() -> None:
    rng = np.random.default_rng(0)
    img = 0.1 + 0.05 * rng.random((64, 64))
    square = (37.0, 10.0, 18.0, 17.0)  # x, y, w, h in image pixels (not on the 4 px grid)
    img[10:27, 37:55] = 1.0
    x = torch.tensor(img, dtype=torch.float32)[None, None]
    model = BrightSquareNet().eval()
    logits, maps = batched_gradcam(model, x)
    assert maps.shape == (1, 3, 16, 16)
    assert logits[0, 0] > 0
    bright = map_to_box(maps[0, 0].numpy(), 0.5)
    assert bright.reason is None
    in_image = scale_xywh(np.array(bright.box), 64 / 16, 64 / 16)
    assert iou(in_image, np.array(square)) > 0.5
    # the "not bright" class has only negative evidence there: empty map, no box
    assert map_to_box(maps[0, 1].numpy(), 0.5).reason == REASON_EMPTY
    # the evidence of "dark" is everywhere but the square
    dark = maps[0, 2].numpy()
    assert dark[3:6, 10:13].max() == 0 and dark[12:, :4].min() > 0


# -- map -> box ------------------------------------------------------------------------------
def test_single_pixel_uses_pixel_edge_convention() -> None:
    m = np.zeros((7, 9))
    m[2, 5] = 3.0
    mb = map_to_box(m)
    assert mb.box == (5.0, 2.0, 1.0, 1.0)
    assert mb.peak == 3.0 and mb.mass == 3.0 and mb.reason is None


def test_threshold_is_a_fraction_of_the_peak() -> None:
    m = np.zeros((10, 10), dtype=np.float16)
    m[4, 4] = 1.0
    m[3:6, 3:7] += 0.4  # below 0.5 * 1.4 everywhere but the peak
    assert map_to_box(m, 0.5).box == (4.0, 4.0, 1.0, 1.0)
    assert map_to_box(m, 0.25).box == (3.0, 3.0, 4.0, 3.0)  # 0.4 >= 0.35 joins


def test_threshold_includes_values_equal_to_the_cut() -> None:
    # the region is every pixel >= frac * peak: 1.0 == 0.5 * 2.0 exactly, so it joins
    m = np.zeros((5, 6))
    m[2, 1] = 2.0
    m[2, 2:4] = 1.0
    m[3, 1] = 0.999
    assert map_to_box(m, 0.5).box == (1.0, 2.0, 3.0, 1.0)


def test_largest_mass_wins_not_largest_area_nor_the_peak() -> None:
    m = np.zeros((12, 12))
    m[8:10, 8:10] = 4.0  # 4 px, mass 16, holds the peak; threshold 0.5 * 4 = 2
    m[0:2, 0:3] = 2.0  # 6 px, mass 12: larger area, less mass
    small_strong = map_to_box(m, 0.5)
    assert small_strong.box == (8.0, 8.0, 2.0, 2.0) and small_strong.mass == 16.0
    m[0:2, 0:5] = 2.0  # 10 px, mass 20: now the faint one is heavier than the peak's blob
    large_faint = map_to_box(m, 0.5)
    assert large_faint.box == (0.0, 0.0, 5.0, 2.0) and large_faint.mass == 20.0
    assert large_faint.peak == 4.0


def test_diagonal_pixels_are_one_component() -> None:
    m = np.zeros((6, 6))
    for i in range(4):
        m[1 + i, 1 + i] = 1.0  # mass 4 as one 8-connected chain, four 1.0 pieces otherwise
    m[5, 0] = 1.5  # isolated pixel, heavier than any single diagonal pixel
    mb = map_to_box(m)
    assert mb.box == (1.0, 1.0, 4.0, 4.0) and mb.mass == 4.0


def test_degenerate_maps_give_no_box_and_a_reason() -> None:
    assert map_to_box(np.zeros((7, 7))).reason == REASON_EMPTY
    assert map_to_box(-np.ones((7, 7))).box is None
    flat = map_to_box(np.full((7, 7), 0.25))
    assert flat.box is None and flat.reason == REASON_FLAT and flat.peak == 0.25
    nan = np.ones((7, 7))
    nan[3, 3] = np.nan
    assert map_to_box(nan).reason == REASON_NONFINITE
    inf = np.zeros((7, 7))
    inf[0, 0] = np.inf
    got = map_to_box(inf)
    assert got.box is None and got.reason == REASON_NONFINITE and math.isnan(got.peak)
    assert map_to_box(np.zeros((0, 3))).box is None
    assert map_to_box(np.ones(5)).reason.startswith("not a 2-D map")
    with pytest.raises(ValueError):
        map_to_box(np.ones((3, 3)), frac=0.0)


def test_whole_map_above_threshold_gives_the_whole_map() -> None:
    m = np.array([[1.0, 0.8], [0.9, 0.6]])
    assert map_to_box(m, 0.5).box == (0.0, 0.0, 2.0, 2.0)


def _reference_box(m: np.ndarray, frac: float) -> tuple | None:
    """The rule written the slow, obvious way: one 2-D labelling per map."""
    if not np.isfinite(m).all() or m.max() <= 0 or m.max() == m.min():
        return None
    labels, n = ndimage.label(m >= frac * m.max(), structure=np.ones((3, 3)))
    masses = [m[labels == i].sum() for i in range(1, n + 1)]
    ys, xs = np.nonzero(labels == int(np.argmax(masses)) + 1)
    return (xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min())


def test_stacked_labelling_never_joins_neighbouring_maps() -> None:
    rng = np.random.default_rng(4)
    # smooth-ish random maps whose blobs touch the borders, so a component leaking from one
    # map of the stack into the next would change boxes
    maps = np.maximum(rng.normal(size=(60, 9, 7)), 0).astype(np.float16)
    maps[::9] = 0
    maps[4::13] = 0.25
    maps[7, 2, 2] = np.nan
    for frac in (0.3, 0.5, 0.9):
        got = maps_to_boxes(maps, frac)
        for m, mb in zip(maps, got, strict=True):
            ref = _reference_box(m.astype(np.float64), frac)
            assert (mb.box is None) == (ref is None)
            if ref is not None:
                assert mb.box == tuple(float(v) for v in ref)
                assert mb.reason is None and mb.peak == float(m.max())
