"""What one training run is asked to do (:class:`TrainConfig`), free of torch.

The CLI reads its option defaults from here at start-up, so this module imports nothing heavy;
the loop that uses it is :func:`kacl_cli.training.fit.fit`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# --box-loss-weight when --box-supervision is on and the weight is not given: measured on
# 3 seeds (docs/cam.md, "Box supervision on the maps"). The loop's own default stays 0.
DEFAULT_BOX_LOSS_WEIGHT = 0.1
# Forms of the box term (models/box_loss.py); here so the CLI can list them without torch.
BOX_LOSS_FORMS = ("softmax", "share")
# The box term's config fields: hashed only while the term is on (weight > 0), so runs from
# before the options keep their hashes (TrainConfig and ContrastConfig).
BOX_TERM_FIELDS = ("box_loss_weight", "box_loss_form")
# Config fields that change how fast a run goes, not what it computes: left out of the hash,
# so a finished run is not redone because it moved to another device or worker count.
EXECUTION_FIELDS = ("device", "workers", "amp", "channels_last", "val_batch_size", "data_path")


@dataclass
class TrainConfig:
    """Everything the loop needs; ``hashed()`` is what identifies a run."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    loss: str = "focal"
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    image_size: int = 224
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    workers: int = 2
    warmup_fraction: float = 0.05
    grad_clip: float = 5.0
    val_batch_size: int | None = None
    # "batched": uint8 batches, resize + augmentation on the device (kacl_cli.training.batches);
    # "items": the per-item DataLoader path (augmentation in the workers). Same pixels.
    data_path: str = "batched"
    # Weight of the CAM-mass-in-GT-box term on box-supervised images (models/box_loss.py);
    # 0 = off. Default by measurement (docs/cam.md, "Box supervision").
    box_loss_weight: float = 0.0
    # Its form (models/box_loss.py: softmax | share); hashed only while the term is on.
    box_loss_form: str = "softmax"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def hashed(self) -> dict[str, Any]:
        off = BOX_TERM_FIELDS if not self.box_loss_weight else ()
        return {k: v for k, v in self.to_dict().items()
                if k not in EXECUTION_FIELDS and k not in off}
