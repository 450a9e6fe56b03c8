"""The HTML report: one self-contained file whose tables say what metrics.json says."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from kacl_cli.findings import BOX_FINDINGS, FINDINGS
from kacl_cli.stages.evaluate.baselines import WANG2017_AUC, WANG2017_LOC_IOU
from kacl_cli.stages.evaluate.metrics import IOBB_THRESHOLDS, IOU_THRESHOLDS
from kacl_cli.stages.evaluate.report import write_summary_report
from kacl_cli.stages.evaluate.stage import evaluate_round


class Tables(HTMLParser):
    """Collect every <table id=...> as a list of rows of cell texts, and every <img src>."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []
        elif tag == "img":
            self.images.append(a["src"])

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> tuple[str, Tables]:
    text = path.read_text(encoding="utf-8")
    t = Tables()
    t.feed(text)
    return text, t


def f4(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def assert_self_contained(text: str, parsed: Tables) -> None:
    assert not re.search(r"https?://", text, re.IGNORECASE)
    assert "<script" not in text and "<link" not in text
    for src in parsed.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def round_report(tiny_workspace, fakes):
    ws = tiny_workspace(n=48, size=32)
    fakes.write_fake_round(ws, 0)
    doc = evaluate_round(ws, 0, n_boot=50, overlays=4)
    return ws, doc


def test_round_report_tables_match_metrics_json(round_report) -> None:
    ws, doc = round_report
    path = ws.reports / "round-0" / "report.html"
    metrics = json.loads((ws.reports / "round-0" / "metrics.json").read_text())
    assert doc["report"] == str(path)
    text, parsed = parse(path)
    assert_self_contained(text, parsed)
    assert len(parsed.images) == 3  # ROC, accuracy curves, overlays

    auc = parsed.tables["auc-table"]
    assert [r[0] for r in auc[1:15]] == list(FINDINGS)
    for row, c in zip(auc[1:15], metrics["classification"]["findings"], strict=True):
        assert row[1] == f4(c["auc"])
        assert row[3] == f"{c['n_pos']} / {c['n']}"
        assert row[4] == f4(WANG2017_AUC.auc[c["finding"]])
        if c["auc"] is not None:
            assert row[2] == f"{f4(c['ci_low'])} – {f4(c['ci_high'])}"
    assert auc[15][1] == f4(metrics["classification"]["mean_auc"])
    assert "n/a" in [r[1] for r in auc[1:15]]  # tiny test split: some findings one-class

    loc = metrics["localization"]
    for kind, thresholds, name in (("iou", IOU_THRESHOLDS, "IoU"),
                                   ("iobb", IOBB_THRESHOLDS, "IoBB")):
        table = parsed.tables[f"loc-{kind}"]
        assert table[0] == ["T", *BOX_FINDINGS, "mean"]
        assert [r[0] for r in table[1:1 + len(thresholds)]] == [
            f"T({name}) = {t:g}" for t in thresholds]
        for i, row in enumerate(table[1:1 + len(thresholds)]):
            assert row[1:9] == [f4(c[f"acc_{kind}"][i]) for c in loc["findings"]]
            assert row[9] == f4(loc[f"mean_acc_{kind}"][i])
        gt_row = next(r for r in table if r[0] == "GT boxes")
        assert gt_row[1:9] == [str(c["n"]) for c in loc["findings"]]
    published = parsed.tables["baseline-loc-iou"]
    assert published[1][1:] == [f4(WANG2017_LOC_IOU.at(f, 0.1)) for f in BOX_FINDINGS]
    assert "official patient split" in text  # published numbers carry their split
    head = re.sub(r"<[^>]+>", "", text[text.index('id="headline"'):])
    assert f4(metrics["headline"]["mean_loc_acc"]) in head[:300]


def test_report_without_stored_maps_says_so(tiny_workspace, fakes) -> None:
    ws = tiny_workspace(n=48, size=32)
    fakes.write_fake_round(ws, 2, with_cams=False)
    out = ws.root / "elsewhere"
    evaluate_round(ws, 2, n_boot=0, out=out)
    text, parsed = parse(out / "report.html")
    assert (out / "metrics.json").exists()
    assert_self_contained(text, parsed)
    assert len(parsed.images) == 2
    assert "No overlays" in text
    ci_cells = [r[2] for r in parsed.tables["auc-table"][1:]]
    assert set(ci_cells) == {"n/a"}  # --bootstrap 0: no intervals


def test_summary_report_shows_every_round(round_report, fakes) -> None:
    ws, doc0 = round_report
    fakes.write_fake_round(ws, 1, seed=9, signal=0.5)
    doc1 = evaluate_round(ws, 1, n_boot=0, overlays=0)
    path = write_summary_report(ws, "test", [0, 1], ws.reports / "summary" / "report.html",
                                {0: Path(doc0["report"]), 1: Path(doc1["report"])})
    text, parsed = parse(path)
    assert_self_contained(text, parsed)
    rounds = parsed.tables["rounds"]
    assert [r[0] for r in rounds[1:]] == ["0", "1"]
    for row, doc in zip(rounds[1:], (doc0, doc1), strict=True):
        assert row[1] == f4(doc["headline"]["mean_auc"])
        assert row[3] == f4(doc["headline"]["mean_loc_acc"])
    assert 'href="../round-1/report.html"' in text
    per_finding = parsed.tables["rounds-auc"]
    assert per_finding[0] == ["finding", "round 0", "round 1"]
    assert len(parsed.images) == 1


@pytest.mark.nih
def test_report_on_the_real_nih_sample(nih_sample, tmp_path, fakes) -> None:
    """Real CSVs and boxes (6 box-annotated images of the sample, all on the official test
    list): every test-split GT box is a pair, one box-supervised image is excluded, and the
    report names the dataset and split beside the published numbers."""
    from kacl_cli.stages.prepare.stage import prepare_nih
    from kacl_cli.workspace import Workspace

    ws = Workspace(tmp_path / "nih")
    prepare_nih(ws, nih_sample, size=32, workers=1)
    fakes.write_fake_round(ws, 0)
    boxes = ws.catalog.query(
        "SELECT g.image_id, count(*) FROM gt_boxes g JOIN images i USING (image_id) "
        "WHERE i.split = 'test' GROUP BY 1 ORDER BY 1")
    assert boxes, "the sample's box-annotated images are on the official test list"
    ws.catalog.execute("INSERT INTO box_supervision VALUES (?, 0, 0.8, 'test')", [boxes[0][0]])
    doc = evaluate_round(ws, 0, n_boot=20, overlays=3)
    loc = doc["localization"]
    assert loc["n_excluded_images"] == 1 and loc["n_excluded_pairs"] == boxes[0][1]
    assert loc["n_pairs"] == sum(n for _, n in boxes) - boxes[0][1]
    text, parsed = parse(Path(doc["report"]))
    assert_self_contained(text, parsed)
    assert "NIH ChestX-ray14" in text and "official patient split" in text
    assert len(parsed.images) == 3
