"""``kacl merge`` and ``run_sharded``: fold a stage's part files into the workspace.

Generic: every stage-specific step comes from the stage's hooks
(:class:`~kacl_cli.sharding.hooks.StageHooks`, exported by ``stages/<stage>/parts.py`` and
listed in ``kacl_cli.stages.shardable``). The parts themselves (the ``--shard i/n`` rule,
opening and seeding a part) are :mod:`kacl_cli.sharding.parts`.

Merge rules (:func:`merge`): all ``n`` shards present and finished with the same settings;
two parts claiming the same keys must agree (else: refused); parts cut from a prepared
workspace must have been cut from its current image set; nothing is written until every check
passed; merging again changes nothing (keys are replaced, never appended, and a merge whose
content is already in the workspace is a no-op).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import re
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from kacl_cli import __version__
from kacl_cli.errors import KaclError
from kacl_cli.sharding.hooks import StageHooks
from kacl_cli.sharding.parts import ROUND_INFIX, Shard, attach, run_part, select, stage_dir
from kacl_cli.store import Store
from kacl_cli.workspace import Workspace, stable_json

COPY_BLOCK = 512  # images (or maps) per HDF5 read/write while merging


# -- summaries -------------------------------------------------------------------------------
# numbers that are the same in every part (settings, global counts), not per-shard amounts
_SAME = {"round", "threshold", "features", "workers", "size", "seed", "difficulty", "enrich",
         "min_prob", "csv_rows", "missing", "unlisted", "over_limit", "epochs"}
_PART_PATH = re.compile(r"/parts/[^/]+/shard-\d+-of-\d+(?=/|$)")


def combine_summaries(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One summary for the parts of a job: per-shard counts summed (nested count dicts too),
    settings and global counts from the first part, seconds = the slowest part."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for p in parts for k in p):
        values = [p[key] for p in parts if key in p]
        first = values[0]
        if key.endswith("seconds") and all(isinstance(v, (int, float)) for v in values):
            out[key] = max(values)
        elif key in _SAME or isinstance(first, bool):
            out[key] = first
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = sum(values)
        elif all(isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values())
                 for v in values):
            acc: dict[str, Any] = {}
            for v in values:
                for k, x in v.items():
                    acc[k] = acc.get(k, 0) + x
            out[key] = acc
        elif isinstance(first, str):  # a path inside a part names the workspace's file
            out[key] = _PART_PATH.sub("", first)
        else:
            out[key] = first
    return out


# -- a stage run as parts ----------------------------------------------------------------------
def run_sharded(ws: Workspace, hooks: StageHooks, round_: int | None, shard: Shard | None,
                work: Callable[[Workspace], dict[str, Any]], *, device: str = "auto",
                force: bool = False) -> dict[str, Any]:
    """A stage with ``--shard i/n`` (one part, merged later by ``kacl merge``), or under
    torchrun (rank r of N runs shard r/N, rank 0 merges all N parts, the others wait).

    ``work`` is the stage's inner run (never its dispatcher), called once on the part.
    Under torchrun every rank returns a summary of the whole job (the parts' summaries
    combined); a failure on any rank fails every rank with that rank's message.
    """
    if shard is not None:
        return run_part(ws, hooks, round_, shard, work, force=force)
    from kacl_cli.training import distributed

    ctx = distributed.init(device)
    sh = Shard(ctx.rank, ctx.world_size)
    result: dict[str, Any] | None = None
    error: str | None = None
    failure: BaseException | None = None
    try:
        result = run_part(ws, hooks, round_, sh, work, force=force)
    except Exception as exc:  # told to every rank below, then re-raised here
        failure = exc
        error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    outcomes = distributed.all_gather_object((error, result), ctx)
    if failure is not None:
        raise failure
    for r, (e, _) in enumerate(outcomes):
        if e:
            raise KaclError(f"{hooks.name}: rank {r} failed: {e}")
    merged: dict[str, Any] | str | None = None
    if ctx.is_main:
        try:
            merged = merge(ws, hooks, round_=round_, count=ctx.world_size)["merged"][0]
        except KaclError as exc:
            merged = str(exc)
    merged = distributed.broadcast_object(merged, ctx)
    if isinstance(merged, str):
        raise KaclError(merged)
    parts = [o[1] for o in outcomes]
    summary = combine_summaries(parts)  # type: ignore[arg-type]
    summary.update(merged.get("summary") or {})  # type: ignore[union-attr]
    summary["ranks"] = ctx.world_size
    summary["skipped"] = all(p.get("skipped") for p in parts) and not merged["changed"]  # type: ignore[index,union-attr]
    for key in ("shard", "part"):
        summary.pop(key, None)
    return summary


# -- merge -----------------------------------------------------------------------------------
@dataclass
class Part:
    """One shard's part directory, and its finished run once checked."""

    shard: Shard
    root: Path
    run: dict[str, Any] = field(default_factory=dict)  # its finished run (config, summary...)

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.duckdb"

    @property
    def store(self) -> Store:
        return Store(self.root / "store.h5")


@dataclass
class Group:
    """The parts of one stage and round, being merged; ``plan`` is what the hooks decided."""

    hooks: StageHooks
    round: int | None
    parts: list[Part]
    prefix: str  # staging table prefix in the merge connection
    plan: dict[str, Any] = field(default_factory=dict)

    @property
    def stage(self) -> str:
        return self.hooks.name

    @property
    def name(self) -> str:
        return self.stage + ("" if self.round is None else f" round {self.round}")

    @property
    def count(self) -> int:
        return self.parts[0].shard.count


def _stage_round(hooks: StageHooks, dirname: str) -> tuple[bool, int | None]:
    """Whether ``dirname`` is a part directory of ``hooks``' stage, and its round."""
    if dirname == hooks.name:
        return True, None
    head, sep, tail = dirname.partition(ROUND_INFIX)
    if head == hooks.name and sep and tail.isdigit():
        return True, int(tail)
    return False, None


def discover(ws: Workspace, stages: Sequence[StageHooks], round_: int | None = None
             ) -> list[tuple[StageHooks, int | None, Path]]:
    """Part directories under ``WS/parts`` of ``stages`` (and ``round_``), in merge order:
    the order of ``stages``, then by round."""
    found = []
    if ws.parts.is_dir():
        for d in ws.parts.iterdir():
            if not d.is_dir():
                continue
            for hooks in stages:
                ok, r = _stage_round(hooks, d.name)
                if ok and (round_ is None or r == round_):
                    found.append((hooks, r, d))
    order = {h.name: k for k, h in enumerate(stages)}
    return sorted(found, key=lambda t: (order[t[0].name], -1 if t[1] is None else t[1]))


def _collect(stage: str, round_: int | None, d: Path, count: int | None) -> list[Part]:
    """The parts of a stage directory, checked complete (all n shards, each finished)."""
    parts = []
    for p in sorted(d.iterdir()):
        shard = Shard.from_dirname(p.name)
        if shard is not None and p.is_dir() and (count is None or shard.count == count):
            parts.append(Part(shard, p))
    name = stage + ("" if round_ is None else f" round {round_}")
    if not parts:
        raise KaclError(f"{name}: no shard parts in {d}")
    counts = sorted({p.shard.count for p in parts})
    if len(counts) > 1:
        raise KaclError(f"{name}: parts of different shard counts ({', '.join(map(str, counts))}"
                        f") in {d}; delete the stale ones and merge again")
    n = counts[0]
    have = {p.shard.index for p in parts}
    missing = [f"{i}/{n}" for i in range(n) if i not in have]
    if missing:
        raise KaclError(f"{name}: missing shard(s) {', '.join(missing)} of {n} "
                        f"({len(have)} of {n} present in {d}); run them, then merge again")
    parts.sort(key=lambda p: p.shard.index)
    for p in parts:
        p.run = _finished_run(p, stage, round_, name)
    hashes = {p.run["config_hash"] for p in parts}
    if len(hashes) > 1:
        a, b = parts[0], next(p for p in parts if p.run["config_hash"] != parts[0].run[
            "config_hash"])
        raise KaclError(f"{name}: shards {a.shard.label} and {b.shard.label} ran with different "
                        "settings; re-run the odd ones with the same options, then merge")
    return parts


def _finished_run(p: Part, stage: str, round_: int | None, name: str) -> dict[str, Any]:
    """The part's last run of the stage; refused unless it finished."""
    if not p.catalog.exists():
        raise KaclError(f"{name}: shard {p.shard.label} has no catalog in {p.root}: "
                        "it never ran; run it, then merge again")
    with duckdb.connect(":memory:") as con:
        attach(con, p.catalog, "part", wait_s=2.0)
        row = con.execute(
            "SELECT run_id, status, config_json, config_hash, input_fingerprint, "
            "summary_json FROM part.runs WHERE stage = ? AND round IS NOT DISTINCT FROM ? "
            "ORDER BY started_at DESC LIMIT 1", [stage, round_]).fetchone()
    if row is None or row[1] != "done":
        state = "never ran" if row is None else f"its last run is {row[1]}"
        raise KaclError(f"{name}: shard {p.shard.label} has not finished ({state}); "
                        "run it again, then merge")
    return {"run_id": row[0], "config_json": row[2], "config_hash": row[3],
            "fingerprint": row[4], "summary": json.loads(row[5] or "{}")}


def merge(ws: Workspace, stages: StageHooks | Sequence[StageHooks], *,
          round_: int | None = None, count: int | None = None, clean: bool = False
          ) -> dict[str, Any]:
    """Fold the part files of ``stages`` (one stage's hooks, or several in merge order) into
    the workspace (see the module docstring for the rules).

    Every group (stage + round) is checked before anything is written; returns
    ``{"merged": [per-group result], "changed": bool, ...}``.
    """
    only = isinstance(stages, StageHooks)
    hooks_list = [stages] if isinstance(stages, StageHooks) else list(stages)
    found = discover(ws, hooks_list, round_)
    if not found:
        what = " ".join(x for x in (only and f"--stage {hooks_list[0].name}",
                                    round_ is not None and f"--round {round_}") if x)
        raise KaclError(f"nothing to merge: no part files under {ws.parts}"
                        + (f" for {what}" if what else ""))
    groups = [Group(h, r, _collect(h.name, r, d, count), f"g{k}_") for k, (h, r, d) in
              enumerate(found)]
    if any(g.hooks.needs_workspace for g in groups):
        ws.require()
    started = time.perf_counter()
    with duckdb.connect(":memory:") as con:
        _check(con, ws, groups)
        if any(g.plan["changed"] for g in groups):
            _write(con, ws, groups)
    results = []
    for g in groups:
        if g.hooks.after is not None:
            g.hooks.after(ws, g)
        results.append({"stage": g.stage, "round": g.round, "shards": g.count,
                        "changed": g.plan["changed"], "rows": g.plan.get("rows", {}),
                        "summary": g.plan.get("summary", {}),
                        "parts": str(stage_dir(ws, g.stage, g.round))})
        if clean:
            shutil.rmtree(stage_dir(ws, g.stage, g.round), ignore_errors=True)
    return {"workspace": str(ws.root), "merged": results,
            "changed": any(r["changed"] for r in results),
            "seconds": round(time.perf_counter() - started, 3), "cleaned": clean}


def _check(con: duckdb.DuckDBPyConnection, ws: Workspace, groups: list[Group]) -> None:
    """Stage every group's parts and plan it against the workspace (read only)."""
    for g in groups:
        g.hooks.stage(con, ws, g)
    has_ws = ws.catalog.path.exists()
    if has_ws:
        attach(con, ws.catalog.path, "ws")
    try:
        for g in groups:
            g.hooks.plan(con, ws, g, has_ws)
    finally:
        if has_ws:
            con.execute("DETACH ws")


def _write(con: duckdb.DuckDBPyConnection, ws: Workspace, groups: list[Group]) -> None:
    """Data first (pixels, maps: catalog rows imply their data exists), then every changed
    group's rows and runs in one catalog transaction."""
    for g in groups:
        if g.plan["changed"] and g.hooks.write_data is not None:
            g.hooks.write_data(con, ws, g)
    if not ws.catalog.path.exists():
        ws.init()
    attach(con, ws.catalog.path, "ws", read_only=False)
    try:
        con.execute("BEGIN")
        for g in groups:
            if g.plan["changed"]:
                g.hooks.write_rows(con, ws, g)
                _write_runs(con, g)
        con.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            con.execute("ROLLBACK")
        raise
    finally:
        con.execute("DETACH ws")


# -- tools for the stages' hooks ---------------------------------------------------------------
def stage_tables(con: duckdb.DuckDBPyConnection, g: Group,
                 selects: dict[str, str], params: dict[str, list] | None = None) -> None:
    """Copy each part's rows (``selects``: staging name -> SELECT over alias ``part``) into
    ``<prefix><name>`` with a ``part`` column, plus its finished runs and their errors."""
    selects = {**selects,
               "runs": "SELECT * FROM part.runs WHERE status = 'done'",
               "errors": "SELECT e.* FROM part.errors e JOIN part.runs r USING (run_id) "
                         "WHERE r.status = 'done'"}
    params = params or {}
    for k, p in enumerate(g.parts):
        attach(con, p.catalog, "part", wait_s=2.0)
        try:
            for name, sql in selects.items():
                target = g.prefix + name
                body = f"SELECT {p.shard.index} AS part, q.* FROM ({sql}) q"
                if k == 0:
                    con.execute(f"CREATE TABLE {target} AS {body}", params.get(name, []))
                else:
                    con.execute(f"INSERT INTO {target} {body}", params.get(name, []))
        finally:
            con.execute("DETACH part")


def overlaps(con: duckdb.DuckDBPyConnection, table: str, keys: str, cols: str,
             what: str, g: Group) -> None:
    """Refuse keys claimed by two parts with different content; drop exact duplicates."""
    bad = con.execute(
        f"SELECT {keys}, list(DISTINCT part ORDER BY part) FROM (SELECT DISTINCT part, {keys}, "
        f"({cols}) AS content FROM {table}) GROUP BY {keys} HAVING count(DISTINCT content) > 1 "
        "LIMIT 1").fetchone()
    if bad:
        parts = ", ".join(f"{i}/{g.count}" for i in bad[-1])
        key = "/".join(str(v) for v in bad[:-1])
        raise KaclError(f"{g.name}: overlapping parts: shards {parts} both hold {what} {key} "
                        "with different content; delete the wrong part and merge again")
    con.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT * FROM {table} "
                f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY part) = 1")


def coverage(con: duckdb.DuckDBPyConnection, ws: Workspace, g: Group) -> list[str]:
    """Parts cut from a prepared workspace must be the slices of its current images."""
    ids = [r[0] for r in ws.catalog.query("SELECT image_id FROM images ORDER BY image_id")]
    for p in g.parts:
        have = [r[0] for r in con.execute(
            f"SELECT image_id FROM {g.prefix}ids WHERE part = ? ORDER BY image_id",
            [p.shard.index]).fetchall()]
        if have != select(ids, p.shard):
            raise KaclError(f"{g.name}: shard {p.shard.label} was cut from another image set "
                            f"({len(have)} images; the workspace's slice has "
                            f"{len(select(ids, p.shard))}): the workspace changed since it "
                            f"ran; run it again (--force), then merge")
    return ids


def changes(con: duckdb.DuckDBPyConnection, new: str, old: str, cols: str) -> int:
    """Rows that differ between a staged table and the workspace's (both directions)."""
    return int(con.execute(
        f"SELECT (SELECT count(*) FROM (SELECT {cols} FROM {new} EXCEPT SELECT {cols} "
        f"FROM {old})) + (SELECT count(*) FROM (SELECT {cols} FROM {old} EXCEPT SELECT {cols} "
        f"FROM {new}))").fetchone()[0])


def columns(con: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    return [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]


def collist(cols: list[str]) -> str:
    """Quoted column names, comma-separated."""
    return ", ".join('"' + c.replace('"', '""') + '"' for c in cols)


# -- runs ----------------------------------------------------------------------------------------
def _write_runs(con: duckdb.DuckDBPyConnection, g: Group) -> None:
    """The parts' finished runs (with their shard) and errors, plus one run for the merge.

    The merge's run carries the parts' config, so readers find its settings (radiomics);
    with ``keeps_fingerprint`` also their input fingerprint, so an unsharded re-run is skipped.
    """
    pre = g.prefix
    new = f"(SELECT run_id FROM {pre}runs WHERE run_id NOT IN (SELECT run_id FROM ws.runs))"
    con.execute(f"INSERT INTO ws.errors SELECT * EXCLUDE (part) FROM {pre}errors "
                f"WHERE run_id IN {new}")
    con.execute(f"INSERT INTO ws.runs SELECT * EXCLUDE (part) REPLACE "
                f"(part::VARCHAR || '/{g.count}' AS shard) FROM {pre}runs WHERE run_id IN {new}")
    first = g.parts[0].run
    prints = sorted({p.run["fingerprint"] for p in g.parts})
    fingerprint = (prints[0] if g.hooks.keeps_fingerprint and len(prints) == 1 else
                   "merged:" + hashlib.sha256("|".join(prints).encode()).hexdigest()[:16])
    summary = {**g.plan.get("summary", {}), "merged_from": g.count,
               "parts": [p.run["run_id"] for p in g.parts]}
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    con.execute("INSERT INTO ws.runs (run_id, stage, round, shard, config_json, config_hash, "
                "input_fingerprint, status, started_at, finished_at, seconds, version, "
                "summary_json) VALUES (?, ?, ?, NULL, ?, ?, ?, 'done', ?, ?, 0, ?, ?)",
                [f"{g.stage}-merge-{uuid.uuid4().hex[:10]}", g.stage, g.round,
                 first["config_json"], first["config_hash"], fingerprint, now, now,
                 __version__, stable_json(summary)])


__all__ = ["COPY_BLOCK", "Group", "Part", "changes", "collist", "columns", "combine_summaries",
           "coverage", "discover", "merge", "overlaps", "run_sharded", "stage_tables"]
