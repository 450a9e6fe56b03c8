"""`kacl cam`: not implemented yet (placeholder that fails honestly)."""

from __future__ import annotations

from ..cli import WorkspaceOpt, handle_errors
from ..errors import KaclError
from ..workspace import DEFAULT_WORKSPACE

NAME = "cam"


@handle_errors
def command(workspace: WorkspaceOpt = DEFAULT_WORKSPACE) -> None:
    """Batched multi-label Grad-CAM maps and boxes from a round's checkpoint.

    Not implemented yet: this stage exits 1.

    Example: kacl cam --round 0 --split test
    """
    raise KaclError("`kacl cam` is not implemented yet")
