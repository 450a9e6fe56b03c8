"""One writer per workspace: a lock file that says who holds it.

Two processes writing one workspace corrupt it in ways DuckDB's own file lock does not catch
(both record a finished run, one marks the other's live run ``interrupted``, duplicate rows).
So every command that writes takes ``WS/.kacl.lock`` first, and a second one stops with one
line: ``workspace busy: kacl pretrain, pid N on HOST since T``.

How it works, and why:
- The lock is an ``fcntl.flock`` on the file, held for the life of the command. The kernel
  drops it when the process dies (also on kill -9), so a crashed run never blocks the next.
- The file's content (JSON: pid, host, command, start time) is what the busy line shows. It is
  emptied on a clean exit; content found when the flock is free belongs to a run that died, and
  the new run takes it over with a note on stderr.
- Content naming *another host* is not taken over even when the flock is free: flock over a
  network file system is not to be trusted, and that host's pid cannot be checked from here.
  The busy line then says which file to delete once that run is known to be gone.
- Re-entrant within one process (``contrast`` runs ``cam`` and ``radiomics`` in-process), and
  only rank 0 of a torchrun job takes it (the other ranks never write the workspace).
- A ``--shard i/n`` job writes only its own part folder, so it locks that shard alone
  (``.kacl-shard-STAGE-i-of-n.lock``): the shards of one job run side by side, a duplicate of
  one shard does not.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import functools
import json
import os
import re
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from kacl_cli.errors import KaclError

LOCK_NAME = ".kacl.lock"

# Locks this process holds: resolved lock path -> (open file descriptor, depth).
_HELD: dict[Path, list[int]] = {}

F = TypeVar("F", bound=Callable[..., Any])


class WorkspaceBusy(KaclError):
    """Another process holds the workspace's writer lock."""


def _describe(info: dict[str, Any]) -> str:
    return (f"kacl {info.get('command', '?')}, pid {info.get('pid', '?')} on "
            f"{info.get('host', '?')} since {info.get('started', '?')}")


def _read(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    if not raw.strip():
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        return {"command": "?", "pid": "?", "host": "?", "started": "?"}
    return info if isinstance(info, dict) else None


def fs_error(path: Path, exc: OSError, what: str = "write") -> KaclError:
    """One line for a file-system error on a workspace path (no suggestion of another
    process: a read-only or missing folder is not a busy one)."""
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = "read-only file system" if exc.errno == errno.EROFS else "permission denied"
        return KaclError(f"cannot {what} {path}: {why}")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST) or isinstance(exc, NotADirectoryError):
        return KaclError(f"cannot {what} {path}: a path component is a file, not a directory")
    if exc.errno == errno.ENOSPC:
        return KaclError(f"disk full while writing {path}")
    return KaclError(f"cannot {what} {path}: {exc.strerror or exc}")


def lock_path(root: Path, stage: str, shard: str | None = None) -> Path:
    """The lock file of a workspace, or of one shard of a stage's sharded job."""
    if shard is None:
        return root / LOCK_NAME
    i, _, n = shard.partition("/")
    return root / f".kacl-shard-{stage}-{i}-of-{n}.lock"


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


@contextlib.contextmanager
def workspace_lock(root: Path | str, command: str, shard: str | None = None,
                   create: bool = False,
                   note: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the writer lock of workspace ``root`` for the body (re-entrant per process).

    ``create``: make the workspace folder when it is missing (``prepare``); otherwise a
    missing workspace is left to the command's own "run kacl prepare first" message.
    """
    root = Path(root)
    if _rank() != 0:
        yield
        return
    if root.exists() and not root.is_dir():
        raise KaclError(f"workspace {root} is a file, not a directory")
    if not root.exists():
        if not create:
            yield
            return
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise fs_error(root, exc, "create workspace") from None
        created = True
    else:
        created = False
    path = lock_path(root, command, shard).resolve()
    held = _HELD.get(path)
    if held is not None:
        held[1] += 1
        try:
            yield
        finally:
            held[1] -= 1
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise fs_error(root, exc, "write to workspace") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read(fd) or {}
            raise WorkspaceBusy(f"workspace busy: {_describe(info)}") from None
        host = socket.gethostname()
        previous = _read(fd)
        if previous is not None:
            if previous.get("host") not in (host, "?"):
                fcntl.flock(fd, fcntl.LOCK_UN)
                raise WorkspaceBusy(
                    f"workspace busy: {_describe(previous)} (another host; delete {path} "
                    "once that run is known to be gone)")
            # Same host and the flock is free: that pid no longer holds it (a live pid of
            # that number is a reused one), so the lock is stale.
            (note or _stderr)(f"note: took over a stale workspace lock ({_describe(previous)}; "
                              "that process is gone)")
        info = {"pid": os.getpid(), "host": host, "command": command,
                "started": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    _HELD[path] = [fd, 1]
    since = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    try:
        yield
    except BaseException as exc:
        if shard is None:
            close_orphan_runs(root, since, exc)
        raise
    finally:
        del _HELD[path]
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        if created:  # a refused first run leaves no empty workspace behind
            with contextlib.suppress(OSError):
                if [p.name for p in root.iterdir()] == [path.name]:
                    path.unlink()
                    root.rmdir()


def close_orphan_runs(root: Path, since: dt.datetime, exc: BaseException) -> None:
    """Close the runs this process left ``running`` when its command ends in an exception.

    Holding the writer lock, every ``running`` row started since it was taken is this
    process's own; a stage that failed on something other than a KaclError (a torch error,
    a full disk) would otherwise leave it ``running`` for ever.
    """
    catalog = root / "catalog.duckdb"
    if not catalog.exists() or (type(exc).__name__ == "Exit"
                                and getattr(exc, "exit_code", 1) == 0):
        return
    status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
    reason = json.dumps({"reason": f"{type(exc).__name__}: {exc}"[:500]})
    with contextlib.suppress(Exception):
        import duckdb

        con = duckdb.connect(str(catalog))
        try:
            con.execute(
                "UPDATE runs SET status = ?, finished_at = ?, "
                "summary_json = coalesce(summary_json, ?) "
                "WHERE status = 'running' AND started_at >= ?",
                [status, dt.datetime.now(dt.timezone.utc).replace(tzinfo=None), reason, since])
        finally:
            con.close()


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


def writes_workspace(command: str, create: bool = False) -> Callable[[F], F]:
    """Decorator for a Typer command that writes its workspace: holds the lock around it.

    Reads the command's ``workspace`` and ``shard`` keyword arguments (every writing command
    has the former; sharded ones the latter). Goes *under* ``@handle_errors`` so the busy
    error becomes its one line.
    """

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from kacl_cli.workspace import DEFAULT_WORKSPACE

            root = Path(kwargs.get("workspace") or DEFAULT_WORKSPACE)
            shard = kwargs.get("shard")
            shard = getattr(shard, "label", shard)  # a parsed Shard, or the raw i/n text
            if shard is not None and not re.fullmatch(r"\d+/\d+", str(shard)):
                return fn(*args, **kwargs)  # the command refuses it as a usage error
            with workspace_lock(root, command, shard, create=create):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return deco
