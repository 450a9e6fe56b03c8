"""`kacl config COMMAND [OPTIONS]`: print a command's resolved options as a config file."""

from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from kacl_cli.cli import handle_errors
from kacl_cli.config_file import (
    ConfigError,
    command_tree,
    load_defaults,
    option_keys,
    plain,
    render,
)
from kacl_cli.workspace import DEFAULT_WORKSPACE, Workspace

NAME = "config"
CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}
# runs.stage -> the command that records it (the others are spelled alike)
STAGE_COMMANDS = {"import": "import xrv"}


class Format(str, Enum):
    yaml = "yaml"
    toml = "toml"


def _workspace_arg(args: list[str]) -> Path:
    for i, a in enumerate(args):
        if a in ("-w", "--workspace") and i + 1 < len(args):
            return Path(args[i + 1])
        if a.startswith("--workspace="):
            return Path(a.split("=", 1)[1])
    return Path(os.environ.get("KACL_WORKSPACE") or DEFAULT_WORKSPACE)


def _config_arg(args: list[str]) -> Path | None:
    for i, a in enumerate(args):
        if a == "--config" and i + 1 < len(args):
            return Path(args[i + 1])
        if a.startswith("--config="):
            return Path(a.split("=", 1)[1])
    return None


def _run_row(ws: Workspace, run_id: str) -> tuple[str, dict[str, Any]]:
    if not ws.exists():
        raise ConfigError(f"--run {run_id}: workspace {ws.root} has no catalog")
    rows = ws.catalog.query("SELECT stage, config_json FROM runs WHERE run_id = ?", [run_id])
    if not rows:
        raise ConfigError(f"--run {run_id}: no such run in {ws.catalog.path} (see the runs "
                          "table)")
    return rows[0][0], json.loads(rows[0][1] or "{}")


def _context(root_ctx: Any, path: str, args: list[str]) -> Any:
    """The (resiliently parsed) context of the command at ``path`` given ``args``."""
    parent, group = root_ctx, root_ctx.command
    parts = path.split()
    for part in parts[:-1]:
        group = group.commands[part]
        parent = group.make_context(part, [], parent=parent, resilient_parsing=True)
    cmd = group.commands[parts[-1]]
    return cmd.make_context(parts[-1], list(args), parent=parent, resilient_parsing=True)


@handle_errors
def command(
    ctx: typer.Context,
    command_name: Annotated[list[str] | None, typer.Argument(
        metavar="COMMAND [OPTIONS]",
        help="A kacl command (e.g. pretrain, 'import xrv') and any of its options, "
             "--config FILE included.")] = None,
    run: Annotated[str | None, typer.Option(
        "--run", help="Print the config of this finished run (runs.run_id) instead.")] = None,
    fmt: Annotated[Format, typer.Option(
        "--as", help="yaml | toml (--as, so that a command's own --format passes through).")]
    = Format.yaml,
) -> None:
    """Print the resolved options of a command (defaults < --config FILE < command line) as a
    config file that reproduces it; or those of a recorded run (--run RUN_ID).

    Example: kacl config pretrain --config exp.yaml --epochs 3 > pretrain.yaml
    """
    words = list(command_name or []) + list(ctx.args)
    tree = {k: v for k, v in command_tree(ctx.find_root().command).items() if k != NAME}
    path, args = None, words
    for n in (2, 1):
        if len(words) >= n and " ".join(words[:n]) in tree:
            path, args = " ".join(words[:n]), words[n:]
            break
    recorded: dict[str, Any] = {}
    header = ""
    if run is not None:
        ws = Workspace(_workspace_arg(args))
        stage, recorded = _run_row(ws, run)
        run_path = STAGE_COMMANDS.get(stage, stage)
        if path is not None and path != run_path:
            raise ConfigError(f"--run {run}: a {stage} run, not {path}")
        path = run_path
        if path not in tree:
            raise ConfigError(f"--run {run}: stage {stage!r} has no command")
        if not any(a in ("-w", "--workspace") or a.startswith("--workspace=") for a in args):
            args = [*args, "--workspace", str(ws.root)]
        header = f"recorded run {run} ({stage})\n"
    if path is None:
        raise ConfigError(f"kacl config: name a command ({', '.join(sorted(tree))}) or --run")
    sub = _context(ctx.find_root(), path, args)
    cfg_file = _config_arg(args)
    if cfg_file is not None:
        load_defaults(sub, cfg_file)  # resilient parsing hides errors: check explicitly
    options = [p for p in sub.command.params
               if getattr(p, "param_type_name", "") == "option" and p.name != "config"]
    values: dict[str, Any] = {}
    used: set[str] = set()
    for p in options:
        value = sub.params.get(p.name, sub.meta.get(f"kacl.{p.name}"))
        for key in option_keys(p):
            if key in recorded:
                value, _ = recorded[key], used.add(key)
                break
        values[p.opts[0].lstrip("-")] = plain(value)
    left = sorted(set(recorded) - used)
    if left:
        header += "recorded settings that are not options (derived or internal): " + \
            ", ".join(f"{k}={recorded[k]}" for k in left) + "\n"
    header += f"kacl {path}: resolved options; reproduce with: kacl {path} --config THIS_FILE"
    typer.echo(render(path, values, fmt.value, header), nl=False)
