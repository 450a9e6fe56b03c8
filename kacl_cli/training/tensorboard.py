"""``--tensorboard DIR`` for ``pretrain`` and ``contrast``: the per-epoch curves in TensorBoard.

TensorBoard is an optional extra (``pip install 'kacl[tensorboard]'``); without it the option
ends the command with one line saying so, and the HTML report keeps its own plots either way.
One TensorBoard run per training round (``DIR/pretrain-round-0``, ``DIR/contrast-round-1``,
...), so rounds overlay in TensorBoard's run selector; the step is the epoch. Scalars:
``loss/train``, ``loss/cls``, ``loss/contrastive``, ``loss/val``, ``auc/val_mean``, ``lr``
(at the epoch's end) and ``throughput/images_per_s``: the same numbers as the ``epochs``
table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kacl_cli.errors import KaclError

MISSING = ("--tensorboard needs the tensorboard package, which is not installed: "
           "pip install 'kacl[tensorboard]' (or drop --tensorboard; the report has the curves)")
SCALARS = {  # epochs-row key -> TensorBoard tag
    "train_loss": "loss/train",
    "cls_loss": "loss/cls",
    "contrastive_loss": "loss/contrastive",
    "val_loss": "loss/val",
    "val_mean_auc": "auc/val_mean",
    "lr": "lr",
    "images_per_s": "throughput/images_per_s",
}


def summary_writer_class() -> Callable[..., Any]:
    """torch's SummaryWriter, or KaclError when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise KaclError(MISSING) from None
    return SummaryWriter


class TensorBoardLogger:
    """An epoch callback writing one SummaryWriter per (stage, round) under ``root``."""

    def __init__(self, root: Path, writer_class: Callable[..., Any]):
        self.root = Path(root)
        self.writer_class = writer_class
        self.writers: dict[tuple[str, int], Any] = {}

    def __call__(self, stage: str, round_: int, row: dict[str, Any]) -> None:
        key = (stage, round_)
        if key not in self.writers:
            log_dir = self.root / f"{stage}-round-{round_}"
            self.writers[key] = self.writer_class(log_dir=str(log_dir))
        writer = self.writers[key]
        for field, tag in SCALARS.items():
            value = row.get(field)
            if value is not None and math.isfinite(float(value)):
                writer.add_scalar(tag, float(value), int(row["epoch"]))
        writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()
