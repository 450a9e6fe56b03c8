"""The "any of K" column of `cam --max-boxes K`: hand-made ranked boxes where any-of-K differs
from the protocol's top box, in metrics.json, the metrics table, the HTML report and the CLI;
absent when the round has no ranked boxes."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from typer.testing import CliRunner

from kacl_cli.app import app
from kacl_cli.catalog import insert_rows
from kacl_cli.findings import BOX_FINDINGS
from kacl_cli.stages.cam.parts import state_key
from kacl_cli.stages.evaluate.localization import any_of_k_iou
from kacl_cli.stages.evaluate.metrics import IOU_THRESHOLDS
from kacl_cli.stages.evaluate.stage import evaluate_round


def _report_tests() -> ModuleType:
    """test_report.py's HTML table parser (importlib mode: test modules cannot import each
    other by name)."""
    spec = importlib.util.spec_from_file_location(
        "report_tests", Path(__file__).with_name("test_report.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FAR = (900.0, 900.0, 10.0, 10.0)  # no overlap with any GT box of the tiny workspace (256 px)


def test_any_of_k_iou_takes_the_best_of_the_k_boxes_and_nan_for_none() -> None:
    gt = np.array([[0, 0, 10, 10]] * 4, dtype=float)
    nan = [np.nan] * 4
    pred = np.array([
        [[5, 0, 10, 10], [0, 0, 10, 10]],   # top IoU 1/3, rank 2 exact: 1
        [nan, nan],                         # no box at all: NaN (a miss)
        [[0, 0, 10, 10], FAR],              # top exact, rank 2 far: still 1
        [FAR, nan],                         # only a far box: 0
    ], dtype=float)
    np.testing.assert_allclose(any_of_k_iou(pred, gt), [1.0, np.nan, 1.0, 0.0])
    # K = 1 is the top box's IoU
    np.testing.assert_allclose(any_of_k_iou(pred[:, :1], gt), [1 / 3, np.nan, 1.0, 0.0])


@pytest.fixture
def ranked_ws(tiny_workspace, fakes):
    """Fake round 0 ('exact' / 'shift' / 'none' top boxes), plus ranked boxes: the shifted
    pairs get the exact GT box at rank 2, the exact ones a far box, the missing ones nothing;
    the round's cam state says --max-boxes 3."""
    ws = tiny_workspace(n=48, size=32)
    kinds = fakes.write_fake_round(ws, 0)
    return ws, kinds


def _add_ranked(ws, kinds) -> None:
    gt = {}
    for image_id, finding, x, y, w, h in ws.catalog.query(
            "SELECT image_id, finding, x, y, w, h FROM gt_boxes ORDER BY image_id, finding"):
        gt.setdefault((image_id, finding), (x, y, w, h))
    rows = []
    for (image_id, finding), kind in kinds.items():
        if kind == "shift":
            rows.append((0, image_id, finding, 2, *gt[(image_id, finding)], 0.5))
        elif kind == "exact":
            rows.append((0, image_id, finding, 2, *FAR, 0.5))
    with ws.catalog.connect() as con:
        insert_rows(con, "cam_boxes_ranked", rows)
        con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                    [state_key(0), json.dumps({"max_boxes": 3})])


def _test_pairs(ws, kinds) -> dict[str, list[str]]:
    test = {r[0] for r in ws.catalog.query("SELECT image_id FROM images WHERE split = 'test'")}
    per: dict[str, list[str]] = {f: [] for f in BOX_FINDINGS}
    for (image_id, finding), kind in kinds.items():
        if image_id in test:
            per[finding].append(kind)
    return per


def test_no_ranked_boxes_no_column(ranked_ws) -> None:
    ws, _ = ranked_ws
    doc = evaluate_round(ws, 0, n_boot=0, overlays=0)
    assert doc["localization"]["any_of_k"] is None
    assert all("any_of_k" not in r for r in doc["localization"]["findings"])
    text = (ws.reports / "round-0" / "report.html").read_text()
    assert 'id="loc-iou-any"' not in text and "any of K" not in text.lower()
    assert ws.catalog.count("metrics", "metric LIKE '%any_of_k%'") == 0


def test_any_of_k_differs_from_top_one_everywhere_it_is_shown(ranked_ws) -> None:
    ws, kinds = ranked_ws
    top = evaluate_round(ws, 0, n_boot=0, overlays=0)
    _add_ranked(ws, kinds)
    doc = evaluate_round(ws, 0, n_boot=0, overlays=0)  # the ranked rows are an input: re-run
    assert not doc["skipped"]
    loc = doc["localization"]
    assert loc["any_of_k"]["k"] == 3  # K from the cam run's --max-boxes, not the highest rank
    per = _test_pairs(ws, kinds)
    differs = False
    for row, before in zip(loc["findings"], top["localization"]["findings"], strict=True):
        # the protocol's columns keep the top box
        assert row["acc_iou"] == before["acc_iou"] and row["mean_iou"] == before["mean_iou"]
        kinds_f = per[row["finding"]]
        n = len(kinds_f)
        if n == 0:
            assert all(a is None for a in row["any_of_k"]["acc_iou"])
            continue
        exact, shift = kinds_f.count("exact"), kinds_f.count("shift")
        # any of K: the shifted pairs' rank-2 box is exact, a hit at every T
        np.testing.assert_allclose(row["any_of_k"]["acc_iou"], [(exact + shift) / n] * 7)
        np.testing.assert_allclose(row["acc_iou"],
                                   [(exact + shift * (t < 1 / 3)) / n for t in IOU_THRESHOLDS])
        assert row["any_of_k"]["mean_iou"] == pytest.approx((exact + shift) / n)
        differs |= shift > 0
    assert differs  # the fixture has shifted pairs on the test split
    per_t = [np.mean([r["any_of_k"]["acc_iou"][t] for r in loc["findings"] if r["n"]])
             for t in range(len(IOU_THRESHOLDS))]
    assert loc["any_of_k"]["mean_loc_acc"] == pytest.approx(np.mean(per_t))
    assert loc["any_of_k"]["mean_loc_acc"] > loc["mean_loc_acc"]
    assert doc["headline"]["mean_loc_acc"] == top["headline"]["mean_loc_acc"]
    assert any("any of K = 3" in n for n in doc["notes"])

    # the metrics table
    (value,), = ws.catalog.query("SELECT value FROM metrics WHERE metric = "
                                 "'mean_loc_acc_any_of_k'")
    assert value == pytest.approx(loc["any_of_k"]["mean_loc_acc"])
    assert ws.catalog.count("metrics", "metric = 'loc_acc_iou_any_of_k'") == 7 * len(BOX_FINDINGS)

    # the HTML report: its own table in the papers' layout, K in the header
    mod = _report_tests()
    _, parsed = mod.parse(ws.reports / "round-0" / "report.html")
    table = parsed.tables["loc-iou-any"]
    assert table[0] == ["T (any of K=3)", *BOX_FINDINGS, "mean"]
    for i, row in enumerate(table[1:1 + len(IOU_THRESHOLDS)]):
        assert row[1:9] == [mod.f4(c["any_of_k"]["acc_iou"][i]) for c in loc["findings"]]
        assert row[9] == mod.f4(loc["any_of_k"]["mean_acc_iou"][i])
    top_table = parsed.tables["loc-iou"]
    assert top_table[1][1:9] == [mod.f4(c["acc_iou"][0]) for c in loc["findings"]]

    # the CLI table and --json
    res = CliRunner().invoke(app, ["evaluate", "-w", str(ws.root), "--round", "0",
                                   "--bootstrap", "0", "--overlays", "0"])
    assert res.exit_code == 0, res.output
    assert "Any of K=3 ranked boxes" in res.stdout
    res = CliRunner().invoke(app, ["evaluate", "-w", str(ws.root), "--round", "0",
                                   "--bootstrap", "0", "--overlays", "0", "--json"])
    got = json.loads(res.stdout)["localization"]["any_of_k"]
    assert got["k"] == 3 and math.isclose(got["mean_loc_acc"], loc["any_of_k"]["mean_loc_acc"])
