"""Experiment config files for every command: ``--config FILE`` (YAML, TOML or JSON).

Why here and not in each command: click (vendored by Typer) already has the mechanism, the
context's ``default_map``: a value found there replaces an option's default, and anything on
the command line (or in an option's environment variable) still wins. One command class
(:class:`ConfiguredCommand`, used for every subcommand in ``app.py``) adds an eager
``--config`` option whose callback fills ``default_map`` before the other options are read.
The commands themselves do not change.

File layout (keys are option names, ``batch-size`` or ``batch_size``)::

    # exp.yaml                         # exp.toml (or pyproject.toml)
    workspace: /scratch/kacl-nih       # [tool.kacl]            (or [kacl], or top level)
    device: cuda                       # workspace = "/scratch/kacl-nih"
    pretrain:                          # [tool.kacl.pretrain]
      backbone: densenet121            # backbone = "densenet121"
      epochs: 12                       # epochs = 12
    contrast: {rounds: 3}              # [tool.kacl.contrast]

Top-level keys that are not command names apply to every command that has that option
(``workspace``, ``device``, ``seed``...). Nested commands use nested tables
(``[tool.kacl.import.xrv]``). An unknown key, a value of the wrong type, or a file that cannot
be read ends the command with one line naming the file and key, exit 2.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from typer.core import TyperCommand

from kacl_cli.errors import InputError

CONFIG_PARAM = "config"


class ConfigError(InputError):
    """A config file that cannot be read or does not fit the command (usage error: exit 2)."""

    exit_code = 2


# -- reading -------------------------------------------------------------------------------
def read_file(path: Path) -> dict[str, Any]:
    """The file's mapping, unwrapped from ``tool.kacl`` / ``kacl`` where present."""
    if not path.is_file():
        raise ConfigError(f"config {path}: no such file")
    text_err = None
    try:
        raw = path.read_bytes()
        if path.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - Python 3.10
                try:
                    import tomli as tomllib
                except ImportError:
                    raise ConfigError(
                        f"config {path}: TOML needs Python 3.11+ or `pip install tomli`"
                    ) from None
            data = tomllib.loads(raw.decode("utf-8"))
        elif path.suffix == ".json":
            data = json.loads(raw)
        else:
            data = yaml.safe_load(raw)
    except ConfigError:
        raise
    except Exception as exc:  # yaml/toml/json/unicode errors: the first line says where
        text_err = " ".join(str(exc).split())[:200] or type(exc).__name__
    if text_err is not None:
        raise ConfigError(f"config {path}: unreadable ({text_err})")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping of option names, got "
                          f"{type(data).__name__}")
    tool = data.get("tool")
    if isinstance(tool, dict) and isinstance(tool.get("kacl"), dict):
        return tool["kacl"]
    if isinstance(data.get("kacl"), dict) and len(data) == 1:
        return data["kacl"]
    return data


def _key(name: str) -> str:
    return name.lstrip("-").replace("-", "_")


def option_keys(param: Any) -> set[str]:
    """Every spelling of an option a config file may use: its name and its flags."""
    keys = {_key(param.name or "")}
    for opt in getattr(param, "opts", []):
        keys.add(_key(opt))
    return keys


def _options(command: Any) -> list[Any]:
    """Options a file may set: the command's own and added ones (--tensorboard), not --config."""
    return [p for p in command.params
            if getattr(p, "param_type_name", "") == "option" and p.name != CONFIG_PARAM]


def command_tree(root: Any) -> dict[str, Any]:
    """{"pretrain": cmd, "import xrv": cmd, ...} of a click group."""
    out: dict[str, Any] = {}
    for name, cmd in getattr(root, "commands", {}).items():
        if hasattr(cmd, "commands"):
            out.update({f"{name} {k}": v for k, v in command_tree(cmd).items()})
        else:
            out[name] = cmd
    return out


def _section(data: dict[str, Any], path: list[str]) -> dict[str, Any] | None:
    node: Any = data
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def resolve(data: dict[str, Any], source: str, command_path: str, command: Any,
            all_commands: dict[str, Any]) -> dict[str, Any]:
    """{param name: raw value} for ``command`` from a config mapping, refusing unknown keys."""
    top_names = {p.split()[0] for p in all_commands}
    by_key = {k: p for p in _options(command) for k in option_keys(p)}
    known_anywhere = {k for c in all_commands.values() for p in _options(c)
                      for k in option_keys(p)}
    values: dict[str, Any] = {}
    # shared keys first: every command that has the option takes them
    for key, value in data.items():
        if key in top_names:
            continue
        k = _key(str(key))
        if k == CONFIG_PARAM or k not in known_anywhere:
            raise ConfigError(f"config {source}: unknown key {key!r} (no kacl command has "
                              f"an option --{str(key).replace('_', '-')})")
        if k in by_key:
            values[by_key[k].name] = value
    section = _section(data, command_path.split())
    if section is not None:
        where = command_path.replace(" ", ".")
        if not isinstance(section, dict):
            raise ConfigError(f"config {source}: {where!r} must be a table of options")
        for key, value in section.items():
            k = _key(str(key))
            if k not in by_key or k == CONFIG_PARAM:
                known = " ".join(sorted(p.opts[0].lstrip("-") for p in _options(command)))
                raise ConfigError(f"config {source}: unknown key '{where}.{key}' "
                                  f"({command_path} options: {known})")
            values[by_key[k].name] = value
    for cmd_name, sub in data.items():  # a table for a command that does not exist
        if cmd_name in top_names or not isinstance(sub, dict):
            continue
        raise ConfigError(f"config {source}: unknown key {cmd_name!r} (not a kacl command "
                          "nor an option)")
    return values


def check_types(ctx: Any, command: Any, values: dict[str, Any], source: str) -> None:
    """Coerce each value as the command line would; a bad one names its key (exit 2)."""
    params = {p.name: p for p in _options(command)}
    for name, value in values.items():
        param = params[name]
        flag = param.opts[0]
        if value is None:
            continue
        bad = isinstance(value, dict | list) and not (param.multiple or param.nargs != 1)
        annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
        if isinstance(value, bool) and annotation in (int, float):
            bad = True
        if isinstance(value, float) and annotation is int and not float(value).is_integer():
            bad = True
        if not bad:
            try:
                param.process_value(ctx, value)
            except Exception as exc:  # click's BadParameter & co.
                msg = getattr(exc, "format_message", lambda e=exc: str(e))()
                raise ConfigError(f"config {source}: key {name!r} ({flag}): {msg}") from None
        else:
            raise ConfigError(f"config {source}: key {name!r} ({flag}): wrong type "
                              f"{type(value).__name__} ({value!r})")


def context_path(ctx: Any) -> str:
    """``"pretrain"`` or ``"import xrv"``: the command names below the root."""
    names = []
    while ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return " ".join(reversed(names))


def load_defaults(ctx: Any, path: Path) -> dict[str, Any]:
    """The default_map of ``ctx``'s command from the file at ``path`` (validated)."""
    root = ctx.find_root()
    tree = command_tree(root.command)
    command_path = context_path(ctx)
    data = read_file(Path(path))
    values = resolve(data, str(path), command_path, ctx.command, tree)
    check_types(ctx, ctx.command, values, str(path))
    return values


def _apply(ctx: Any, _param: Any, value: Any) -> Any:
    """``--config`` callback (eager): fill the context's default_map from the file."""
    if value is None:
        return value
    try:
        values = load_defaults(ctx, Path(value))
    except ConfigError as exc:
        if ctx.resilient_parsing:  # `kacl config` checks the file itself
            return value
        from rich.markup import escape

        from kacl_cli.cli import err, one_line

        err.print(f"[bold red]error:[/] {escape(one_line(str(exc)))}", highlight=False, markup=True)
        raise typer.Exit(exc.exit_code) from None
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


# -- the command class ---------------------------------------------------------------------
def params_of(fn: Callable[..., None]) -> list[Any]:
    """Click parameters of a function's Typer annotations (built by Typer itself)."""
    probe = typer.Typer()
    probe.command()(fn)
    return list(typer.main.get_command(probe).params)


def _config_probe(
    config: Annotated[Path | None, typer.Option(
        "--config", metavar="FILE",
        help="YAML/TOML/JSON file of option values ([tool.kacl.COMMAND] tables); command-"
             "line values win. `kacl config COMMAND` prints a resolved one.")] = None,
) -> None:
    """Probe."""


def config_option() -> Any:
    (param,) = [p for p in params_of(_config_probe) if p.name == CONFIG_PARAM]
    param.is_eager = True
    param.expose_value = False
    param.callback = _apply
    return param


def command_class(name: str, extra: Iterable[Callable[[], Any]] = ()) -> type[TyperCommand]:
    """A TyperCommand subclass whose instances also take ``--config`` (+ ``extra`` options)."""
    makers = [config_option, *extra]

    class ConfiguredCommand(TyperCommand):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            params = [make() for make in makers]
            # before --help, after the command's own options
            self.params = [*self.params, *params]

    ConfiguredCommand.__name__ = f"ConfiguredCommand_{name.replace(' ', '_')}"
    return ConfiguredCommand


# -- printing a resolved config ------------------------------------------------------------
def plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    return value


def render(command_path: str, values: dict[str, Any], fmt: str, header: str) -> str:
    """A config file holding ``values`` for ``command_path`` (YAML or TOML)."""
    parts = command_path.split()
    lines = [f"# {line}" for line in header.splitlines()]
    if fmt == "toml":
        lines.append(f"[tool.kacl.{'.'.join(parts)}]")
        for key, value in values.items():
            if value is None:
                lines.append(f"# {key} = (default: unset)")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"
    nested: dict[str, Any] = values
    for part in reversed(parts):
        nested = {part: nested}
    return "\n".join(lines) + "\n" + yaml.safe_dump(nested, sort_keys=False)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))
