"""The published numbers, transcribed as data, agree with themselves and with the real boxes."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from kacl_cli.findings import BOX_FINDINGS, FINDINGS, normalise_finding
from kacl_cli.stages.evaluate.baselines import WANG2017_AUC, WANG2017_LOC_IOBB, WANG2017_LOC_IOU


def test_published_mean_auc_is_the_mean_of_the_findings() -> None:
    assert list(WANG2017_AUC.auc) == list(FINDINGS)
    assert np.mean(list(WANG2017_AUC.auc.values())) == pytest.approx(WANG2017_AUC.mean, abs=1e-4)


@pytest.mark.nih
def test_published_accuracies_are_counts_of_the_real_box_list(nih_sample) -> None:
    """Accuracy = correct / GT boxes: every published value times the finding's number of boxes
    in BBox_List_2017.csv is (up to 4-decimal truncation) a whole number of boxes, which pins
    both the transcription and the per-box denominators evaluate uses."""
    with open(nih_sample / "BBox_List_2017.csv", newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    boxes = {f: 0 for f in BOX_FINDINGS}
    for row in rows:
        boxes[normalise_finding(row[1])] += 1
    assert sum(boxes.values()) == 984
    for table in (WANG2017_LOC_IOU, WANG2017_LOC_IOBB):
        for f in BOX_FINDINGS:
            for t in table.thresholds:
                count = table.at(f, t) * boxes[f]
                assert abs(count - round(count)) < 0.02, (table.kind, f, t, count)
