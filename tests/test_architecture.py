"""The package's layering, checked on the source with ``ast`` (nothing is imported).

- No import cycles among kacl_cli modules. Imports inside functions count too (a lazy import
  is still a dependency; it only hides the cycle from the interpreter). Imports under
  ``if TYPE_CHECKING:`` do not (they never run).
- Nothing below the CLI layer (stages/, training/, models/, sharding/ and the base modules)
  imports the CLI layer (kacl_cli.cli, kacl_cli.commands, kacl_cli.app, and config_file, the
  click default-map hook): stages report through
  a ``note`` callback and return results; commands parse options and render.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kacl_cli

ROOT = Path(kacl_cli.__file__).parent
CLI_LAYER = ("kacl_cli.cli", "kacl_cli.commands", "kacl_cli.app", "kacl_cli.config_file",
             "kacl_cli.usage")

# Cycles that the sharding split (issue 12, branch arch-shard: sharding/parts.py + per-stage
# hooks in stages/*/parts.py, parallel.py) removes; each is the set of modules of one strongly
# connected component. Delete an entry when its cycle is gone: the test fails on a stale one.
ALLOWED_CYCLES: list[frozenset[str]] = []  # none: keep it that way


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                skip.update(id(n) for n in ast.walk(stmt))
    return skip


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The kacl_cli modules ``name`` imports, anywhere in its source."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` mod.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        else:
            continue
        found.update(t for t in targets if t.startswith("kacl_cli") and t in modules)
    found.discard(name)
    found.discard("kacl_cli")  # the package __init__ (version only)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_function_level_imports() -> None:
    """The checker itself: a lazy import inside a function is an edge."""
    graph = import_graph()
    assert "kacl_cli.stages.evaluate.report" not in graph["kacl_cli.stages.evaluate.metrics"]
    # stages.evaluate.stage imports the report (matplotlib) only inside run()
    assert "kacl_cli.stages.evaluate.report" in graph["kacl_cli.stages.evaluate.stage"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        frozenset({"a", "b", "c"})]


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    unexpected = [sorted(c) for c in found if c not in ALLOWED_CYCLES]
    assert not unexpected, f"import cycles: {unexpected}"
    stale = [sorted(c) for c in ALLOWED_CYCLES if c not in found]
    assert not stale, f"allow-listed cycles that are gone (drop them): {stale}"


def test_nothing_below_the_cli_imports_it() -> None:
    graph = import_graph()
    upward = {
        name: sorted(t for t in targets if t.startswith(CLI_LAYER))
        for name, targets in graph.items()
        if not name.startswith(CLI_LAYER)
    }
    assert {k: v for k, v in upward.items() if v} == {}
