"""`kacl prepare`: CLI manners, skip/force, dataset guard, and kill + resume giving exactly the
result of one uninterrupted run (the phantoms exercise the real NIH ingest path)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kacl_cli.app import app
from kacl_cli.catalog import label_columns_sql
from kacl_cli.stages.prepare import phantoms
from kacl_cli.stages.prepare import stage as ingest
from kacl_cli.workspace import Workspace

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def snapshot(ws: Workspace) -> dict[str, tuple]:
    """Everything prepare decides per image: row, split, labels, boxes, and its pixels."""
    images = ws.catalog.query("SELECT image_id, row, split, patient_id, orig_width FROM images")
    labels = {r[0]: r[1:] for r in ws.catalog.query(
        f"SELECT image_id, {label_columns_sql()} FROM labels")}
    boxes: dict[str, list] = {}
    for r in ws.catalog.query("SELECT image_id, finding, x, y, w, h FROM gt_boxes "
                              "ORDER BY image_id, finding"):
        boxes.setdefault(r[0], []).append(r[1:])
    pixels = ws.store.read_images([r[1] for r in images])
    return {r[0]: (r[1:], labels[r[0]], tuple(boxes.get(r[0], [])),
                   hashlib.sha256(pixels[i].tobytes()).hexdigest())
            for i, r in enumerate(images)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """One uninterrupted run: 40 phantoms at 32 px, seed 3."""
    ws = Workspace(tmp_path_factory.mktemp("ref") / "ws")
    s = ingest.prepare_synthetic(ws, 40, 32, seed=3)
    assert s["images"] == 40 and ws.store.n_rows() == 40
    return snapshot(ws)


# -- CLI ---------------------------------------------------------------------------------------
def test_cli_synthetic_json_skip_and_force(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    args = ["prepare", "--synthetic", "24", "--size", "32", "--workers", "1", "-w", str(ws)]
    r = runner.invoke(app, args + ["--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert (s["images"], s["ingested"], s["source"], s["split"]) == (24, 24, "synthetic",
                                                                      "official")
    assert s["train"] > 0 and s["test"] > 0
    w = Workspace(ws)
    assert s["gt_boxes"] == w.catalog.count("gt_boxes") > 0
    assert (s["train"], s["val"], s["test"]) == tuple(
        w.catalog.count("images", f"split = '{split}'") for split in ("train", "val", "test"))
    again = runner.invoke(app, args + ["--json"])
    assert again.exit_code == 0 and "done, skipping" in again.stderr
    assert json.loads(again.stdout)["skipped"] is True
    forced = runner.invoke(app, args + ["--force"])
    assert forced.exit_code == 0 and "images in workspace" in forced.stdout
    w = Workspace(ws)
    assert w.catalog.count("images") == 24 and w.store.n_rows() == 24
    assert w.catalog.count("runs", "stage = 'prepare' AND status = 'done'") == 2


@pytest.mark.parametrize("args", [
    ["prepare"],
    ["prepare", "--synthetic", "5", "--nih-dir", "."],
    ["prepare", "--synthetic", "5", "--split", "fancy"],
])
def test_cli_usage_errors_exit_2(args: list[str], tmp_path: Path) -> None:
    r = runner.invoke(app, args + ["-w", str(tmp_path / "ws")])
    assert r.exit_code == 2
    assert not (tmp_path / "ws").exists()


def test_cli_malformed_csv_is_one_line_error_and_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "nih"
    phantoms.write_release(root, 6, 32, seed=1)
    lines = (root / "Data_Entry_2017_v2020.csv").read_text().splitlines(keepends=True)
    lines[4] = lines[4].replace(",", ";", 3)  # row 5 loses its columns
    (root / "Data_Entry_2017_v2020.csv").write_text("".join(lines))
    r = runner.invoke(app, ["prepare", "--nih-dir", str(root), "-w", str(tmp_path / "ws")])
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1 and "Data_Entry_2017_v2020.csv:5:" in r.stderr
    assert not (tmp_path / "ws").exists()


def test_cli_no_images_exits_1_and_records_failed_run(tmp_path: Path) -> None:
    root = tmp_path / "nih"
    phantoms.write_release(root, 5, 32, seed=1)
    shutil.rmtree(root / "images")
    ws = tmp_path / "ws"
    r = runner.invoke(app, ["prepare", "--nih-dir", str(root), "-w", str(ws)])
    assert r.exit_code == 1 and "nothing ingested: none of the 5 images" in r.stderr
    assert Workspace(ws).catalog.count("runs", "status = 'failed'") == 1


def test_other_dataset_needs_force(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    ingest.prepare_synthetic(ws, 12, 32, seed=1)
    r = runner.invoke(app, ["prepare", "--synthetic", "12", "--size", "32", "--seed", "2",
                            "-w", str(ws.root)])
    assert r.exit_code == 1 and "--force" in r.stderr and "seed" in r.stderr
    assert ws.catalog.count("images") == 12
    with ws.catalog.connect() as con:  # a derived row of the old data
        con.execute("INSERT INTO cam_boxes (round, image_id, finding, probability) "
                    "SELECT 0, image_id, 'Mass', 0.5 FROM images LIMIT 1")
    s = ingest.prepare_synthetic(ws, 12, 32, seed=2, force=True)
    assert s["images"] == 12 and ws.catalog.count("images") == 12
    assert ws.catalog.count("cam_boxes") == 0  # rebuilt data: derived rows are gone


# -- resume ------------------------------------------------------------------------------------
class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("phase", ["stored", "committed"])
def test_interrupted_run_resumes_to_the_uninterrupted_result(
    phase: str, tmp_path: Path, reference: dict
) -> None:
    def hook(chunk: int, at: str) -> None:
        if chunk == 2 and at == phase:
            raise Boom

    ws = Workspace(tmp_path / "ws")
    with pytest.raises(Boom):
        ingest.prepare_synthetic(ws, 40, 32, seed=3, chunk_size=8, on_chunk=hook)
    committed = 24 if phase == "committed" else 16
    assert ws.catalog.count("images") == committed
    assert ws.store.n_rows() == 24  # chunk 2's pixels were written either way
    s = ingest.prepare_synthetic(ws, 40, 32, seed=3, chunk_size=8)
    assert (s["ingested"], s["skipped_existing"], s["images"]) == (40 - committed, committed, 40)
    assert ws.store.n_rows() == 40
    assert snapshot(ws) == reference


def test_an_lzf_store_resumes_as_lzf_and_refuses_another_compression(
        tmp_path: Path, reference: dict) -> None:
    """The compression is the store's: a resumed run without --compression keeps it (mixed
    chunks would read as garbage) and asking for another is one line, with nothing lost."""
    def hook(chunk: int, at: str) -> None:
        if chunk == 2 and at == "committed":
            raise Boom

    ws = Workspace(tmp_path / "ws")
    with pytest.raises(Boom):
        ingest.prepare_synthetic(ws, 40, 32, seed=3, chunk_size=8, on_chunk=hook,
                                 compression="lzf")
    args = ["prepare", "--synthetic", "40", "--size", "32", "--seed", "3", "--workers", "1",
            "-w", str(ws.root)]
    r = runner.invoke(app, args + ["--compression", "none"])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.output
    assert "'lzf'" in r.stderr and ws.catalog.count("images") == 24
    r = runner.invoke(app, args + ["--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["compression"] == "lzf", r.output
    assert ws.store.images_compression() == "lzf" and snapshot(ws) == reference
    r = runner.invoke(app, args + ["--compression", "zstd"])
    assert r.exit_code == 2 and "--compression must be one of none, lzf" in r.output


def test_killed_process_resumes_to_the_uninterrupted_result(tmp_path: Path,
                                                            reference: dict) -> None:
    """A real SIGKILL (no exception handlers, no cleanup) mid-run, with worker processes."""
    ws = tmp_path / "ws"
    code = (
        "import os, signal, sys\n"
        "from kacl_cli.stages.prepare.stage import prepare_synthetic\n"
        "from kacl_cli.workspace import Workspace\n"
        "def hook(i, at):\n"
        "    if i == 1 and at == 'stored':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "prepare_synthetic(Workspace(sys.argv[1]), 40, 32, seed=3, workers=2, chunk_size=8,"
        " on_chunk=hook)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code, str(ws)], env=env, timeout=120,
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    w = Workspace(ws)
    assert w.catalog.count("images") == 8 and w.store.n_rows() == 16
    assert w.catalog.count("runs", "status = 'running'") == 1
    s = ingest.prepare_synthetic(w, 40, 32, seed=3, chunk_size=8)
    assert (s["ingested"], s["skipped_existing"]) == (32, 8)
    assert snapshot(w) == reference


# -- the NIH path on phantoms: growing downloads, mirror layout, random split -------------------
def test_growing_download_adds_only_new_images(tmp_path: Path) -> None:
    root = tmp_path / "nih"
    phantoms.write_release(root, 30, 32, seed=5)
    later = tmp_path / "later"
    later.mkdir()
    names = sorted(p.name for p in (root / "images").glob("*.png"))
    for name in names[::2]:
        shutil.move(root / "images" / name, later / name)
    ws = Workspace(tmp_path / "ws")
    first = ingest.prepare_nih(ws, root, size=32)
    assert (first["ingested"], first["missing"]) == (15, 15)
    before = snapshot(ws)
    for name in names[::2]:
        shutil.move(later / name, root / "images" / name)
    second = ingest.prepare_nih(ws, root, size=32)  # new fingerprint: not skipped
    assert (second["ingested"], second["skipped_existing"], second["missing"]) == (15, 15, 0)
    after = snapshot(ws)
    assert {k: after[k] for k in before} == before  # earlier images keep rows and splits
    full = Workspace(tmp_path / "full")
    ingest.prepare_nih(full, root, size=32)
    strip = {k: (v[0][1:], v[1], v[2], v[3]) for k, v in snapshot(full).items()}
    assert {k: (v[0][1:], v[1], v[2], v[3]) for k, v in after.items()} == strip


def test_mirror_layout_equals_flat_layout(tmp_path: Path) -> None:
    root = tmp_path / "nih"
    phantoms.write_release(root, 12, 32, seed=6)
    flat = Workspace(tmp_path / "flat")
    ingest.prepare_nih(flat, root, size=24)
    names = sorted(p.name for p in (root / "images").glob("*.png"))
    for k, name in enumerate(names):
        d = root / f"images_{1 + k % 3:03d}" / "images"
        d.mkdir(parents=True, exist_ok=True)
        shutil.move(root / "images" / name, d / name)
    (root / "images").rmdir()
    mirror = Workspace(tmp_path / "mirror")
    s = ingest.prepare_nih(mirror, root, size=24)
    assert s["images"] == 12

    def strip(snap: dict) -> dict:
        return {k: (v[0][:3], v[1], v[2], v[3]) for k, v in snap.items()}
    assert strip(snapshot(mirror)) == strip(snapshot(flat))


def test_random_split_keeps_patients_together(tmp_path: Path) -> None:
    root = tmp_path / "nih"
    phantoms.write_release(root, 60, 16, seed=7)
    ws = Workspace(tmp_path / "ws")
    s = ingest.prepare_nih(ws, root, size=16, split="random", seed=1)
    assert s["split"] == "random" and s["train"] > s["test"] > 0
    assert ws.catalog.query(
        "SELECT count(*) FROM (SELECT patient_id FROM images GROUP BY patient_id "
        "HAVING count(DISTINCT split) > 1)")[0][0] == 0
    assert ws.catalog.query("SELECT count(DISTINCT patient_id) < count(*) FROM images")[0][0]
