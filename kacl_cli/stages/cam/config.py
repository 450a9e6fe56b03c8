"""The settings of the cam stage (:class:`CamConfig`), free of torch: the CLI reads its option
defaults here at start-up, and contrast, evaluate and predict take the same defaults."""

from __future__ import annotations

from dataclasses import dataclass

# Images per committed chunk: a killed run loses at most this much work, and the per-chunk
# catalog transaction stays well under a second.
CHUNK = 1024


@dataclass
class CamConfig:
    """What ``kacl cam`` computes, and how fast (docs/cam.md)."""

    round: int | None = None  # checkpoint round-K (None: the latest finished round)
    split: str | None = None  # train | val | test | all (None: all)
    # Box region: map values >= this fraction of the map's peak for every finding; None: the
    # per-finding rules fitted on GT boxes evaluation does not score (box_rules.py), else 0.5.
    threshold: float | None = None
    max_boxes: int = 1  # boxes per (image, finding): box 1 in cam_boxes, 2..K cam_boxes_ranked
    batch_size: int = 64  # images per forward/backward pass
    device: str = "auto"
    force: bool = False
    workers: int = 0  # DataLoader worker processes reading the store
    chunk_size: int = CHUNK
