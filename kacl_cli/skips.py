"""Honest skips: "done, skipping" only when the outputs on disk are the ones that run made.

A finished run with the same config and inputs is not enough: a later run with other settings
may have overwritten its checkpoint (``pretrain --seed 1``, ``--seed 2``, ``--seed 1``) or its
rows (radiomics default -> ``binWidth: 10`` -> default). So a training run records the content
hash of the checkpoint it wrote, and a skip re-checks it; a mismatch (or a run recorded before
the hash existed) re-runs the stage. Radiomics checks the settings hash of its rows instead
(``stages/radiomics/stage.py``), cam its rows (``_rows_intact``).
"""

from __future__ import annotations

from typing import Any

from kacl_cli.workspace import Workspace

HASH_KEY = "checkpoint_hash"


def checkpoint_hash(ws: Workspace, round_: int) -> str | None:
    """Content hash of checkpoint round-K, or None when it is missing or incomplete."""
    from kacl_cli.models.checkpoint_files import checkpoint_fingerprint

    if round_ not in ws.finished_rounds():
        return None
    try:
        return checkpoint_fingerprint(ws.checkpoint_dir(round_))
    except OSError:
        return None


def checkpoint_is_theirs(ws: Workspace, round_: int, summary: dict[str, Any]) -> bool:
    """True when checkpoint round-K is the one the finished run (``summary``) wrote."""
    recorded = summary.get(HASH_KEY)
    return recorded is not None and recorded == checkpoint_hash(ws, round_)
