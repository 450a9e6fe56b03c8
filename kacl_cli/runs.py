"""One stage run's lifecycle (the ``runs`` table): skip, begin, fail, finish, in one place.

Every stage wraps its work in::

    with ws.stage_run(STAGE, config, fingerprint, round_=k, force=force) as run:
        if run.skipped:
            return run.result()        # the identical finished run's summary, skipped=True
        ...                            # the work; run.error(...) records bad items
        run.summary = summary          # recorded when the block exits normally
    return run.result()

If a run with the same stage, round, shard, config hash and input fingerprint already finished
(and ``force`` is off), the block gets a skipped run and records nothing. Otherwise a
``running`` row is written (an older ``running`` row of the same stage/round/shard was killed:
it becomes ``interrupted``); leaving the block normally marks it ``done`` with ``run.summary``,
and ANY exception (a KaclError, a crash, Ctrl-C) marks it ``failed`` with one reason form,
:func:`failure_reason`, before the exception goes on. A run never stays ``running`` unless the
process itself died.

Under torchrun (``device`` given and a multi-process job), rank 0 records the run and the
other ranks mirror it (same run id, never writing the catalog): every rank must have done its
catalog reads before the block starts, since rank 0 writes from then on.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kacl_cli import __version__
from kacl_cli.catalog import insert_rows

if TYPE_CHECKING:
    from kacl_cli.workspace import Workspace


def stable_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(config: dict[str, Any]) -> str:
    """Short hash of a resolved config; the same settings always give the same hash."""
    return hashlib.sha256(stable_json(config).encode()).hexdigest()[:16]


def now() -> dt.datetime:
    """UTC wall time without tzinfo (DuckDB TIMESTAMP)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def failure_reason(exc: BaseException) -> str:
    """The one form of a failed run's reason: ``Type: first line of the message``."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


@dataclass
class StageRun:
    """One recorded invocation of a stage; collects errors and closes its ``runs`` row.

    ``skipped`` runs stand for an identical finished run (``previous`` is its summary): they
    have no row of their own and record nothing.
    """

    ws: Workspace
    run_id: str
    stage: str
    round: int | None
    config: dict[str, Any]
    started: dt.datetime
    n_errors: int = 0
    summary: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False
    previous: dict[str, Any] | None = None
    status: str = "running"

    @property
    def closed(self) -> bool:
        return self.skipped or self.status != "running"

    def result(self) -> dict[str, Any]:
        """What the stage returns: the summary, or the earlier one marked ``skipped``."""
        if self.skipped:
            return {**(self.previous or {}), "skipped": True}
        return self.summary

    def error(self, item: str | None, reason: str) -> None:
        """Record one bad input item; the stage carries on with the others."""
        self.errors([(item, reason)])

    def errors(self, items: list[tuple[str | None, str]]) -> None:
        if not items:
            return
        self.n_errors += len(items)
        if not self.ws.writes:
            return
        at = now()
        with self.ws.catalog.connect() as con:
            insert_rows(con, "errors",
                        [(self.run_id, self.stage, item, reason, at) for item, reason in items])

    def _close(self, status: str, summary: dict[str, Any]) -> None:
        if self.closed:
            raise RuntimeError(f"run {self.run_id} is already closed ({self.status})")
        self.status = status
        self.summary = summary
        if not self.ws.writes:
            return
        end = now()
        with self.ws.catalog.connect() as con:
            con.execute(
                "UPDATE runs SET status = ?, finished_at = ?, seconds = ?, summary_json = ? "
                "WHERE run_id = ?",
                [status, end, (end - self.started).total_seconds(), stable_json(summary),
                 self.run_id],
            )

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        self._close("done", self.summary if summary is None else summary)

    def fail(self, reason: str) -> None:
        self._close("failed", {"reason": reason})


def find_done(ws: Workspace, stage: str, round_: int | None, chash: str, fingerprint: str,
              shard: str | None = None) -> dict[str, Any] | None:
    """The summary of a finished identical run, or None."""
    if not ws.catalog.path.exists():
        return None
    rows = ws.catalog.query(
        "SELECT summary_json FROM runs WHERE stage = ? AND round IS NOT DISTINCT FROM ? "
        "AND shard IS NOT DISTINCT FROM ? AND config_hash = ? AND input_fingerprint = ? "
        "AND status = 'done' ORDER BY finished_at DESC LIMIT 1",
        [stage, round_, shard, chash, fingerprint],
    )
    if not rows:
        return None
    return json.loads(rows[0][0] or "{}")


def open_run(ws: Workspace, stage: str, config: dict[str, Any], fingerprint: str,
             round_: int | None = None, shard: str | None = None,
             force: bool = False,
             intact: Callable[[dict[str, Any]], bool] | None = None) -> StageRun:
    """Record a ``running`` row, or return a skipped run for an identical finished one.

    ``intact(summary)`` says whether that finished run's outputs are still the ones on disk
    (kacl_cli.skips); when it says no, the stage runs again instead of skipping.
    """
    chash = config_hash(config)
    if not force:
        done = find_done(ws, stage, round_, chash, fingerprint, shard)
        if done is not None and (intact is None or intact(done)):
            return StageRun(ws, str(done.get("run_id", "")), stage, round_, config, now(),
                            skipped=True, previous=done)
    run_id = f"{stage}-{'' if round_ is None else f'r{round_}-'}{uuid.uuid4().hex[:10]}"
    started = now()
    run = StageRun(ws, run_id, stage, round_, config, started)
    if ws.writes:
        ws.run_configs.mkdir(parents=True, exist_ok=True)
        (ws.run_configs / f"{run_id}.json").write_text(
            json.dumps({"stage": stage, "round": round_, "shard": shard,
                        "config": config, "input_fingerprint": fingerprint}, indent=2,
                       default=str)
        )
        with ws.catalog.connect() as con:
            # A run of the same stage still marked 'running' was killed: say so, since this
            # one resumes its work.
            con.execute(
                "UPDATE runs SET status = 'interrupted' WHERE status = 'running' "
                "AND stage = ? AND round IS NOT DISTINCT FROM ? AND shard IS NOT DISTINCT FROM ?",
                [stage, round_, shard],
            )
            con.execute(
                "INSERT INTO runs (run_id, stage, round, shard, config_json, config_hash, "
                "input_fingerprint, status, started_at, version) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, ?)",
                [run_id, stage, round_, shard, stable_json(config), chash, fingerprint,
                 started, __version__],
            )
    return run


def _open_ranked(ws: Workspace, device: Any, stage: str, config: dict[str, Any],
                 fingerprint: str, **kwargs: Any) -> StageRun:
    """:func:`open_run` for a torchrun job: rank 0 records the run, the others mirror it.

    Starts with a barrier (every rank has finished its catalog reads); afterwards only rank 0
    touches the catalog (``ws.writes`` is turned off elsewhere).
    """
    from kacl_cli.training import distributed

    ctx = distributed.from_env()
    if not ctx.active:
        return open_run(ws, stage, config, fingerprint, **kwargs)
    distributed.setup(ctx, distributed.local_device(device))
    if not ctx.is_main:
        ws.writes = False
    distributed.barrier(ctx)
    payload: Any = None
    run: StageRun | None = None
    if ctx.is_main:
        run = open_run(ws, stage, config, fingerprint, **kwargs)
        payload = (run.skipped, run.previous, run.run_id, run.started)
    skipped, previous, run_id, started = distributed.broadcast_object(payload, ctx)
    if run is not None:
        return run
    return StageRun(ws, run_id, stage, kwargs.get("round_"), config, started,
                    skipped=skipped, previous=previous,
                    status="running")


@contextmanager
def stage_run(ws: Workspace, stage: str, config: dict[str, Any], fingerprint: str, *,
              round_: int | None = None, shard: str | None = None, force: bool = False,
              device: Any = None,
              intact: Callable[[dict[str, Any]], bool] | None = None) -> Iterator[StageRun]:
    """The lifecycle of one stage run (see the module docstring).

    ``device`` (a torch device spec) makes the run torchrun-aware: rank 0 records it and the
    other ranks mirror it. Without it the run is recorded by this process alone.
    """
    kwargs = {"round_": round_, "shard": shard, "force": force, "intact": intact}
    run = (open_run(ws, stage, config, fingerprint, **kwargs) if device is None
           else _open_ranked(ws, device, stage, config, fingerprint, **kwargs))
    if run.skipped:
        yield run
        return
    try:
        yield run
    except BaseException as exc:
        if not run.closed:
            run.fail(failure_reason(exc))
        raise
    if not run.closed:
        run.finish()
