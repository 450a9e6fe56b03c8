"""A localization term that acts on the maps: CAM mass inside the ground-truth box.

Two forms (``form``), chosen by measurement (docs/cam.md, "Box supervision on the maps"):

- ``softmax`` (default): the negative log of the share of a *spatial softmax* of the finding's
  map that falls inside its box, ``-log sum_(ij in box) softmax(M_bf)_ij``. A softmax does not
  change when a constant is added to the map, so the term's gradient sums to zero over the
  positions: it moves evidence from outside the box to inside and leaves the map's mean, which
  is the logit of a GAP + linear head, untouched. Classification and localization do not trade.
- ``share``: the first form, below. Its relu share is also satisfied by pushing the map
  negative outside the box, which lowers the logit of exactly the positive images; measured,
  it drove test AUC below chance (0.75 -> 0.44) while it improved the boxes.

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

from kacl_cli.training.config import BOX_LOSS_FORMS

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


def cam_box_loss(maps: torch.Tensor, masks: torch.Tensor, form: str = "softmax") -> torch.Tensor:
    """Mean box loss over the supervised (image, finding) pairs (those whose mask is
    non-zero); 0 (with a graph) when there is none. ``form``: see the module docstring."""
    if form not in BOX_LOSS_FORMS:
        raise ValueError(f"box loss form {form!r}: expected one of {', '.join(BOX_LOSS_FORMS)}")
    supervised = masks.flatten(2).sum(dim=2) > 0
    if not supervised.any():
        return maps.sum() * 0.0
    if form == "softmax":
        # Only supervised pairs: an empty mask would give log(0) everywhere and NaN gradients.
        logp = torch.log_softmax(maps.float().flatten(2)[supervised], dim=1)
        # log of the in-box probability, weighting each cell by the share of it the box covers
        inside = torch.logsumexp(logp + torch.log(masks.flatten(2)[supervised].float()), dim=1)
        return -inside.mean()
    pos = torch.relu(maps.float())
    inside = (pos * masks).flatten(2).sum(dim=2)
    total = pos.flatten(2).sum(dim=2)
    share_out = 1.0 - inside / (total + EPS)
    return share_out[supervised].mean()
