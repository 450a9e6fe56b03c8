"""``cam`` as shards: what a part is seeded with, and how its maps and boxes are merged.

A cam part sees the workspace's images (HDF5 external link) and checkpoints (symlink), and
gets the shard's ``images`` and ``labels`` rows; its maps are written at the workspace's
rows, so the merge copies them block by block into ``/cams/round-K``. The merge folds in the
parts' ``cam_boxes`` and their ``cam_boxes_ranked`` (boxes 2..K of ``--max-boxes K``) together:
the ranked rows belong to the (image, finding) of their ``cam_boxes`` row.
"""

from __future__ import annotations

import duckdb
import numpy as np

from kacl_cli.catalog import Catalog
from kacl_cli.errors import KaclError
from kacl_cli.sharding.hooks import StageHooks
from kacl_cli.sharding.merge import (
    COPY_BLOCK,
    Group,
    changes,
    collist,
    columns,
    combine_summaries,
    coverage,
    overlaps,
    stage_tables,
)
from kacl_cli.sharding.parts import (
    Shard,
    link_checkpoints,
    link_images,
    seed_tables,
    shard_images,
)
from kacl_cli.store import cam_key
from kacl_cli.workspace import Workspace

NAME = "cam"
SEED_TABLES = ("images", "labels")


def state_key(round_: int) -> str:
    """The ``meta`` key holding which checkpoint/threshold/method made the round's maps."""
    return f"{NAME}:round-{round_}"


def _seed(ws: Workspace, part: Workspace, round_: int | None, shard: Shard) -> None:
    link_images(ws, part)
    link_checkpoints(ws, part)
    seed_tables(ws, part, shard_images(ws, shard), SEED_TABLES, keep_meta=f"{NAME}:%")


def _stage(con: duckdb.DuckDBPyConnection, ws: Workspace, g: Group) -> None:
    ws.catalog.ensure_tables("cam_boxes_ranked")  # catalogs older than --max-boxes
    for p in g.parts:
        Catalog(p.catalog).ensure_tables("cam_boxes_ranked")
    stage_tables(con, g, {
        "ids": "SELECT image_id, row FROM part.images",
        "cam": "SELECT * FROM part.cam_boxes WHERE round = ?",
        "ranked": "SELECT * FROM part.cam_boxes_ranked WHERE round = ?",
        "state": "SELECT value FROM part.meta WHERE key = ?",
    }, {"cam": [g.round], "ranked": [g.round], "state": [state_key(g.round)]})  # type: ignore[arg-type]
    shapes = {}
    for p in g.parts:
        with p.store.open("r") as f:
            key = cam_key(g.round)  # type: ignore[arg-type]
            shapes[p.shard.index] = tuple(f[key].shape[1:]) if key in f else None
    g.plan["map_shapes"] = shapes


def _plan(con: duckdb.DuckDBPyConnection, ws: Workspace, g: Group, has_ws: bool) -> None:
    pre = g.prefix
    states = [r[0] for r in con.execute(f"SELECT DISTINCT value FROM {pre}state").fetchall()]
    if len(states) != 1:
        raise KaclError(f"{g.name}: the shards used different checkpoints or thresholds "
                        "(or one has no maps); re-run them with the same options")
    coverage(con, ws, g)
    cols = [c for c in columns(con, f"{pre}cam") if c != "part"]
    overlaps(con, f"{pre}cam", "image_id, finding", collist(cols), "CAM box", g)
    ranked_cols = [c for c in columns(con, f"{pre}ranked") if c != "part"]
    overlaps(con, f"{pre}ranked", "image_id, finding, rank", collist(ranked_cols),
             "ranked CAM box", g)
    with_maps = {p.shard.index for p in g.parts if con.execute(
        f"SELECT count(*) FROM {pre}cam WHERE part = ?", [p.shard.index]).fetchone()[0]}
    shapes = {g.plan["map_shapes"][i] for i in with_maps}
    if None in shapes or len(shapes) > 1:
        raise KaclError(f"{g.name}: parts hold Grad-CAM maps of different shapes (or rows "
                        "without maps); re-run them")
    main_state = con.execute("SELECT value FROM ws.meta WHERE key = ?",
                             [state_key(g.round)]).fetchone()  # type: ignore[arg-type]
    stale = main_state is None or main_state[0] != states[0]
    g.plan.update(state=states[0], stale=stale,
                  rows={"cam_boxes": int(con.execute(f"SELECT count(*) FROM {pre}cam")
                                         .fetchone()[0]),
                        "cam_boxes_ranked": int(con.execute(
                            f"SELECT count(*) FROM {pre}ranked").fetchone()[0])})
    if stale:
        g.plan["changed"] = True
    else:
        scope = (f"(SELECT * FROM ws.cam_boxes WHERE round = {int(g.round)} AND image_id IN "  # type: ignore[arg-type]
                 f"(SELECT image_id FROM {pre}cam))")
        ranked_scope = (f"(SELECT * FROM ws.cam_boxes_ranked WHERE round = {int(g.round)} "  # type: ignore[arg-type]
                        f"AND image_id IN (SELECT image_id FROM {pre}cam))")
        g.plan["changed"] = bool(
            changes(con, f"(SELECT * EXCLUDE (part) FROM {pre}cam)", scope, collist(cols))
            or changes(con, f"(SELECT * EXCLUDE (part) FROM {pre}ranked)", ranked_scope,
                       collist(ranked_cols)))
        if not g.plan["changed"] and not ws.store.has_cams(g.round):  # type: ignore[arg-type]
            g.plan["changed"] = True
    g.plan["summary"] = combine_summaries([p.run["summary"] for p in g.parts])


def _write_data(con: duckdb.DuckDBPyConnection, ws: Workspace, g: Group) -> None:
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


def _write_rows(con: duckdb.DuckDBPyConnection, ws: Workspace, g: Group) -> None:
    pre = g.prefix
    for table in ("cam_boxes", "cam_boxes_ranked"):
        if g.plan["stale"]:
            con.execute(f"DELETE FROM ws.{table} WHERE round = ?", [g.round])
        else:
            con.execute(f"DELETE FROM ws.{table} WHERE round = ? AND image_id IN "
                        f"(SELECT image_id FROM {pre}cam)", [g.round])
    con.execute(f"INSERT INTO ws.cam_boxes SELECT * EXCLUDE (part) FROM {pre}cam")
    con.execute(f"INSERT INTO ws.cam_boxes_ranked SELECT * EXCLUDE (part) FROM {pre}ranked")
    con.execute("INSERT OR REPLACE INTO ws.meta VALUES (?, ?)",
                [state_key(g.round), g.plan["state"]])  # type: ignore[arg-type]


HOOKS = StageHooks(name=NAME, stage=_stage, plan=_plan, write_data=_write_data,
                   write_rows=_write_rows, seed=_seed, state_key=state_key)
