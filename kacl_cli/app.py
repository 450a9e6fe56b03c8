"""The ``kacl`` command line: one thin module per subcommand under ``commands/``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from kacl_cli import __version__
from kacl_cli.cli import err, one_line
from kacl_cli.commands import (
    cam,
    compare,
    config,
    contrast,
    evaluate,
    export,
    import_model,
    merge,
    predict,
    prepare,
    pretrain,
    radiomics,
    study,
)
from kacl_cli.config_file import command_class, params_of
from kacl_cli.errors import KaclError
from kacl_cli.training import callbacks, tensorboard
from kacl_cli.usage import OneLineErrorGroup


def _attach_tensorboard(ctx: Any, _param: Any, value: Any) -> Any:
    """Option callback: register a logger for this command; closed with the command."""
    ctx.meta["kacl.tensorboard"] = value
    if value is None or ctx.resilient_parsing:
        return value
    try:
        writer_class = tensorboard.summary_writer_class()
    except KaclError as exc:
        err.print(f"[bold red]error:[/] {escape(one_line(str(exc)))}", highlight=False, markup=True)
        raise typer.Exit(1) from None
    logger = tensorboard.TensorBoardLogger(Path(value), writer_class)
    remove = callbacks.register(logger)
    ctx.call_on_close(lambda: (remove(), logger.close()))
    return value


def _tensorboard_probe(
    tensorboard: Annotated[Path | None, typer.Option(
        "--tensorboard", metavar="DIR",
        help="Write per-epoch losses, val AUC, lr and images/s for TensorBoard under DIR "
             "(needs kacl[tensorboard]).")] = None,
) -> None:
    """Only declares the option, so typer builds it like every other one."""


def tensorboard_option() -> Any:
    """The ``--tensorboard DIR`` click option (pretrain and contrast; the training loop's
    epoch callbacks feed it, see :mod:`kacl_cli.training.tensorboard`)."""
    (param,) = [p for p in params_of(_tensorboard_probe) if p.name == "tensorboard"]
    param.expose_value = False
    param.callback = _attach_tensorboard
    return param


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
    cls=OneLineErrorGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Options added to a command without touching it (the command never sees their values).
EXTRA_OPTIONS = {pretrain.NAME: (tensorboard_option,), contrast.NAME: (tensorboard_option,)}
for module in (prepare, pretrain, cam, radiomics, contrast, evaluate, predict, merge, export,
               study, compare):
    app.command(name=module.NAME, help=module.command.__doc__,
                cls=command_class(module.NAME, EXTRA_OPTIONS.get(module.NAME, ())))(
        module.command)
app.add_typer(import_model.app, name=import_model.NAME)
app.command(name=config.NAME, help=config.command.__doc__, context_settings=config.CONTEXT)(
    config.command)


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
