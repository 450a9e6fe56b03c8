"""Numeric options checked before any work (issue 15): a bad value is a usage error (exit 2)
with one line, never a torch traceback, a run row left ``running`` or a NaN in config_json."""

from __future__ import annotations

import math

import typer


def check_number(option: str, value: float | None, *, lo: float | None = None,
                 hi: float | None = None, lo_open: bool = False) -> None:
    """Refuse a non-finite ``value``, or one outside ``[lo, hi]`` (``(lo, hi]`` with
    ``lo_open``). None (an unset optional) passes."""
    if value is None:
        return
    if not math.isfinite(value):
        raise typer.BadParameter(f"{option} {value}: must be a finite number")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise typer.BadParameter(f"{option} {value:g}: must be {'>' if lo_open else '>='} {lo:g}")
    if hi is not None and value > hi:
        raise typer.BadParameter(f"{option} {value:g}: must be <= {hi:g}")


def check_choice(option: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    """Refuse a value outside ``choices`` as a usage error (exit 2)."""
    if value not in choices:
        raise typer.BadParameter(f"{option} {value!r}: expected one of {', '.join(choices)}")
