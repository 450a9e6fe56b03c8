"""GT boxes of box-supervised training images as a per-image ``box`` extra for the loss.

Why: the box term of :class:`kacl_cli.models.losses.ClassificationObjective`
(:mod:`kacl_cli.models.box_loss`) needs, for every training image, where each finding's GT
box lies in the *network-input* frame. Here the catalog's ``gt_boxes`` (original pixels) of
the images that ``--box-supervision`` lends (:mod:`kacl_cli.stages.contrast.supervision`)
become one float32 array ``n x F x 4`` (x, y, w, h in **store** pixels, per axis
``S / orig_width`` and ``S / orig_height`` as prepare resized; NaN where the image has no box
of that finding, or is not box-supervised). Both data paths then move the boxes with the
image (:func:`to_input_frame` with the view's forward affine: resize, rotation, scale,
translation and flip), so the objective always sees boxes in the augmented image's pixels.

Several boxes of one finding on one image (rare in NIH) are merged into their envelope:
the term asks for the map's mass inside the box, and the envelope keeps every lesion inside.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kacl_cli.findings import FINDINGS
from kacl_cli.training.gpu_augment import transform_boxes

BOX_KEY = "box"


def gt_box_array(ws, image_ids: Sequence[str], store_size: int,
                 supervised: set[str] | frozenset[str]) -> np.ndarray:
    """``len(image_ids) x F x 4`` float32 store-pixel boxes of the ``supervised`` images
    (NaN elsewhere; see the module docstring)."""
    out = np.full((len(image_ids), len(FINDINGS), 4), np.nan, np.float32)
    if not supervised or not len(image_ids):
        return out
    where = {i: r for r, i in enumerate(image_ids) if i in supervised}
    col = {f: j for j, f in enumerate(FINDINGS)}
    rows = ws.catalog.query(
        "SELECT g.image_id, g.finding, g.x, g.y, g.w, g.h, i.orig_width, i.orig_height "
        "FROM gt_boxes g JOIN images i USING (image_id) ORDER BY 1, 2, 3, 4")
    lo = np.full((len(image_ids), len(FINDINGS), 2), np.inf)
    hi = np.full((len(image_ids), len(FINDINGS), 2), -np.inf)
    for image_id, finding, x, y, w, h, ow, oh in rows:
        r, j = where.get(str(image_id)), col.get(str(finding))
        if r is None or j is None or not (ow and oh):
            continue
        sx, sy = store_size / float(ow), store_size / float(oh)
        lo[r, j] = np.minimum(lo[r, j], (x * sx, y * sy))
        hi[r, j] = np.maximum(hi[r, j], ((x + w) * sx, (y + h) * sy))
    have = np.isfinite(lo).all(-1)
    out[have, :2] = lo[have]
    out[have, 2:] = hi[have] - lo[have]
    return out


def to_input_frame(boxes: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Store-pixel boxes (B x F x 4, or F x 4 with a 2 x 3 ``affine``) -> the augmented
    image's pixels; NaN boxes stay NaN."""
    if boxes.ndim == 2:
        return transform_boxes(boxes[None].float(), affine[None].to(boxes.device))[0]
    return transform_boxes(boxes.float(), affine.to(boxes.device))
