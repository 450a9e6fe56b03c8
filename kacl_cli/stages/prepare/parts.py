"""``prepare`` as shards: which images a shard ingests, and how its parts are merged.

A prepare part is a workspace of its own, started empty (no ``seed`` hook): it stores its
images at its own local rows and a ``shard_items`` table (image_id, position in the unsharded
ingest order). The merge gives every image the workspace row an unsharded run would have
given it (the order of those positions) and copies the pixels there.
"""

from __future__ import annotations

from typing import Any

import duckdb
import h5py
import numpy as np

from kacl_cli.errors import KaclError
from kacl_cli.sharding.hooks import StageHooks
from kacl_cli.sharding.merge import (
    COPY_BLOCK,
    Group,
    changes,
    collist,
    columns,
    combine_summaries,
    overlaps,
    stage_tables,
)
from kacl_cli.sharding.parts import Shard, attach, select
from kacl_cli.store import DEFAULT_IMAGE_COMPRESSION, IMAGES, read_rows
from kacl_cli.workspace import Workspace

NAME = "prepare"
SHARD_ITEMS_SQL = (
    "CREATE TABLE IF NOT EXISTS shard_items (image_id VARCHAR PRIMARY KEY, "
    "position INTEGER NOT NULL)"
)


def take_items(ws: Workspace, entries: list[Any], shard: Shard) -> list[Any]:
    """Keep the shard's entries (objects with ``image_id``, in ingest order) and record each
    kept entry's position in that order in ``ws`` (the part), for the merge's rows."""
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


def _stage(con: duckdb.DuckDBPyConnection, ws: Workspace, g: Group) -> None:
    for p in g.parts:
        with duckdb.connect(":memory:") as c:
            attach(c, p.catalog, "part", wait_s=2.0)
            ok = c.execute("SELECT count(*) FROM duckdb_tables() WHERE database_name = 'part' "
                           "AND table_name = 'shard_items'").fetchone()[0]
        if not ok:
            raise KaclError(f"{g.name}: {p.root} is not a sharded prepare part (no shard_items)")
    stage_tables(con, g, {
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


def _check_parts(con: duckdb.DuckDBPyConnection, g: Group) -> set[tuple[int, ...]]:
    """The parts agree (one dataset, no conflicting images or labels, stores complete);
    returns the image sizes held."""
    pre = g.prefix
    identities = con.execute(f"SELECT DISTINCT value FROM {pre}meta").fetchall()
    if len(identities) > 1:
        raise KaclError(f"{g.name}: the shards prepared different datasets (source, size, "
                        "split or seed differ); re-run them with the same options")
    img_cols = [c for c in columns(con, f"{pre}images") if c not in ("part", "position")]
    overlaps(con, f"{pre}images", "image_id", collist([c for c in img_cols if c != "row"]),
             "image", g)
    label_cols = [c for c in columns(con, f"{pre}labels") if c != "part"]
    overlaps(con, f"{pre}labels", "image_id", collist(label_cols), "labels of", g)
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
    return sizes


def _plan(con: duckdb.DuckDBPyConnection, ws: Workspace, g: Group, has_ws: bool) -> None:
    pre = g.prefix
    sizes = _check_parts(con, g)
    img_cols = [c for c in columns(con, f"{pre}images") if c not in ("part", "position")]
    label_cols = [c for c in columns(con, f"{pre}labels") if c != "part"]
    # rows of the workspace: the order an unsharded run ingests in
    con.execute(f"CREATE TABLE {pre}final AS SELECT * EXCLUDE (row), "
                f"(row_number() OVER (ORDER BY position) - 1)::INTEGER AS new_row, "
                f"row AS local_row FROM {pre}images")
    n = int(con.execute(f"SELECT count(*) FROM {pre}final").fetchone()[0])
    final_cols = ", ".join("new_row AS row" if c == "row" else collist([c]) for c in img_cols)
    con.execute(f"CREATE TABLE {pre}out_images AS SELECT {final_cols} FROM {pre}final "
                "ORDER BY new_row")
    size = next(iter(sizes))[0] if sizes else None
    g.plan.update(n=n, size=size, rows={"images": n})
    have = 0
    if has_ws:
        have = int(con.execute("SELECT count(*) FROM ws.images").fetchone()[0])
    if have:
        diff = (changes(con, f"{pre}out_images", "ws.images", collist(img_cols))
                + changes(con, f"(SELECT * EXCLUDE (part) FROM {pre}labels)", "ws.labels",
                          collist(label_cols))
                + changes(con, f"(SELECT * EXCLUDE (part, seq) FROM {pre}gt)", "ws.gt_boxes",
                          "*"))
        if diff or ws.store.n_rows() != n or (n and ws.store.image_size() != size):
            raise KaclError(f"workspace {ws.root} already holds {have} prepared images that "
                            "are not exactly these parts'; merge into a fresh workspace")
        g.plan["changed"] = False
        return
    g.plan["changed"] = True
    g.plan["summary"] = _summary(con, g)


def _summary(con: duckdb.DuckDBPyConnection, g: Group) -> dict[str, Any]:
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


def _write_data(con: duckdb.DuckDBPyConnection, ws: Workspace, g: Group) -> None:
    """Copy every part's pixels to the workspace rows assigned by the plan, one part at a
    time (a thousand-shard NIH merge never holds a thousand files open)."""
    if ws.store.path.exists():  # the catalog holds no image: nothing in it is worth keeping
        ws.store.path.unlink()
    size = g.plan["size"]
    # an empty dataset with the store's layout (chunks, and the parts' compression: they
    # were all prepared with one command line), then sized to N
    compression = g.parts[0].store.images_compression() if g.parts else None
    ws.store.write_images(0, np.empty((0, size, size), np.uint8), size,
                          compression or DEFAULT_IMAGE_COMPRESSION)
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


def _write_rows(con: duckdb.DuckDBPyConnection, ws: Workspace, g: Group) -> None:
    pre = g.prefix
    con.execute(f"INSERT INTO ws.images SELECT * FROM {pre}out_images ORDER BY row")
    con.execute(f"INSERT INTO ws.labels SELECT l.* EXCLUDE (part) FROM {pre}labels l "
                f"JOIN {pre}final f USING (image_id) ORDER BY f.new_row")
    con.execute(f"INSERT INTO ws.gt_boxes SELECT b.* EXCLUDE (part, seq) FROM {pre}gt b "
                f"JOIN {pre}final f USING (image_id) ORDER BY f.new_row, b.seq")
    con.execute(f"INSERT OR REPLACE INTO ws.meta SELECT key, value FROM {pre}meta LIMIT 1")


HOOKS = StageHooks(name=NAME, stage=_stage, plan=_plan, write_data=_write_data,
                   write_rows=_write_rows, keeps_fingerprint=True)
