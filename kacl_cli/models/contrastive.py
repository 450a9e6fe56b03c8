"""Knowledge-augmented contrastive objective: classification + lambda * NT-Xent.

Han et al. (WACV 2022) pair each X-ray's image embedding with the embedding of radiomic
features computed on that X-ray's Grad-CAM region: the radiomics embedding is the positive,
the other X-rays of the batch are the negatives (SimCLR's NT-Xent / InfoNCE). Here:

- image side: the image network's global-average-pooled features (the representation its
  classifier reads) -> :class:`ProjectionHead` -> ``proj_dim``;
- radiomics side: z-scored features -> :class:`RadiomicsEncoder` (MLP) ->
  :class:`ProjectionHead` -> ``proj_dim``;
- :func:`nt_xent`: cosine similarities / temperature, cross-entropy in both directions
  (image -> radiomics and radiomics -> image), averaged. Cross-modal only (a B x B matrix, the
  CLIP form of NT-Xent): image-image pairs are not contrasted, because two X-ray embeddings
  are not a positive/negative pair the method defines.
- Images without a radiomics positive (no CAM box, or a failed extraction) are masked out of
  the contrastive term: they are neither anchors nor negatives and contribute classification
  loss only.

Total loss = classification (focal or BCE, the same :class:`ClassificationObjective` pretrain
uses) + lambda * NT-Xent. :class:`AugmentObjective` is the SimCLR ablation: the positive is a
second augmented view of the same X-ray (same :func:`nt_xent`, same heads), so the ablation
changes only where the positive comes from.

Defaults and why (the paper gives none; method.md asks for T in [0.05, 0.5], 64-128 dims):
- ``temperature = 0.1``: SimCLR's and MoCo's usual value, inside the range. Lower values sharpen
  the softmax so only the hardest in-batch negatives matter, which with batches of 16-64 X-rays
  (many sharing a finding, i.e. false negatives) makes the gradient noisy; higher values
  (0.5) flatten it until the positive barely stands out.
- ``proj_dim = 128``: SimCLR's projection size, the top of the asked range; the head is cheap
  and the loss is computed on normalised vectors, so more dimensions only help separability.
- ``hidden = 512`` (image head) and ``256`` (radiomics MLP): the radiomics input is ~100
  features, so a 256-wide two-layer MLP has ample capacity without memorising small sets.
- ``feature_clip = 5``: z-scores are clipped to +-5 before the MLP. Features with a tiny
  training-split std (e.g. shape features of near-constant boxes) give huge z-scores on other
  images; clipping keeps one such outlier from dominating a batch.
- ``lam = 0.1`` (lambda): at the start NT-Xent is about log(B) (3.5 for a batch of 32) while
  the mean focal loss over 14 labels is 0.03-0.1, so lambda 0.5 would make the contrastive
  term ~50x the classification term; 0.1 keeps classification in charge while the contrastive
  gradient still shapes the representation (measurements in docs/contrast.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kacl_cli.models.contrast_spec import POSITIVES, ContrastSpec
from kacl_cli.models.losses import ClassificationObjective, Objective
from kacl_cli.training import distributed


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric cross-modal NT-Xent between paired rows of ``a`` and ``b`` (B x D each).

    Row i of ``a`` and row i of ``b`` are positives; every other row of the other modality
    is a negative. ``mask`` (B bools) keeps only some pairs: masked rows are neither anchors
    nor negatives. Returns the mean of the a->b and b->a cross-entropies, computed in float32.
    With fewer than two kept pairs there is no negative and the loss is an exact zero that is
    still connected to both inputs (so every parameter gets a gradient, which DDP needs).
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"nt_xent needs two B x D tensors of one shape, got {a.shape}, {b.shape}")
    a = a.float()
    b = b.float()
    zero = (a.sum() + b.sum()) * 0.0
    if mask is not None:
        mask = mask.to(device=a.device, dtype=torch.bool).reshape(-1)
        a, b = a[mask], b[mask]
    n = a.shape[0]
    if n < 2:
        return zero
    a = F.normalize(a, dim=1)
    b = F.normalize(b, dim=1)
    logits = a @ b.t() / temperature
    target = torch.arange(n, device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) + zero


class ProjectionHead(nn.Module):
    """SimCLR's non-linear projection: Linear -> ReLU -> Linear (no norm layers, so masked or
    tiny batches behave the same in train and eval mode)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class RadiomicsEncoder(nn.Module):
    """MLP over z-scored radiomic features: clip -> Linear -> LayerNorm -> ReLU -> Linear -> ReLU.

    LayerNorm rather than BatchNorm: the encoder also sees rows that the mask drops later and
    small per-GPU batches; per-sample normalisation keeps it independent of batch make-up.
    """

    def __init__(self, n_features: int, hidden: int = 256, embed_dim: int = 256,
                 feature_clip: float = 5.0):
        super().__init__()
        self.feature_clip = float(feature_clip)
        self.net = nn.Sequential(
            nn.Linear(n_features, hidden), nn.LayerNorm(hidden), nn.ReLU(),
            nn.Linear(hidden, embed_dim), nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0)
        if self.feature_clip > 0:
            x = x.clamp(-self.feature_clip, self.feature_clip)
        return self.net(x)


class _ScaledBackbone:
    """Optimizer parameter groups: the image network at ``backbone_lr_scale`` x the base
    learning rate, the objective's own (fresh) heads at the base rate. The training loop
    asks an objective for ``param_groups(model, lr)`` when it has one."""

    backbone_lr_scale: float = 1.0

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        own = [p for p in self.parameters() if p.requires_grad]  # type: ignore[attr-defined]
        groups = [{"params": [p for p in model.parameters() if p.requires_grad],
                   "lr": lr * self.backbone_lr_scale}]
        if own:
            groups.append({"params": own, "lr": lr})
        return groups


class ClassificationOnly(_ScaledBackbone, Objective):
    """``--positives none``: the classification objective alone, same epochs and optimizer
    groups as the contrastive settings, so the ablation differs only by the missing term."""

    def __init__(self, classification: ClassificationObjective):
        super().__init__()
        self.classification = classification

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.classification.classification_loss(logits, labels)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.classification(model, batch)


class ContrastiveObjective(_ScaledBackbone, Objective):
    """Classification + lambda * NT-Xent(image projection, radiomics projection).

    Batches carry ``radiomics`` (B x n_features, z-scored) and ``has_radiomics`` (B bools);
    a batch without them (e.g. validation) is scored on classification only.
    """

    def __init__(self, classification: ClassificationObjective, spec: ContrastSpec):
        super().__init__()
        if spec.positives != "radiomics" or spec.n_features <= 0:
            raise ValueError("ContrastiveObjective needs positives='radiomics' and n_features > 0")
        self.spec = spec
        self.classification = classification
        self.image_proj = ProjectionHead(spec.feature_dim, spec.image_hidden, spec.proj_dim)
        self.radiomics_encoder = RadiomicsEncoder(
            spec.n_features, spec.radiomics_hidden, spec.radiomics_embed, spec.feature_clip)
        self.radiomics_proj = ProjectionHead(spec.radiomics_embed, spec.radiomics_hidden,
                                             spec.proj_dim)

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.classification.classification_loss(logits, labels)

    def embed(self, model: nn.Module, batch: dict[str, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, image projection, radiomics projection) of a batch."""
        return self._embed(model, batch)[1:]

    def _embed(self, model: nn.Module, batch: dict[str, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        fmap, pooled, logits = model.forward_all(batch["image"])
        z_img = self.image_proj(pooled.float())
        z_rad = self.radiomics_proj(self.radiomics_encoder(batch["radiomics"]))
        return fmap, logits, z_img, z_rad

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "radiomics" not in batch:
            logits = model(batch["image"])
            cls = self.classification.masked_loss(logits, batch)
            return cls, {"cls": cls.detach()}
        fmap, logits, z_img, z_rad = self._embed(model, batch)
        cls = self.classification.masked_loss(logits, batch)
        # Under torchrun the negatives are the whole global batch (every rank's rows), as in
        # one process holding it; gather_with_grad routes each rank's gradients back to it.
        mask = batch.get("has_radiomics")
        if mask is not None:
            mask = distributed.gather_with_grad(mask.to(torch.uint8)).bool()
        con = nt_xent(distributed.gather_with_grad(z_img), distributed.gather_with_grad(z_rad),
                      self.spec.temperature, mask)
        return _with_box(self.classification, model, batch, fmap, cls + self.spec.lam * con,
                         {"cls": cls.detach(), "contrastive": con.detach()})


def _with_box(classification: ClassificationObjective, model: nn.Module,
              batch: dict[str, torch.Tensor], fmap: torch.Tensor, total: torch.Tensor,
              parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``total`` plus the classification objective's weighted box term when it applies
    (``--box-loss-weight`` > 0 and the batch carries GT boxes)."""
    box = classification.box_term(model, batch, fmap)
    if box is None:
        return total, parts
    return total + classification.box_loss_weight * box, {**parts, "box": box.detach()}


class AugmentObjective(_ScaledBackbone, Objective):
    """SimCLR ablation: classification + lambda * NT-Xent between two augmented views.

    Both views go through the network in one forward pass (2B images); classification is
    scored on the first view only, so its signal equals the other settings'.
    """

    def __init__(self, classification: ClassificationObjective, spec: ContrastSpec):
        super().__init__()
        if spec.positives != "augment":
            raise ValueError("AugmentObjective needs positives='augment'")
        self.spec = spec
        self.classification = classification
        self.image_proj = ProjectionHead(spec.feature_dim, spec.image_hidden, spec.proj_dim)

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.classification.classification_loss(logits, labels)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "image2" not in batch:
            logits = model(batch["image"])
            cls = self.classification.masked_loss(logits, batch)
            return cls, {"cls": cls.detach()}
        b = batch["image"].shape[0]
        fmap, pooled, logits = model.forward_all(torch.cat([batch["image"], batch["image2"]]))
        cls = self.classification.masked_loss(logits[:b], batch)
        z = self.image_proj(pooled.float())
        # global-batch negatives under torchrun, as in the radiomics objective above
        con = nt_xent(distributed.gather_with_grad(z[:b]), distributed.gather_with_grad(z[b:]),
                      self.spec.temperature)
        return _with_box(self.classification, model, batch, fmap[:b], cls + self.spec.lam * con,
                         {"cls": cls.detach(), "contrastive": con.detach()})


def build_objective(classification: ClassificationObjective, spec: ContrastSpec,
                    backbone_lr_scale: float = 1.0) -> Objective:
    """The objective of a ``--positives`` setting (``none`` = classification only)."""
    objective: _ScaledBackbone
    if spec.positives == "radiomics":
        objective = ContrastiveObjective(classification, spec)
    elif spec.positives == "augment":
        objective = AugmentObjective(classification, spec)
    elif spec.positives == "none":
        objective = ClassificationOnly(classification)
    else:
        raise ValueError(
            f"positives must be one of {', '.join(POSITIVES)}, got {spec.positives!r}")
    objective.backbone_lr_scale = float(backbone_lr_scale)
    return objective  # type: ignore[return-value]
