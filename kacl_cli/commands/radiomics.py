"""`kacl radiomics`: not implemented yet (placeholder that fails honestly)."""

from __future__ import annotations

from ..cli import WorkspaceOpt, handle_errors
from ..errors import KaclError
from ..workspace import DEFAULT_WORKSPACE

NAME = "radiomics"


@handle_errors
def command(workspace: WorkspaceOpt = DEFAULT_WORKSPACE) -> None:
    """Radiomic features of the CAM (or ground-truth) regions.

    Not implemented yet: this stage exits 1.

    Example: kacl radiomics --round 1 --roi cam --workers 8
    """
    raise KaclError("`kacl radiomics` is not implemented yet")
