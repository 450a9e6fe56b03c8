"""`kacl evaluate`: not implemented yet (placeholder that fails honestly)."""

from __future__ import annotations

from ..cli import WorkspaceOpt, handle_errors
from ..errors import KaclError
from ..workspace import DEFAULT_WORKSPACE

NAME = "evaluate"


@handle_errors
def command(workspace: WorkspaceOpt = DEFAULT_WORKSPACE) -> None:
    """AUC and localization accuracy per round, with an HTML report.

    Not implemented yet: this stage exits 1.

    Example: kacl evaluate --round all
    """
    raise KaclError("`kacl evaluate` is not implemented yet")
