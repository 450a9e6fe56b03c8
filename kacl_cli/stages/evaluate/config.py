"""The settings of one evaluation (:class:`EvaluateConfig`), free of numpy/sklearn so the CLI
reads its option defaults from here at start-up."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class EvaluateConfig:
    """Resolved settings of ``kacl evaluate`` for one round (docs/evaluation.md)."""

    split: str = "test"
    out: Path | None = None  # the report directory (default WORKSPACE/reports/round-K)
    n_boot: int = 1000  # bootstrap resamples of the AUC CIs (0 = no CIs)
    seed: int = 0
    overlays: int = 12  # Grad-CAM overlays in the report's grid
    force: bool = False
    device: str = "auto"
