"""The workspace every stage shares: its paths, store and catalog.

A stage wraps its work in :meth:`Workspace.stage_run` (the lifecycle lives in
:mod:`kacl_cli.runs`): with its resolved config and an input fingerprint, an identical
finished run is skipped ("done, skipping"); otherwise a ``running`` row is recorded, and the
stage commits its work in chunks so a killed run resumes from the last committed chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from kacl_cli import runs
from kacl_cli.catalog import Catalog
from kacl_cli.errors import KaclError
from kacl_cli.models.checkpoint_files import META_FILE, MODEL_FILE
from kacl_cli.runs import StageRun, config_hash, stable_json
from kacl_cli.store import Store

# Re-exported: the run bookkeeping lives in kacl_cli.runs.
__all__ = ["DEFAULT_WORKSPACE", "StageRun", "Workspace", "config_hash", "json_default",
           "stable_json"]

DEFAULT_WORKSPACE = Path("kacl-workspace")


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
                if suffix.isdigit() and (p / META_FILE).exists() and (
                    p / MODEL_FILE
                ).exists():
                    rounds.append(int(suffix))
        return sorted(rounds)

    # -- runs (kacl_cli.runs) ---------------------------------------------------------------
    def find_done(
        self, stage: str, round_: int | None, chash: str, fingerprint: str,
        shard: str | None = None,
    ) -> dict[str, Any] | None:
        """The summary of a finished identical run, or None."""
        return runs.find_done(self, stage, round_, chash, fingerprint, shard)

    def begin(
        self,
        stage: str,
        config: dict[str, Any],
        fingerprint: str,
        round_: int | None = None,
        shard: str | None = None,
        force: bool = False,
    ) -> StageRun:
        """Open a run by hand (``run.skipped`` when an identical one finished); stages use
        :meth:`stage_run`, which also closes it."""
        return runs.open_run(self, stage, config, fingerprint, round_, shard, force)

    def stage_run(
        self,
        stage: str,
        config: dict[str, Any],
        fingerprint: str,
        *,
        round_: int | None = None,
        shard: str | None = None,
        force: bool = False,
        device: Any = None,
        intact: Callable[[dict[str, Any]], bool] | None = None,
    ) -> AbstractContextManager[StageRun]:
        """``with ws.stage_run(...) as run:``: skip/begin/fail/finish (:func:`runs.stage_run`)."""
        return runs.stage_run(self, stage, config, fingerprint, round_=round_, shard=shard,
                              force=force, device=device, intact=intact)
