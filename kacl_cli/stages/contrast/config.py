"""The settings of ``kacl contrast`` (:class:`ContrastConfig`), free of torch: the CLI reads its
option defaults here at start-up (defaults and reasons: docs/contrast.md)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kacl_cli.errors import InputError
from kacl_cli.models.contrast_spec import POSITIVES, ContrastSpec
from kacl_cli.stages.cam.config import CamConfig
from kacl_cli.stages.radiomics.backends.base import DEFAULT_BACKEND
from kacl_cli.training.config import BOX_TERM_FIELDS, TrainConfig

# Fields of ContrastConfig that say how to run, not what to compute: kept out of the hash.
EXECUTION_FIELDS = ("rounds", "from_round", "force", "device", "workers", "cam_batch_size")
# Fields added after runs were recorded: kept out of the hash at these defaults, so runs made
# before they existed are still recognised.
NEW_DEFAULTS = {"label_fraction": 1.0, "positive_roi": "predicted", "normal_positive": "skip",
                "shuffle_positives": False, "radiomics_params": None}
# --positive-roi -> the radiomics stage's ROI mode
POSITIVE_ROIS = {"predicted": "cam", "labelled": "labelled", "oracle": "oracle"}


@dataclass
class ContrastConfig:
    """Resolved settings of ``kacl contrast`` (defaults and reasons: docs/contrast.md)."""

    rounds: int = 3
    from_round: int | None = None
    epochs_per_round: int = 2
    temperature: float = ContrastSpec.temperature  # one home for these defaults: the model's
    lam: float = ContrastSpec.lam
    proj_dim: int = ContrastSpec.proj_dim
    box_supervision: float = 0.0
    fold: int = 0
    # Weight of the CAM-mass-in-GT-box term on the box-supervised images (models/box_loss.py).
    box_loss_weight: float = TrainConfig.box_loss_weight
    box_loss_form: str = TrainConfig.box_loss_form
    positives: str = "radiomics"
    feedback: bool = True
    radiomics_backend: str = DEFAULT_BACKEND
    backbone_lr_scale: float = 1.0
    batch_size: int = 32
    lr: float = 2e-4
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    cam_batch_size: int = CamConfig.batch_size
    force: bool = False
    # Weak labels and positive choice (docs/contrast.md)
    label_fraction: float = 1.0
    positive_roi: str = "predicted"  # predicted | labelled | oracle (the positive control)
    normal_positive: str = "skip"  # skip | lung (labelled/oracle ROIs of finding-free images)
    shuffle_positives: bool = False  # the negative control
    # --radiomics-params: a pyradiomics params file for the rounds' radiomics (None: defaults);
    # hashed by the settings it resolves to, not by its path
    radiomics_params: str | None = None

    def hashed(self) -> dict[str, Any]:
        # box_loss_weight only when on, the newer fields only off their defaults: runs from
        # before these options keep their hashes.
        off = BOX_TERM_FIELDS if not self.box_loss_weight else ()
        out = {k: v for k, v in asdict(self).items() if k not in EXECUTION_FIELDS
               and not (k in NEW_DEFAULTS and v == NEW_DEFAULTS[k]) and k not in off}
        if self.radiomics_params is not None:
            out["radiomics_params"] = radiomics_settings_hash(self.radiomics_params)
        return out

    def validate(self) -> None:
        if self.rounds < 1:
            raise InputError(f"--rounds must be >= 1, got {self.rounds}")
        if self.from_round is not None and not 1 <= self.from_round:
            raise InputError(f"--from-round must be >= 1, got {self.from_round}")
        if self.epochs_per_round < 1:
            raise InputError(f"--epochs-per-round must be >= 1, got {self.epochs_per_round}")
        if not 0.0 < self.temperature <= 10.0:
            raise InputError(f"--temperature must be in (0, 10], got {self.temperature}")
        if self.lam < 0:
            raise InputError(f"--lambda must be >= 0, got {self.lam}")
        if self.proj_dim < 2:
            raise InputError(f"--proj-dim must be >= 2, got {self.proj_dim}")
        if self.positives not in POSITIVES:
            raise InputError(f"--positives must be one of {', '.join(POSITIVES)}, "
                             f"got {self.positives!r}")
        if not 0.0 <= self.box_supervision <= 1.0:
            raise InputError(f"--box-supervision must be in [0, 1], got {self.box_supervision}")
        if not 0 <= self.fold <= 4:
            raise InputError(f"--fold must be in 0..4, got {self.fold}")
        if self.box_supervision > 0 and self.positives != "radiomics":
            raise InputError("--box-supervision lends GT boxes to the radiomics positives: "
                             "it needs --positives radiomics")
        if not self.box_loss_weight >= 0:  # also refuses NaN
            raise InputError(f"--box-loss-weight must be >= 0, got {self.box_loss_weight}")
        if self.backbone_lr_scale <= 0:
            raise InputError(f"--backbone-lr-scale must be > 0, got {self.backbone_lr_scale}")
        if self.lr <= 0 or self.batch_size < 1:
            raise InputError("--lr must be > 0 and --batch-size >= 1")
        if not 0.0 < self.label_fraction <= 1.0:
            raise InputError(f"--label-fraction must be in (0, 1], got {self.label_fraction}")
        if self.positive_roi not in POSITIVE_ROIS:
            raise InputError(f"--positive-roi must be one of {', '.join(POSITIVE_ROIS)}, "
                             f"got {self.positive_roi!r}")
        if self.normal_positive not in ("skip", "lung"):
            raise InputError(f"--normal-positive must be skip or lung, got "
                             f"{self.normal_positive!r}")
        if self.positives != "radiomics" and (self.positive_roi != "predicted"
                                              or self.shuffle_positives):
            raise InputError("--positive-roi and --shuffle-positives choose radiomics "
                             "positives: they need --positives radiomics")
        if self.radiomics_params is not None:
            if self.positives != "radiomics":
                raise InputError("--radiomics-params sets the radiomics positives' features: "
                                 "it needs --positives radiomics")
            radiomics_settings_hash(self.radiomics_params)  # a bad file: one line, now
        if self.box_supervision > 0 and self.positive_roi != "predicted":
            raise InputError("--box-supervision uses its own ROI rule (cam+gt): it needs "
                             "--positive-roi predicted")


def radiomics_settings_hash(params: str) -> str:
    """The settings hash of a ``--radiomics-params`` file (InputError when it is bad)."""
    from kacl_cli.stages.radiomics import settings as settings_mod

    return settings_mod.settings_hash(settings_mod.load_settings(params))
