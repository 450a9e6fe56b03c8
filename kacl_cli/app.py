"""The ``kacl`` command line: one thin module per subcommand under ``commands/``."""

from __future__ import annotations

import typer

from kacl_cli import __version__
from kacl_cli.commands import (
    cam,
    compare,
    contrast,
    evaluate,
    merge,
    predict,
    prepare,
    pretrain,
    radiomics,
    study,
)

app = typer.Typer(
    name="kacl",
    help=(
        "Knowledge-augmented contrastive learning for chest X-rays (Han et al., WACV 2022).\n\n"
        "The loop: prepare -> pretrain -> (cam -> radiomics -> contrast) x rounds -> evaluate.\n"
        "Every stage reads and writes one workspace (--workspace/-w or KACL_WORKSPACE).\n\n"
        "Example: kacl prepare --synthetic 200 && kacl pretrain && kacl contrast --rounds 3 "
        "&& kacl evaluate --round all"
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

for module in (prepare, pretrain, cam, radiomics, contrast, evaluate, predict, merge, study,
               compare):
    app.command(name=module.NAME, help=module.command.__doc__)(module.command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kacl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """kacl command line."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
