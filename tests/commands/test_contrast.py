"""`kacl contrast` end to end: rounds, skip/extend, kill + resume, one-line errors.

Tiny phantoms (64 px), tiny backbone, 1 epoch per round, the fast radiomics backend.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from kacl_cli.app import app
from kacl_cli.models.checkpoint import load_image_net, read_checkpoint

pytestmark = pytest.mark.slow
runner = CliRunner()
FAST = ["--epochs-per-round", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu",
        "--radiomics-backend", "fast"]


@pytest.fixture
def ws(pretrained_ws):
    return pretrained_ws


def _contrast(ws, *args: str):
    return runner.invoke(app, ["contrast", "-w", str(ws.root), *FAST, *args])


def _runs(ws) -> list[tuple]:
    return ws.catalog.query(
        "SELECT stage, round, status FROM runs WHERE stage IN ('cam', 'radiomics', 'contrast') "
        "ORDER BY started_at")


def _done(ws) -> set[tuple[str, int]]:
    return {(s, r) for s, r, st in _runs(ws) if st == "done"}


def test_rounds_skip_and_extend(ws) -> None:
    res = _contrast(ws, "--rounds", "2", "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["trained"] == [1, 2] and doc["latest_round"] == 2
    assert ws.finished_rounds() == [0, 1, 2]
    # every step of every round is its own runs row: cam/radiomics of round k-1, contrast k
    assert _done(ws) == {("cam", 0), ("radiomics", 0), ("contrast", 1),
                         ("cam", 1), ("radiomics", 1), ("contrast", 2)}
    for r in doc["rounds"]:
        assert 0 < r["train_with_positive"] <= r["train_images"]
        assert r["contrastive_loss"] > 0 and r["n_features"] > 10
    assert doc["rounds"][0]["objective_init"] == "fresh"
    assert doc["rounds"][1]["objective_init"] == "continued"
    assert ws.catalog.count("epochs", "round = 2 AND contrastive_loss IS NOT NULL") == 1

    # a contrast checkpoint: image net for predict/cam, plus the objective's encoder + heads
    tensors, meta = read_checkpoint(ws.checkpoint_dir(2))
    assert meta["stage"] == "contrast" and meta["round"] == 2
    assert meta["objective"]["positives"] == "radiomics" and meta["objective"]["proj_dim"] == 128
    assert any(k.startswith("objective.radiomics_encoder.") for k in tensors)
    assert any(k.startswith("objective.image_proj.") for k in tensors)
    model, _ = load_image_net(ws.checkpoint_dir(2))
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 14)

    n_runs = len(_runs(ws))
    again = _contrast(ws, "--rounds", "2", "--json")
    assert again.exit_code == 0, again.stderr
    doc2 = json.loads(again.stdout)
    assert doc2["trained"] == [] and all(r["skipped"] for r in doc2["rounds"])
    assert [r["round"] for r in doc2["rounds"]] == [1, 2]
    assert len(_runs(ws)) == n_runs  # nothing ran, not even a skipped stage

    more = _contrast(ws, "--rounds", "3")
    assert more.exit_code == 0, more.stderr
    assert "skipped" in more.stdout and "trained" in more.stdout  # the table
    assert ws.finished_rounds() == [0, 1, 2, 3]
    new = _runs(ws)[n_runs:]
    assert sorted((s, r) for s, r, _ in new) == [("cam", 2), ("contrast", 3), ("radiomics", 2)]


def test_kill_after_radiomics_then_resume(ws, monkeypatch) -> None:
    import kacl_cli.training.fit as train

    written: list[int] = []
    real_write = train._write_epoch_row

    def record(ws_, round_, stage, row):
        written.append(row["epoch"])
        real_write(ws_, round_, stage, row)

    real_save = train._save_partial

    def save_then_die(directory, state):
        real_save(directory, state)
        raise KeyboardInterrupt  # the user's Ctrl-C right after epoch 1 was saved

    monkeypatch.setattr(train, "_write_epoch_row", record)
    monkeypatch.setattr(train, "_save_partial", save_then_die)
    args = ["--rounds", "1", "--epochs-per-round", "2"]
    killed = _contrast(ws, *args)
    assert killed.exit_code == 130
    assert "re-run the same command to resume" in killed.stderr
    assert ws.finished_rounds() == [0]
    assert (ws.checkpoints / "round-1.partial").is_dir()
    statuses = {(s, r): st for s, r, st in _runs(ws)}
    assert statuses == {("cam", 0): "done", ("radiomics", 0): "done", ("contrast", 1): "failed"}
    assert written == [1]

    monkeypatch.setattr(train, "_save_partial", real_save)
    resumed = _contrast(ws, *args, "--json")
    assert resumed.exit_code == 0, resumed.stderr
    assert written == [1, 2]  # epoch 1 was not trained again
    assert ws.finished_rounds() == [0, 1]
    assert not (ws.checkpoints / "round-1.partial").exists()
    runs = _runs(ws)
    # cam and radiomics were skipped (no new rows); one new contrast row, done
    assert [(s, r) for s, r, _ in runs].count(("cam", 0)) == 1
    assert [(s, r) for s, r, _ in runs].count(("radiomics", 0)) == 1
    assert runs[-1] == ("contrast", 1, "done")
    assert ws.catalog.count("epochs", "round = 1") == 2


def test_one_line_errors(ws, tmp_path) -> None:
    res = _contrast(ws, "--from-round", "3")
    assert res.exit_code == 1
    assert "round-2" in res.stderr and "Traceback" not in res.stderr
    res = _contrast(ws, "--box-supervision", "0.5", "--positives", "augment")
    assert res.exit_code == 1 and "--positives radiomics" in res.stderr
    res = _contrast(ws, "--positives", "nonsense")
    assert res.exit_code == 2
    empty = runner.invoke(app, ["contrast", "-w", str(tmp_path / "nothing"), *FAST])
    assert empty.exit_code == 1 and "kacl prepare" in empty.stderr
    ws.catalog.execute("DELETE FROM runs")  # nothing of the above may have recorded a run
    import shutil

    shutil.rmtree(ws.checkpoint_dir(0))
    res = _contrast(ws)
    assert res.exit_code == 1 and "kacl pretrain" in res.stderr


def test_help_has_example() -> None:
    res = runner.invoke(app, ["contrast", "--help"])
    assert res.exit_code == 0
    assert "Example:" in res.stdout and "--box-supervision" in res.stdout


def test_cli_defaults_are_the_models_defaults() -> None:
    """The CLI keeps literal defaults (no torch import at start-up); they must not drift from
    the one home of the objective's defaults (ContrastSpec, which ContrastConfig reuses)."""
    import inspect

    from kacl_cli.commands import contrast as command
    from kacl_cli.models.contrastive import ContrastSpec
    from kacl_cli.stages.contrast.stage import ContrastConfig

    params = inspect.signature(command.command).parameters
    for cli_name, attr in (("temperature", "temperature"), ("lam", "lam"),
                           ("proj_dim", "proj_dim")):
        assert params[cli_name].default == getattr(ContrastConfig, attr)
        assert getattr(ContrastConfig, attr) == getattr(ContrastSpec, attr)


def test_lambda_temperature_and_proj_dim_reach_the_objective_and_meta(ws, monkeypatch) -> None:
    from kacl_cli.stages.contrast import stage as contrast_stage

    built = []
    real_build = contrast_stage.build_objective

    def spy(classification, spec, **kw):
        built.append(spec)
        return real_build(classification, spec, **kw)

    monkeypatch.setattr(contrast_stage, "build_objective", spy)
    res = _contrast(ws, "--rounds", "1", "--lambda", "0.3", "--temperature", "0.2",
                    "--proj-dim", "16", "--json")
    assert res.exit_code == 0, res.stderr
    (spec,) = built
    assert (spec.lam, spec.temperature, spec.proj_dim) == (0.3, 0.2, 16)
    tensors, meta = read_checkpoint(ws.checkpoint_dir(1))
    assert meta["objective"]["lam"] == 0.3 and meta["objective"]["temperature"] == 0.2
    assert meta["objective"]["proj_dim"] == 16
    assert tensors["objective.image_proj.net.2.weight"].shape[0] == 16
    assert tensors["objective.radiomics_proj.net.2.weight"].shape[0] == 16
    # the epoch's means are linear in the steps': train loss = cls + lambda * contrastive
    total, cls, con = ws.catalog.query(
        "SELECT train_loss, cls_loss, contrastive_loss FROM epochs WHERE round = 1")[0]
    assert con > 0.1
    assert total == pytest.approx(cls + 0.3 * con, rel=1e-4)
    assert total != pytest.approx(cls + con, rel=1e-2)


def test_radiomics_params_reach_the_rounds_radiomics(ws, tmp_path) -> None:
    """--radiomics-params: the rounds' radiomics use the file's settings (here the shipped
    normalised ones), and the positives are read with those settings."""
    from kacl_cli.stages.radiomics import settings as S

    res = _contrast(ws, "--rounds", "1", "--radiomics-params", str(S.NORMALIZED_PARAMS),
                    "--json")
    assert res.exit_code == 0, res.stderr
    normalized = S.settings_hash(S.load_settings(S.NORMALIZED_PARAMS))
    hashes = {h for (h,) in ws.catalog.query("SELECT DISTINCT settings_hash FROM radiomics")}
    assert hashes == {normalized}
    _, meta = read_checkpoint(ws.checkpoint_dir(1))
    assert normalized in json.dumps(meta)  # the positives' settings travel with the model

    bad = tmp_path / "bad.yaml"
    bad.write_text("setting: {normalize: true}\n")  # binWidth 25 on a 1-SD scale
    for path, message in ((bad, "gray-level bins"), (tmp_path / "none.yaml", "no such file")):
        res = _contrast(ws, "--rounds", "2", "--radiomics-params", str(path))
        assert res.exit_code != 0 and message in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    res = _contrast(ws, "--rounds", "2", "--positives", "none", "--radiomics-params",
                    str(S.NORMALIZED_PARAMS))
    assert res.exit_code != 0 and "--positives radiomics" in res.stderr
    assert ws.finished_rounds() == [0, 1]  # none of the refusals trained anything
