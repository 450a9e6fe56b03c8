"""Resize + augmentation of whole uint8 batches on the training device (CUDA or CPU).

Both data paths use it: the batched path (:mod:`kacl_cli.training.batches`) on whole
batches on the device, the item path (``StoreDataset`` in DataLoader workers) on batches of
one. Per batch:

1. one ``grid_sample`` (bilinear, black outside) from the store pixels to the training size,
   with torchvision's affine about the image centre (rotation, scale, whole-pixel
   translation; the grid built separably). The resize rides in the same pass when the store
   is at most 1.5x the training side; a larger store is first resized (antialiased);
2. brightness and contrast about the image's mean grey level in one pass; clamp to 0..1.
Without augmentation: the antialiased resize only (uint8 levels).

Every image's parameters are a pure function of (seed, epoch, index, view)
(:func:`uniforms`, a counter-based hash), so an epoch's images depend neither on the worker
count, nor on the batch size, nor on where they are computed (worker, main process; tested).
The warp equals torchvision's ``affine`` away from the border (tested against
:func:`kacl_cli.training.augment.augment_image`, which darkens the border a second time).

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

from kacl_cli.training.augment import AugmentConfig

PARAMS = ("angle", "scale", "tx", "ty", "brightness", "contrast", "flip")
# Store sides up to this multiple of the training side are resized inside the warp.
FOLD_RESIZE = 1.5


_M1, _M2, _GOLD = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x9E3779B97F4A7C15


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, vectorised over uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, epoch: int, view: int, indices: Sequence[int] | np.ndarray, k: int
             ) -> np.ndarray:
    """n x k uniforms in [0, 1), a pure function of (seed, epoch, view, index, column).

    A counter-based hash (splitmix64), vectorised: drawing a batch's parameters costs
    microseconds, where a seeded ``torch.Generator`` per image cost ~0.1 ms.
    """
    mask = (1 << 64) - 1
    with np.errstate(over="ignore"):
        key = np.array([int(seed) & mask], np.uint64)
        for part in (epoch, view):
            key = _mix(key ^ np.array([(int(part) * _GOLD) & mask], np.uint64))
        idx = np.asarray(indices, dtype=np.int64).astype(np.uint64).reshape(-1, 1)
        ctr = idx * np.uint64(k) + np.arange(k, dtype=np.uint64)[None, :]
        z = _mix(_mix(ctr * np.uint64(_GOLD) ^ key[0]))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def draw_params(seed: int, epoch: int, indices: Sequence[int] | np.ndarray, view: int,
                side: int, cfg: AugmentConfig | None = None) -> np.ndarray:
    """Per-image parameters, n x 7 float64 in :data:`PARAMS` order (translation in whole
    pixels of ``side``, as torchvision's affine takes it)."""
    cfg = cfg or AugmentConfig()
    u = uniforms(seed, epoch, view, indices, 7)
    out = np.empty((len(u), len(PARAMS)), np.float64)
    out[:, 0] = cfg.rotate_deg * (2 * u[:, 0] - 1)
    out[:, 1] = cfg.scale[0] + (cfg.scale[1] - cfg.scale[0]) * u[:, 1]
    out[:, 2:4] = np.round(cfg.translate * (2 * u[:, 2:4] - 1) * side)
    out[:, 4] = 1 + cfg.brightness * (2 * u[:, 4] - 1)
    out[:, 5] = 1 + cfg.contrast * (2 * u[:, 5] - 1)
    out[:, 6] = (u[:, 6] < cfg.hflip_p) if cfg.hflip_p > 0 else 0.0
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
    """B x 1 x S x S uint8 -> B x 1 x side x side uint8, antialiased bilinear.

    On the CPU torch's uint8 kernel (several times faster than float); elsewhere float,
    rounded. The item path (``StoreDataset``) calls the same function.
    """
    if x.shape[-1] == side and x.shape[-2] == side:
        return x
    if x.device.type == "cpu":
        return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True,
                             align_corners=False)
    y = F.interpolate(x.float(), size=(side, side), mode="bilinear", antialias=True,
                      align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def _grid(theta: torch.Tensor, side: int) -> torch.Tensor:
    """``F.affine_grid(theta, [n, 1, side, side], align_corners=False)``, built from its
    separable parts (one broadcast add per coordinate: ~7x cheaper on the CPU)."""
    n = theta.shape[0]
    c = (torch.arange(side, device=theta.device, dtype=theta.dtype) + 0.5) * (2.0 / side) - 1
    grid = torch.empty(n, 2, side, side, device=theta.device, dtype=theta.dtype)
    for k in range(2):  # contiguous planes, then a view: cheaper than strided writes
        along_x = theta[:, k, 0, None] * c
        along_y = theta[:, k, 1, None] * c + theta[:, k, 2, None]
        torch.add(along_x[:, None, :], along_y[:, :, None], out=grid[:, k])
    return grid.permute(0, 2, 3, 1)


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without stalling: a pageable host -> GPU copy waits
    for the stream (the previous step's kernels); a pinned one is queued behind them."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


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
    affine = torch.from_numpy(forward_affine(params, n, store_side, side).astype(np.float32))
    if params is None or n == 0:
        return resize_batch(x, side).float().div_(255.0), _to(affine, x.device)
    # grid_sample's normalised coordinates do not depend on the source size, so a mild
    # downscale (or any upscale) is folded into the warp: one bilinear pass from the store
    # pixels. A strong downscale is antialiased first, or bilinear taps would alias.
    src = x if store_side <= FOLD_RESIZE * side else resize_batch(x, side)
    theta = _to(torch.from_numpy(_inverse_theta(params, side).astype(np.float32)), x.device)
    srcf = src.float()
    out = F.grid_sample(srcf, _grid(theta, side), mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    p = _to(torch.from_numpy(params[:, 4:6].astype(np.float32)), x.device).view(n, 2, 1, 1)
    # Brightness b, then contrast c about the image's mean grey level m (after brightness):
    # clamp(c * b * v + (1 - c) * b * m), one pass. m comes from the sum of the source's
    # integer levels, exact in any order: each row's sum in float32 (integers below 2^24 for
    # rows up to 65,000 px), the rows' in float64 (< 2^53): the same value whatever the
    # batch, threads or device. (A float64 sum of the whole image was 15x slower on the CPU,
    # an int64 sum of uint8 ~20x.)
    area = float(src.shape[-1] * src.shape[-2])
    total = (srcf.sum(dim=-1).sum(dim=(1, 2), dtype=torch.float64)
             .view(n, 1, 1, 1).to(torch.float32))
    b, c = p[:, :1], p[:, 1:]
    offset = (1.0 - c) * b * total / (255.0 * area)
    out = out.mul_(b * c / 255.0).add_(offset).clamp_(0.0, 1.0)
    return out, _to(affine, x.device)


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

