"""Progress bars on stderr for long work.

Bars are drawn when stderr is a terminal; in batch-job logs (stderr redirected) they would be
thousands of carriage-return frames, so there only the stages' one-line notes appear (per
epoch, per stage). ``KACL_PROGRESS=1`` forces bars on, ``KACL_NO_PROGRESS=1`` silences bars
and notes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from tqdm.auto import tqdm

# How a stage says something that is not its result (a warning, where it is): a callback the
# command layer supplies (the CLI prints it on stderr); stages never import the CLI.
Note = Callable[[str], None]


def note_stderr(text: str) -> None:
    """The default :data:`Note` outside the CLI: one line on stderr, past any progress bar."""
    tqdm.write(text, file=sys.stderr)


def enabled() -> bool:
    """False when the user silenced progress output altogether (bars and notes)."""
    return os.environ.get("KACL_NO_PROGRESS", "") in ("", "0")


def _disable() -> bool | None:
    if not enabled():
        return True
    if os.environ.get("KACL_PROGRESS", "") not in ("", "0"):
        return False
    return None  # tqdm's rule: a bar only on a terminal


def bar(total: int | None, desc: str, unit: str = "img", **kwargs) -> tqdm:
    """A progress bar on stderr; ``mininterval`` keeps forced bars in logs readable."""
    return tqdm(total=total, desc=desc, unit=unit, disable=_disable(), mininterval=0.5,
                dynamic_ncols=True, leave=False, **kwargs)
