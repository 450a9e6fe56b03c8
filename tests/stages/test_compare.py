"""`kacl compare` records its result in A's catalog, and evaluate's reports list it under
"Paired comparisons" (round reports of the rounds involved, the summary); no section without
a comparison, and a refused compare writes nothing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from typer.testing import CliRunner

from kacl_cli.app import app
from kacl_cli.errors import KaclError
from kacl_cli.findings import FINDINGS
from kacl_cli.lock import LOCK_NAME
from kacl_cli.models.checkpoint import model_meta, save_checkpoint
from kacl_cli.models.image_net import GRAY_MEAN, GRAY_STD, build_image_net
from kacl_cli.stages.compare import compare
from kacl_cli.stages.evaluate import comparisons
from kacl_cli.stages.evaluate.paired import CompareError
from kacl_cli.stages.evaluate.report import write_summary_report
from kacl_cli.stages.evaluate.stage import evaluate_round
from kacl_cli.workspace import Workspace


def _report_tests() -> ModuleType:
    """tests/stages/evaluate/test_report.py's HTML table parser (importlib mode)."""
    path = Path(__file__).parent / "evaluate" / "test_report.py"
    spec = importlib.util.spec_from_file_location("report_tests", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _checkpoint(ws: Workspace, round_: int) -> None:
    """A tiny checkpoint: makes the round 'finished' (compare's vocabulary check reads it);
    the boxes and probabilities are the fake round's."""
    torch.manual_seed(0)
    model = build_image_net("tiny", n_classes=len(FINDINGS), init="none")
    meta = model_meta("tiny", 32, ws.store.image_size(), GRAY_MEAN, GRAY_STD, round_,
                      "pretrain")
    save_checkpoint(ws.checkpoint_dir(round_),
                    {f"image_net.{k}": v for k, v in model.state_dict().items()}, meta)


@pytest.fixture
def two_rounds(tiny_workspace, fakes) -> Workspace:
    ws = tiny_workspace(n=48, size=32)
    fakes.write_fake_round(ws, 0, with_cams=False)
    fakes.write_fake_round(ws, 1, seed=4, signal=0.3, with_cams=False)
    for r in (0, 1):
        _checkpoint(ws, r)
    return ws


def _sign(v: float) -> str:
    return f"{v:+.4f}"


def test_compare_section_appears_with_the_deltas_and_is_replaced(two_rounds) -> None:
    ws = two_rounds
    rep = _report_tests()
    first = evaluate_round(ws, 0, n_boot=0, overlays=0)
    text, parsed = rep.parse(Path(first["report"]))
    assert "comparisons" not in parsed.tables and "Paired comparisons" not in text

    a, b = f"{ws.root}:0", f"{ws.root}:1"
    doc = compare(a, b, n_boot=100, seed=3)
    assert doc["recorded_in"] == str(ws.catalog.path)
    n_metrics = 3 + len(FINDINGS)
    assert ws.catalog.count("comparisons") == n_metrics
    # the next evaluate is not skipped: its report now lists the comparison
    again = evaluate_round(ws, 0, n_boot=0, overlays=0)
    assert not again["skipped"]
    text, parsed = rep.parse(Path(again["report"]))
    table = parsed.tables["comparisons"]
    assert len(table) == 2  # header + one comparison
    row = table[1]
    assert row[0] == f"{a} (round 0)" and row[1] == f"{b} (round 1)"
    lo, hi = doc["mean_auc"]["ci"]
    assert row[2:4] == [_sign(doc["mean_auc"]["delta"]), f"[{_sign(lo)}, {_sign(hi)}]"]
    assert row[4] == _sign(doc["loc_acc"]["delta"]) and row[6] == _sign(doc["mean_iou"]["delta"])
    assert row[8:10] == [str(doc["n_images"]), "100"]
    assert doc["mean_auc"]["delta"] > 0  # round 0 has the stronger signal (fakes)
    per = parsed.tables["comparisons-auc"]
    cardio = next(r for r in per if r[0] == "Cardiomegaly")
    assert cardio[1].startswith(_sign(doc["per_finding_auc"]["Cardiomegaly"]["delta"]))
    # round 1 is B of the same workspace: its report lists it too
    r1 = evaluate_round(ws, 1, n_boot=0, overlays=0)
    assert "comparisons" in rep.parse(Path(r1["report"]))[1].tables
    # and the summary across rounds
    summary = write_summary_report(ws, "test", [0, 1], ws.reports / "summary" / "report.html")
    assert rep.parse(summary)[1].tables["comparisons"][1][2] == row[2]

    # the same A, B again (another seed): replaced, not added
    doc2 = compare(a, b, n_boot=200, seed=4)
    assert ws.catalog.count("comparisons") == n_metrics
    got = comparisons.load(ws, 0, "test")
    assert len(got) == 1 and got[0]["n_boot"] == 200
    assert got[0]["mean_auc"]["ci"] == pytest.approx(doc2["mean_auc"]["ci"])
    # another split is another comparison
    assert comparisons.load(ws, 0, "val") == []


def test_a_refused_compare_writes_nothing(two_rounds, tiny_workspace, fakes) -> None:
    ws = two_rounds
    other = tiny_workspace(n=40, size=32)  # other test images
    fakes.write_fake_round(other, 0, with_cams=False)
    _checkpoint(other, 0)
    with pytest.raises(CompareError, match="test images differ"):
        compare(f"{other.root}:0", f"{ws.root}:0", n_boot=100)
    with pytest.raises(KaclError, match="round 5 is missing"):
        compare(f"{ws.root}:5", f"{ws.root}:0", n_boot=100)
    # A busy with a writer on another host: the result stands, unrecorded, and says why
    (ws.root / LOCK_NAME).write_text(json.dumps({
        "pid": 1, "host": "elsewhere", "command": "contrast", "started": "T"}))
    busy = compare(f"{ws.root}:0", f"{ws.root}:1", n_boot=100)
    assert busy["recorded_in"] is None and "busy" in busy["not_recorded"]
    assert busy["mean_auc"]["delta"] > 0
    (ws.root / LOCK_NAME).write_text("")
    for w in (ws, other):
        assert comparisons.load(w, None, "test") == []
    doc = evaluate_round(other, 0, n_boot=0, overlays=0)
    assert "Paired comparisons" not in Path(doc["report"]).read_text()
    # the CLI: one line, exit 1, nothing recorded; a good compare says where it went
    runner = CliRunner()
    res = runner.invoke(app, ["compare", f"{other.root}:0", f"{ws.root}:0"])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1
    assert comparisons.load(other, None, "test") == []
    res = runner.invoke(app, ["compare", f"{ws.root}:1", f"{ws.root}:0", "--bootstrap", "100",
                              "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["recorded_in"] == str(ws.catalog.path)
    assert [c["round_a"] for c in comparisons.load(ws, 1, "test")] == [1]
