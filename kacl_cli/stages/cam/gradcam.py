"""Batched multi-label Grad-CAM and the map -> box rule.

Why batched: Grad-CAM (Selvaraju et al. 2017) weights the target layer's channels A_k (h x w)
by the spatial mean of the class score's gradient, ``alpha_ck = mean_ij d y_c / d A_kij``, and
keeps ``ReLU(sum_k alpha_ck A_k)``. For kacl's image network the target layer is the output of
the last conv block, followed by global average pooling and one linear layer::

    y_c = b_c + sum_k W_ck * (1 / (h w)) * sum_ij A_kij

so ``d y_c / d A_kij = W_ck / (h w)`` at every position, ``alpha_ck = W_ck / (h w)``, and

    L_c = ReLU(sum_k W_ck A_k) / (h w).

Every class's map is a weighted sum of the same activations: all 14 maps follow from ONE
forward pass and one einsum, with no backward pass at all, where the ``grad-cam`` package
style costs one forward + one backward per class. We keep the ``1 / (h w)`` factor so the maps
are *exactly* the autograd Grad-CAM (tested to 1e-5), and because it gives the raw map a
meaning: before the ReLU, the map sums to ``y_c - b_c``, i.e. it spreads the class logit over
the image. The gradient target is the class **logit** (pre-sigmoid), as in Grad-CAM: the
sigmoid's derivative would only rescale each image's map by ``p (1 - p)``, shrinking the maps
of confident findings towards zero.

:func:`batched_gradcam` checks that the model really is GAP + linear (``head`` is an
``nn.Linear`` and ``logits == head(mean(fmap))`` on the batch at hand) and otherwise falls back
to :func:`autograd_gradcam`, the general path that works for any differentiable head.

:func:`map_to_box` turns one raw map into a box: threshold at ``frac * peak``, 8-connected
components (scipy.ndimage.label), keep the component with the largest *mass* (sum of map
values, so a small strong blob beats a large faint one), and return its bounding box in map
pixel coordinates with the pixel-edge convention (pixel (row i, col j) spans [j, j+1) x
[i, i+1), so a single pixel gives ``(j, i, 1, 1)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import nn

# 8-connectivity: diagonal neighbours belong to the same region. A coarse (7 x 7 .. 32 x 32)
# Grad-CAM map often draws an oblique lesion as a diagonal chain of pixels; 4-connectivity
# would split it into pieces and keep only the heaviest fragment.
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

REASON_EMPTY = "empty map: no positive evidence"
REASON_FLAT = "flat map: no localisation"
REASON_NONFINITE = "non-finite map values"


@dataclass(frozen=True)
class MapBox:
    """The box of one map (map pixel coords, x/y = top-left corner) or None with a reason."""

    box: tuple[float, float, float, float] | None
    peak: float
    mass: float
    reason: str | None


def is_gap_linear(
    model: nn.Module, fmap: torch.Tensor, pooled: torch.Tensor, logits: torch.Tensor
) -> bool:
    """Whether ``logits = head(GAP(fmap))`` holds on this batch, so the fast path is exact.

    Checked numerically rather than trusted from the class: a subclass with dropout before the
    head (in train mode), an extra layer, or another pooling would silently give wrong maps.
    The check costs one small matmul.
    """
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear) or fmap.ndim != 4 or logits.ndim != 2:
        return False
    if head.in_features != fmap.shape[1] or head.out_features != logits.shape[1]:
        return False
    with torch.no_grad():
        gap = fmap.detach().float().mean(dim=(2, 3))
        expected = nn.functional.linear(gap, head.weight.float(), _float(head.bias))
        pooled, logits = pooled.detach(), logits.detach()
    tol = 1e-3 * (1.0 + float(expected.abs().max())) if expected.numel() else 1e-3
    return bool(
        pooled.shape == gap.shape
        and torch.allclose(pooled.float(), gap, rtol=1e-3, atol=tol)
        and torch.allclose(logits.float(), expected, rtol=1e-3, atol=tol)
    )


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def gap_linear_maps(fmap: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """All classes' Grad-CAM maps of a GAP + linear head: ReLU(W A) / (h w), in float32.

    ``fmap`` B x C x h x w, ``weight`` F x C -> B x F x h x w. Float32 even under AMP: the maps
    are differences of large terms, and they are thresholded relative to their peak.
    """
    h, w = fmap.shape[-2:]
    maps = torch.einsum("fc,bchw->bfhw", weight.float(), fmap.float())
    return torch.relu(maps) / float(h * w)


def batched_gradcam(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B x F) and raw Grad-CAM maps of ALL classes (B x F x h x w) from one forward.

    ``model`` follows the ImageNet interface (``forward_all(x) -> (fmap, pooled, logits)``,
    ``head: nn.Linear``) and should be in eval mode (train-mode BatchNorm mixes the samples of
    a batch, so no per-image map is well defined). Falls back to :func:`autograd_gradcam` when
    the head is not GAP + linear. Returned tensors are detached.
    """
    with torch.no_grad():
        fmap, pooled, logits = model.forward_all(x)
        if is_gap_linear(model, fmap, pooled, logits):
            return logits.detach(), gap_linear_maps(fmap, model.head.weight)
    return autograd_gradcam(model, x)


def autograd_gradcam(
    model: nn.Module,
    x: torch.Tensor,
    classes: Sequence[int] | None = None,
    target_layer: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Textbook Grad-CAM: one backward per class; works for any differentiable head.

    The target activations are the features output: ``forward_all``'s ``fmap``, or, for a
    plain module, the output of ``target_layer`` captured by a forward hook. For each class
    c: gradients of ``sum_b y_bc`` (the logits, pre-sigmoid) w.r.t. the activations, which are
    per-image gradients because images do not interact in eval mode; channel weights = their
    spatial mean; map = ReLU(weighted channel sum). Returns (logits B x F, maps
    B x len(classes) x h x w), detached.
    """
    # Gradients must reach the activations even when the weights are frozen.
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        if target_layer is not None:
            captured: list[torch.Tensor] = []
            handle = target_layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
            try:
                logits = model(x)
            finally:
                handle.remove()
            if not captured:
                raise ValueError("target_layer was not called by the model's forward")
            fmap = captured[-1]
        else:
            fmap, _pooled, logits = model.forward_all(x)
        if classes is None:
            classes = range(logits.shape[1])
        classes = list(classes)
        maps = []
        for i, c in enumerate(classes):
            (grad,) = torch.autograd.grad(
                logits[:, c].sum(), fmap, retain_graph=i < len(classes) - 1
            )
            alpha = grad.float().mean(dim=(2, 3), keepdim=True)
            maps.append(torch.relu((alpha * fmap.detach().float()).sum(dim=1)))
    if maps:
        out = torch.stack(maps, dim=1)
    else:
        out = fmap.new_zeros((fmap.shape[0], 0) + tuple(fmap.shape[-2:]), dtype=torch.float32)
    return logits.detach(), out


def map_to_box(cam_map: np.ndarray, frac: float = 0.5) -> MapBox:
    """The bounding box of the heaviest region of one raw map above ``frac * peak``.

    Never raises on map content: an all-zero (or all-negative) map, a flat map (max == min > 0,
    where a box would just be the whole image and say nothing) and a map with NaN/inf give
    ``box=None`` with a reason. ``frac`` must lie in (0, 1] (a programming error otherwise).
    """
    m = np.asarray(cam_map)
    if m.ndim != 2 or m.size == 0:
        _check_frac(frac)
        return MapBox(None, math.nan, math.nan, f"not a 2-D map (shape {m.shape})")
    return maps_to_boxes(m[None], frac)[0]


def _check_frac(frac: float) -> None:
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"threshold fraction must be in (0, 1], got {frac}")


def maps_to_boxes(maps: np.ndarray, frac: float = 0.5) -> list[MapBox]:
    """:func:`map_to_box` for a stack of maps (N x h x w), with one labelling pass for all.

    Why: the stage makes 14 boxes per image; labelling the whole stack at once (a 3-D
    structure that connects 8-neighbours within a map, never across maps) is tens of times
    faster than a scipy call per map, which would otherwise bound GPU throughput.
    """
    _check_frac(frac)
    m = np.asarray(maps, dtype=np.float64)
    if m.ndim != 3:
        raise ValueError(f"expected N x h x w maps, got shape {m.shape}")
    n = len(m)
    if n == 0:
        return []
    if m.shape[1] * m.shape[2] == 0:
        return [MapBox(None, math.nan, math.nan, f"not a 2-D map (shape {m.shape[1:]})")] * n
    finite = np.isfinite(m).all(axis=(1, 2))
    safe = np.where(finite[:, None, None], m, 0.0)
    peak = safe.max(axis=(1, 2))
    flat = peak == safe.min(axis=(1, 2))
    ok = finite & (peak > 0) & ~flat
    mask = (safe >= frac * peak[:, None, None]) & ok[:, None, None]
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = EIGHT_CONNECTED
    labels, n_labels = ndimage.label(mask, structure=structure)
    best: dict[int, int] = {}
    objects: list = []
    masses = np.zeros(0)
    if n_labels:
        ids = np.arange(1, n_labels + 1)
        masses = np.asarray(ndimage.sum_labels(safe, labels, index=ids), dtype=np.float64)
        objects = ndimage.find_objects(labels)
        owner = np.array([o[0].start for o in objects])
        # per map: the largest mass; ties go to the first component in raster order
        order = np.lexsort((ids, -masses, owner))
        first = order[np.r_[True, owner[order][1:] != owner[order][:-1]]]
        best = {int(owner[j]): int(j) for j in first}
    out = []
    for i in range(n):
        if not finite[i]:
            out.append(MapBox(None, math.nan, math.nan, REASON_NONFINITE))
        elif peak[i] <= 0.0:
            out.append(MapBox(None, float(peak[i]), 0.0, REASON_EMPTY))
        elif flat[i]:
            out.append(MapBox(None, float(peak[i]), float(safe[i].sum()), REASON_FLAT))
        else:
            j = best[i]
            _, rows, cols = objects[j]
            box = (float(cols.start), float(rows.start), float(cols.stop - cols.start),
                   float(rows.stop - rows.start))
            out.append(MapBox(box, float(peak[i]), float(masses[j]), None))
    return out
