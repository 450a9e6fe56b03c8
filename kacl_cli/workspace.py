"""The workspace every stage shares, and the stage contract's bookkeeping (``runs`` table).

A stage calls :meth:`Workspace.begin` with its resolved config and an input fingerprint. If
a run with the same stage, round, shard, config hash and fingerprint already finished, it is
skipped ("done, skipping"); otherwise a ``running`` row is recorded, and the stage commits
its work in chunks so a killed run resumes from the last committed chunk.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kacl_cli import __version__
from kacl_cli.catalog import Catalog, insert_rows
from kacl_cli.errors import KaclError
from kacl_cli.store import Store

DEFAULT_WORKSPACE = Path("kacl-workspace")


def stable_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def json_default(obj: Any) -> Any:
    """``json.dumps(default=...)`` for output documents: numpy scalars and arrays as numbers
    and lists, anything else as its str (config hashes keep ``stable_json``'s plain str).

    ``tolist`` first: it gives a scalar for numpy/torch scalars and a list for arrays, where
    ``item`` raises on any array of more than one element."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def config_hash(config: dict[str, Any]) -> str:
    """Short hash of a resolved config; the same settings always give the same hash."""
    return hashlib.sha256(stable_json(config).encode()).hexdigest()[:16]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


@dataclass
class StageRun:
    """One recorded invocation of a stage; collects errors and closes its ``runs`` row."""

    ws: Workspace
    run_id: str
    stage: str
    round: int | None
    config: dict[str, Any]
    started: dt.datetime
    n_errors: int = 0
    summary: dict[str, Any] = field(default_factory=dict)

    def error(self, item: str | None, reason: str) -> None:
        """Record one bad input item; the stage carries on with the others."""
        self.errors([(item, reason)])

    def errors(self, items: list[tuple[str | None, str]]) -> None:
        if not items:
            return
        self.n_errors += len(items)
        if not self.ws.writes:
            return
        at = _now()
        with self.ws.catalog.connect() as con:
            insert_rows(con, "errors",
                        [(self.run_id, self.stage, item, reason, at) for item, reason in items])

    def _close(self, status: str, summary: dict[str, Any]) -> None:
        self.summary = summary
        if not self.ws.writes:
            return
        end = _now()
        with self.ws.catalog.connect() as con:
            con.execute(
                "UPDATE runs SET status = ?, finished_at = ?, seconds = ?, summary_json = ? "
                "WHERE run_id = ?",
                [status, end, (end - self.started).total_seconds(), stable_json(summary),
                 self.run_id],
            )

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        self._close("done", summary or {})

    def fail(self, reason: str) -> None:
        self._close("failed", {"reason": reason})


class Workspace:
    """Paths of one workspace directory, plus its store and catalog."""

    def __init__(self, root: Path | str = DEFAULT_WORKSPACE, writes: bool = True):
        self.root = Path(root)
        # False on non-zero DDP ranks: they compute but never touch the catalog or store.
        self.writes = writes
        self.store = Store(self.root / "store.h5")
        self.catalog = Catalog(self.root / "catalog.duckdb")

    # -- paths --------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint_dir(self, round_: int) -> Path:
        return self.checkpoints / f"round-{round_}"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def run_configs(self) -> Path:
        return self.root / "runs"

    @property
    def parts(self) -> Path:
        """Per-shard part files of sharded batch jobs, folded in by ``kacl merge``."""
        return self.root / "parts"

    def exists(self) -> bool:
        return self.catalog.path.exists()

    def require(self) -> None:
        """Fail with a clear message unless ``prepare`` has populated this workspace."""
        if not self.catalog.path.exists() or not self.store.path.exists():
            raise KaclError(
                f"workspace {self.root} has no prepared data: run `kacl prepare` first "
                "(or pass --workspace/-w, or set KACL_WORKSPACE)"
            )

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.catalog.init()

    def finished_rounds(self) -> list[int]:
        """Rounds with a complete checkpoint (``model.safetensors`` + ``meta.json``)."""
        rounds = []
        if self.checkpoints.is_dir():
            for p in self.checkpoints.glob("round-*"):
                suffix = p.name.split("-", 1)[1]
                if suffix.isdigit() and (p / "meta.json").exists() and (
                    p / "model.safetensors"
                ).exists():
                    rounds.append(int(suffix))
        return sorted(rounds)

    def latest_round(self) -> int:
        rounds = self.finished_rounds()
        if not rounds:
            raise KaclError(f"no trained checkpoint in {self.checkpoints}: run `kacl pretrain`")
        return rounds[-1]

    # -- runs ---------------------------------------------------------------------------
    def find_done(
        self, stage: str, round_: int | None, chash: str, fingerprint: str,
        shard: str | None = None,
    ) -> dict[str, Any] | None:
        """The summary of a finished identical run, or None."""
        if not self.catalog.path.exists():
            return None
        rows = self.catalog.query(
            "SELECT summary_json FROM runs WHERE stage = ? AND round IS NOT DISTINCT FROM ? "
            "AND shard IS NOT DISTINCT FROM ? AND config_hash = ? AND input_fingerprint = ? "
            "AND status = 'done' ORDER BY finished_at DESC LIMIT 1",
            [stage, round_, shard, chash, fingerprint],
        )
        if not rows:
            return None
        return json.loads(rows[0][0] or "{}")

    def begin(
        self,
        stage: str,
        config: dict[str, Any],
        fingerprint: str,
        round_: int | None = None,
        shard: str | None = None,
        force: bool = False,
    ) -> StageRun | dict[str, Any]:
        """Start a stage run, or return the summary of the identical finished run to skip.

        Returns a :class:`StageRun` to work with, or a dict (the earlier summary) when the
        same stage already finished with the same config and inputs and ``force`` is off.
        """
        chash = config_hash(config)
        if not force:
            done = self.find_done(stage, round_, chash, fingerprint, shard)
            if done is not None:
                return done
        run_id = f"{stage}-{'' if round_ is None else f'r{round_}-'}{uuid.uuid4().hex[:10]}"
        started = _now()
        run = StageRun(self, run_id, stage, round_, config, started)
        if self.writes:
            self.run_configs.mkdir(parents=True, exist_ok=True)
            (self.run_configs / f"{run_id}.json").write_text(
                json.dumps({"stage": stage, "round": round_, "shard": shard,
                            "config": config, "input_fingerprint": fingerprint}, indent=2,
                           default=str)
            )
            with self.catalog.connect() as con:
                # A run of the same stage still marked 'running' was killed: say so, since
                # this one resumes its work.
                con.execute(
                    "UPDATE runs SET status = 'interrupted' WHERE status = 'running' "
                    "AND stage = ? AND round IS NOT DISTINCT FROM ? "
                    "AND shard IS NOT DISTINCT FROM ?",
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
