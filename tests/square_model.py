"""A hand-set tiny network whose Grad-CAM maps light a known square (not a test module).

Why: cam, evaluate and predict map boxes between three frames (map cells, the store's S x S
pixels, the original W x H pixels). A trained or random net says nothing about *where* a box
should be; this one does. Every conv passes channel 0 through unchanged (a centre tap of 1,
identity BatchNorm), so after ReLU and the three 2x max-pools the 1/8-scale feature map of
channel 0 is bright exactly on the 8 x 8 cells that hold bright input pixels (the dark
background normalises below zero and ReLU removes it). The head reads channel 0 only, so the
map of every "lit" finding is that square and its box is known in map cells; findings that are
not lit get a zero map (no box).

Loaded by path (``conftest._test_module``), like ``evaluate_fakes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from kacl_cli.findings import FINDINGS
from kacl_cli.models.checkpoint import model_meta, save_checkpoint
from kacl_cli.models.image_net import GRAY_MEAN, GRAY_STD, ImageNet, build_image_net

STRIDE = 8                      # the tiny net's feature-map stride
SQUARE = (2, 3, 2, 2)           # the lit box in map cells (x, y, w, h): not square-symmetric


def square_net(lit: Sequence[int], lit_bias: float = 2.0, dark_bias: float = -3.0) -> ImageNet:
    """The tiny net, hand-set: channel 0 passes through every block; findings ``lit`` read it
    with weight 1 and bias ``lit_bias``, the others get weight 0 and ``dark_bias``."""
    model = build_image_net("tiny", n_classes=len(FINDINGS), init="none")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.zero_()
            if name.startswith("features.norm") and name.endswith(".weight"):
                p.fill_(1.0)
        for i in range(4):
            getattr(model.features, f"conv{i}").weight[0, 0, 1, 1] = 1.0
            norm = getattr(model.features, f"norm{i}")
            norm.running_mean.zero_()
            norm.running_var.fill_(1.0)
        model.head.bias.fill_(dark_bias)
        for j in lit:
            model.head.weight[j, 0] = 1.0
            model.head.bias[j] = lit_bias
    return model.eval()


def save_square_checkpoint(directory: Path, lit: Sequence[int], image_size: int = 64,
                           store_size: int = 64, round_: int = 0, **kw: float) -> Path:
    """:func:`square_net` as a kacl checkpoint (``round_`` 0 = a pretrain checkpoint)."""
    model = square_net(lit, **kw)
    tensors = {f"image_net.{k}": v for k, v in model.state_dict().items()}
    meta = model_meta("tiny", image_size, store_size, GRAY_MEAN, GRAY_STD, round_,
                      "pretrain" if round_ == 0 else "contrast")
    return save_checkpoint(directory, tensors, meta)


def square_image(height: int, width: int, cells: tuple[int, int, int, int] = SQUARE,
                 grid: int = 8) -> np.ndarray:
    """A dark ``height`` x ``width`` uint8 image, bright inside the ``cells`` box of a
    ``grid`` x ``grid`` partition, inset by a quarter cell on every side: after any
    resize to a multiple of ``grid`` pixels the bright pixels still touch every cell of the box
    and no other cell."""
    x, y, w, h = cells
    img = np.zeros((height, width), dtype=np.uint8)
    cw, ch = width / grid, height / grid
    x0, x1 = round((x + 0.25) * cw), round((x + w - 0.25) * cw)
    y0, y1 = round((y + 0.25) * ch), round((y + h - 0.25) * ch)
    img[y0:y1, x0:x1] = 255
    return img


def expected_box(width: float, height: float, cells: tuple[int, int, int, int] = SQUARE,
                 grid: int = 8) -> tuple[float, float, float, float]:
    """The box of ``cells`` in a ``width`` x ``height`` image's pixels (x, y, w, h), computed
    by hand: a map cell spans width / grid by height / grid pixels."""
    x, y, w, h = cells
    sx, sy = width / grid, height / grid
    return (x * sx, y * sy, w * sx, h * sy)
