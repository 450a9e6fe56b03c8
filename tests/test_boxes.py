"""Box geometry against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from kacl_cli.boxes import iobb, iou, scale_xywh, to_pixel_slices


def test_iou_and_iobb_hand_computed() -> None:
    gt = np.array([0.0, 0.0, 10.0, 10.0])
    pred = np.array([5.0, 5.0, 10.0, 10.0])  # overlap 5x5 = 25, union 175
    assert iou(pred, gt) == pytest.approx(25 / 175)
    assert iobb(pred, gt) == pytest.approx(25 / 100)
    inside = np.array([2.0, 2.0, 2.0, 2.0])
    assert iobb(inside, gt) == pytest.approx(1.0)
    assert iou(inside, gt) == pytest.approx(4 / 100)
    assert iou(np.array([20.0, 20, 1, 1]), gt) == 0.0


def test_scale_and_pixel_slices() -> None:
    box = scale_xywh(np.array([512.0, 256.0, 128.0, 64.0]), 0.25, 0.125)
    assert box.tolist() == [128.0, 32.0, 32.0, 8.0]
    assert to_pixel_slices(np.array([1.2, 1.7, 0.1, 0.1]), 8, 8) == (1, 1, 2, 2)
    assert to_pixel_slices(np.array([6.5, 0, 10, 3]), 8, 8) == (6, 0, 8, 3)
