"""`kacl pretrain`: not implemented yet (placeholder that fails honestly)."""

from __future__ import annotations

from ..cli import WorkspaceOpt, handle_errors
from ..errors import KaclError
from ..workspace import DEFAULT_WORKSPACE

NAME = "pretrain"


@handle_errors
def command(workspace: WorkspaceOpt = DEFAULT_WORKSPACE) -> None:
    """Train the image classifier (round 0) with focal loss.

    Not implemented yet: this stage exits 1.

    Example: kacl pretrain --backbone densenet121 --epochs 10
    """
    raise KaclError("`kacl pretrain` is not implemented yet")
