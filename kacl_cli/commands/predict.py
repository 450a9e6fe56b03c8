"""`kacl predict`: not implemented yet (placeholder that fails honestly)."""

from __future__ import annotations

from ..cli import WorkspaceOpt, handle_errors
from ..errors import KaclError
from ..workspace import DEFAULT_WORKSPACE

NAME = "predict"


@handle_errors
def command(workspace: WorkspaceOpt = DEFAULT_WORKSPACE) -> None:
    """Classify X-ray files and localize findings.

    Not implemented yet: this stage exits 1.

    Example: kacl predict img.png --boxes
    """
    raise KaclError("`kacl predict` is not implemented yet")
