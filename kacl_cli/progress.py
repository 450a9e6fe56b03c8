"""Progress bars on stderr for long work (tqdm; ``KACL_NO_PROGRESS=1`` silences them)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def enabled() -> bool:
    return os.environ.get("KACL_NO_PROGRESS", "") in ("", "0")


def bar(total: int | None, desc: str, unit: str = "img", **kwargs) -> tqdm:
    """A progress bar on stderr; ``mininterval`` keeps batch-job logs readable."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled(), mininterval=0.5,
                dynamic_ncols=True, leave=False, **kwargs)


def track(items: Iterable[T], total: int | None, desc: str, unit: str = "img") -> Iterator[T]:
    with bar(total, desc, unit) as pb:
        for item in items:
            yield item
            pb.update(1)
