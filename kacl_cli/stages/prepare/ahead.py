"""Feeding decode jobs to the worker pool, and decoding ahead while the label file is read.

Why ahead: on a small download the fixed part of ``prepare`` (reading and validating the
112k-row label file, the catalog's run records) used to run while the decoders sat idle. The
images on disk are known before the label file is read (the survey lists them), and the label
file lists them in file-name order, which is also the order the ingest decodes them in; so
``prepare`` starts decoding every listed file in name order at once, and the ingest then
takes the results it needs from that stream (:func:`pick`). Nothing is written before the
CSVs are validated: decoding writes nothing. When the ingest's jobs are not in that order
(a label file in another order, a resumed run), it drops the stream and feeds its own.

Pixels do not come back through the pool's pipe: the workers write each image's chunk into a
shared ring (:class:`Slots`) and send back only its length. Measured on 2 cores, a pool's
result pipe cost the receiving process 11 ms of CPU per 512-px image (256 KiB; 2 ms at 256
px), which capped the single writer at ~90 images/s however many decoders fed it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

Job = tuple[int, str, int, str]  # (index, path, store size, compression): decode_job's
SLOT_PREFIX = "kacl-decoded-"


class Slots:
    """A ring of ``count`` slots of ``slot_bytes`` each in a memory file (``/dev/shm`` where
    there is one) that the decode workers map by path: job k writes slot k mod count.

    Why that is safe: :class:`Feed` feeds job k only after job k - count was consumed, and it
    copies a result out of its slot before it frees the slot. The file is removed by
    :meth:`close`; a killed run's file is removed by the next run (its pid is in the name).
    The space is reserved up front (``posix_fallocate``): a sparse file on a small
    ``/dev/shm`` (64 MB in a default container) would kill a worker with SIGBUS on write.
    Raises OSError when no folder has the room (:class:`Feed` then uses the pipe).
    """

    def __init__(self, count: int, slot_bytes: int):
        self.count, self.slot_bytes = count, slot_bytes
        folders = [f for f in ("/dev/shm", tempfile.gettempdir()) if os.path.isdir(f)]
        for k, folder in enumerate(folders):
            _sweep(Path(folder))
            fd, self.path = tempfile.mkstemp(prefix=f"{SLOT_PREFIX}{os.getpid()}-", dir=folder)
            try:
                reserve = getattr(os, "posix_fallocate", None)  # not on macOS
                if reserve is not None:
                    reserve(fd, 0, count * slot_bytes)
                else:  # pragma: no cover
                    os.ftruncate(fd, count * slot_bytes)
                self._map = mmap.mmap(fd, count * slot_bytes)
                return
            except OSError:
                os.unlink(self.path)
                if k == len(folders) - 1:
                    raise
            finally:
                os.close(fd)

    def take(self, slot: int, n: int) -> bytes:
        off = (slot % self.count) * self.slot_bytes
        return self._map[off:off + n]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(BufferError):
            self._map.close()


def _sweep(folder: Path) -> None:
    """Remove ring files whose process is gone (a killed prepare's)."""
    for f in folder.glob(f"{SLOT_PREFIX}*"):
        pid = f.name[len(SLOT_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                f.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@dataclasses.dataclass
class InSlot:
    """A worker's result whose chunk bytes (``n`` of them) are in the ring, in the slot of
    its job's position (the consumer knows it: results come back in job order)."""

    result: Any  # the result with ``chunk=None``
    mask: int
    n: int


_MAPS: dict[str, mmap.mmap] = {}  # the worker's open rings (the newest few)


def run_into_slot(task: tuple[Callable[[Job], Any], Job, str, int, int]) -> Any:
    """In a worker: ``fn(job)``, its ``chunk`` written into the ring rather than returned.
    Anything that does not fit (or a ring already removed: a dropped stream) comes back
    through the pipe as before."""
    fn, job, path, slot, slot_bytes = task
    d = fn(job)
    chunk = getattr(d, "chunk", None)
    if chunk is None or len(chunk[1]) > slot_bytes:
        return d
    try:
        ring = _open_ring(path)
    except (OSError, ValueError):
        return d
    off = slot * slot_bytes
    ring[off:off + len(chunk[1])] = chunk[1]
    return InSlot(dataclasses.replace(d, chunk=None), chunk[0], len(chunk[1]))


def _open_ring(path: str) -> mmap.mmap:
    if path not in _MAPS:
        while len(_MAPS) >= 2:  # earlier runs' rings
            _MAPS.pop(next(iter(_MAPS))).close()
        with open(path, "r+b") as f:
            _MAPS[path] = mmap.mmap(f.fileno(), 0)
    return _MAPS[path]


class Feed:
    """``fn`` over ``jobs`` in a pool's ``imap``, in order, with at most ``window`` results
    fed and not yet consumed.

    ``Pool.imap`` alone would queue all 112k jobs at once and buffer every result the main
    process has not consumed yet; a semaphore around the job feed bounds what is in flight
    (memory stays flat even when store writes are slower than decoding). With
    ``slot_bytes``, results' ``chunk`` bytes travel through a :class:`Slots` ring of
    ``window`` slots instead of the pipe.
    """

    def __init__(self, pool: Any, fn: Callable[[Job], Any], jobs: Sequence[Job], window: int,
                 slot_bytes: int | None = None):
        self.jobs = jobs
        self._slots = threading.Semaphore(window)
        self._stop = threading.Event()
        self._ring: Slots | None = None
        if slot_bytes:
            with contextlib.suppress(OSError):  # no room for a ring: the pipe, as before
                self._ring = Slots(window, slot_bytes)
        tasks = self._feed() if self._ring is None else (
            (fn, job, self._ring.path, k % window, slot_bytes)
            for k, job in enumerate(self._feed()))
        # imap holds tasks back until it has a whole chunk: never more than the window
        self._results = pool.imap(fn if self._ring is None else run_into_slot, tasks,
                                  chunksize=min(4, window))

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
            for k, d in enumerate(self._results):
                if isinstance(d, InSlot):  # copied out before its slot is freed
                    assert self._ring is not None
                    d = dataclasses.replace(d.result, chunk=(d.mask, self._ring.take(k, d.n)))
                self._slots.release()
                yield d
        finally:
            self.stop()

    def stop(self) -> None:
        """Feed no more jobs (unblocks the feeder so the pool can shut down) and remove the
        ring's file (workers still writing keep their mapping; new ones send in-band)."""
        self._stop.set()
        if self._ring is not None:
            self._ring.close()


def positions(ahead: Sequence[Job], jobs: Sequence[Job]) -> list[int] | None:
    """For each of ``jobs``, the position of the same file, size and compression in
    ``ahead``; None unless they appear there in the same order (then the stream cannot serve
    them)."""
    out: list[int] = []
    k = 0
    for _, path, size, compression in jobs:
        while k < len(ahead) and ahead[k][1] != path:
            k += 1
        if k == len(ahead) or ahead[k][2:] != (size, compression):
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
