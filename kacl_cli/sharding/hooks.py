"""What a shardable stage tells the generic part/merge machinery (:mod:`.parts`, :mod:`.merge`).

Each shardable stage exports one :class:`StageHooks` from its ``parts.py``; the registry
``kacl_cli.stages.shardable`` lists them. The machinery never names a stage: everything that
differs between stages (which tables a part is seeded with, how parts are checked and folded
in) is one of these hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: merge.py imports this module
    import duckdb

    from kacl_cli.sharding.merge import Group
    from kacl_cli.sharding.parts import Shard
    from kacl_cli.workspace import Workspace

    Con = duckdb.DuckDBPyConnection
    GroupStep = Callable[[Con, Workspace, Group], None]

Seed = Callable[["Workspace", "Workspace", "int | None", "Shard"], None]
"""``seed(ws, part, round_, shard)``: give a freshly opened part its inputs from ``ws``."""


@dataclass(frozen=True)
class StageHooks:
    """One shardable stage, as :func:`~kacl_cli.sharding.merge.merge` and
    :func:`~kacl_cli.sharding.merge.run_sharded` see it.

    The merge calls, per group of parts (one stage and round): ``stage`` (copy the parts'
    rows into staging tables of the merge connection), ``plan`` (check them against each
    other and the workspace; set ``group.plan["changed"]``, ``"rows"`` and ``"summary"``),
    then, when something changed, ``write_data`` (pixels/maps into ``store.h5``, before any
    row) and ``write_rows`` (inside the merge's catalog transaction), and ``after`` once the
    rows are committed (e.g. statistics over the merged workspace).
    """

    name: str
    stage: GroupStep
    plan: Callable[[Con, Workspace, Group, bool], None]
    write_rows: GroupStep
    write_data: GroupStep | None = None
    after: Callable[[Workspace, Group], None] | None = None
    seed: Seed | None = None
    """None: the stage builds the workspace itself (prepare): its parts start empty, need no
    prepared workspace, and ``--force`` restarts them from scratch."""
    state_key: Callable[[int], str] | None = None
    """The ``meta`` key under which the stage keeps its own state for a round (parts keep
    theirs instead of copying the workspace's)."""
    keeps_fingerprint: bool = False
    """The merge's run carries the parts' input fingerprint, so an unsharded re-run with the
    same inputs is skipped (prepare); otherwise it gets a fingerprint of the parts' runs."""

    @property
    def needs_workspace(self) -> bool:
        """Whether parts are cut from (and merged into) an already prepared workspace."""
        return self.seed is not None


