"""The registry of shardable stages: each one's hooks, in merge order.

``kacl merge --stage`` offers exactly these names, and the merge finds part directories
(``WS/parts/<name>[-round-K]``) of exactly these stages.
"""

from __future__ import annotations

from typing import Any

from kacl_cli.errors import InputError
from kacl_cli.sharding.hooks import StageHooks
from kacl_cli.sharding.merge import merge
from kacl_cli.stages.cam.parts import HOOKS as CAM
from kacl_cli.stages.prepare.parts import HOOKS as PREPARE
from kacl_cli.stages.radiomics.parts import HOOKS as RADIOMICS
from kacl_cli.workspace import Workspace

# merge order: a stage's parts are cut from what the stages before it produced
SHARDABLE: tuple[StageHooks, ...] = (PREPARE, CAM, RADIOMICS)
NAMES: tuple[str, ...] = tuple(h.name for h in SHARDABLE)


def hooks_of(name: str) -> StageHooks:
    """The hooks of a shardable stage, by name."""
    for h in SHARDABLE:
        if h.name == name:
            return h
    raise InputError(f"--stage must be one of {', '.join(NAMES)}, got {name!r}")


def merge_parts(ws: Workspace, stage: str | None = None, round_: int | None = None, *,
                clean: bool = False) -> dict[str, Any]:
    """``kacl merge``: the parts of one stage (by name), or of every shardable stage."""
    return merge(ws, SHARDABLE if stage is None else hooks_of(stage), round_=round_,
                 clean=clean)
