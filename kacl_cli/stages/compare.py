"""`kacl compare A B` as a stage: resolve two ``workspace[:round]`` targets, refuse what
cannot be paired (other test images, another vocabulary, a missing round), make sure both
rounds have their cam boxes, and run the paired bootstrap (pure: evaluate/paired.py). The
result is recorded in A's catalog (evaluate/comparisons.py) for evaluate's HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kacl_cli.errors import KaclError


def parse_target(text: str) -> tuple[Path, int | None]:
    """``workspace[:round]`` (a trailing ``:N`` is a round; the latest round otherwise)."""
    head, sep, tail = text.rpartition(":")
    if sep and tail.isdigit() and head:
        return Path(head), int(tail)
    return Path(text), None


def load_target(text: str, split: str):
    from kacl_cli.stages.evaluate.data import load_eval_data
    from kacl_cli.stages.evaluate.stage import ensure_cams
    from kacl_cli.workspace import Workspace

    path, round_ = parse_target(text)
    ws = Workspace(path)
    ws.require()
    rounds = ws.finished_rounds()
    if round_ is None:
        if not rounds:
            raise KaclError(f"{text}: no trained round in {path}")
        round_ = rounds[-1]
    elif round_ not in rounds:
        raise KaclError(f"{text}: round {round_} is missing in {path} (finished rounds: "
                        f"{', '.join(map(str, rounds)) or 'none'})")
    ensure_cams(ws, round_, split)
    return load_eval_data(ws, round_, split), round_


def _vocabulary(text: str) -> tuple[str, ...]:
    from kacl_cli.models.checkpoint import read_meta
    from kacl_cli.workspace import Workspace

    path, round_ = parse_target(text)
    ws = Workspace(path)
    rounds = ws.finished_rounds()
    r = rounds[-1] if round_ is None and rounds else round_
    if r is None or r not in rounds:
        return ()  # load_target says what is missing
    meta = read_meta(ws.checkpoint_dir(r))
    return tuple(meta.get("findings") or meta.get("labels") or ())


def _split_ids(text: str, split: str) -> list[str]:
    from kacl_cli.workspace import Workspace

    ws = Workspace(parse_target(text)[0])
    ws.require()
    return [r[0] for r in ws.catalog.query(
        "SELECT image_id FROM images WHERE split = ? ORDER BY image_id", [split])]


def compare(a: str, b: str, split: str = "test", n_boot: int = 2000, seed: int = 0,
            record: bool = True) -> dict[str, Any]:
    """A - B (see module docstring); with ``record``, the result is also kept in A's catalog
    for evaluate's "Paired comparisons" report section. A refused compare records nothing."""
    from kacl_cli.stages.evaluate.paired import CompareError, pair_eval, paired_bootstrap

    va, vb = _vocabulary(a), _vocabulary(b)
    if va and vb and va != vb:
        raise CompareError("the two models predict different finding vocabularies")
    ia, ib = _split_ids(a, split), _split_ids(b, split)
    if ia != ib:  # refused before any cam run: the one line is all the user sees
        raise CompareError(
            f"the test images differ ({len(ia)} vs {len(ib)} images, or other ids): a paired "
            "comparison needs the same prepared data and split")
    da, ra = load_target(a, split)
    db, rb = load_target(b, split)
    res = paired_bootstrap(pair_eval(da, db), n_boot, seed)
    doc = {"a": a, "b": b, "round_a": ra, "round_b": rb, "split": split, "seed": seed, **res}
    if record:
        try:
            doc["recorded_in"] = _record(doc)
        except KaclError as exc:  # e.g. A busy with a writer: the result still stands
            doc["recorded_in"] = None
            doc["not_recorded"] = str(exc)
    return doc


def _record(doc: dict[str, Any]) -> str:
    """Keep the result in A's catalog (table ``comparisons``), where evaluate's report finds
    it; returns that catalog's path."""
    from kacl_cli.lock import workspace_lock
    from kacl_cli.stages.evaluate.comparisons import record
    from kacl_cli.workspace import Workspace

    ws = Workspace(parse_target(doc["a"])[0])
    with workspace_lock(ws.root, "compare"):  # a writer of A's catalog (kacl_cli.lock)
        record(ws, doc, parse_target(doc["b"])[0])
    return str(ws.catalog.path)
