"""A localization term that acts on the maps: CAM mass inside the ground-truth box.

Why: ``--box-supervision`` used to swap radiomics ROIs only; no loss touched the maps, so
lending boxes could not improve localization. Li et al. 2018 supervise the maps directly
(a MIL patch loss). This is the simpler, differentiable variant the issue allows: for each
(image, finding) with a GT box, the share of the finding's positive class-activation mass
that falls OUTSIDE the box,

    L = mean_(b,f supervised)  1 - sum_(ij in box) relu(M_bfij) / (sum_ij relu(M_bfij) + eps)

where ``M = W fmap`` (the GAP + linear head's per-position logit contributions, i.e. the
Grad-CAM map up to the 1 / (h w) factor, computed with gradients). Its gradient raises the map
inside the box and lowers it outside, while the classification loss keeps the map's total
(the logit) meaningful. The box is given as a mask in map cells (:func:`box_masks`: a cell
belongs to the box by the fraction of it the box covers), so it is exact for any map size.

Feeding it: ``StoreDataset`` extras ``box`` (F x 4, xywh in store pixels, NaN where the
image has no box of that finding; :mod:`kacl_cli.training.box_targets`), which both data
paths move into the augmented network-input frame with each image's forward affine
(resize, rotation, scale, translation, flip) before the objective sees them.
"""

from __future__ import annotations

import torch

EPS = 1e-6


def box_masks(boxes: torch.Tensor, map_hw: tuple[int, int], image_size: int) -> torch.Tensor:
    """Coverage masks (B x F x h x w, in [0, 1]) of xywh boxes in ``image_size`` pixels on a
    map of ``map_hw`` cells spanning the image (pixel-edge frame); zero where a box is NaN."""
    h, w = map_hw
    b = boxes.float()
    valid = torch.isfinite(b).all(dim=-1)
    b = torch.nan_to_num(b, nan=0.0) / float(image_size)
    x0, y0 = b[..., 0], b[..., 1]
    x1, y1 = x0 + b[..., 2], y0 + b[..., 3]
    cx = torch.arange(w, device=b.device, dtype=b.dtype) / w
    cy = torch.arange(h, device=b.device, dtype=b.dtype) / h
    # overlap of each cell [c, c + 1/w) with [x0, x1), as a fraction of the cell
    ox = ((torch.minimum(cx + 1.0 / w, x1[..., None]) - torch.maximum(cx, x0[..., None]))
          .clamp(min=0) * w)
    oy = ((torch.minimum(cy + 1.0 / h, y1[..., None]) - torch.maximum(cy, y0[..., None]))
          .clamp(min=0) * h)
    return oy[..., :, None] * ox[..., None, :] * valid[..., None, None].to(b.dtype)


def class_maps(fmap: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-position logit contributions ``W fmap`` (B x F x h x w), with gradients."""
    return torch.einsum("fc,bchw->bfhw", weight, fmap)


def cam_box_loss(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean share of positive map mass outside the box over the supervised (image, finding)
    pairs (those whose mask is non-zero); 0 (with a graph) when there is none."""
    pos = torch.relu(maps.float())
    supervised = masks.flatten(2).sum(dim=2) > 0
    if not supervised.any():
        return maps.sum() * 0.0
    inside = (pos * masks).flatten(2).sum(dim=2)
    total = pos.flatten(2).sum(dim=2)
    share_out = 1.0 - inside / (total + EPS)
    return share_out[supervised].mean()
