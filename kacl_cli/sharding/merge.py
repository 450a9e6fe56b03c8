"""Sharded batch jobs: deterministic slices, per-shard part files, and ``kacl merge``.

Why parts: DuckDB admits one writing process per file and HDF5 has no concurrent writers, so
``--shard i/n`` jobs (SLURM array tasks, or the ranks of a torchrun job) never write the
workspace. Each writes its own *part*, a small workspace of its own, and ``kacl merge`` folds
the parts in, in one process.

Sharding rule: shard ``i`` of ``n`` (0-based) takes the items at positions ``i, i+n, i+2n, ...``
of the stage's items **sorted by image_id**. Strided rather than contiguous blocks so every
shard gets a similar mix (NIH ids are patient-ordered, and some patients have dozens of
follow-ups). Items are:

- ``prepare``: the CSV rows whose image file is present (after ``--limit``); the patient
  splits are still assigned over the whole CSV, so they equal an unsharded run's;
- ``cam`` / ``radiomics``: every image of the workspace; ``--split`` then applies inside the
  shard.

Layout: ``WS/parts/<stage>[-round-K]/shard-i-of-n/`` holds ``catalog.duckdb`` (the full schema)
and ``store.h5``, plus ``part.json`` (what it is). A ``prepare`` part stores its own images at
its own local rows (rows of the workspace are assigned at merge time, in the order an
unsharded run would have given them) and a ``shard_items`` table (image_id, position in the
unsharded ingest order). ``cam`` and ``radiomics`` parts work on a prepared workspace: their
catalog is seeded with the shard's rows of the input tables (read-only from the workspace),
their ``store.h5`` reaches the workspace's ``/images`` through an HDF5 external link (read
only: nothing writes the workspace while shards run), ``cam`` parts see the workspace's
``checkpoints/`` through a symlink, and ``cam`` maps are written at the workspace's rows.

Merge rules (:func:`merge`): all ``n`` shards present and finished with the same settings;
two parts claiming the same keys must agree (else: refused); ``cam``/``radiomics`` parts must
have been cut from the workspace's current image set; nothing is written until every check
passed; merging again changes nothing (keys are replaced, never appended, and a merge whose
content is already in the workspace is a no-op).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import h5py
import numpy as np

from kacl_cli import __version__
from kacl_cli.errors import InputError, KaclError, NotReadyError
from kacl_cli.store import IMAGES, Store, cam_key, read_rows
from kacl_cli.workspace import Workspace, stable_json

STAGES = ("prepare", "cam", "radiomics")
PART_FILE = "part.json"
SLICING = "sorted-image_id-strided/v1"
_SHARD_DIR = re.compile(r"^shard-(\d+)-of-(\d+)$")
_STAGE_DIR = re.compile(r"^(prepare|cam|radiomics)(?:-round-(\d+))?$")
COPY_BLOCK = 512  # images (or maps) per HDF5 read/write while merging

SHARD_ITEMS_SQL = (
    "CREATE TABLE IF NOT EXISTS shard_items (image_id VARCHAR PRIMARY KEY, "
    "position INTEGER NOT NULL)"
)


# -- the rule --------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise InputError(f"shard {self.index}/{self.count}: need 0 <= i < n")

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def dirname(self) -> str:
        return f"shard-{self.index}-of-{self.count}"


def as_shard(value: Shard | tuple[int, int] | str | None) -> Shard | None:
    """A Shard from ``"i/n"``, ``(i, n)`` (what ``cli.parse_shard`` returns) or None."""
    if value is None or isinstance(value, Shard):
        return value
    if isinstance(value, str):
        try:
            i_s, n_s = value.split("/")
            return Shard(int(i_s), int(n_s))
        except ValueError:
            raise InputError(f"--shard must look like i/n, got {value!r}") from None
    return Shard(int(value[0]), int(value[1]))


def select(ids: Sequence[str], shard: Shard) -> list[str]:
    """The ids of ``shard``: positions i, i+n, ... of ``ids`` sorted (the sharding rule)."""
    return sorted(ids)[shard.index::shard.count]


def stage_dir(ws: Workspace, stage: str, round_: int | None) -> Path:
    if stage not in STAGES:
        raise InputError(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}")
    return ws.parts / (stage if round_ is None else f"{stage}-round-{round_}")


def part_dir(ws: Workspace, stage: str, round_: int | None, shard: Shard) -> Path:
    return stage_dir(ws, stage, round_) / shard.dirname


# -- small helpers ---------------------------------------------------------------------------
def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def attach(con: duckdb.DuckDBPyConnection, path: Path, alias: str, *, read_only: bool = True,
           wait_s: float = 30.0) -> None:
    """ATTACH another catalog, waiting briefly while a writer holds its lock."""
    mode = " (READ_ONLY)" if read_only else ""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            con.execute(f"ATTACH {_sql_str(str(path))} AS {alias}{mode}")
            return
        except duckdb.Error as exc:
            msg = str(exc).splitlines()[0]
            if "lock" not in msg.lower() or time.monotonic() > deadline:
                raise KaclError(f"cannot open {path}: {msg} (is a shard still running?)") from None
            time.sleep(0.2)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock): shards that share one setup step take turns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


_IN_PART = [False]


@contextlib.contextmanager
def _inside_part() -> Iterator[None]:
    """While a stage runs on a part, it must not shard again (see :func:`ddp_sharding`)."""
    prev = _IN_PART[0]
    _IN_PART[0] = True
    try:
        yield
    finally:
        _IN_PART[0] = prev


def ddp_sharding() -> bool:
    """Whether a stage called now should shard itself by torchrun rank."""
    from kacl_cli.training import distributed  # torch: only for the stages that need it

    return not _IN_PART[0] and distributed.from_env().active


# -- parts -----------------------------------------------------------------------------------
def open_part(ws: Workspace, stage: str, round_: int | None, shard: Shard) -> Workspace:
    """Create (or reopen) the part workspace of one shard; see the module docstring."""
    root = part_dir(ws, stage, round_, shard)
    root.mkdir(parents=True, exist_ok=True)
    info = {"stage": stage, "round": round_, "shard": shard.label, "index": shard.index,
            "count": shard.count, "slicing": SLICING, "workspace": str(ws.root.resolve())}
    path = root / PART_FILE
    if not path.exists() or json.loads(path.read_text()) != info:
        path.write_text(json.dumps(info, indent=2) + "\n")
    part = Workspace(root)
    part.init()
    if stage != "prepare":
        _link_images(ws, part)
    if stage == "cam":
        _link_checkpoints(ws, part)
    return part


def _link_images(ws: Workspace, part: Workspace) -> None:
    """``part/store.h5:/images`` -> the workspace's ``/images`` (an HDF5 external link).

    Only ever followed by read-only opens (image reads); the part's own datasets (cam maps)
    are written through read-write opens that never traverse the link.
    """
    target = str(ws.store.path.resolve())
    with h5py.File(part.store.path, "a") as f:
        link = f.get(IMAGES, getlink=True)
        if isinstance(link, h5py.ExternalLink) and link.filename == target:
            return
        if link is not None:
            del f[IMAGES]
        f[IMAGES] = h5py.ExternalLink(target, "/" + IMAGES)


def _link_checkpoints(ws: Workspace, part: Workspace) -> None:
    link = part.checkpoints
    target = ws.checkpoints.resolve()
    if link.is_symlink():
        if Path(link.readlink()) == target:
            return
        link.unlink()
    elif link.exists():
        shutil.rmtree(link)
    link.symlink_to(target, target_is_directory=True)


# tables copied (shard's images only) from the workspace into a cam / radiomics part
_SEED = {
    "cam": ("images", "labels"),
    "radiomics": ("images", "labels", "gt_boxes", "box_supervision"),
}


def seed_part(ws: Workspace, part: Workspace, stage: str, round_: int | None,
              shard: Shard) -> int:
    """Refresh the part's copy of the inputs (the shard's images, their labels, boxes, CAM
    boxes of the round) from the workspace, read-only. Returns the shard's image count."""
    ids = [r[0] for r in ws.catalog.query("SELECT image_id FROM images ORDER BY image_id")]
    mine = select(ids, shard)
    if not mine:
        raise InputError(f"shard {shard.label}: no images (the workspace holds {len(ids)}; use "
                         "at most that many shards)")
    if stage == "radiomics" and round_ is not None and not ws.catalog.count(
            "cam_boxes", "round = ?", [round_]) and stage_dir(ws, "cam", round_).is_dir():
        raise NotReadyError(f"the cam parts of round {round_} are not merged yet: run "
                            f"`kacl merge --stage cam --round {round_}` first")
    with part.catalog.connect() as con:
        attach(con, ws.catalog.path, "src")
        try:
            con.execute("BEGIN")
            con.execute("CREATE OR REPLACE TEMP TABLE mine AS "
                        "SELECT unnest(?::VARCHAR[]) AS image_id", [mine])
            for table in _SEED[stage]:
                order = " ORDER BY t.rowid" if table == "gt_boxes" else ""
                con.execute(f"DELETE FROM {table}")
                con.execute(f"INSERT INTO {table} SELECT t.* FROM src.{table} t "
                            f"WHERE t.image_id IN (SELECT image_id FROM mine){order}")
            # meta: the workspace's keys, except the ones this part's own stage keeps
            own = "cam:%" if stage == "cam" else "\x00"
            con.execute("DELETE FROM meta WHERE key NOT LIKE ?", [own])
            con.execute("INSERT OR REPLACE INTO meta SELECT * FROM src.meta "
                        "WHERE key NOT LIKE ?", [own])
            if stage == "radiomics":
                con.execute("DELETE FROM cam_boxes")
                con.execute("INSERT INTO cam_boxes SELECT c.* FROM src.cam_boxes c WHERE "
                            "c.round = ? AND c.image_id IN (SELECT image_id FROM mine)",
                            [round_])
            con.execute("COMMIT")
        finally:
            con.execute("DETACH src")
    return len(mine)


def take_prepare_items(ws: Workspace, entries: list[Any], shard: Shard | tuple[int, int]
                       ) -> list[Any]:
    """``prepare``'s hook: keep the shard's entries (objects with ``image_id``, in ingest
    order) and record each kept entry's position in that order, for the merge's rows."""
    shard = as_shard(shard)
    assert shard is not None
    mine = set(select([e.image_id for e in entries], shard))
    kept = [(pos, e) for pos, e in enumerate(entries) if e.image_id in mine]
    with ws.catalog.connect() as con:
        con.execute("BEGIN")
        con.execute(SHARD_ITEMS_SQL)
        con.execute("DELETE FROM shard_items")
        con.execute("INSERT INTO shard_items SELECT unnest(?::VARCHAR[]), unnest(?::INTEGER[])",
                    [[e.image_id for _, e in kept], [pos for pos, _ in kept]])
        con.execute("COMMIT")
    return [e for _, e in kept]


def run_part(ws: Workspace, stage: str, round_: int | None, shard: Shard,
             work: Callable[[Workspace], dict[str, Any]], *, force: bool = False
             ) -> dict[str, Any]:
    """Run ``work`` (the stage, unsharded) on the shard's part; returns its summary.

    ``prepare --force`` on a shard starts the part afresh; other stages get ``force``
    themselves (``work`` passes it on).
    """
    if stage == "prepare":
        root = part_dir(ws, stage, round_, shard)
        if force and root.exists():
            shutil.rmtree(root)
        part = open_part(ws, stage, round_, shard)
    else:
        ws.require()
        part = open_part(ws, stage, round_, shard)
        seed_part(ws, part, stage, round_, shard)
    with _inside_part():
        summary = work(part)
    return {**summary, "shard": shard.label, "part": str(part.root)}


def run_sharded(ws: Workspace, stage: str, round_: int | None,
                shard: Shard | tuple[int, int] | str | None,
                work: Callable[[Workspace], dict[str, Any]], *, device: str = "auto",
                force: bool = False) -> dict[str, Any]:
    """A stage with ``--shard i/n`` (one part, merged later by ``kacl merge``), or under
    torchrun (rank r of N runs shard r/N, rank 0 merges all N parts, the others wait).

    Under torchrun every rank returns a summary of the whole job (the parts' summaries
    combined); a failure on any rank fails every rank with that rank's message.
    """
    from kacl_cli.training import distributed

    sh = as_shard(shard)
    if sh is not None:
        return run_part(ws, stage, round_, sh, work, force=force)
    ctx = distributed.init(device)
    sh = Shard(ctx.rank, ctx.world_size)
    result: dict[str, Any] | None = None
    error: str | None = None
    failure: BaseException | None = None
    try:
        result = run_part(ws, stage, round_, sh, work, force=force)
    except Exception as exc:  # told to every rank below, then re-raised here
        failure = exc
        error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    outcomes = distributed.all_gather_object((error, result), ctx)
    if failure is not None:
        raise failure
    for r, (e, _) in enumerate(outcomes):
        if e:
            raise KaclError(f"{stage}: rank {r} failed: {e}")
    merged: dict[str, Any] | str | None = None
    if ctx.is_main:
        try:
            merged = merge(ws, stage=stage, round_=round_, count=ctx.world_size)["merged"][0]
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


# numbers that are the same in every part (settings, global counts), not per-shard amounts
_SAME = {"round", "threshold", "features", "workers", "size", "seed", "difficulty", "enrich",
         "min_prob", "csv_rows", "missing", "unlisted", "over_limit", "epochs"}


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


_PART_PATH = re.compile(r"/parts/[^/]+/shard-\d+-of-\d+(?=/|$)")


# -- merge -----------------------------------------------------------------------------------
@dataclass
class _Part:
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
class _Group:
    stage: str
    round: int | None
    parts: list[_Part]
    prefix: str  # staging table prefix in the merge connection
    plan: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.stage + ("" if self.round is None else f" round {self.round}")

    @property
    def count(self) -> int:
        return self.parts[0].shard.count


def discover(ws: Workspace, stage: str | None = None, round_: int | None = None
             ) -> list[tuple[str, int | None, Path]]:
    """Stage directories under ``WS/parts`` (filtered), in merge order: prepare, cam, radiomics."""
    if stage is not None and stage not in STAGES:
        raise InputError(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}")
    found = []
    if ws.parts.is_dir():
        for d in ws.parts.iterdir():
            m = _STAGE_DIR.match(d.name)
            if not m or not d.is_dir():
                continue
            s, r = m.group(1), None if m.group(2) is None else int(m.group(2))
            if (stage is None or s == stage) and (round_ is None or r == round_):
                found.append((s, r, d))
    return sorted(found, key=lambda t: (STAGES.index(t[0]), -1 if t[1] is None else t[1]))


def _collect(stage: str, round_: int | None, d: Path, count: int | None) -> list[_Part]:
    """The parts of a stage directory, checked complete (all n shards, each finished)."""
    parts = []
    for p in sorted(d.iterdir()):
        m = _SHARD_DIR.match(p.name)
        if m and p.is_dir():
            shard = Shard(int(m.group(1)), int(m.group(2)))
            if count is None or shard.count == count:
                parts.append(_Part(shard, p))
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
        p.run = {"run_id": row[0], "config_json": row[2], "config_hash": row[3],
                 "fingerprint": row[4], "summary": json.loads(row[5] or "{}")}
    hashes = {p.run["config_hash"] for p in parts}
    if len(hashes) > 1:
        a, b = parts[0], next(p for p in parts if p.run["config_hash"] != parts[0].run[
            "config_hash"])
        raise KaclError(f"{name}: shards {a.shard.label} and {b.shard.label} ran with different "
                        "settings; re-run the odd ones with the same options, then merge")
    return parts


def merge(ws: Workspace, *, stage: str | None = None, round_: int | None = None,
          count: int | None = None, clean: bool = False) -> dict[str, Any]:
    """Fold the part files into the workspace (see the module docstring for the rules).

    Every group (stage + round) is checked before anything is written; returns
    ``{"merged": [per-group result], "changed": bool}``.
    """
    found = discover(ws, stage, round_)
    if not found:
        what = " ".join(x for x in (stage and f"--stage {stage}",
                                    round_ is not None and f"--round {round_}") if x)
        raise KaclError(f"nothing to merge: no part files under {ws.parts}"
                        + (f" for {what}" if what else ""))
    groups = [_Group(s, r, _collect(s, r, d, count), f"g{k}_") for k, (s, r, d) in
              enumerate(found)]
    if any(g.stage != "prepare" for g in groups):
        ws.require()
    started = time.perf_counter()
    with duckdb.connect(":memory:") as con:
        for g in groups:
            _STAGERS[g.stage](con, ws, g)
        if ws.catalog.path.exists():
            attach(con, ws.catalog.path, "ws")
        for g in groups:
            _PLANNERS[g.stage](con, ws, g, ws.catalog.path.exists())
        if ws.catalog.path.exists():
            con.execute("DETACH ws")
        if any(g.plan["changed"] for g in groups):
            for g in groups:  # pixels and maps first: catalog rows imply their data exists
                if g.plan["changed"]:
                    _WRITE_DATA[g.stage](con, ws, g)
            if not ws.catalog.path.exists():
                ws.init()
            attach(con, ws.catalog.path, "ws", read_only=False)
            try:
                con.execute("BEGIN")
                for g in groups:
                    if g.plan["changed"]:
                        _WRITE_ROWS[g.stage](con, ws, g)
                        _write_runs(con, g)
                con.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                raise
            finally:
                con.execute("DETACH ws")
    results = []
    for g in groups:
        if g.stage == "radiomics" and (g.plan["changed"] or g.plan.get("stats_missing")):
            _radiomics_stats(ws, g)
        results.append({"stage": g.stage, "round": g.round, "shards": g.count,
                        "changed": g.plan["changed"], "rows": g.plan.get("rows", {}),
                        "summary": g.plan.get("summary", {}),
                        "parts": str(stage_dir(ws, g.stage, g.round))})
        if clean:
            shutil.rmtree(stage_dir(ws, g.stage, g.round), ignore_errors=True)
    return {"workspace": str(ws.root), "merged": results,
            "changed": any(r["changed"] for r in results),
            "seconds": round(time.perf_counter() - started, 3), "cleaned": clean}


# -- staging (read the parts into the merge connection) --------------------------------------
def _stage_tables(con: duckdb.DuckDBPyConnection, g: _Group,
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


def _overlaps(con: duckdb.DuckDBPyConnection, table: str, keys: str, cols: str,
              what: str, g: _Group) -> None:
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


def _coverage(con: duckdb.DuckDBPyConnection, ws: Workspace, g: _Group) -> list[str]:
    """cam/radiomics parts must be the slices of the workspace's current images."""
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


def _changes(con: duckdb.DuckDBPyConnection, new: str, old: str, cols: str) -> int:
    """Rows that differ between a staged table and the workspace's (both directions)."""
    return int(con.execute(
        f"SELECT (SELECT count(*) FROM (SELECT {cols} FROM {new} EXCEPT SELECT {cols} "
        f"FROM {old})) + (SELECT count(*) FROM (SELECT {cols} FROM {old} EXCEPT SELECT {cols} "
        f"FROM {new}))").fetchone()[0])


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    return [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]


def _collist(cols: list[str]) -> str:
    return ", ".join('"' + c.replace('"', '""') + '"' for c in cols)


# prepare ---------------------------------------------------------------------------------
def _stage_prepare(con: duckdb.DuckDBPyConnection, ws: Workspace, g: _Group) -> None:
    for p in g.parts:
        with duckdb.connect(":memory:") as c:
            attach(c, p.catalog, "part", wait_s=2.0)
            ok = c.execute("SELECT count(*) FROM duckdb_tables() WHERE database_name = 'part' "
                           "AND table_name = 'shard_items'").fetchone()[0]
        if not ok:
            raise KaclError(f"{g.name}: {p.root} is not a sharded prepare part (no shard_items)")
    _stage_tables(con, g, {
        "images": "SELECT i.*, s.position FROM part.images i JOIN part.shard_items s "
                  "USING (image_id)",
        "labels": "SELECT * FROM part.labels",
        "gt": "SELECT b.*, b.rowid AS seq FROM part.gt_boxes b",
        "meta": "SELECT * FROM part.meta WHERE key = 'prepare_dataset'",
    })
    sizes = {}
    for p in g.parts:
        with p.store.open("r") as f:
            sizes[p.shard.index] = tuple(f[IMAGES].shape) if IMAGES in f else None
    g.plan["sizes"] = sizes


def _plan_prepare(con: duckdb.DuckDBPyConnection, ws: Workspace, g: _Group,
                  has_ws: bool) -> None:
    pre = g.prefix
    identities = con.execute(f"SELECT DISTINCT value FROM {pre}meta").fetchall()
    if len(identities) > 1:
        raise KaclError(f"{g.name}: the shards prepared different datasets (source, size, "
                        "split or seed differ); re-run them with the same options")
    img_cols = [c for c in _columns(con, f"{pre}images") if c not in ("part", "position")]
    content = _collist([c for c in img_cols if c != "row"])
    _overlaps(con, f"{pre}images", "image_id", content, "image", g)
    label_cols = [c for c in _columns(con, f"{pre}labels") if c != "part"]
    _overlaps(con, f"{pre}labels", "image_id", _collist(label_cols), "labels of", g)
    dup = con.execute(f"SELECT position FROM {pre}images GROUP BY position "
                      "HAVING count(*) > 1 LIMIT 1").fetchone()
    if dup:
        raise KaclError(f"{g.name}: two parts put different images at ingest position "
                        f"{dup[0]}: they come from different releases; re-run them")
    # gt boxes: the first part that holds an image provides all of its boxes
    con.execute(f"CREATE OR REPLACE TABLE {pre}gt AS SELECT b.* FROM {pre}gt b JOIN "
                f"{pre}images i ON i.image_id = b.image_id AND i.part = b.part")
    sizes = {v[1:] for v in g.plan["sizes"].values() if v is not None}
    if len(sizes) > 1:
        raise KaclError(f"{g.name}: parts hold images of different sizes: {sorted(sizes)}")
    for p in g.parts:
        shape = g.plan["sizes"][p.shard.index]
        need = con.execute(f"SELECT count(*), max(row) FROM {pre}images WHERE part = ?",
                           [p.shard.index]).fetchone()
        if need[0] and (shape is None or shape[0] <= need[1]):
            raise KaclError(f"{g.name}: shard {p.shard.label}'s store lacks images its catalog "
                            "lists; run it again, then merge")
    # rows of the workspace: the order an unsharded run ingests in
    con.execute(f"CREATE TABLE {pre}final AS SELECT * EXCLUDE (row), "
                f"(row_number() OVER (ORDER BY position) - 1)::INTEGER AS new_row, "
                f"row AS local_row FROM {pre}images")
    n = int(con.execute(f"SELECT count(*) FROM {pre}final").fetchone()[0])
    final_cols = ", ".join("new_row AS row" if c == "row" else _collist([c]) for c in img_cols)
    con.execute(f"CREATE TABLE {pre}out_images AS SELECT {final_cols} FROM {pre}final "
                "ORDER BY new_row")
    size = next(iter(sizes))[0] if sizes else None
    g.plan.update(n=n, size=size, rows={"images": n})
    have = 0
    if has_ws:
        have = int(con.execute("SELECT count(*) FROM ws.images").fetchone()[0])
    if have:
        diff = (_changes(con, f"{pre}out_images", "ws.images", _collist(img_cols))
                + _changes(con, f"(SELECT * EXCLUDE (part) FROM {pre}labels)", "ws.labels",
                           _collist(label_cols))
                + _changes(con, f"(SELECT * EXCLUDE (part, seq) FROM {pre}gt)", "ws.gt_boxes",
                           "*"))
        if diff or ws.store.n_rows() != n or (n and ws.store.image_size() != size):
            raise KaclError(f"workspace {ws.root} already holds {have} prepared images that "
                            "are not exactly these parts'; merge into a fresh workspace")
        g.plan["changed"] = False
        return
    g.plan["changed"] = True
    g.plan["summary"] = _prepare_summary(con, g)


def _prepare_summary(con: duckdb.DuckDBPyConnection, g: _Group) -> dict[str, Any]:
    summary = combine_summaries([p.run["summary"] for p in g.parts])
    counts = dict(con.execute(f"SELECT split, count(*) FROM {g.prefix}out_images "
                              "GROUP BY split").fetchall())
    n_boxes, n_box_images = con.execute(
        f"SELECT count(*), count(DISTINCT image_id) FROM {g.prefix}gt").fetchone()
    summary.update(images=g.plan["n"], train=int(counts.get("train", 0)),
                   val=int(counts.get("val", 0)), test=int(counts.get("test", 0)),
                   gt_boxes=int(n_boxes), images_with_boxes=int(n_box_images),
                   shards=g.count)
    return summary


def _data_prepare(con: duckdb.DuckDBPyConnection, ws: Workspace, g: _Group) -> None:
    """Copy every part's pixels to the workspace rows assigned by the plan, one part at a
    time (a thousand-shard NIH merge never holds a thousand files open)."""
    if ws.store.path.exists():  # the catalog holds no image: nothing in it is worth keeping
        ws.store.path.unlink()
    size = g.plan["size"]
    # an empty dataset with the store's layout (chunks, compression), then sized to N
    ws.store.write_images(0, np.empty((0, size, size), np.uint8), size)
    with ws.store.open("a") as out:
        ds = out[IMAGES]
        ds.resize((g.plan["n"], size, size))
        for p in g.parts:
            rows = np.array(con.execute(
                f"SELECT new_row, local_row FROM {g.prefix}final WHERE part = ? "
                "ORDER BY new_row", [p.shard.index]).fetchall(), dtype=np.int64).reshape(-1, 2)
            with h5py.File(p.store.path, "r") as f:
                for start in range(0, len(rows), COPY_BLOCK):
                    block = rows[start:start + COPY_BLOCK]
                    ds[block[:, 0]] = read_rows(f[IMAGES], block[:, 1])
        out.flush()


def _rows_prepare(con: duckdb.DuckDBPyConnection, ws: Workspace, g: _Group) -> None:
    pre = g.prefix
    con.execute(f"INSERT INTO ws.images SELECT * FROM {pre}out_images ORDER BY row")
    con.execute(f"INSERT INTO ws.labels SELECT l.* EXCLUDE (part) FROM {pre}labels l "
                f"JOIN {pre}final f USING (image_id) ORDER BY f.new_row")
    con.execute(f"INSERT INTO ws.gt_boxes SELECT b.* EXCLUDE (part, seq) FROM {pre}gt b "
                f"JOIN {pre}final f USING (image_id) ORDER BY f.new_row, b.seq")
    con.execute(f"INSERT OR REPLACE INTO ws.meta SELECT key, value FROM {pre}meta LIMIT 1")


# cam ---------------------------------------------------------------------------------------
def _stage_cam(con: duckdb.DuckDBPyConnection, ws: Workspace, g: _Group) -> None:
    _stage_tables(con, g, {
        "ids": "SELECT image_id, row FROM part.images",
        "cam": "SELECT * FROM part.cam_boxes WHERE round = ?",
        "state": "SELECT value FROM part.meta WHERE key = ?",
    }, {"cam": [g.round], "state": [f"cam:round-{g.round}"]})
    shapes = {}
    for p in g.parts:
        with p.store.open("r") as f:
            key = cam_key(g.round)  # type: ignore[arg-type]
            shapes[p.shard.index] = tuple(f[key].shape[1:]) if key in f else None
    g.plan["map_shapes"] = shapes


def _plan_cam(con: duckdb.DuckDBPyConnection, ws: Workspace, g: _Group, has_ws: bool) -> None:
    pre = g.prefix
    states = [r[0] for r in con.execute(f"SELECT DISTINCT value FROM {pre}state").fetchall()]
    if len(states) != 1:
        raise KaclError(f"{g.name}: the shards used different checkpoints or thresholds "
                        "(or one has no maps); re-run them with the same options")
    _coverage(con, ws, g)
    cols = [c for c in _columns(con, f"{pre}cam") if c != "part"]
    _overlaps(con, f"{pre}cam", "image_id, finding", _collist(cols), "CAM box", g)
    with_maps = {p.shard.index for p in g.parts if con.execute(
        f"SELECT count(*) FROM {pre}cam WHERE part = ?", [p.shard.index]).fetchone()[0]}
    shapes = {g.plan["map_shapes"][i] for i in with_maps}
    if None in shapes or len(shapes) > 1:
        raise KaclError(f"{g.name}: parts hold Grad-CAM maps of different shapes (or rows "
                        "without maps); re-run them")
    main_state = con.execute("SELECT value FROM ws.meta WHERE key = ?",
                             [f"cam:round-{g.round}"]).fetchone()
    stale = main_state is None or main_state[0] != states[0]
    g.plan.update(state=states[0], stale=stale,
                  rows={"cam_boxes": int(con.execute(f"SELECT count(*) FROM {pre}cam")
                                         .fetchone()[0])})
    if stale:
        g.plan["changed"] = True
    else:
        scope = (f"(SELECT * FROM ws.cam_boxes WHERE round = {int(g.round)} AND image_id IN "  # type: ignore[arg-type]
                 f"(SELECT image_id FROM {pre}cam))")
        g.plan["changed"] = bool(_changes(con, f"(SELECT * EXCLUDE (part) FROM {pre}cam)",
                                          scope, _collist(cols)))
        if not g.plan["changed"] and not ws.store.has_cams(g.round):  # type: ignore[arg-type]
            g.plan["changed"] = True
    g.plan["summary"] = combine_summaries([p.run["summary"] for p in g.parts])


def _data_cam(con: duckdb.DuckDBPyConnection, ws: Workspace, g: _Group) -> None:
    """Copy every part's maps (already at workspace rows) into ``/cams/round-K``."""
    round_ = int(g.round)  # type: ignore[arg-type]
    if g.plan["stale"]:
        ws.store.delete(cam_key(round_))
    n_store = ws.store.n_rows()
    for p in g.parts:
        rows = np.array([r[0] for r in con.execute(
            f"SELECT DISTINCT i.row FROM {g.prefix}ids i JOIN {g.prefix}cam c "
            "ON c.image_id = i.image_id AND c.part = i.part WHERE i.part = ? ORDER BY i.row",
            [p.shard.index]).fetchall()], dtype=np.int64)
        for start in range(0, len(rows), COPY_BLOCK):
            block = rows[start:start + COPY_BLOCK]
            ws.store.write_cams(round_, block, p.store.read_cams(round_, block), n_store)


def _rows_cam(con: duckdb.DuckDBPyConnection, ws: Workspace, g: _Group) -> None:
    pre = g.prefix
    if g.plan["stale"]:
        con.execute("DELETE FROM ws.cam_boxes WHERE round = ?", [g.round])
    else:
        con.execute(f"DELETE FROM ws.cam_boxes WHERE round = ? AND image_id IN "
                    f"(SELECT image_id FROM {pre}cam)", [g.round])
    con.execute(f"INSERT INTO ws.cam_boxes SELECT * EXCLUDE (part) FROM {pre}cam")
    con.execute("INSERT OR REPLACE INTO ws.meta VALUES (?, ?)",
                [f"cam:round-{g.round}", g.plan["state"]])


# radiomics ---------------------------------------------------------------------------------
def _stage_radiomics(con: duckdb.DuckDBPyConnection, ws: Workspace, g: _Group) -> None:
    _stage_tables(con, g, {
        "ids": "SELECT image_id, row, split FROM part.images",
        "rois": "SELECT * FROM part.rois WHERE round = ?",
        "rad": "SELECT * FROM part.radiomics WHERE round = ?",
        "feat": "SELECT * FROM part.radiomics_features",
        "set": "SELECT * FROM part.radiomics_settings",
    }, {"rois": [g.round], "rad": [g.round]})


def _plan_radiomics(con: duckdb.DuckDBPyConnection, ws: Workspace, g: _Group,
                    has_ws: bool) -> None:
    pre = g.prefix
    _coverage(con, ws, g)
    for table, what in (("rois", "ROI"), ("rad", "radiomics row")):
        cols = [c for c in _columns(con, f"{pre}{table}") if c != "part"]
        _overlaps(con, f"{pre}{table}", "image_id, finding", _collist(cols), what, g)
    _overlaps(con, f"{pre}feat", "settings_hash, feature_index", "name", "feature", g)
    _overlaps(con, f"{pre}set", "settings_hash", "settings_json", "settings", g)
    clash = con.execute(f"SELECT f.settings_hash FROM {pre}feat f JOIN ws.radiomics_features w "
                        "USING (settings_hash, feature_index) WHERE f.name <> w.name LIMIT 1"
                        ).fetchone()
    if clash:
        raise KaclError(f"{g.name}: feature names of settings {clash[0]} differ from the "
                        "workspace's; the shards ran another radiomics version")
    config = json.loads(g.parts[0].run["config_json"])
    splits = config.get("split")
    split_sql = "" if not splits else " AND split IN (" + ", ".join(
        _sql_str(s) for s in splits) + ")"
    scope = f"(SELECT image_id FROM ws.images WHERE true{split_sql})"
    con.execute(f"CREATE TABLE {pre}scope AS SELECT image_id FROM {scope}")
    r = int(g.round)  # type: ignore[arg-type]
    changed = 0
    for table, ws_table in (("rois", "rois"), ("rad", "radiomics")):
        cols = _collist([c for c in _columns(con, f"{pre}{table}") if c != "part"])
        changed += _changes(con, f"(SELECT * EXCLUDE (part) FROM {pre}{table})",
                            f"(SELECT * FROM ws.{ws_table} WHERE round = {r} AND image_id IN "
                            f"(SELECT image_id FROM {pre}scope))", cols)
    changed += int(con.execute(f"SELECT count(*) FROM (SELECT settings_hash, feature_index, "
                               f"name FROM {pre}feat EXCEPT SELECT * FROM ws.radiomics_features)"
                               ).fetchone()[0])
    hashes = [h for (h,) in con.execute(f"SELECT DISTINCT settings_hash FROM {pre}rad")
              .fetchall()]
    stats_missing = any(not con.execute(
        "SELECT count(*) FROM ws.radiomics_stats WHERE round = ? AND settings_hash = ?",
        [r, h]).fetchone()[0] for h in hashes)
    g.plan.update(changed=bool(changed), stats_missing=stats_missing, hashes=hashes,
                  rows={"rois": int(con.execute(f"SELECT count(*) FROM {pre}rois")
                                    .fetchone()[0]),
                        "radiomics": int(con.execute(f"SELECT count(*) FROM {pre}rad")
                                         .fetchone()[0])})
    summary = combine_summaries([p.run["summary"] for p in g.parts])
    summary.pop("train_rows_for_stats", None)  # recomputed over the whole workspace
    g.plan["summary"] = summary


def _data_none(con: duckdb.DuckDBPyConnection, ws: Workspace, g: _Group) -> None:
    return None


def _rows_radiomics(con: duckdb.DuckDBPyConnection, ws: Workspace, g: _Group) -> None:
    pre = g.prefix
    for table in ("radiomics", "rois"):
        con.execute(f"DELETE FROM ws.{table} WHERE round = ? AND image_id IN "
                    f"(SELECT image_id FROM {pre}scope)", [g.round])
    con.execute(f"INSERT INTO ws.rois SELECT * EXCLUDE (part) FROM {pre}rois "
                "ORDER BY image_id, finding")
    con.execute(f"INSERT INTO ws.radiomics SELECT * EXCLUDE (part) FROM {pre}rad "
                "ORDER BY image_id, finding")
    con.execute(f"INSERT OR REPLACE INTO ws.radiomics_settings SELECT * EXCLUDE (part) "
                f"FROM {pre}set")
    con.execute(f"DELETE FROM ws.radiomics_features WHERE settings_hash IN "
                f"(SELECT settings_hash FROM {pre}feat)")
    con.execute(f"INSERT INTO ws.radiomics_features SELECT * EXCLUDE (part) FROM {pre}feat "
                "ORDER BY settings_hash, feature_index")


def _radiomics_stats(ws: Workspace, g: _Group) -> None:
    """Training-split z-scoring statistics over the whole workspace (never per shard)."""
    from kacl_cli.stages.radiomics.stage import compute_stats

    for h in g.plan["hashes"]:
        n = ws.catalog.count("radiomics_features", "settings_hash = ?", [h])
        g.plan["summary"]["train_rows_for_stats"] = compute_stats(ws, int(g.round), h, n)  # type: ignore[arg-type]


# runs ----------------------------------------------------------------------------------------
def _write_runs(con: duckdb.DuckDBPyConnection, g: _Group) -> None:
    """The parts' finished runs (with their shard) and errors, plus one run for the merge.

    The merge's run carries the parts' config, so ``radiomics`` readers find its settings;
    for ``prepare`` also their input fingerprint, so an unsharded re-run is skipped.
    """
    pre = g.prefix
    new = f"(SELECT run_id FROM {pre}runs WHERE run_id NOT IN (SELECT run_id FROM ws.runs))"
    con.execute(f"INSERT INTO ws.errors SELECT * EXCLUDE (part) FROM {pre}errors "
                f"WHERE run_id IN {new}")
    con.execute(f"INSERT INTO ws.runs SELECT * EXCLUDE (part) REPLACE "
                f"(part::VARCHAR || '/{g.count}' AS shard) FROM {pre}runs WHERE run_id IN {new}")
    first = g.parts[0].run
    prints = sorted({p.run["fingerprint"] for p in g.parts})
    fingerprint = (prints[0] if g.stage == "prepare" and len(prints) == 1 else
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


_STAGERS = {"prepare": _stage_prepare, "cam": _stage_cam, "radiomics": _stage_radiomics}
_PLANNERS = {"prepare": _plan_prepare, "cam": _plan_cam, "radiomics": _plan_radiomics}
_WRITE_DATA = {"prepare": _data_prepare, "cam": _data_cam, "radiomics": _data_none}
_WRITE_ROWS = {"prepare": _rows_prepare, "cam": _rows_cam, "radiomics": _rows_radiomics}

__all__ = ["Shard", "as_shard", "combine_summaries", "ddp_sharding", "file_lock",
           "merge", "open_part", "run_part", "run_sharded", "seed_part", "select",
           "stage_dir", "take_prepare_items"]
