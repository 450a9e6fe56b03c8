"""One stage-run lifecycle (kacl_cli.runs): skip, force, and any exception marks the run
failed (never left `running`) with one reason form."""

from __future__ import annotations

import json

import pytest

from kacl_cli.errors import KaclError
from kacl_cli.runs import failure_reason


def _runs(ws) -> list[tuple[str, str]]:
    return ws.catalog.query("SELECT status, summary_json FROM runs ORDER BY started_at")


def test_normal_exit_records_the_summary_and_an_identical_run_is_skipped(tiny_workspace) -> None:
    ws = tiny_workspace(n=2)
    with ws.stage_run("demo", {"x": 1}, "fp", round_=0) as run:
        assert not run.skipped
        run.summary = {"n": 3}
    assert run.result() == {"n": 3}
    with ws.stage_run("demo", {"x": 1}, "fp", round_=0) as again:
        assert again.skipped and again.previous == {"n": 3}
    assert again.result() == {"n": 3, "skipped": True}
    assert [(s, json.loads(j)) for s, j in _runs(ws)] == [("done", {"n": 3})]


def test_force_runs_again(tiny_workspace) -> None:
    ws = tiny_workspace(n=2)
    for n in (1, 2):
        with ws.stage_run("demo", {"x": 1}, "fp", force=True) as run:
            assert not run.skipped
            run.summary = {"n": n}
    assert [json.loads(j)["n"] for _, j in _runs(ws)] == [1, 2]


@pytest.mark.parametrize("exc", [ZeroDivisionError("division by zero\nmore"),
                                 KeyboardInterrupt(), KaclError("bad input")])
def test_any_exception_marks_the_run_failed(tiny_workspace, exc: BaseException) -> None:
    """Regression: pretrain and prepare caught only KaclError, so a crash left `running`."""
    ws = tiny_workspace(n=2)
    with pytest.raises(type(exc)), ws.stage_run("demo", {"x": 1}, "fp") as run:
        raise exc
    [(status, summary)] = _runs(ws)
    assert status == "failed" and run.status == "failed"
    assert json.loads(summary) == {"reason": failure_reason(exc)}


def test_failure_reason_has_one_form() -> None:
    assert failure_reason(ZeroDivisionError("division by zero\nmore")) == (
        "ZeroDivisionError: division by zero")
    assert failure_reason(KeyboardInterrupt()) == "KeyboardInterrupt"
    assert failure_reason(KaclError("bad input")) == "KaclError: bad input"


def test_a_failed_run_is_not_skipped(tiny_workspace) -> None:
    ws = tiny_workspace(n=2)
    with pytest.raises(RuntimeError), ws.stage_run("demo", {"x": 1}, "fp"):
        raise RuntimeError("boom")
    with ws.stage_run("demo", {"x": 1}, "fp") as run:
        assert not run.skipped
