"""`kacl prepare`: not implemented yet (placeholder that fails honestly)."""

from __future__ import annotations

from ..cli import WorkspaceOpt, handle_errors
from ..errors import KaclError
from ..workspace import DEFAULT_WORKSPACE

NAME = "prepare"


@handle_errors
def command(workspace: WorkspaceOpt = DEFAULT_WORKSPACE) -> None:
    """Ingest NIH ChestX-ray14 or synthetic phantoms into the workspace.

    Not implemented yet: this stage exits 1.

    Example: kacl prepare --nih-dir /data/nih  |  kacl prepare --synthetic 200 --size 128
    """
    raise KaclError("`kacl prepare` is not implemented yet")
