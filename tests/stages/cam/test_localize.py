"""Boxes at image resolution (localize), fitted box rules (box_rules) and the grid ceiling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kacl_cli.errors import CheckpointError, InputError
from kacl_cli.findings import FINDINGS
from kacl_cli.stages.cam.box_rules import FittedRules, fit_rules, read_rules_file, write_rules
from kacl_cli.stages.cam.gradcam import REASON_EMPTY, REASON_FLAT, REASON_NONFINITE
from kacl_cli.stages.cam.localize import BoxRule, localize, upsample_maps
from kacl_cli.stages.evaluate.localization import grid_ceiling_iou, headroom, mean_accuracy


def test_upsampling_keeps_the_pixel_edge_frame() -> None:
    """A constant map stays constant; a left-right ramp's upsampled centre column sits where
    the map's cell centres say (align_corners=False: output pixel i centre = (i + .5) h / S)."""
    ramp = torch.arange(4, dtype=torch.float32).repeat(4, 1)[None]  # value j at column j
    up = upsample_maps(ramp, (16, 16))[0]
    # output column 6 has its centre at 6.5 / 4 = 1.625 map units, i.e. 1.125 past cell 0's
    # centre (0.5): interpolated value 1.125
    assert up[0, 6].item() == pytest.approx(1.125)
    assert torch.allclose(upsample_maps(torch.ones(1, 3, 5), (9, 15)), torch.ones(1, 9, 15))


def test_one_hot_cell_gives_exactly_its_cell_at_image_resolution() -> None:
    m = torch.zeros(1, 8, 8)
    m[0, 2, 5] = 1.0
    (mb,), = localize(m, (64, 64), BoxRule(0.5, "peak"))
    assert mb.box == (40.0, 16.0, 8.0, 8.0) and mb.peak == 1.0
    # a lower cut reaches into the neighbours: a strictly larger box around the same cell
    (low,), = localize(m, (64, 64), BoxRule(0.1, "peak"))
    x, y, w, h = low.box
    assert x < 40 and y < 16 and x + w > 48 and y + h > 24


def two_blobs() -> torch.Tensor:
    """A single hot pixel (the peak, 1.0) and a broad weaker region (0.8 over 3 x 3 cells)."""
    m = torch.zeros(1, 8, 8)
    m[0, 1, 1] = 1.0
    m[0, 4:7, 4:7] = 0.8
    return m


def test_component_rules_peak_versus_mass() -> None:
    (peak,), = localize(two_blobs(), (8, 8), BoxRule(0.5, "peak"))
    (mass,), = localize(two_blobs(), (8, 8), BoxRule(0.5, "mass"))
    assert peak.box == (1.0, 1.0, 1.0, 1.0)
    assert mass.box == (4.0, 4.0, 3.0, 3.0) and mass.mass == pytest.approx(0.8 * 9)


def test_k_boxes_are_ranked_by_mass_after_the_chosen_one() -> None:
    m = two_blobs()
    m[0, 7, 0] = 0.6  # a third, lightest component
    ranked, = localize(m, (8, 8), BoxRule(0.5, "mass"), max_boxes=3)
    assert [b.box for b in ranked] == [(4.0, 4.0, 3.0, 3.0), (1.0, 1.0, 1.0, 1.0),
                                       (0.0, 7.0, 1.0, 1.0)]
    assert [b.mass for b in ranked] == sorted((b.mass for b in ranked), reverse=True)
    by_peak, = localize(m, (8, 8), BoxRule(0.5, "peak"), max_boxes=2)
    assert [b.box for b in by_peak] == [(1.0, 1.0, 1.0, 1.0), (4.0, 4.0, 3.0, 3.0)]
    assert len(localize(m, (8, 8), BoxRule(0.5), max_boxes=10)[0]) == 3


def test_bad_maps_give_reasons_and_bad_options_one_line_errors() -> None:
    maps = torch.zeros(3, 4, 4)
    maps[1] = 0.3
    maps[2, 0, 0] = float("nan")
    got = [b[0] for b in localize(maps, (16, 16), BoxRule())]
    assert [b.reason for b in got] == [REASON_EMPTY, REASON_FLAT, REASON_NONFINITE]
    assert all(b.box is None for b in got)
    for frac in (0.0, 1.5, -0.2, float("nan")):
        with pytest.raises(InputError, match=r"\(0, 1\]"):
            BoxRule(frac)
    with pytest.raises(InputError, match="max-boxes"):
        localize(maps, (16, 16), BoxRule(), max_boxes=0)
    with pytest.raises(InputError, match="component"):
        BoxRule(0.5, "largest")


def test_fit_picks_the_threshold_that_matches_the_known_box() -> None:
    """A Gaussian blob: the GT box is exactly the region above 0.3 x peak, so the fit must pick
    0.3 (not the default 0.5) with IoU 1, and report the default's lower IoU beside it."""
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = torch.exp(-((xx - 15.5) ** 2 + (yy - 15.5) ** 2) / (2 * 5.0 ** 2))[None]
    (ref,), = localize(blob, (32, 32), BoxRule(0.3, "peak"))
    rules, info = fit_rules(blob.repeat(2, 1, 1), np.array([ref.box, ref.box]),
                            ["Mass", "Mass"], (32, 32))
    assert rules["Mass"] == BoxRule(0.3, "peak")
    assert info["Mass"]["mean_iou"] == pytest.approx(1.0)
    assert info["Mass"]["default_mean_iou"] < 0.9 and info["Mass"]["n"] == 2


def test_fit_picks_the_component_rule_that_finds_the_box() -> None:
    rules, _ = fit_rules(two_blobs(), np.array([[4.0, 4.0, 3.0, 3.0]]), ["Nodule"], (8, 8))
    assert rules["Nodule"].component == "mass"


def test_rules_file_refuses_another_checkpoint_or_vocabulary(tmp_path, tiny_workspace) -> None:
    ws = tiny_workspace(n=4, size=32)
    ckpt = tmp_path / "round-0"
    ckpt.mkdir()
    fitted = FittedRules({f: BoxRule(0.35, "mass") for f in FINDINGS}, "fitted",
                         image_ids=["a.png"], checkpoint="abc")
    write_rules(ws, 0, ckpt, fitted)
    assert read_rules_file(ckpt, "abc").rules["Mass"] == BoxRule(0.35, "mass")
    assert ws.catalog.query("SELECT count(*) FROM box_rules WHERE round = 0")[0][0] == 14
    assert ws.catalog.query("SELECT image_id FROM box_rule_images") == [("a.png",)]
    with pytest.raises(CheckpointError, match="another checkpoint"):
        read_rules_file(ckpt, "xyz")
    doc = json.loads((ckpt / "box_rules.json").read_text())
    doc["findings"] = doc["findings"][::-1]
    (ckpt / "box_rules.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="vocabulary"):
        read_rules_file(ckpt, "abc")
    assert read_rules_file(tmp_path, "abc") is None


def test_grid_ceiling_is_exact_on_and_between_grid_lines() -> None:
    size = np.array([[64.0, 64.0], [64.0, 64.0]])
    # on the 8 x 8 grid (cell 8 px): ceiling 1; the second box's x range [4, 20) is half a
    # cell off the grid lines 0, 8, 16, 24
    gt = np.array([[8.0, 8.0, 16.0, 16.0], [4.0, 8.0, 16.0, 16.0]])
    ceil = grid_ceiling_iou(gt, size, (8, 8))
    assert ceil[0] == pytest.approx(1.0)
    # x candidates: [0,24) 16/24, [0,16) and [8,24) 12/20, [8,16) 8/16 -> best 2/3
    assert ceil[1] == pytest.approx(2 / 3)
    assert mean_accuracy(np.array([0.75, np.nan]), (0.1, 0.7, 0.8)) == pytest.approx(2 / 6)
    rows = headroom(np.array([0.5, 0.2]), ceil, np.array([0, 0]), ("Mass", "Nodule"), (0.1,))
    assert rows[0]["n"] == 2 and rows[0]["ceiling_iou"] == pytest.approx(5 / 6)
    assert rows[1]["n"] == 0 and rows[1]["mean_iou"] is None
