"""``radiomics`` as shards: what a part is seeded with, and how its ROIs and features are
merged. The z-scoring statistics are recomputed over the merged workspace afterwards
(:func:`kacl_cli.stages.radiomics.stats.compute_stats`), never per shard.
"""

from __future__ import annotations

import json

import duckdb

from kacl_cli.errors import KaclError, NotReadyError
from kacl_cli.sharding.hooks import StageHooks
from kacl_cli.sharding.merge import (
    Group,
    changes,
    collist,
    columns,
    combine_summaries,
    coverage,
    overlaps,
    stage_tables,
)
from kacl_cli.sharding.parts import Shard, link_images, seed_tables, shard_images, sql_str
from kacl_cli.sharding.parts import stage_dir as parts_dir
from kacl_cli.stages.cam import parts as cam_parts
from kacl_cli.stages.radiomics.stats import compute_stats
from kacl_cli.workspace import Workspace

NAME = "radiomics"
SEED_TABLES = ("images", "labels", "gt_boxes", "box_supervision")


def _seed(ws: Workspace, part: Workspace, round_: int | None, shard: Shard) -> None:
    """The shard's images, labels, GT boxes, box supervision and the round's CAM boxes."""
    link_images(ws, part)
    mine = shard_images(ws, shard)
    if round_ is not None and not ws.catalog.count("cam_boxes", "round = ?", [round_]) and \
            parts_dir(ws, cam_parts.NAME, round_).is_dir():
        raise NotReadyError(f"the cam parts of round {round_} are not merged yet: run "
                            f"`kacl merge --stage {cam_parts.NAME} --round {round_}` first")

    def cam_boxes(con: duckdb.DuckDBPyConnection) -> None:
        con.execute("DELETE FROM cam_boxes")
        con.execute("INSERT INTO cam_boxes SELECT c.* FROM src.cam_boxes c WHERE "
                    "c.round = ? AND c.image_id IN (SELECT image_id FROM mine)", [round_])

    seed_tables(ws, part, mine, SEED_TABLES, extra=cam_boxes)


def _stage(con: duckdb.DuckDBPyConnection, ws: Workspace, g: Group) -> None:
    stage_tables(con, g, {
        "ids": "SELECT image_id, row, split FROM part.images",
        "rois": "SELECT * FROM part.rois WHERE round = ?",
        "rad": "SELECT * FROM part.radiomics WHERE round = ?",
        "feat": "SELECT * FROM part.radiomics_features",
        "set": "SELECT * FROM part.radiomics_settings",
    }, {"rois": [g.round], "rad": [g.round]})


def _check_parts(con: duckdb.DuckDBPyConnection, ws: Workspace, g: Group) -> None:
    """The parts agree with each other and with the workspace's feature names."""
    pre = g.prefix
    coverage(con, ws, g)
    for table, what in (("rois", "ROI"), ("rad", "radiomics row")):
        cols = [c for c in columns(con, f"{pre}{table}") if c != "part"]
        overlaps(con, f"{pre}{table}", "image_id, finding", collist(cols), what, g)
    overlaps(con, f"{pre}feat", "settings_hash, feature_index", "name", "feature", g)
    overlaps(con, f"{pre}set", "settings_hash", "settings_json", "settings", g)
    clash = con.execute(f"SELECT f.settings_hash FROM {pre}feat f JOIN ws.radiomics_features w "
                        "USING (settings_hash, feature_index) WHERE f.name <> w.name LIMIT 1"
                        ).fetchone()
    if clash:
        raise KaclError(f"{g.name}: feature names of settings {clash[0]} differ from the "
                        "workspace's; the shards ran another radiomics version")


def _plan(con: duckdb.DuckDBPyConnection, ws: Workspace, g: Group, has_ws: bool) -> None:
    pre = g.prefix
    _check_parts(con, ws, g)
    config = json.loads(g.parts[0].run["config_json"])
    splits = config.get("split")
    split_sql = "" if not splits else " AND split IN (" + ", ".join(
        sql_str(s) for s in splits) + ")"
    scope = f"(SELECT image_id FROM ws.images WHERE true{split_sql})"
    con.execute(f"CREATE TABLE {pre}scope AS SELECT image_id FROM {scope}")
    r = int(g.round)  # type: ignore[arg-type]
    changed = 0
    for table, ws_table in (("rois", "rois"), ("rad", "radiomics")):
        cols = collist([c for c in columns(con, f"{pre}{table}") if c != "part"])
        changed += changes(con, f"(SELECT * EXCLUDE (part) FROM {pre}{table})",
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


def _write_rows(con: duckdb.DuckDBPyConnection, ws: Workspace, g: Group) -> None:
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


def _after(ws: Workspace, g: Group) -> None:
    """Training-split z-scoring statistics over the whole workspace (never per shard)."""
    if not (g.plan["changed"] or g.plan.get("stats_missing")):
        return
    for h in g.plan["hashes"]:
        n = ws.catalog.count("radiomics_features", "settings_hash = ?", [h])
        g.plan["summary"]["train_rows_for_stats"] = compute_stats(ws, int(g.round), h, n)  # type: ignore[arg-type]


HOOKS = StageHooks(name=NAME, stage=_stage, plan=_plan, write_rows=_write_rows, after=_after,
                   seed=_seed)
