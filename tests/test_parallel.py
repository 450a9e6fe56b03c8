"""kacl_cli.parallel: one worker-count rule and one pool for every stage."""

from __future__ import annotations

import os

import pytest

from kacl_cli import parallel


def test_auto_workers_takes_a_request_as_is_and_caps_the_automatic_count(monkeypatch) -> None:
    assert parallel.auto_workers(0) == 0  # 0 stays 0 (e.g. no DataLoader worker processes)
    assert parallel.auto_workers(3) == 3
    monkeypatch.setattr(parallel, "usable_cores", lambda: 64)
    assert parallel.auto_workers(None) == parallel.MAX_AUTO_WORKERS
    monkeypatch.setattr(parallel, "usable_cores", lambda: 2)
    assert parallel.auto_workers(None) == 2


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux affinity mask")
def test_usable_cores_is_the_affinity_mask() -> None:
    assert parallel.usable_cores() == len(os.sched_getaffinity(0))


def _pid_and_mark(_: int) -> tuple[int, str]:
    return os.getpid(), os.environ.get("KACL_TEST_MARK", "")


def _mark(value: str) -> None:
    os.environ["KACL_TEST_MARK"] = value


def test_process_pool_runs_the_initializer_in_other_processes() -> None:
    with parallel.process_pool(2, _mark, ("set",), preload=("kacl_cli.parallel",)) as pool:
        out = pool.map(_pid_and_mark, range(4))
    assert all(pid != os.getpid() for pid, _ in out)
    assert {mark for _, mark in out} == {"set"}


def test_a_pool_only_pays_when_the_saved_time_exceeds_its_start_up(monkeypatch) -> None:
    monkeypatch.setattr(parallel, "POOL_START_S", 1.0)
    assert not parallel.pool_pays(100.0, 1)
    assert not parallel.pool_pays(1.9, 2)  # saves 0.95 s < 1 s start-up
    assert parallel.pool_pays(2.1, 2)
    assert parallel.pool_pays(1.5, 4)  # saves 1.125 s
