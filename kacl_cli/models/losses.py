"""Classification losses and the training-objective interface the one training loop calls.

Defaults, and why:
- ``focal`` (alpha 0.25, gamma 2; Lin et al. 2017, as the paper's "focal loss"): the
  (1 - p_t)^gamma factor shrinks the loss of the many easy negatives of a 14-label chest X-ray
  problem (most findings are absent in most images), so rare positives are not drowned out.
  alpha weighs positives by alpha and negatives by 1 - alpha; 0.25 is the published default
  that pairs with gamma 2 (gamma already down-weights the easy negatives far more than alpha
  down-weights positives). ``--loss focal`` uses :func:`torchvision.ops.sigmoid_focal_loss`.
- ``bce`` with ``pos_weight`` = negatives / positives of each finding on the train split
  (clipped to [1, 100]; 1 where a finding has no positives): the usual re-weighting for
  multi-label imbalance, so each finding's positives and negatives weigh the same in total.
Both are averaged over every (image, finding) element of the batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from kacl_cli.errors import KaclError

LOSSES = ("focal", "bce")
POS_WEIGHT_MAX = 100.0


def pos_weight_from_labels(labels: np.ndarray, max_weight: float = POS_WEIGHT_MAX) -> torch.Tensor:
    """Per-finding negatives/positives of a label matrix (n x F), clipped to [1, max]."""
    labels = np.asarray(labels, dtype=np.float64)
    pos = labels.sum(axis=0)
    neg = labels.shape[0] - pos
    w = np.where(pos > 0, neg / np.maximum(pos, 1.0), 1.0)
    return torch.as_tensor(np.clip(w, 1.0, max_weight), dtype=torch.float32)


def focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Mean sigmoid focal loss over all elements (alpha < 0 disables the alpha weighting)."""
    return sigmoid_focal_loss(logits.float(), targets.float(), alpha=alpha, gamma=gamma,
                              reduction="mean")


class Objective(nn.Module):
    """What the training loop optimises: ``forward(model, batch) -> (total, parts)``.

    ``batch`` holds device tensors: ``image`` (B x 1 x s x s, preprocessed and augmented),
    ``labels`` (B x F float), ``row``, any dataset extras, and ``image2`` for two-view sets.
    ``parts`` are detached-or-not scalar tensors for logging (``cls``, ``contrastive``, ...).
    Parameters of an objective (e.g. contrast's radiomics encoder and projection heads) are
    trained with the model and checkpointed under the ``objective.`` prefix.
    """

    def forward(  # pragma: no cover - interface
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - interface

    def validation_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], logits: torch.Tensor
    ) -> torch.Tensor:
        """Loss reported on the val split: the classification loss of ``logits``.

        Val images carry no second view or radiomics guarantee, so by default only the
        classification part is measured; an objective may override this.
        """
        return self.classification_loss(logits, batch["labels"])


class ClassificationObjective(Objective):
    """Supervised multi-label loss (focal or pos-weighted BCE): pretrain's whole objective."""

    def __init__(
        self,
        loss: str = "focal",
        alpha: float = 0.25,
        gamma: float = 2.0,
        pos_weight: torch.Tensor | None = None,
        box_loss_weight: float = 0.0,
        box_loss_form: str = "softmax",
    ):
        super().__init__()
        # Weight of the CAM-mass-inside-the-box term (models/box_loss.py) on batches that
        # carry a ``box`` extra (F x 4 per image, network-input pixels, NaN = no box).
        self.box_loss_weight = float(box_loss_weight)
        self.box_loss_form = box_loss_form
        if loss not in LOSSES:
            raise KaclError(f"--loss {loss!r}: expected one of {', '.join(LOSSES)}")
        self.loss = loss
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        # A buffer, not a parameter: it moves with .to(device) and is not trained; kept out
        # of the state dict (persistent=False) because it is recomputed from the train split.
        self.register_buffer(
            "pos_weight", pos_weight if pos_weight is not None else torch.empty(0),
            persistent=False,
        )

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.loss == "focal":
            return focal_loss(logits, labels, self.alpha, self.gamma)
        pw = self.pos_weight if self.pos_weight.numel() else None
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=pw)

    def masked_loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Classification loss over the batch's labelled images only.

        ``batch["label_mask"]`` (B bools, ``--label-fraction``) marks the images that carry
        labels; without it every image does. A batch with no labelled image gives an exact
        zero still connected to the logits (every parameter keeps a gradient, as DDP needs).
        """
        mask = batch.get("label_mask")
        if mask is None:
            return self.classification_loss(logits, batch["labels"])
        mask = mask.to(device=logits.device, dtype=torch.bool).reshape(-1)
        if not bool(mask.any()):
            return logits.float().sum() * 0.0
        return self.classification_loss(logits[mask], batch["labels"][mask])
    def box_term(self, model: nn.Module, batch: dict[str, torch.Tensor], fmap: torch.Tensor
                 ) -> torch.Tensor | None:
        """The unweighted box loss of a batch's first-view feature maps, or None when the
        term is off or the batch carries no boxes (the contrast objectives call it too)."""
        if self.box_loss_weight <= 0 or "box" not in batch:
            return None
        from kacl_cli.models.box_loss import box_masks, cam_box_loss, class_maps

        masks = box_masks(batch["box"], tuple(fmap.shape[-2:]), batch["image"].shape[-1])
        return cam_box_loss(class_maps(fmap, model.head.weight), masks, self.box_loss_form)

    def forward(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.box_loss_weight > 0 and "box" in batch:
            fmap, _pooled, logits = model.forward_all(batch["image"])
            cls = self.masked_loss(logits, batch)
            box = self.box_term(model, batch, fmap)
            total = cls + self.box_loss_weight * box
            return total, {"cls": cls.detach(), "box": box.detach()}
        logits = model(batch["image"])
        loss = self.masked_loss(logits, batch)
        return loss, {"cls": loss.detach()}
