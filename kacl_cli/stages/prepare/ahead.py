"""Feeding decode jobs to the worker pool, and decoding ahead while the label file is read.

Why ahead: on a small download the fixed part of ``prepare`` (reading and validating the
112k-row label file, the catalog's run records) used to run while the decoders sat idle. The
images on disk are known before the label file is read (the survey lists them), and the label
file lists them in file-name order, which is also the order the ingest decodes them in; so
``prepare`` starts decoding every listed file in name order at once, and the ingest then
takes the results it needs from that stream (:func:`pick`). Nothing is written before the
CSVs are validated: decoding writes nothing. When the ingest's jobs are not in that order
(a label file in another order, a resumed run), it drops the stream and feeds its own.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

Job = tuple[int, str, int]  # (index, path, store size): decode_job's argument


class Feed:
    """``fn`` over ``jobs`` in a pool's ``imap``, in order, with at most ``window`` results
    fed and not yet consumed.

    ``Pool.imap`` alone would queue all 112k jobs at once and buffer every result the main
    process has not consumed yet; a semaphore around the job feed bounds what is in flight
    (memory stays flat even when store writes are slower than decoding).
    """

    def __init__(self, pool: Any, fn: Callable[[Job], Any], jobs: Sequence[Job], window: int):
        self.jobs = jobs
        self._slots = threading.Semaphore(window)
        self._stop = threading.Event()
        self._results = pool.imap(fn, self._feed(), chunksize=4)

    def _feed(self) -> Iterator[Job]:
        for job in self.jobs:
            while not self._slots.acquire(timeout=0.1):
                if self._stop.is_set():
                    return
            if self._stop.is_set():
                return
            yield job

    def __iter__(self) -> Iterator[Any]:
        try:
            for d in self._results:
                self._slots.release()
                yield d
        finally:
            self.stop()

    def stop(self) -> None:
        """Feed no more jobs (unblocks the feeder so the pool can shut down)."""
        self._stop.set()


def positions(ahead: Sequence[Job], jobs: Sequence[Job]) -> list[int] | None:
    """For each of ``jobs``, the position of the same file and size in ``ahead``; None
    unless they appear there in the same order (then the stream cannot serve them)."""
    out: list[int] = []
    k = 0
    for _, path, size in jobs:
        while k < len(ahead) and ahead[k][1] != path:
            k += 1
        if k == len(ahead) or ahead[k][2] != size:
            return None
        out.append(k)
        k += 1
    return out


def pick(feed: Feed, picks: list[int]) -> Iterator[Any]:
    """The results at positions ``picks`` (ascending) of ``feed``, re-indexed 0, 1, ...
    as the ingest's own jobs; the rest are dropped. Stops the feed after the last one."""
    want = {p: j for j, p in enumerate(picks)}
    left = len(picks)
    if not left:
        feed.stop()
        return
    try:
        for d in feed:
            j = want.get(d.index)
            if j is None:
                continue
            yield dataclasses.replace(d, index=j)
            left -= 1
            if not left:
                break
    finally:
        feed.stop()
