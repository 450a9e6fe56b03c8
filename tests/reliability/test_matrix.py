"""The reliability matrix (issue 15): every kind of bad input through the real CLI.

For each kind (``kinds.py``): the exit code, exactly one line on stderr for a failure (with
the expected words, no "Traceback"), no run left ``running``, and the good items' rows as a
clean run left them. The workspaces are built once per module: a pretrained tiny workspace
with cam and radiomics rows ("full"), and an NIH-layout phantom folder with its clean prepare.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kacl_cli.app import app

HERE = Path(__file__).resolve().parent


def _load(name: str, file: str):
    """Import a helper beside this file (pytest's importlib mode adds no folder to sys.path)."""
    spec = importlib.util.spec_from_file_location(name, HERE / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _kinds():
    return _load("reliability_kinds", "kinds.py")


kinds = _kinds()
rows = _load("reliability_rows", "rows.py")
snapshot, running_runs, error_reasons = rows.snapshot, rows.running_runs, rows.error_reasons
runner = CliRunner()
N_RELEASE = 12


def invoke(args: list[str]):
    """Run the CLI in-process, keeping the environment as it was (--max-pixels sets one)."""
    saved = dict(os.environ)
    try:
        return runner.invoke(app, args)
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def full(pretrained_base, tmp_path_factory) -> Path:
    """Prepared + pretrained (conftest) + cam + radiomics of round 0, through the CLI."""
    root = tmp_path_factory.mktemp("full") / "ws"
    shutil.copytree(pretrained_base.root, root)
    for args in (["cam", "--round", "0", "--device", "cpu"], ["radiomics", "--round", "0"]):
        r = invoke([*args, "-w", str(root)])
        assert r.exit_code == 0, r.stderr
    return root


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, Path]:
    """(an NIH-layout phantom folder, its clean prepare)."""
    from kacl_cli.stages.prepare import phantoms

    base = tmp_path_factory.mktemp("release")
    folder = base / "nih"
    phantoms.write_release(folder, N_RELEASE, 64, seed=3, enrich=0.6)
    clean = base / "clean"
    r = invoke(["prepare", "--nih-dir", str(folder), "--size", "64", "--workers", "1",
                "-w", str(clean)])
    assert r.exit_code == 0, r.stderr
    return folder, clean


def same_good_rows(clean: dict, got: dict, bad_ids: set[str]) -> None:
    """Every image of the clean run (but the deliberately broken ones) has identical rows."""
    for table in ("images", "labels", "gt_boxes"):
        want = [r for r in clean[table] if r[0] not in bad_ids]
        have = [r for r in got[table] if r[0] not in bad_ids]
        assert have == want, table
    for image_id, digest in clean["pixels"].items():
        if image_id not in bad_ids:
            assert got["pixels"][image_id] == digest, image_id


# -- the matrix --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", kinds.KINDS, ids=[k.name for k in kinds.KINDS])
def test_bad_input(kind, full, release, tmp_path, monkeypatch) -> None:
    folder, clean_ws = release
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    if kind.base == "full":
        ws = tmp_path / "ws"
        shutil.copytree(full, ws)
    else:
        ws = tmp_path / "ws"
    env = kinds.Env(ws=ws, release=tmp_path / "nih", tmp=scratch, monkeypatch=monkeypatch)
    shutil.copytree(folder, env.release)
    args = kind.build(env)
    before = snapshot(ws) if kind.base == "full" else None
    r = invoke(args)

    assert not (r.exception and not isinstance(r.exception, SystemExit)), repr(r.exception)
    assert r.exit_code == kind.code, (r.stdout[-2000:], r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    if kind.code != 0:
        assert len(lines) == 1, r.stderr
    if kind.says:
        assert kind.says in r.stderr, r.stderr
    elif kind.code == 0:
        assert not any("error" in ln for ln in lines), r.stderr
    assert "another kacl process" not in r.stderr  # no kind here is a busy workspace
    assert running_runs(ws) == []
    if kind.logged:
        assert any(kind.logged in reason for reason in error_reasons(ws)), error_reasons(ws)

    if kind.base == "full":
        after = snapshot(ws)
        for table in set(before) | set(after):
            if table not in kind.changes:
                assert after.get(table) == before.get(table), table
    elif kind.code == 0 and kind.command == "prepare":
        # The good images' rows are the clean run's; a broken image is left out or, when
        # it decodes, kept with its own pixels.
        # A box kind only adds a bad box: every row must be the clean run's.
        bad = set() if "-box-" in kind.name else {kinds.first_image(env)}
        same_good_rows(snapshot(clean_ws), snapshot(ws), bad)
    elif kind.code != 0 and kind.command == "prepare" and (ws / "catalog.duckdb").exists():
        assert snapshot(ws).get("images") in ([], None)  # a refusal ingests nothing


def test_the_matrix_is_large_enough() -> None:
    assert len(kinds.KINDS) >= 60
    assert len({k.name for k in kinds.KINDS}) == len(kinds.KINDS)


def test_one_bad_predict_file_keeps_the_others(full, tmp_path) -> None:
    """Issue 15 #5: the good files' results are printed, the bad one is its error entry."""
    import json

    good = kinds.png(tmp_path / "g.png")
    bomb = kinds.png(tmp_path / "big.png", np.zeros((8000, 8000), np.uint8))
    ww0 = kinds.dicom(tmp_path / "w0.dcm", window_width=0)
    r = invoke(["predict", "--json", "--device", "cpu", "-w", str(full), str(good), str(bomb),
                str(ww0)])
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc["n_failed"] == 2
    assert [("error" in d) for d in doc["images"]] == [False, True, True]
    assert len(doc["images"][0]["findings"]) == 14
