"""Which round? One answer for every stage and command.

A round K is a trained checkpoint (``checkpoints/round-K``: 0 from pretrain, 1.. from
contrast) and what was derived from it (cam_boxes, radiomics, metrics of round K).

- :func:`resolve_round`: a round whose checkpoint has finished (default: the latest), for the
  stages that load it (cam, predict);
- :func:`cam_round`: a round with Grad-CAM boxes (default: the latest), for radiomics;
- :func:`evaluation_rounds`: ``K | latest | all`` of ``kacl evaluate``: rounds with a
  checkpoint or with cam_boxes on the split.
"""

from __future__ import annotations

from kacl_cli.errors import InputError, NotReadyError
from kacl_cli.workspace import Workspace

LATEST = "latest"
ALL = "all"


def resolve_round(ws: Workspace, round_: int | None) -> int:
    """The requested round, or the latest finished one; one-line errors when there is none."""
    if round_ is None:
        rounds = ws.finished_rounds()
        if not rounds:
            raise NotReadyError(
                f"no trained checkpoint in {ws.checkpoints}: run `kacl pretrain` first"
            )
        return rounds[-1]
    if round_ < 0:
        raise InputError(f"--round {round_}: rounds are 0 (pretrain), 1, 2, ...")
    if round_ not in ws.finished_rounds():
        hint = "`kacl pretrain`" if round_ == 0 else "`kacl pretrain`, then `kacl contrast`"
        raise NotReadyError(
            f"no finished checkpoint for round {round_} at {ws.checkpoint_dir(round_)}: "
            f"run {hint} first"
        )
    return round_


def cam_round(ws: Workspace, round_: int | None) -> int:
    """The requested round, or the latest round with Grad-CAM boxes."""
    if round_ is not None:
        return round_
    rows = ws.catalog.query("SELECT max(round) FROM cam_boxes")
    if not rows or rows[0][0] is None:
        raise NotReadyError("no Grad-CAM boxes in this workspace: run `kacl cam --round 0` first")
    return int(rows[0][0])


def available_rounds(ws: Workspace, split: str) -> list[int]:
    """Rounds with a finished checkpoint or with cam_boxes rows on the split."""
    rounds = set(ws.finished_rounds())
    rows = ws.catalog.query(
        "SELECT DISTINCT c.round FROM cam_boxes c JOIN images i USING (image_id) "
        "WHERE i.split = ?", [split])
    rounds.update(int(r[0]) for r in rows)
    return sorted(rounds)


def evaluation_rounds(ws: Workspace, spec: int | str, split: str) -> list[int]:
    """``K`` | ``latest`` | ``all`` -> the rounds to evaluate on ``split``.

    ``latest`` is the latest finished checkpoint (else the latest round with cam_boxes);
    ``all`` every round with either.
    """
    if isinstance(spec, int):
        if spec < 0:
            raise InputError("--round must be >= 0")
        return [spec]
    rounds = available_rounds(ws, split)
    if not rounds:
        raise NotReadyError(
            f"nothing to evaluate in {ws.root}: no checkpoint and no cam_boxes on split "
            f"{split!r} (run `kacl pretrain` first)")
    if spec == LATEST:
        finished = ws.finished_rounds()
        return [finished[-1] if finished else rounds[-1]]
    if spec == ALL:
        return rounds
    raise InputError(f"--round must be a number, {LATEST!r} or {ALL!r}, got {spec!r}")
