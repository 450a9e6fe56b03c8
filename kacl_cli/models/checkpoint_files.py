"""The names of a checkpoint's files, free of torch: the workspace and the stages find
checkpoints by them without loading a model (:mod:`kacl_cli.models.checkpoint` writes them)."""

from __future__ import annotations

KIND = "kacl-checkpoint"
MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
