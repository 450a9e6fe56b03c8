"""Sharded stages and `merge`: 3 shards merged equal one unsharded run row for row (prepare,
cam, radiomics), merging is idempotent, and incomplete, unfinished, stale or overlapping parts
are refused with the workspace left untouched."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from kacl_cli.errors import InputError, KaclError
from kacl_cli.findings import FINDINGS
from kacl_cli.models.checkpoint import model_meta, save_checkpoint
from kacl_cli.models.image_net import GRAY_MEAN, GRAY_STD, build_image_net
from kacl_cli.sharding.merge import combine_summaries
from kacl_cli.sharding.parts import Shard, part_dir, select
from kacl_cli.stages.cam import stage as cam_stage
from kacl_cli.stages.prepare import stage as ingest
from kacl_cli.stages.radiomics.stage import run_radiomics_stage
from kacl_cli.stages.shardable import merge_parts
from kacl_cli.workspace import Workspace

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]


def write_checkpoint(ws: Workspace, round_: int = 0, size: int = 64) -> None:
    torch.manual_seed(0)
    model = build_image_net("tiny", n_classes=len(FINDINGS), init="none")
    meta = model_meta("tiny", size, ws.store.image_size(), GRAY_MEAN, GRAY_STD, round_,
                      "pretrain")
    save_checkpoint(ws.checkpoint_dir(round_),
                    {f"image_net.{k}": v for k, v in model.state_dict().items()}, meta)


def table(ws: Workspace, name: str, exclude: str = "") -> list[tuple]:
    cols = f"* EXCLUDE ({exclude})" if exclude else "*"
    return ws.catalog.query(f"SELECT {cols} FROM {name} ORDER BY ALL")


def snapshot(ws: Workspace) -> dict[str, list[tuple]]:
    """Every table's content (runs included), to show a refused merge wrote nothing."""
    names = [r[0] for r in ws.catalog.query(
        "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'")]
    return {n: table(ws, n) for n in names}


# -- the rule ------------------------------------------------------------------------------
def test_slices_partition_the_sorted_ids_strided() -> None:
    ids = [f"{i:03d}.png" for i in (7, 3, 11, 0, 5, 9, 1)]
    parts = [select(ids, Shard(i, 3)) for i in range(3)]
    assert parts[0] == ["000.png", "005.png", "011.png"]
    assert sorted(sum(parts, [])) == sorted(ids) and len(set(sum(parts, []))) == len(ids)
    assert select(list(reversed(ids)), Shard(1, 3)) == parts[1]  # input order is irrelevant


def test_shard_parse_accepts_i_slash_n_only() -> None:
    assert Shard.parse("2/5") == Shard(2, 5) and Shard.parse(" 0 / 1 ") == Shard(0, 1)
    assert Shard.parse(None) is None
    for bad in ("3/3", "5/2", "-1/2", "0/0", "1", "a/b", "1/2/3", "", "/", "1.0/2"):
        with pytest.raises(InputError, match="--shard"):
            Shard.parse(bad)
    with pytest.raises(InputError):
        Shard(2, 2)  # the dataclass keeps the rule too (torchrun ranks build it directly)
    assert Shard(1, 4).dirname == "shard-1-of-4" and Shard(1, 4).label == "1/4"
    assert Shard.from_dirname("shard-1-of-4") == Shard(1, 4)
    for name in ("shard-4-of-4", "shard-1-of-", "xshard-1-of-4", "shard-a-of-4", "cam"):
        assert Shard.from_dirname(name) is None, name


def test_combine_summaries_sums_counts_keeps_settings() -> None:
    out = combine_summaries([
        {"images": 3, "round": 1, "seconds": 2.0, "reasons": {"a": 1}, "split": "all"},
        {"images": 4, "round": 1, "seconds": 5.0, "reasons": {"a": 2, "b": 1}, "split": "all"},
    ])
    assert out == {"images": 7, "round": 1, "seconds": 5.0, "reasons": {"a": 3, "b": 1},
                   "split": "all"}


# -- prepare -------------------------------------------------------------------------------
def prepare_shard(ws: Workspace, i: int, n: int, count: int = 30,
                  compression: str | None = None) -> dict:
    return ingest.prepare_synthetic(ws, count, 48, seed=3, shard=Shard(i, n),
                                    compression=compression)


def test_prepare_three_shards_merge_to_the_unsharded_rows(tmp_path: Path) -> None:
    one = Workspace(tmp_path / "one")
    ingest.prepare_synthetic(one, 30, 48, seed=3)
    many = Workspace(tmp_path / "many")
    sizes = [prepare_shard(many, i, 3, compression="lzf")["ingested"] for i in range(3)]
    assert sum(sizes) == 30 and min(sizes) == 10
    assert not many.catalog.path.exists()  # shards never write the workspace itself
    result = merge_parts(many)
    assert result["changed"] and result["merged"][0]["rows"] == {"images": 30}
    # rows equal the unsharded run's, image for image (paths differ only by the workspace)
    assert table(one, "images", "source_path") == table(many, "images", "source_path")
    for name in ("labels", "gt_boxes", "meta"):
        assert table(one, name) == table(many, name), name
    # GT boxes keep the insertion order the ROI rule relies on ("first box of a finding")
    order = "SELECT image_id, finding, x FROM gt_boxes ORDER BY rowid"
    assert one.catalog.query(order) == many.catalog.query(order)
    assert np.array_equal(one.store.read_images(np.arange(30)),
                          many.store.read_images(np.arange(30)))
    # the merged store keeps the parts' compression
    assert (one.store.images_compression(), many.store.images_compression()) == ("none", "lzf")
    # the merged run stands for the unsharded one: re-running prepare there is skipped
    assert ingest.prepare_synthetic(many, 30, 48, seed=3).get("skipped") is True
    before = snapshot(many)
    again = merge_parts(many)
    assert again["changed"] is False and snapshot(many) == before


def test_prepare_overlapping_part_is_refused(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    for i in range(2):
        prepare_shard(ws, i, 2, count=12)
    # shard 1 also claims an image of shard 0, with other labels: an overlap that disagrees
    p0, p1 = (part_dir(ws, "prepare", None, Shard(i, 2)) / "catalog.duckdb"
              for i in range(2))
    with duckdb.connect(str(p1)) as con:
        con.execute(f"ATTACH '{p0}' AS p0 (READ_ONLY)")
        victim = con.execute("SELECT image_id FROM p0.images LIMIT 1").fetchone()[0]
        con.execute("INSERT INTO images SELECT * REPLACE (99 AS row) FROM p0.images "
                    "WHERE image_id = ?", [victim])
        con.execute("INSERT INTO labels SELECT * REPLACE (NOT \"Hernia\" AS \"Hernia\") "
                    "FROM p0.labels WHERE image_id = ?", [victim])
        con.execute("INSERT INTO shard_items SELECT * FROM p0.shard_items WHERE image_id = ?",
                    [victim])
    with pytest.raises(KaclError, match=f"overlapping parts: shards 0/2, 1/2 .*{victim}"):
        merge_parts(ws)
    assert not ws.catalog.path.exists() and not ws.store.path.exists()


# -- cam and radiomics ---------------------------------------------------------------------
@pytest.fixture
def pair(tiny_workspace, tmp_path: Path) -> tuple[Workspace, Workspace]:
    """Two identical prepared workspaces with a round-0 checkpoint: unsharded vs sharded."""
    one = tiny_workspace(n=18, size=64)
    write_checkpoint(one)
    shutil.copytree(one.root, tmp_path / "many")
    return one, Workspace(tmp_path / "many")


def run_cam_shards(ws: Workspace, n: int = 3, only: list[int] | None = None) -> None:
    for i in only if only is not None else range(n):
        out = cam_stage.run_cam_stage(ws, 0, device="cpu", batch_size=1, shard=Shard(i, n))
        assert out["shard"] == f"{i}/{n}" and out["images"] == 6


def test_cam_and_radiomics_three_shards_merge_to_the_unsharded_rows(pair) -> None:
    one, many = pair
    # batch size 1: an image's numbers do not depend on which images share its batch
    cam_stage.run_cam_stage(one, 0, device="cpu", batch_size=1)
    run_cam_shards(many)
    assert many.catalog.count("cam_boxes") == 0  # parts only, until the merge
    assert merge_parts(many, "cam")["changed"]
    assert table(one, "cam_boxes") == table(many, "cam_boxes")
    assert cam_stage.read_state(one, 0) == cam_stage.read_state(many, 0)
    rows = np.arange(18)
    assert np.array_equal(one.store.read_cams(0, rows), many.store.read_cams(0, rows))

    run_radiomics_stage(one, 0, backend="fast")
    for i in range(3):
        run_radiomics_stage(many, 0, backend="fast", shard=Shard(i, 3))
    assert merge_parts(many, "radiomics", 0)["changed"]
    for name in ("rois", "radiomics", "radiomics_features", "radiomics_settings"):
        assert table(one, name) == table(many, name), name
    # z-scoring statistics: recomputed over the merged rows (the sum order may differ)
    sa, sb = (np.array(table(w, "radiomics_stats", "round, settings_hash"), float)
              for w in (one, many))
    assert sa.shape == sb.shape and np.allclose(sa, sb, rtol=1e-9, atol=1e-12)
    before = snapshot(many)
    assert merge_parts(many)["changed"] is False  # both stages again: nothing changes
    assert snapshot(many) == before


def test_cam_max_boxes_two_shards_merge_the_ranked_boxes_too(pair) -> None:
    one, many = pair
    # a low threshold cuts several components per map, so boxes 2..K exist
    kw = dict(device="cpu", batch_size=1, max_boxes=2, threshold=0.2)
    cam_stage.run_cam_stage(one, 0, **kw)
    ranked = table(one, "cam_boxes_ranked")
    assert ranked and {r[3] for r in ranked} == {2}  # rank 2 only, for some (image, finding)
    for i in range(2):
        cam_stage.run_cam_stage(many, 0, shard=Shard(i, 2), **kw)
    assert many.catalog.count("cam_boxes_ranked") == 0  # parts only, until the merge
    result = merge_parts(many, "cam")
    assert result["merged"][0]["rows"]["cam_boxes_ranked"] == len(ranked)
    assert table(many, "cam_boxes_ranked") == ranked
    assert table(many, "cam_boxes") == table(one, "cam_boxes")
    # a part whose ranked box disagrees with the merged one is a change, then an overlap
    part = Workspace(part_dir(many, "cam", 0, Shard(0, 2)))
    assert merge_parts(many, "cam")["changed"] is False
    part.catalog.execute("UPDATE cam_boxes_ranked SET w = w + 1")
    assert merge_parts(many, "cam")["changed"] is True
    assert table(many, "cam_boxes_ranked") != ranked
    # a re-run with K = 1 merged over it leaves no stale ranked rows
    for i in range(2):
        cam_stage.run_cam_stage(many, 0, shard=Shard(i, 2), device="cpu", batch_size=1,
                                threshold=0.2)
    merge_parts(many, "cam")
    assert many.catalog.count("cam_boxes_ranked") == 0


def test_missing_or_unfinished_shard_is_refused_untouched(pair) -> None:
    _, ws = pair
    run_cam_shards(ws, only=[0, 2])
    before = snapshot(ws)
    with pytest.raises(KaclError, match=r"missing shard\(s\) 1/3 of 3 \(2 of 3 present"):
        merge_parts(ws)
    run_cam_shards(ws, only=[1])
    part = Workspace(part_dir(ws, "cam", 0, Shard(1, 3)))
    part.catalog.execute("UPDATE runs SET status = 'running'")
    with pytest.raises(KaclError, match="shard 1/3 has not finished"):
        merge_parts(ws)
    cam_stage.run_cam_stage(ws, 0, device="cpu", batch_size=1, shard=Shard(0, 2))
    with pytest.raises(KaclError, match="different shard counts"):
        merge_parts(ws)
    assert snapshot(ws) == before and not ws.store.has_cams(0)
    with pytest.raises(KaclError, match="nothing to merge"):
        merge_parts(ws, "radiomics")


def test_overlapping_or_stale_cam_parts_are_refused(pair) -> None:
    _, ws = pair
    run_cam_shards(ws)
    parts = [Workspace(part_dir(ws, "cam", 0, Shard(i, 3))) for i in range(3)]
    other = parts[0].catalog.query("SELECT image_id FROM images LIMIT 1")[0][0]
    with parts[1].catalog.connect() as con:  # shard 1 claims a box of shard 0's image ...
        con.execute(f"ATTACH '{parts[0].catalog.path}' AS p0 (READ_ONLY)")
        con.execute("INSERT INTO cam_boxes SELECT * FROM p0.cam_boxes WHERE image_id = ?",
                    [other])
    # ... with identical content: a harmless duplicate, merged once
    result = merge_parts(ws)
    assert result["merged"][0]["rows"]["cam_boxes"] == 18 * len(FINDINGS)
    assert ws.catalog.count("cam_boxes") == 18 * len(FINDINGS)
    parts[1].catalog.execute("UPDATE cam_boxes SET probability = probability / 2 "
                             "WHERE image_id = ?", [other])
    before = snapshot(ws)
    with pytest.raises(KaclError, match=f"overlapping parts: shards 0/3, 1/3 .*{other}"):
        merge_parts(ws)
    assert snapshot(ws) == before
    # the workspace gains an image after the shards ran: their slices no longer fit
    parts[1].catalog.execute("DELETE FROM cam_boxes WHERE image_id = ?", [other])
    ws.catalog.execute("INSERT INTO images SELECT * REPLACE ('00000000_001.png' AS image_id, "
                       "99 AS row) FROM images WHERE row = 0")
    with pytest.raises(KaclError, match="cut from another image set"):
        merge_parts(ws)


def test_radiomics_shard_needs_merged_cam(pair) -> None:
    _, ws = pair
    run_cam_shards(ws)
    with pytest.raises(KaclError, match="merge --stage cam --round 0"):
        run_radiomics_stage(ws, 0, backend="fast", shard=Shard(0, 3))


def test_example_scripts_are_bash_n_clean() -> None:
    scripts = sorted((REPO / "examples").glob("*.sh"))
    names = {p.name for p in scripts}
    assert {"slurm_radiomics_array.sh", "torchrun_pretrain_contrast.sh",
            "nih_full_run_multigpu.sh"} <= names
    for script in scripts:
        res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert res.returncode == 0, f"{script.name}: {res.stderr}"
    slurm = (REPO / "examples" / "slurm_radiomics_array.sh").read_text()
    assert "#SBATCH --array=0-" in slurm and "--shard \"$SLURM_ARRAY_TASK_ID/$N\"" in slurm
    assert "merge --stage radiomics" in slurm
    assert "afterok" in slurm  # the merge job waits for the whole array


def test_discover_knows_only_the_registered_stages(tmp_path: Path) -> None:
    from kacl_cli.sharding.merge import discover
    from kacl_cli.stages.shardable import CAM, SHARDABLE

    ws = Workspace(tmp_path / "ws")
    for name in ("radiomics-round-1", "cam-round-0", "prepare", "pretrain", "cam-round-x",
                 "camera-round-0"):
        (ws.parts / name / "shard-0-of-1").mkdir(parents=True)
    found = [(h.name, r, d.name) for h, r, d in discover(ws, SHARDABLE)]
    assert found == [("prepare", None, "prepare"), ("cam", 0, "cam-round-0"),
                     ("radiomics", 1, "radiomics-round-1")]
    assert [d.name for _, _, d in discover(ws, [CAM], round_=0)] == ["cam-round-0"]
    assert discover(ws, [CAM], round_=1) == []
