"""Shared CLI output: the skip report is one line for people and the full summary for --json."""

from __future__ import annotations

import json

import pytest

from kacl_cli.cli import brief, report, skipped

SUMMARY = {"csv_rows": 8, "checkpoint": "/a/very/long/path/to/checkpoints/round-0",
           "errors": 0, "images": 24, "no_box_reasons": {"flat map": 3}, "round": 0,
           "seconds": 1.5}


def test_skip_is_one_line_for_people(capsys: pytest.CaptureFixture[str]) -> None:
    skipped("cam", SUMMARY, as_json=False)
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("cam: done earlier (round 0, images 24, errors 0")
    assert "no_box_reasons" not in lines[0] and "/a/very/long" not in lines[0]
    assert "done, skipping" in captured.err


def test_skip_json_is_the_full_summary(capsys: pytest.CaptureFixture[str]) -> None:
    report("cam", {**SUMMARY, "skipped": True}, as_json=True)
    doc = json.loads(capsys.readouterr().out)
    assert doc == {**SUMMARY, "skipped": True}


def test_brief_prefers_headline_keys_and_caps_the_count() -> None:
    text = brief({f"k{i}": i for i in range(10)} | {"images": 3}, most=3)
    assert text == "images 3, k0 0, k1 1"


def test_json_output_takes_numpy_scalars_and_arrays(capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    from kacl_cli.cli import emit

    emit({"a": np.float32(0.5), "b": np.arange(3), "n": np.int64(7), "p": object}, True)
    doc = json.loads(capsys.readouterr().out)
    assert doc == {"a": 0.5, "b": [0, 1, 2], "n": 7, "p": str(object)}
