"""Batched resize + augmentation on the training device (CUDA or CPU), one kernel per step.

The per-item path (:func:`kacl_cli.training.augment.augment_image`, in DataLoader workers)
costs a Python call, a torchvision affine and a collation per image; on a GPU the workers
cannot keep up with the model. Here a whole uint8 batch is moved to the device and

1. resized to the training size (antialiased bilinear, rounded to uint8 levels exactly as the
   item path does, so both paths see the same pixels before augmentation);
2. warped by one ``affine_grid`` + ``grid_sample`` call (bilinear, black outside);
3. scaled in brightness and contrast, clamped to 0..1.

The parameters of every image come from :func:`kacl_cli.training.augment.item_generator`
seeded by (seed, epoch, index, view), drawn in the same order as ``augment_image``, and the
warp is torchvision's (same inverse matrix, same centre, same integer translation). Hence an
epoch's images depend neither on the worker count nor on the batch size nor on where they are
computed (worker or main process, tested); they match the item path up to its border
darkening (torchvision multiplies by the sampled coverage a second time) and float rounding.

:func:`augment_batch` also returns each image's **forward** matrix: ``affine[b] @ [x, y, 1]``
maps a point of the *store* image (pixel-corner coordinates, pixel i spans [i, i + 1)) to the
augmented training image, resize and flip included, so a box term can follow the warp
(:func:`transform_boxes`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kacl_cli.training.augment import AugmentConfig, _uniform, item_generator

PARAMS = ("angle", "scale", "tx", "ty", "brightness", "contrast", "flip")


def draw_params(seed: int, epoch: int, indices: Sequence[int] | np.ndarray, view: int,
                side: int, cfg: AugmentConfig | None = None) -> np.ndarray:
    """Per-image parameters, n x 7 float64 in :data:`PARAMS` order.

    The draws are exactly :func:`augment_image`'s (same generator, same order, translation
    rounded to whole pixels of ``side``), so the item and the batched path agree.
    """
    cfg = cfg or AugmentConfig()
    out = np.empty((len(indices), len(PARAMS)), np.float64)
    for k, index in enumerate(np.asarray(indices, dtype=np.int64).tolist()):
        g = item_generator(seed, epoch, index, view)
        angle = _uniform(g, -cfg.rotate_deg, cfg.rotate_deg)
        scale = _uniform(g, *cfg.scale)
        tx = round(_uniform(g, -cfg.translate, cfg.translate) * side)
        ty = round(_uniform(g, -cfg.translate, cfg.translate) * side)
        brightness = _uniform(g, 1 - cfg.brightness, 1 + cfg.brightness)
        contrast = _uniform(g, 1 - cfg.contrast, 1 + cfg.contrast)
        flip = cfg.hflip_p > 0 and float(torch.rand((), generator=g)) < cfg.hflip_p
        out[k] = (angle, scale, tx, ty, brightness, contrast, float(flip))
    return out


def _inverse_theta(params: np.ndarray, side: int) -> np.ndarray:
    """n x 2 x 3 ``affine_grid`` matrices (output -> input, normalised coordinates).

    torchvision's inverse affine without shear about the image centre: ``M = R(-a) / s``,
    offset ``-M t``; normalised by ``side / 2`` (the same for input and output, both square
    and of the training size). A flip negates the output x axis.
    """
    a = np.radians(params[:, 0])
    s = params[:, 1]
    cos, sin = np.cos(a) / s, np.sin(a) / s
    m = np.empty((len(params), 2, 3), np.float64)
    m[:, 0, 0], m[:, 0, 1] = cos, sin
    m[:, 1, 0], m[:, 1, 1] = -sin, cos
    t = params[:, 2:4]
    m[:, 0, 2] = -(cos * t[:, 0] + sin * t[:, 1]) / (side / 2)
    m[:, 1, 2] = -(-sin * t[:, 0] + cos * t[:, 1]) / (side / 2)
    flip = params[:, 6] > 0.5
    m[flip, :, 0] *= -1.0
    return m


def forward_affine(params: np.ndarray | None, n: int, store_side: int, side: int
                   ) -> np.ndarray:
    """n x 2 x 3 float64: store pixel coordinates -> augmented training-image coordinates."""
    resize = np.diag([side / store_side, side / store_side, 1.0])
    if params is None:
        return np.broadcast_to(resize[:2], (n, 2, 3)).copy()
    theta = _inverse_theta(params, side)
    h = side / 2
    norm = np.array([[1 / h, 0, -1], [0, 1 / h, -1], [0, 0, 1]])  # pixel -> normalised
    inv = np.zeros((n, 3, 3))
    inv[:, :2], inv[:, 2, 2] = theta, 1.0
    # output pixel -> input pixel = norm^-1 theta norm; forward is its inverse, after resize.
    back = np.linalg.inv(norm) @ inv @ norm
    return (np.linalg.inv(back) @ resize)[:, :2]


def resize_batch(x: torch.Tensor, side: int) -> torch.Tensor:
    """B x 1 x S x S uint8 -> B x 1 x side x side float in 0..255 on uint8 levels.

    Antialiased bilinear in float, rounded: bit-for-bit what ``StoreDataset`` does per item.
    """
    xf = x.float()
    if x.shape[-1] == side and x.shape[-2] == side:
        return xf
    y = F.interpolate(xf, size=(side, side), mode="bilinear", antialias=True,
                      align_corners=False)
    return y.round_().clamp_(0, 255)


def augment_batch(x: torch.Tensor, params: np.ndarray | None, side: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B x 1 x side x side float in 0..1, B x 2 x 3 float32 forward affine) of a uint8 batch.

    ``x`` is B x S x S or B x 1 x S x S uint8 on any device; ``params`` from
    :func:`draw_params` (None: resize only).
    """
    if x.ndim == 3:
        x = x.unsqueeze(1)
    store_side = int(x.shape[-1])
    n = int(x.shape[0])
    img = resize_batch(x, side).div_(255.0)
    affine = torch.from_numpy(forward_affine(params, n, store_side, side).astype(np.float32))
    if params is None or n == 0:
        return img, affine.to(x.device)
    theta = torch.from_numpy(_inverse_theta(params, side).astype(np.float32)).to(x.device)
    grid = F.affine_grid(theta, [n, 1, side, side], align_corners=False)
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    p = torch.from_numpy(params[:, 4:6].astype(np.float32)).to(x.device)
    out = out.mul_(p[:, 0].view(n, 1, 1, 1)).clamp_(0.0, 1.0)
    # Per-image mean accumulated in float64: the same value whatever the batch or threads.
    mean = out.double().mean(dim=(1, 2, 3), keepdim=True).float()
    c = p[:, 1].view(n, 1, 1, 1)
    out = out.mul_(c).add_((1.0 - c) * mean).clamp_(0.0, 1.0)
    return out, affine.to(x.device)


def transform_boxes(boxes: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Boxes ``[..., 4]`` (x, y, w, h in store pixels; leading dims B[, K]) -> the axis-aligned
    boxes around their four warped corners, in the augmented image's pixels."""
    x, y, w, h = boxes.unbind(-1)
    xs = torch.stack([x, x + w, x, x + w], -1)
    ys = torch.stack([y, y, y + h, y + h], -1)
    a = affine.to(boxes.dtype)
    while a.ndim < boxes.ndim + 1:
        a = a.unsqueeze(1)
    px = a[..., 0, 0, None] * xs + a[..., 0, 1, None] * ys + a[..., 0, 2, None]
    py = a[..., 1, 0, None] * xs + a[..., 1, 1, None] * ys + a[..., 1, 2, None]
    x0, y0 = px.amin(-1), py.amin(-1)
    return torch.stack([x0, y0, px.amax(-1) - x0, py.amax(-1) - y0], -1)

