"""The names of a checkpoint's files and their content hash, free of torch: the workspace and
the stages find and fingerprint checkpoints without loading a model
(:mod:`kacl_cli.models.checkpoint` writes them)."""

from __future__ import annotations

import hashlib
from pathlib import Path

KIND = "kacl-checkpoint"
MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"


def checkpoint_fingerprint(directory: Path) -> str:
    """Content hash of a checkpoint (tensors + meta): a retrained round-K gets a new hash."""
    h = hashlib.sha256()
    for name in (MODEL_FILE, META_FILE):
        with open(directory / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]
