"""A pretrained tiny workspace for the contrast tests (phantoms with real CAM-able lesions).

Built once per test module and copied per test: prepare (phantoms, 64 px) + pretrain (tiny
backbone, 1 epoch) take a few seconds, and every contrast test starts from that round 0.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from kacl_cli.workspace import Workspace

N_IMAGES = 36
SIZE = 64


def pretrained_workspace(root: Path, n: int = N_IMAGES, size: int = SIZE,
                         seed: int = 0) -> Workspace:
    from kacl_cli.stages import pretrain
    from kacl_cli.stages.prepare.stage import prepare_synthetic
    from kacl_cli.training.config import TrainConfig

    ws = Workspace(root)
    prepare_synthetic(ws, n, size=size, seed=seed)
    cfg = TrainConfig(epochs=1, batch_size=8, image_size=size, workers=0, device="cpu",
                      seed=seed)
    pretrain.run(ws, pretrain.PretrainConfig(backbone="tiny", init="none", train=cfg))
    return ws


def clone(ws: Workspace, dest: Path) -> Workspace:
    """An independent copy of a workspace (catalog, store, checkpoints)."""
    shutil.copytree(ws.root, dest)
    return Workspace(dest)
