"""`kacl study` end to end on a few dozen 64 px phantoms (1 epoch), resumed after a simulated
failure, and `kacl compare`'s refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import pytest
from typer.testing import CliRunner

from kacl_cli.app import app
from kacl_cli.errors import KaclError
from kacl_cli.stages.study import Study, StudyConfig, decide
from kacl_cli.workspace import Workspace

runner = CliRunner()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from kacl_cli.stages.prepare.stage import prepare_synthetic

    ws = Workspace(tmp_path_factory.mktemp("study") / "ws")
    prepare_synthetic(ws, 40, size=64, seed=0, enrich=0.5, generator=2, label_noise=0.05)
    return ws


def _cfg(**kw) -> StudyConfig:
    base = dict(seeds=[0], settings=["none", "oracle", "shuffled"], pretrain_epochs=1,
                rounds=1, epochs_per_round=1, batch_size=8, label_fraction=0.5, n_boot=100,
                augment=False)
    return StudyConfig(**{**base, **kw})


def test_study_end_to_end_resumes_a_failed_cell(prepared) -> None:
    notes: list[str] = []

    def boom(seed: int, setting: str) -> None:
        if setting == "shuffled":
            raise KaclError("simulated failure")

    study = Study(prepared, _cfg(), notes.append)
    doc = study.run(fail=boom)
    rows = {r["setting"]: r for r in doc["rows"]}
    assert rows["shuffled"]["seeds_failed"] == [0] and not rows["shuffled"]["complete"]
    assert rows["oracle"]["seeds_done"] == [0] and "vs_none" in rows["oracle"]
    assert doc["decision"]["valid"] is None  # shuffled missing: no verdict
    # cells share the one store: their images are a link, never a copy
    cell = study.cell_dir(0, "oracle")
    with h5py.File(cell / "store.h5", "r") as f:
        assert isinstance(f.get("images", getlink=True), h5py.ExternalLink)
        assert f["images"].shape[0] == 40
    assert (cell / "checkpoints" / "round-0").is_symlink()
    assert (cell / "store.h5").stat().st_size < (prepared.root / "store.h5").stat().st_size
    oracle_mtime = (cell / "cell.json").stat().st_mtime

    notes.clear()
    doc = Study(prepared, _cfg(), notes.append).run()  # the re-run: only the failed cell
    rows = {r["setting"]: r for r in doc["rows"]}
    assert all(r["complete"] for r in rows.values())
    assert (cell / "cell.json").stat().st_mtime == oracle_mtime  # done cells untouched
    assert [n for n in notes if n.endswith("...")] == ["study seed 0: shuffled ..."]
    assert doc["decision"]["valid"] in (True, False)
    assert set(doc["decisions"]) == {"mean_auc", "loc_acc", "probe_auc"}
    # the linear probe: a test AUC per setting and round 0, paired like the model's
    assert all(0.0 <= r["probe_auc"] <= 1.0 for r in doc["rows"])
    assert 0.0 <= doc["round0"]["probe_auc"] <= 1.0
    assert set(rows["oracle"]["vs_none"]["probe_auc"]) == {"delta", "ci"}
    assert set(rows["oracle"]["vs_shuffled"]["probe_auc"]) == {"delta", "ci"}
    # oracle (and radiomics) are also paired against the negative control
    assert set(rows["oracle"]["vs_shuffled"]) >= {"mean_auc", "loc_acc", "mean_iou"}
    assert "vs_shuffled" not in rows["shuffled"] and "vs_shuffled" not in rows["none"]
    assert doc["decisions"]["mean_auc"] == doc["decision"]
    assert set(doc["rows"][1]["vs_none"]) >= {"mean_auc", "mean_iou", "loc_acc",
                                               "per_finding_auc"}
    # another config refuses to continue the same study directory
    with pytest.raises(KaclError, match="other settings"):
        Study(prepared, _cfg(rounds=2), notes.append).run()


def test_compare_refusals_and_table(prepared, tmp_path) -> None:
    study_root = prepared.root / "study" / "default" / "seed-0"
    if not (study_root / "none" / "cell.json").exists():
        pytest.skip("needs the end-to-end study above")
    a, b = study_root / "oracle", study_root / "none"
    res = runner.invoke(app, ["compare", f"{a}:1", f"{b}:1", "--json", "--bootstrap", "100"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["n_images"] > 0 and len(doc["mean_auc"]["ci"]) == 2
    # a missing round
    res = runner.invoke(app, ["compare", f"{a}:5", f"{b}:1"])
    assert res.exit_code == 1 and "round 5 is missing" in res.output
    # other test images: a workspace prepared from other phantoms
    from kacl_cli.stages import pretrain
    from kacl_cli.stages.prepare.stage import prepare_synthetic
    from kacl_cli.training.config import TrainConfig

    other = Workspace(tmp_path / "other")
    prepare_synthetic(other, 30, size=64, seed=1)
    pretrain.run(other, pretrain.PretrainConfig(
        backbone="tiny", init="none", train=TrainConfig(
            epochs=1, batch_size=8, image_size=64, workers=0, device="cpu", augment=False)))
    res = runner.invoke(app, ["compare", f"{other.root}:0", f"{b}:1"])
    assert res.exit_code == 1 and "test images differ" in res.output
    assert len(res.output.strip().splitlines()) == 1
    # another vocabulary
    meta_path = other.checkpoint_dir(0) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["findings"] = meta["findings"][:-1]
    meta_path.write_text(json.dumps(meta))
    res = runner.invoke(app, ["compare", f"{other.root}:0", f"{b}:1"])
    assert res.exit_code == 1 and "vocabular" in res.output


def test_decision_rule() -> None:
    def doc(o, s, r):
        return {"rows": [{"setting": n, "complete": True, "vs_none": {"mean_auc": {"ci": ci}}}
                         for n, ci in (("oracle", o), ("shuffled", s), ("radiomics", r))]}

    assert decide(doc([0.01, 0.03], [-0.01, 0.01], [-0.01, 0.02]))["verdict"].endswith(
        "no detectable effect of radiomics positives")
    assert decide(doc([0.01, 0.03], [-0.01, 0.01], [0.001, 0.02]))["verdict"].endswith(
        "help (CI above 0)")
    bad = decide(doc([-0.01, 0.03], [0.01, 0.02], [0.0, 0.1]))
    assert bad["valid"] is False and "oracle" in bad["verdict"] and "shuffled" in bad["verdict"]
    # each metric is judged on its own CIs
    both = {"rows": [{"setting": n, "complete": True,
                      "vs_none": {"mean_auc": {"ci": [-0.02, 0.01]}, "loc_acc": {"ci": ci}}}
                     for n, ci in (("oracle", [0.01, 0.04]), ("shuffled", [-0.01, 0.01]),
                                   ("radiomics", [-0.03, -0.01]))]}
    assert decide(both)["valid"] is False
    loc = decide(both, "loc_acc")
    assert loc["valid"] is True and loc["verdict"].endswith("hurt (CI below 0)")


def test_study_jobs_runs_seeds_in_processes_and_locks_a_seed(prepared) -> None:
    """`--jobs 2`: two seeds in two child processes (logs, done cells, the pooled table on
    stdout); a second process on a seed that is being run stops with one "busy" line."""
    res = runner.invoke(app, [
        "study", "-w", str(prepared.root), "--name", "jobs", "--seeds", "2", "--jobs", "2",
        "--settings", "none,oracle,shuffled", "--pretrain-epochs", "1", "--rounds", "1",
        "--epochs-per-round", "1", "--batch-size", "8", "--label-fraction", "0.5",
        "--bootstrap", "100", "--no-augment", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert all(r["seeds_done"] == [0, 1] and r["complete"] for r in doc["rows"])
    root = prepared.root / "study" / "jobs"
    for seed in (0, 1):
        log = (root / f"seed-{seed}.log").read_text()
        assert f"study seed {seed}: oracle test AUC" in log  # the child did the work
        assert f"study seed {1 - seed}:" not in log

    from kacl_cli.lock import WorkspaceBusy, workspace_lock

    study = Study(prepared, _cfg(name="jobs", seeds=[0, 1]), lambda _t: None)
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from kacl_cli.lock import workspace_lock\n"
         f"with workspace_lock({str(root / 'seed-1')!r}, 'test'):\n"
         "    print('held', flush=True); time.sleep(30)"], stdout=-1, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(WorkspaceBusy, match="busy"):
            study._run_seeds(None)
        # through --jobs: that seed's process fails, the command says so and exits 1
        res = runner.invoke(app, [
            "study", "-w", str(prepared.root), "--name", "jobs", "--seeds", "2", "--jobs", "2",
            "--settings", "none,oracle,shuffled", "--pretrain-epochs", "1", "--rounds", "1",
            "--epochs-per-round", "1", "--batch-size", "8", "--label-fraction", "0.5",
            "--bootstrap", "100", "--no-augment"])
        assert res.exit_code == 1
        assert "the process of seed(s) 1 failed" in res.output
        assert "busy" in (root / "seed-1.log").read_text()
    finally:
        child.kill()
        child.wait()
    with workspace_lock(root / "seed-1", "test"):  # released with its holder
        pass
