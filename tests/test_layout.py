"""The code's shape, as docs/design.md states it: imports point one way.

Every ``import`` in src/ (module level or inside a function, but not under ``TYPE_CHECKING``) is an
edge; a cycle among qkrestore's own modules fails the test and names its members.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for f in SRC.rglob("*.py"):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    hidden: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            hidden |= {id(sub) for sub in ast.walk(node)}
    return hidden


def import_graph(type_only: bool = True) -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        hidden = set() if type_only else _type_checking_nodes(tree)
        package = name if is_pkg else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in hidden:
                continue
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    deps.add(sub if sub in mods else base)
            elif isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names}
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "qkrestore.job" in graph["qkrestore.api"]  # the graph sees imports at all
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_cli_prints() -> None:
    """Below cli/ nothing writes to the terminal: results go back to the caller."""
    offenders = []
    for name, (path, _) in modules().items():
        if name.startswith("qkrestore.cli"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "print":
                offenders.append(f"{name}:{node.lineno}")
    assert offenders == []


# The layers of the package, lowest first. A module may import its own subpackage and any lower
# layer, never a higher one (type-only imports count: a circle that exists only for the type
# checker is still a circle for a reader). Root modules are named by their module name.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"_version", "errors"}),
    frozenset({"io"}),  # reading and writing checkpoints, Hub, the torch/transformers edge
    frozenset({"families"}),  # model families as data: layer maps and routing tensors
    frozenset({"surgery"}),  # plan, methods, writer, card, verification
    frozenset({"qkpro"}),  # QK-Pro: closed forms and its Method
    frozenset({"adapter"}),  # PEFT adapters as an input kind
    frozenset({"job", "options"}),  # the one pipeline and its options
    frozenset({"evaluate"}),  # the NIAH probe, scoring, candidates, sweep, select-layers
    frozenset({"diagnostics"}),  # drift, attention distance and locality, autocorrelation
    frozenset({"api", "api_eval", "testing"}),  # the API; tiny builders (demo, tests)
    frozenset({"cli", "__main__", ""}),
)


def layer_of(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"{module}: not in any layer of tests/test_layout.py's LAYERS")


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer_of(name)


def test_no_upward_imports() -> None:
    """Imports point down the layers (type-only imports included); nothing below cli/ imports it."""
    graph = import_graph(type_only=True)
    upward = sorted(
        f"{a} -> {b}"
        for a, deps in graph.items()
        for b in deps
        if layer_of(b) > layer_of(a) and a != "qkrestore"
    )
    assert upward == []


def test_layer_check_sees_an_upward_import() -> None:
    assert layer_of("qkrestore.cli.app") > layer_of("qkrestore.io.checkpoint")
    assert layer_of("qkrestore.surgery.plan") < layer_of("qkrestore.evaluate.sweep")
