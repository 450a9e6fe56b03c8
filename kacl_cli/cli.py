"""What every subcommand shares: options, output on stdout vs. progress on stderr, errors.

Results go to stdout (a rich table, or one JSON document with ``--json``); progress bars and
notes go to stderr, so ``kacl ... --json | jq`` works in batch jobs.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer._click.exceptions import ClickException  # Typer >= 0.26 vendors Click

from kacl_cli.errors import InputError, KaclError
from kacl_cli.options import check_choice, check_number
from kacl_cli.sharding.parts import Shard
from kacl_cli.stages.radiomics.backends.base import BACKENDS
from kacl_cli.training.config import BOX_LOSS_FORMS, DEFAULT_BOX_LOSS_WEIGHT
from kacl_cli.workspace import Workspace, json_default

# Markup off by default: file names, CSV text and image ids reach these consoles, and
# "scan[b]2.png" or "x[/]y.png" must print as they are (issue 15). The few styled strings
# pass markup=True and escape() what they interpolate.
out = Console(soft_wrap=True, markup=False)
err = Console(stderr=True, soft_wrap=True, markup=False)

WorkspaceOpt = Annotated[
    Path,
    typer.Option(
        "--workspace", "-w", envvar="KACL_WORKSPACE",
        help="Workspace directory shared by all stages (store.h5, catalog.duckdb, checkpoints).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Re-run even if this stage is done.")]
# The box term of pretrain and contrast (models/box_loss.py); see resolve_box_loss_weight().
BoxLossWeightOpt = Annotated[float | None, typer.Option(
    "--box-loss-weight",
    help="Weight of the term that pulls each finding's CAM evidence inside its GT box on "
    "box-supervised images (docs/cam.md). 0 = off. Default: "
    f"{DEFAULT_BOX_LOSS_WEIGHT} with --box-supervision, else 0.", show_default=False)]
BoxLossFormOpt = Annotated[str, typer.Option(
    "--box-loss-form",
    help="softmax (default: moves map evidence into the box without changing the logit) "
    "| share (the relu mass share; measured to cost AUC). docs/cam.md.")]


def resolve_box_loss_weight(weight: float | None, form: str, box_supervision: float) -> float:
    """The weight to use: the measured default where there are boxes to use, else 0; the
    usage checks of both box options (exit 2)."""
    if weight is None:
        weight = DEFAULT_BOX_LOSS_WEIGHT if box_supervision > 0 else 0.0
    check_number("--box-loss-weight", weight, lo=0.0, hi=1000.0)
    check_choice("--box-loss-form", form, list(BOX_LOSS_FORMS))
    return weight


DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto | cpu | cuda | cuda:N (auto picks CUDA if present).")
]


def _shard_option(value: str | None) -> Shard | None:
    """``--shard`` through :meth:`Shard.parse` (the one parser), as a usage error (exit 2)
    raised while the options are read, before any work."""
    try:
        return Shard.parse(value)
    except InputError as exc:
        raise typer.BadParameter(str(exc)) from None


ShardOpt = Annotated[
    Shard | None,
    typer.Option(
        "--shard", parser=_shard_option, metavar="I/N",
        help="i/n: process only shard i of n (0-based; every n-th image by sorted image_id), "
             "into WS/parts/STAGE[-round-K]/shard-i-of-n; merge with `kacl merge`.",
    ),
]



# ``--backend`` / ``--radiomics-backend`` choices, built from the backend registry. An Enum, so
# Typer rejects a bad value as a usage error (exit 2).
RadiomicsBackend = Enum("RadiomicsBackend", {name: name for name in BACKENDS}, type=str)


F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(fn: F) -> F:
    """Turn KaclError into a one-line message and exit 1; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KaclError as exc:
            err.print(f"[bold red]error:[/] {escape(one_line(str(exc)))}", highlight=False,
                      markup=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted: finished work is kept; re-run the same command to resume")
            raise typer.Exit(130) from None
        except (ClickException, typer.Exit, typer.Abort):
            raise  # usage errors and exits: Click's (kacl_cli.usage renders them)
        except OSError as exc:  # the file system's answer, about a path the user gave
            err.print(f"[bold red]error:[/] {escape(one_line(os_error_line(exc)))}",
                      highlight=False, markup=True)
            raise typer.Exit(1) from None
        except Exception as exc:
            # Last resort: still one line (KACL_DEBUG=1 shows the traceback). A run this
            # process left `running` is closed by the writer lock (kacl_cli.lock).
            if os.environ.get("KACL_DEBUG"):
                raise
            text = f"internal error: {type(exc).__name__}: {exc} (KACL_DEBUG=1 shows where)"
            err.print(f"[bold red]error:[/] {escape(one_line(text))}", highlight=False,
                      markup=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def os_error_line(exc: OSError) -> str:
    """An OSError as a sentence: what failed on which path, without suggesting a cause
    (a read-only or full disk is not another process)."""
    import errno

    path = exc.filename or ""
    why = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
           errno.ENOSPC: "disk full", errno.ENOTDIR: "a path component is a file, not a "
           "directory", errno.EISDIR: "is a directory", errno.EEXIST: "already exists",
           errno.ENOENT: "no such file or directory"}.get(exc.errno or -1,
                                                          exc.strerror or str(exc))
    return f"{path}: {why}" if path else why


def one_line(text: str) -> str:
    """A message as one line: a user's value with a newline must not split the error line."""
    return " ".join(text.split("\n")) if "\n" in text else text


def workspace(path: Path) -> Workspace:
    return Workspace(path)


def emit(result: dict[str, Any], as_json: bool, render: Callable[[], None] | None = None) -> None:
    """Print a stage's result: JSON for scripts, else the human rendering (or key: value)."""
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=json_default) + "\n")
        sys.stdout.flush()
        return
    if render is not None:
        render()
        return
    for key, value in result.items():
        out.print(f"{key}: {value}", highlight=False)


def skipped(stage: str, summary: dict[str, Any], as_json: bool) -> None:
    """Report that an identical finished run exists (``--force`` re-runs it).

    ``--json`` gets that run's full summary plus ``"skipped": true`` (scripts read it as if
    the stage had just run); a human gets one line on stdout, since the numbers were shown
    when the run finished.
    """
    err.print(f"{stage}: done, skipping (same config and inputs; --force re-runs)")
    if as_json:
        emit({**summary, "skipped": True}, as_json)
        return
    out.print(f"{stage}: done earlier ({brief(summary)}; --json for the full summary)",
              highlight=False)


# What a one-line summary names first, where a stage's summary has it (stored summaries come
# back with sorted keys, so "the first few" alone would pick arbitrary ones).
BRIEF_KEYS = ("round", "split", "source", "backend", "roi", "images", "rois", "boxes",
              "features", "epochs", "val_mean_auc", "mean_auc", "failed", "errors")


def brief(summary: dict[str, Any], most: int = 6) -> str:
    """A few short scalar entries of a summary as ``key value, ...`` (one line)."""
    def short(v: Any) -> bool:
        return isinstance(v, bool | int | float | str) and len(str(v)) <= 24

    keys = [k for k in BRIEF_KEYS if short(summary.get(k))]
    keys += [k for k in summary if k not in keys and short(summary[k])]
    return ", ".join(f"{k} {summary[k]}" for k in keys[:most])


def report(
    stage: str, summary: dict[str, Any], as_json: bool, render: Callable[[], None] | None = None
) -> None:
    """Print a stage's summary: :func:`skipped` for an identical finished run, else :func:`emit`."""
    if summary.get("skipped"):
        skipped(stage, {k: v for k, v in summary.items() if k != "skipped"}, as_json)
        return
    emit(summary, as_json, render)


def shard_note(stage: str, summary: dict[str, Any], round_: int | None = None) -> None:
    """Say (stderr) where a ``--shard`` run's part went and which command folds it in."""
    merge = f"kacl merge --stage {stage}" + ("" if round_ is None else f" --round {round_}")
    err.print(f"{stage}: shard {summary['shard']} written to {summary['part']}; when every "
              f"shard has finished: {merge}")

