"""`--help` of every command: each option is listed with its help text, and each example in it
is shown and uses only options that command really has (an example drifts silently when an
option is renamed or dropped)."""

from __future__ import annotations

import re
import shlex

import pytest
import typer
from typer.testing import CliRunner

from kacl_cli.app import app

runner = CliRunner()
GROUP = typer.main.get_command(app)  # typer's own (vendored) click group
NAMES = sorted(GROUP.commands)
# `kacl import` is a group (`kacl import xrv FILE`): its leaves are documented one by one.
LEAVES = sorted(
    (name, *(() if not hasattr(cmd, "commands") else (sub,)))
    for name, cmd in GROUP.commands.items()
    for sub in (getattr(cmd, "commands", None) or {name: cmd})
)
EXAMPLE = re.compile(r"Example: (kacl .+)")


def _flat(text: str) -> str:
    """Help text without rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def _letters(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower().replace("<name>", ""))


def _help(*args: str) -> str:
    res = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "240", "TERMINAL_WIDTH": "240"})
    assert res.exit_code == 0, res.output
    return _flat(res.stdout)


def _examples(doc: str | None) -> list[str]:
    return [" ".join(m.split()) for m in EXAMPLE.findall(doc or "")]


def _check_example(example: str) -> None:
    """Every `kacl CMD ...` segment names a command and only that command's options, each
    value-taking option followed by a value."""
    for segment in example.split("&&"):
        words = shlex.split(segment.split(" > ")[0])  # a shell redirection is not an option
        assert words[:1] == ["kacl"] and words[1] in GROUP.commands, segment
        command = GROUP.commands[words[1]]
        if hasattr(command, "commands"):  # a group: the next word names its subcommand
            assert words[2] in command.commands, segment
            command, words = command.commands[words[2]], words[:1] + words[2:]
        if (command.context_settings or {}).get("ignore_unknown_options"):
            # `kacl config CMD OPTIONS...` takes CMD's own options: check them against CMD
            assert words[2] in GROUP.commands, segment
            command, words = GROUP.commands[words[2]], words[:1] + words[2:]
        options = {name: p for p in command.params if p.param_type_name == "option"
                   for name in (*p.opts, *p.secondary_opts)}
        for i, word in enumerate(words[2:], start=2):
            if word.startswith("-"):
                assert word in options, f"{example!r}: {word} is not an option of {words[1]}"
                p = options[word]
                if not p.is_flag and word not in p.secondary_opts:
                    assert i + 1 < len(words) and not words[i + 1].startswith("--"), example


def test_every_command_is_documented() -> None:
    assert NAMES == sorted(["prepare", "pretrain", "cam", "radiomics", "contrast", "evaluate",
                            "predict", "merge", "config", "export", "import", "study",
                            "compare"])
    assert ("import", "xrv") in LEAVES


@pytest.mark.parametrize("path", LEAVES, ids=" ".join)
def test_help_lists_options_and_valid_examples(path: tuple[str, ...]) -> None:
    name = " ".join(path)
    command = GROUP.commands[path[0]]
    if len(path) > 1:
        command = command.commands[path[1]]
    out = _help(*path)
    assert f"Usage: kacl {name}" in out
    doc = _flat(command.help or "")
    assert doc.split(".")[0] in out  # the summary sentence
    for p in command.params:
        if not p.param_type_name == "option" or p.hidden:
            continue
        long_names = [o for o in p.opts if o.startswith("--")]
        assert long_names and long_names[0] in out, (name, p.name)
        if p.help:  # compared as letters only: rich's markdown drops <...> and wraps at -
            assert _letters(p.help)[:24] in _letters(out), (name, p.name)
    examples = _examples(command.help)
    assert examples, f"kacl {name} --help has no example"
    for example in examples:
        assert f"Example: {example}" in out
        assert example.startswith(f"kacl {name} ")
        _check_example(example)


def test_top_level_help_lists_the_commands_and_a_valid_example() -> None:
    out = _help()
    for name in NAMES:
        assert name in out
    examples = _examples(app.info.help)
    assert examples and all(f"Example: {e}" in out for e in examples)
    for example in examples:
        _check_example(example)


def test_the_example_check_can_fail() -> None:
    with pytest.raises(AssertionError, match="not an option"):
        _check_example("kacl cam --round 0 --no-such-option")
    with pytest.raises(AssertionError):
        _check_example("kacl cam --round --split test")
