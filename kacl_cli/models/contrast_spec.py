"""What a contrastive objective is (:class:`ContrastSpec`) and its kinds of positives, free of
torch: the CLI reads the defaults here at start-up; :mod:`kacl_cli.models.contrastive` builds
the objective from them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# radiomics: the method (each image's radiomics embedding is its positive); augment: the
# SimCLR ablation (a second augmented view); none: classification only.
POSITIVES = ("radiomics", "augment", "none")


@dataclass(frozen=True)
class ContrastSpec:
    """Shape-defining settings of a contrastive objective (saved in the checkpoint meta).

    Two objectives with equal ``weights_key()`` have identically shaped parameters that mean
    the same thing, so a later round may continue the earlier round's weights.
    """

    positives: str
    feature_dim: int
    proj_dim: int = 128
    image_hidden: int = 512
    temperature: float = 0.1
    lam: float = 0.1
    n_features: int = 0
    radiomics_hidden: int = 256
    radiomics_embed: int = 256
    feature_clip: float = 5.0
    settings_hash: str | None = None
    feature_names_hash: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def weights_key(self) -> dict[str, Any]:
        d = self.to_dict()
        for k in ("temperature", "lam", "feature_clip"):  # no effect on the weights' meaning
            d.pop(k)
        return d
