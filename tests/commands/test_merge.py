"""`kacl merge` on the command line, after `kacl prepare --shard i/n` jobs: JSON result, the
merged workspace usable (and skipped by an unsharded prepare), idempotent re-runs, one-line
errors with exit 1 for missing shards and nothing to merge, usage errors with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from kacl_cli.app import app
from kacl_cli.workspace import Workspace

runner = CliRunner()
PREPARE = ["prepare", "--synthetic", "12", "--size", "32", "--workers", "1"]


def kacl(*args: str):
    return runner.invoke(app, list(args))


def test_help_has_an_example() -> None:
    result = kacl("merge", "--help")
    assert result.exit_code == 0 and "Example: kacl merge" in result.output


def test_prepare_shards_then_merge(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    for i in (0, 2):
        res = kacl(*PREPARE, "--shard", f"{i}/3", "-w", str(ws), "--json")
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["ingested"] == 4
        assert "kacl merge --stage prepare" in res.stderr

    missing = kacl("merge", "-w", str(ws))
    assert missing.exit_code == 1
    assert "missing shard(s) 1/3 of 3" in missing.stderr and "Traceback" not in missing.output
    assert len(missing.stderr.strip().splitlines()) == 1
    assert not (ws / "catalog.duckdb").exists()  # refused: the workspace is untouched

    assert kacl(*PREPARE, "--shard", "1/3", "-w", str(ws)).exit_code == 0
    res = kacl("merge", "-w", str(ws), "--json")
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["changed"] is True
    assert result["merged"][0] | {"summary": None, "parts": None} == {
        "stage": "prepare", "round": None, "shards": 3, "changed": True,
        "rows": {"images": 12}, "summary": None, "parts": None}
    assert result["merged"][0]["summary"]["images"] == 12
    merged = Workspace(ws)
    assert merged.catalog.query("SELECT min(row), max(row), count(*) FROM images")[0] == (
        0, 11, 12)
    assert merged.store.n_rows() == 12

    again = kacl("merge", "-w", str(ws))
    assert again.exit_code == 0 and "already merged, nothing changed" in again.stdout
    assert merged.catalog.count("images") == 12
    # the merge stands for an unsharded prepare with the same options
    skip = kacl(*PREPARE, "-w", str(ws))
    assert skip.exit_code == 0 and "done, skipping" in skip.stderr

    cleaned = kacl("merge", "-w", str(ws), "--clean")
    assert cleaned.exit_code == 0 and not (ws / "parts" / "prepare").exists()
    nothing = kacl("merge", "-w", str(ws), "--stage", "cam", "--round", "0")
    assert nothing.exit_code == 1
    assert "nothing to merge" in nothing.stderr and "--stage cam --round 0" in nothing.stderr


def test_bad_options_are_usage_errors(tmp_path: Path) -> None:
    assert kacl("merge", "--stage", "pretrain", "-w", str(tmp_path)).exit_code == 2
    assert kacl(*PREPARE, "--shard", "3/3", "-w", str(tmp_path)).exit_code == 2
    assert kacl(*PREPARE, "--shard", "x", "-w", str(tmp_path)).exit_code == 2


def test_stage_choice_is_the_hooks_registry() -> None:
    from kacl_cli.commands.merge import Stage
    from kacl_cli.stages.shardable import NAMES, SHARDABLE

    assert [s.value for s in Stage] == list(NAMES) == [h.name for h in SHARDABLE]
    assert NAMES == ("prepare", "cam", "radiomics")  # merge order: inputs before their users
    help_text = kacl("merge", "--help").output
    assert all(name in help_text for name in NAMES)


def test_bad_shard_is_refused_before_any_work(tmp_path: Path) -> None:
    """Every sharded command parses --shard with Shard.parse while reading its options: a bad
    value is a usage error (exit 2) and nothing is created."""
    ws = tmp_path / "ws"
    for command in (PREPARE, ["cam", "--round", "0"], ["radiomics", "--round", "0"]):
        for bad in ("2/2", "5/2", "1", "a/b"):
            res = kacl(*command, "--shard", bad, "-w", str(ws))
            assert res.exit_code == 2, (command, bad, res.output)
            assert "--shard" in res.output and "Traceback" not in res.output
    assert not ws.exists()
