"""Per-epoch hooks of the training loop (TensorBoard today; anything that wants the curves).

Why a registry instead of a ``fit()`` parameter: the commands that call ``fit`` stay as they
are; an option handler (``--tensorboard``) registers a callback for the duration of one
command, and ``fit`` calls every registered callback once per finished epoch, on the process
that writes (rank 0 under torchrun).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

EpochCallback = Callable[[str, int, dict[str, Any]], None]
_CALLBACKS: list[EpochCallback] = []


def register(callback: EpochCallback) -> Callable[[], None]:
    """Add ``callback(stage, round, row)``; returns the function that removes it again."""
    _CALLBACKS.append(callback)

    def remove() -> None:
        if callback in _CALLBACKS:
            _CALLBACKS.remove(callback)

    return remove


def epoch_end(stage: str, round_: int, row: dict[str, Any]) -> None:
    """Called by ``fit`` after each epoch with the row it writes to the ``epochs`` table."""
    for callback in list(_CALLBACKS):
        callback(stage, round_, row)
