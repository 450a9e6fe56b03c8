"""Process pools and worker counts: one way to start a pool, one way to pick a count.

Used by prepare (decoding), the phantom generator and radiomics (feature extraction), and by
the commands' ``--workers`` defaults.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.pool
import os
import signal
from collections.abc import Callable, Sequence
from typing import Any

MAX_AUTO_WORKERS = 8


def usable_cores() -> int:
    """CPU cores this process may run on: the affinity mask a batch scheduler grants, not
    the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1  # pragma: no cover - macOS, Windows


def auto_workers(requested: int | None) -> int:
    """``requested`` as given, or (None) one worker per usable core, capped at
    ``MAX_AUTO_WORKERS``: past ~8 the single writer (prepare) or the HDF5 reads and
    augmentation feeding one model (training) become the limit."""
    if requested is not None:
        return requested
    return max(1, min(MAX_AUTO_WORKERS, usable_cores()))


def ignore_sigint() -> None:
    """Pool workers leave Ctrl-C to the main process, which stops the pool and reports once
    (instead of every worker printing a KeyboardInterrupt traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def process_pool(workers: int, initializer: Callable[..., Any] | None = ignore_sigint,
                 initargs: Sequence[Any] = (), preload: Sequence[str] = ()
                 ) -> multiprocessing.pool.Pool:
    """A process pool that starts fast and safely.

    Not ``fork``: the parent holds DuckDB/HDF5/tqdm threads, and forking those is how pools
    deadlock. Not plain ``spawn`` either: it re-imports the ``kacl`` entry script (the whole
    CLI, torch included) in every worker, seconds each. A forkserver that preloads only the
    modules the workers need (``preload``) gives both.
    """
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        if preload:
            ctx.set_forkserver_preload(list(preload))
    else:  # pragma: no cover - Windows
        ctx = mp.get_context("spawn")
    return ctx.Pool(workers, initializer=initializer, initargs=tuple(initargs))


# Seconds to start and stop a pool of 2 radiomics workers (forkserver, preloaded stage module,
# per-worker store reader and backend), measured on the 2-core machine (benchmarks/fixed_cost.py).
POOL_START_S = 1.5


def pool_pays(work_s: float, workers: int) -> bool:
    """Whether ``workers`` processes finish ``work_s`` seconds of one-core work sooner than
    this process alone, once the pool's start-up (:data:`POOL_START_S`) is paid: a small job
    (a few hundred ROIs of the fast backend) is done in-process before a pool would be up."""
    return workers > 1 and work_s * (1.0 - 1.0 / workers) > POOL_START_S
