"""Checkpoints: ``model.safetensors`` (tensors only) + ``meta.json``, written atomically.

A checkpoint directory is written under a temporary name and renamed into place, so a killed
run never leaves a half-written ``round-K`` that ``latest_round()`` would pick up. Loading
never unpickles objects (safetensors), and a checkpoint of another vocabulary, backbone or
image format is refused with one line (:class:`CheckpointError`).

Tensor key prefixes: ``image_net.`` (the classifier), ``objective.`` (trainable parts of a
training objective, e.g. contrast's radiomics encoder; ignored by inference).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kacl_cli import __version__
from kacl_cli.errors import CheckpointError
from kacl_cli.findings import FINDINGS
from kacl_cli.models.checkpoint_files import KIND, META_FILE, MODEL_FILE
from kacl_cli.models.image_net import ImageNet, build_image_net, load_weights
from kacl_cli.workspace import json_default

IMAGE_PREFIX = "image_net."
OBJECTIVE_PREFIX = "objective."


def _replace_dir(tmp: Path, directory: Path) -> None:
    """Move a finished temp dir into place; the old one (if any) is only removed afterwards."""
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(directory: Path | str, tensors: dict[str, torch.Tensor],
                    meta: dict[str, Any]) -> Path:
    """Write ``tensors`` and ``meta`` to ``directory`` atomically (temp dir + rename)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        save_file(flat, str(tmp / MODEL_FILE))
        full_meta = {"kind": KIND, "version": __version__, **meta}
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2, default=json_default))
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _as_dir(path: Path | str) -> Path:
    path = Path(path)
    if path.is_file() and path.name in (MODEL_FILE, META_FILE):
        return path.parent
    return path


def read_meta(directory: Path | str) -> dict[str, Any]:
    """``meta.json`` of a checkpoint, refusing missing, half-written and foreign ones."""
    directory = _as_dir(directory)
    if not directory.exists():
        raise CheckpointError(f"no checkpoint at {directory}")
    if directory.is_file():
        raise CheckpointError(
            f"{directory}: not a kacl checkpoint (expected a directory with {MODEL_FILE} and "
            f"{META_FILE})"
        )
    if not (directory / META_FILE).is_file() or not (directory / MODEL_FILE).is_file():
        raise CheckpointError(
            f"{directory}: incomplete checkpoint (needs {MODEL_FILE} and {META_FILE}; "
            "a killed run? re-run the stage)"
        )
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{directory / META_FILE}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise CheckpointError(f"{directory}: not a kacl checkpoint (meta.json kind is not {KIND})")
    return meta


def read_checkpoint(directory: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a checkpoint directory."""
    from safetensors.torch import load_file

    directory = _as_dir(directory)
    meta = read_meta(directory)
    try:
        tensors = load_file(str(directory / MODEL_FILE))
    except Exception as exc:  # safetensors raises SafetensorError/OSError on damage
        raise CheckpointError(
            f"{directory / MODEL_FILE}: unreadable tensors ({type(exc).__name__})"
        ) from None
    return tensors, meta


def check_meta(meta: dict[str, Any], source: str) -> None:
    """Refuse a checkpoint whose vocabulary or input format this kacl cannot use."""
    findings = meta.get("findings")
    if list(findings or []) != list(FINDINGS):
        raise CheckpointError(
            f"{source}: trained on another vocabulary ({len(findings or [])} findings, "
            f"expected kacl's {len(FINDINGS)} in FINDINGS order)"
        )
    in_chans = meta.get("in_chans", 1)
    if isinstance(in_chans, bool) or not isinstance(in_chans, int):
        raise CheckpointError(f"{source}: meta.json in_chans {in_chans!r} is not a whole number")
    if in_chans != 1:
        raise CheckpointError(f"{source}: expects {in_chans} input channels, not 1")
    for key in ("backbone", "image_size", "normalisation"):
        if key not in meta:
            raise CheckpointError(f"{source}: meta.json lacks {key!r}")
    check_meta_values(meta, source)


def _whole(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(
        value)


def check_meta_values(meta: dict[str, Any], source: str) -> None:
    """Refuse crafted meta.json values (issue 15) with one line instead of a torch error."""
    if not isinstance(meta.get("backbone"), str):
        raise CheckpointError(f"{source}: meta.json backbone {meta.get('backbone')!r} is not "
                              "a name")
    for key in ("image_size", "store_size"):
        if key in meta and meta[key] is not None and not _whole(meta[key], 8, 8192):
            raise CheckpointError(f"{source}: meta.json {key} {meta[key]!r} is not a size in "
                                  "8..8192 px")
    norm = meta.get("normalisation")
    if not (isinstance(norm, dict) and _finite(norm.get("mean")) and _finite(norm.get("std"))
            and norm["std"] > 0):
        raise CheckpointError(f"{source}: meta.json normalisation {norm!r} is not "
                              "{'mean': number, 'std': positive number}")


def image_net_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(IMAGE_PREFIX):]: v for k, v in tensors.items() if k.startswith(IMAGE_PREFIX)}


def load_image_net(
    directory: Path | str, device: torch.device | str = "cpu", *, channels_last: bool = True
) -> tuple[ImageNet, dict[str, Any]]:
    """Rebuild the classifier of a checkpoint (``objective.`` tensors are ignored), in eval mode.

    Channels-last by default, as training runs: the cam stage's forward was 1.7-1.8x faster on
    the CPU with it (tiny net, 128 px), and the gray input (C = 1) needs no conversion. Export
    asks for the plain layout.
    """
    tensors, meta = read_checkpoint(directory)
    source = str(_as_dir(directory))
    check_meta(meta, source)
    own = image_net_tensors(tensors)
    if not own:
        raise CheckpointError(f"{source}: holds no {IMAGE_PREFIX}* tensors")
    model = build_image_net(str(meta["backbone"]), n_classes=len(meta["findings"]))
    load_weights(model, own, source, allow_missing_head=False)
    model = model.to(device).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model, meta


def model_meta(backbone: str, image_size: int, store_size: int, mean: float, std: float,
               round_: int, stage: str, **extra: Any) -> dict[str, Any]:
    """The meta.json fields every checkpoint carries (metrics are added by the loop)."""
    return {
        "kind": KIND,
        "backbone": backbone,
        "findings": list(FINDINGS),
        "image_size": int(image_size),
        "store_size": int(store_size),
        "in_chans": 1,
        "normalisation": {"mean": float(mean), "std": float(std)},
        "round": int(round_),
        "stage": stage,
        "version": __version__,
        **extra,
    }


def preprocess(images: torch.Tensor, meta: dict[str, Any],
               device: torch.device | str | None = None) -> torch.Tensor:
    """Pixels -> the network's input: B x 1 x s x s float, resized, scaled, normalised.

    ``images`` is B x S x S or B x 1 x S x S, either uint8 (0..255) or float in 0..1 (what
    the augmenting dataset yields). Resizing (when S != meta image_size) is antialiased
    bilinear, done batched on ``device``.
    """
    x = images if device is None else images.to(device, non_blocking=True)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    size = int(meta["image_size"])
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
    norm = meta["normalisation"]
    return (x - float(norm["mean"])) / float(norm["std"])
