"""`kacl merge`: not implemented yet (placeholder that fails honestly)."""

from __future__ import annotations

from ..cli import WorkspaceOpt, handle_errors
from ..errors import KaclError
from ..workspace import DEFAULT_WORKSPACE

NAME = "merge"


@handle_errors
def command(workspace: WorkspaceOpt = DEFAULT_WORKSPACE) -> None:
    """Fold the part files of sharded batch jobs into the workspace.

    Not implemented yet: this stage exits 1.

    Example: kacl merge
    """
    raise KaclError("`kacl merge` is not implemented yet")
