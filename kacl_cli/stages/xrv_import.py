"""`kacl import xrv`: a torchxrayvision DenseNet-121 becomes checkpoint round-0.

Why a separate command, not ``pretrain --init xrv:FILE``: the NIH model is already trained
on the 14 findings, so pretraining it again would only spend GPU hours and move it away from
the published weights. Importing writes the converted net as round 0 directly; ``cam``,
``radiomics``, ``contrast`` (the rounds that fine-tune it), ``evaluate`` and ``predict`` use it
unchanged. (``pretrain --init PATH`` still fine-tunes from any compatible state dict.)

The run is recorded in the ``runs`` table (stage ``import``, round 0) with the source file's
content hash, so repeating the same import is skipped and another file is refused unless
``--force`` replaces round-0.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kacl_cli.errors import KaclError
from kacl_cli.findings import FINDINGS
from kacl_cli.models.checkpoint import IMAGE_PREFIX, model_meta, save_checkpoint
from kacl_cli.models.xrv import XRV_IMAGE_SIZE, convert, read_source, xrv_normalisation
from kacl_cli.workspace import Workspace

STAGE = "import"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _prior(ws: Workspace | None) -> tuple[dict[str, float], str]:
    """Prevalence for fresh head rows: the workspace's train split, else NIH's published one."""
    if ws is not None and ws.exists():
        from kacl_cli.training.loader import load_split

        train = load_split(ws, "train")
        if len(train):
            return dict(zip(FINDINGS, map(float, train.labels.mean(axis=0)), strict=True)), \
                "train split"
    from kacl_cli.stages.prepare.phantoms import STATS_PATH

    stats = json.loads(STATS_PATH.read_text())
    return {f: float(stats["prevalence"][f]) for f in FINDINGS}, "NIH prevalence"


def import_xrv(ws: Workspace | None, source: Path, *, targets: list[str] | None = None,
               calibrate: bool = False, strict: bool = False, out: Path | None = None,
               force: bool = False) -> dict[str, Any]:
    """Convert ``source`` and write it as ``ws``'s round-0 (or to ``out``); return a summary."""
    source = Path(source)
    state, meta_targets = read_source(source)
    if targets is None:
        targets = meta_targets
    prior, prior_from = _prior(ws if out is None else None)
    imported = convert(state, targets, calibrate=calibrate, strict=strict, prior=prior,
                       source=str(source))
    digest = file_sha256(source)
    store_size = XRV_IMAGE_SIZE
    if ws is not None and out is None and ws.store.path.exists():
        store_size = ws.store.image_size()
    config = {"source_sha256": digest, "targets": imported.targets, "calibrate": calibrate,
              "strict": strict}
    summary: dict[str, Any] = {
        "round": 0, "source": str(source), "mapped": len(FINDINGS) - len(imported.mapping.missing),
        "missing": imported.mapping.missing, "unused": imported.mapping.unused,
        "untrained": imported.mapping.untrained, "calibrated": calibrate,
        "fresh_rows_prior": prior_from if imported.mapping.missing else None,
    }
    meta = model_meta(
        "densenet121", XRV_IMAGE_SIZE, store_size, 0.5, 1.0 / 2048.0, 0, STAGE,
        init=f"xrv:{source.name}",
        source={"kind": "torchxrayvision", "file": source.name, "sha256": digest,
                "targets": imported.targets, "mapping": imported.mapping.to_dict(),
                "op_threshs": imported.op_threshs, "calibrated": calibrate},
    )
    meta["normalisation"] = xrv_normalisation()
    # What contrast rounds inherit (INHERITED in stages/contrast): kacl's focal defaults.
    meta["config"] = {"loss": "focal", "focal_alpha": 0.25, "focal_gamma": 2.0,
                      "augment": True}
    tensors = {IMAGE_PREFIX + k: v for k, v in imported.model.state_dict().items()}
    if out is not None:
        save_checkpoint(out, tensors, meta)
        return {**summary, "checkpoint": str(out)}

    assert ws is not None
    ws.init()
    with ws.stage_run(STAGE, config, digest, round_=0, force=force) as run:
        if run.skipped:
            return run.result()
        target = ws.checkpoint_dir(0)
        if target.exists() and not force:
            raise KaclError(f"{target} exists (another pretrain or import): --force replaces it")
        meta["run_id"] = run.run_id
        save_checkpoint(target, tensors, meta)
        run.summary = {**summary, "checkpoint": str(target), "run_id": run.run_id}
    return run.summary
