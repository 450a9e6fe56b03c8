"""Progress bars: on a terminal by default, off in logs, forced or silenced by env."""

from __future__ import annotations

import sys

import pytest

from kacl_cli import progress


@pytest.mark.parametrize(
    ("env", "expect"),
    [({}, None), ({"KACL_PROGRESS": "1"}, False), ({"KACL_NO_PROGRESS": "1"}, True),
     ({"KACL_PROGRESS": "1", "KACL_NO_PROGRESS": "1"}, True)],
)
def test_bar_visibility_rule(monkeypatch, env: dict[str, str], expect: bool | None) -> None:
    monkeypatch.delenv("KACL_PROGRESS", raising=False)
    monkeypatch.delenv("KACL_NO_PROGRESS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert progress._disable() is expect
    with progress.bar(3, "x") as pb:
        shown_by_default = sys.stderr.isatty()  # tqdm's auto rule looks at the stream
        assert pb.disable is (not shown_by_default if expect is None else expect)
