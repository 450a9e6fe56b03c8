"""Usage errors as one line: ``error: --backbone 'bogus': expected one of ... (kacl pretrain -h)``.

Typer's own rendering of a usage error is a boxed panel of five or more lines; scripts and
logs want one line on stderr and exit 2, like every other kacl error (``cli.handle_errors``).
The group's ``main`` runs Click in non-standalone mode and renders what comes back itself.
"""

from __future__ import annotations

import sys
from typing import Any

import typer
from rich.markup import escape
from typer._click.exceptions import ClickException, NoArgsIsHelpError  # vendored Click
from typer.core import TyperGroup


class OneLineErrorGroup(TyperGroup):
    """The ``kacl`` group: usage errors as one line (exit 2); help and exits as Click does."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except NoArgsIsHelpError as exc:  # `kacl` alone: the help text
            exc.show()
            sys.exit(exc.exit_code)
        except ClickException as exc:
            from kacl_cli.cli import err, one_line

            where = ""
            ctx = getattr(exc, "ctx", None)
            if ctx is not None:
                where = f" (see `{ctx.command_path} --help`)"
            err.print(f"[bold red]error:[/] {escape(one_line(exc.format_message()))}{where}",
                      highlight=False, markup=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)
