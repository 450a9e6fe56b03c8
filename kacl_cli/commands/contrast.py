"""`kacl contrast`: not implemented yet (placeholder that fails honestly)."""

from __future__ import annotations

from ..cli import WorkspaceOpt, handle_errors
from ..errors import KaclError
from ..workspace import DEFAULT_WORKSPACE

NAME = "contrast"


@handle_errors
def command(workspace: WorkspaceOpt = DEFAULT_WORKSPACE) -> None:
    """Knowledge-augmented contrastive training in rounds (the feedback loop).

    Not implemented yet: this stage exits 1.

    Example: kacl contrast --rounds 3
    """
    raise KaclError("`kacl contrast` is not implemented yet")
