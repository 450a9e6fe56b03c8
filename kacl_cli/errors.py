"""Errors that end a command with a one-line message instead of a traceback.

Exit codes follow the stage contract: 0 success, 1 failure (bad input, missing stage output,
partial failures), 2 usage errors (Typer's own).
"""

from __future__ import annotations


class KaclError(Exception):
    """A failure the user can act on; its message is printed as one line, exit code 1."""

    exit_code = 1


class NotReadyError(KaclError):
    """A stage's inputs are missing (e.g. ``cam`` before ``pretrain``)."""


class CheckpointError(KaclError):
    """A checkpoint is missing, half-written or from another model/vocabulary."""


class InputError(KaclError):
    """Unreadable or malformed user input (image, CSV, params file)."""


class UsageError(KaclError):
    """An option value that can only be judged once the data is seen (e.g. a shard index past
    the number of images): a usage error like Typer's own, exit code 2."""

    exit_code = 2
