"""Shards and their part workspaces: the ``--shard i/n`` rule, and opening, seeding and
running one part. The merge that folds parts back in is :mod:`kacl_cli.sharding.merge`;
docs/scale-out.md has the whole picture.

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
and ``store.h5``, plus ``part.json`` (what it is). A part of a stage that builds the workspace
(``prepare``) starts empty; the other stages' parts (``cam``, ``radiomics``) work on a prepared
workspace: the stage's ``seed`` hook (:class:`~kacl_cli.sharding.hooks.StageHooks`) copies the
shard's rows of its input tables (read-only from the workspace) with :func:`seed_tables` and
links the workspace's ``/images`` (:func:`link_images`, an HDF5 external link: read only,
nothing writes the workspace while shards run) and, where needed, its ``checkpoints/``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import h5py

from kacl_cli.errors import InputError, KaclError
from kacl_cli.sharding.hooks import StageHooks
from kacl_cli.store import IMAGES
from kacl_cli.workspace import Workspace

PART_FILE = "part.json"
SLICING = "sorted-image_id-strided/v1"
ROUND_INFIX = "-round-"


# -- the rule --------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise InputError(f"--shard {self.index}/{self.count}: need 0 <= i < n")

    @classmethod
    def parse(cls, value: str | None) -> Shard | None:
        """The one parser of ``--shard`` values: ``"i/n"`` -> ``Shard(i, n)``, None -> None.

        Bad forms (not two integers around one ``/``, or not ``0 <= i < n``) raise
        :class:`~kacl_cli.errors.InputError` (a usage error, exit 2) before any work starts.
        """
        if value is None:
            return None
        try:
            i_s, n_s = value.split("/")
            i, n = int(i_s), int(n_s)
        except ValueError:
            raise InputError(f"--shard must look like i/n (e.g. 0/4), got {value!r}") from None
        return cls(i, n)

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def dirname(self) -> str:
        return f"shard-{self.index}-of-{self.count}"

    @classmethod
    def from_dirname(cls, name: str) -> Shard | None:
        """The shard of a part directory name (``shard-i-of-n``), else None."""
        head, _, rest = name.partition("shard-")
        i_s, sep, n_s = rest.partition("-of-")
        if head or not sep or not (i_s.isdigit() and n_s.isdigit()):
            return None
        try:
            return cls(int(i_s), int(n_s))
        except InputError:
            return None


def select(ids: Sequence[str], shard: Shard) -> list[str]:
    """The ids of ``shard``: positions i, i+n, ... of ``ids`` sorted (the sharding rule)."""
    return sorted(ids)[shard.index::shard.count]


def stage_dir(ws: Workspace, stage: str, round_: int | None) -> Path:
    """``WS/parts/<stage>[-round-K]``: where a stage's (and round's) parts live."""
    return ws.parts / (stage if round_ is None else f"{stage}{ROUND_INFIX}{round_}")


def part_dir(ws: Workspace, stage: str, round_: int | None, shard: Shard) -> Path:
    return stage_dir(ws, stage, round_) / shard.dirname


# -- small helpers ---------------------------------------------------------------------------
def sql_str(text: str) -> str:
    """A SQL string literal (for statements DuckDB takes no parameters in, like ATTACH)."""
    return "'" + text.replace("'", "''") + "'"


def attach(con: duckdb.DuckDBPyConnection, path: Path, alias: str, *, read_only: bool = True,
           wait_s: float = 30.0) -> None:
    """ATTACH another catalog, waiting briefly while a writer holds its lock."""
    mode = " (READ_ONLY)" if read_only else ""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            con.execute(f"ATTACH {sql_str(str(path))} AS {alias}{mode}")
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


def ddp_sharding() -> bool:
    """Whether a stage should run as shard ``rank/world`` of a torchrun job.

    Asked only by a stage's dispatcher; the stage's inner run (what a part executes) never
    asks, so a part cannot shard again.
    """
    if not any(os.environ.get(v) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return False  # not launched by torchrun: no torch import (seconds) for a CPU stage
    from kacl_cli.training import distributed  # torch: only for the stages that need it

    return distributed.from_env().active


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
    return part


def link_images(ws: Workspace, part: Workspace) -> None:
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


def link_checkpoints(ws: Workspace, part: Workspace) -> None:
    """``part/checkpoints`` -> the workspace's (a symlink): the part's stage reads them."""
    link = part.checkpoints
    target = ws.checkpoints.resolve()
    if link.is_symlink():
        if Path(link.readlink()) == target:
            return
        link.unlink()
    elif link.exists():
        shutil.rmtree(link)
    link.symlink_to(target, target_is_directory=True)


def shard_images(ws: Workspace, shard: Shard) -> list[str]:
    """The workspace's image ids of ``shard``; refused when the shard would be empty."""
    ids = [r[0] for r in ws.catalog.query("SELECT image_id FROM images ORDER BY image_id")]
    mine = select(ids, shard)
    if not mine:
        raise InputError(f"shard {shard.label}: no images (the workspace holds {len(ids)}; use "
                         "at most that many shards)")
    return mine


def seed_tables(ws: Workspace, part: Workspace, mine: list[str], tables: Sequence[str], *,
                keep_meta: str | None = None,
                extra: Callable[[duckdb.DuckDBPyConnection], None] | None = None) -> None:
    """Refresh the part's copy of ``tables`` (the rows of the images ``mine``) and of the
    workspace's ``meta`` from the workspace (attached read-only as ``src``), in one
    transaction.

    ``keep_meta``: a LIKE pattern of meta keys the part's own stage keeps (not overwritten);
    ``extra(con)``: more copying inside the same transaction (temp table ``mine`` holds the
    ids).
    """
    with part.catalog.connect() as con:
        attach(con, ws.catalog.path, "src")
        try:
            con.execute("BEGIN")
            con.execute("CREATE OR REPLACE TEMP TABLE mine AS "
                        "SELECT unnest(?::VARCHAR[]) AS image_id", [mine])
            for table in tables:
                order = " ORDER BY t.rowid" if table == "gt_boxes" else ""
                con.execute(f"DELETE FROM {table}")
                con.execute(f"INSERT INTO {table} SELECT t.* FROM src.{table} t "
                            f"WHERE t.image_id IN (SELECT image_id FROM mine){order}")
            own = keep_meta or "\x00"
            con.execute("DELETE FROM meta WHERE key NOT LIKE ?", [own])
            con.execute("INSERT OR REPLACE INTO meta SELECT * FROM src.meta "
                        "WHERE key NOT LIKE ?", [own])
            if extra is not None:
                extra(con)
            con.execute("COMMIT")
        finally:
            con.execute("DETACH src")


def run_part(ws: Workspace, hooks: StageHooks, round_: int | None, shard: Shard,
             work: Callable[[Workspace], dict[str, Any]], *, force: bool = False
             ) -> dict[str, Any]:
    """Run ``work`` (the stage's inner, unsharded run) on the shard's part; returns its
    summary with ``shard`` and ``part`` added.

    A stage without a ``seed`` hook (prepare) gets a fresh part on ``force``; the others get
    ``force`` themselves (``work`` passes it on) and their part seeded from ``ws``.
    """
    if hooks.seed is None:
        root = part_dir(ws, hooks.name, round_, shard)
        if force and root.exists():
            shutil.rmtree(root)
        part = open_part(ws, hooks.name, round_, shard)
    else:
        ws.require()
        part = open_part(ws, hooks.name, round_, shard)
        hooks.seed(ws, part, round_, shard)
    summary = work(part)
    return {**summary, "shard": shard.label, "part": str(part.root)}


__all__ = ["PART_FILE", "Shard", "attach", "ddp_sharding", "file_lock", "link_checkpoints",
           "link_images", "open_part", "part_dir", "run_part", "seed_tables", "select",
           "shard_images", "sql_str", "stage_dir"]
