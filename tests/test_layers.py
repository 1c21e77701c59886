"""The import-layer contract: no module imports a layer above it or a forbidden sibling, and no import circles.

Read from the source (every `import`, inside functions and under TYPE_CHECKING too: a lazy import is still a
dependency), so it runs in milliseconds and never imports torch. That `import dtrain` and a config error import
no torch is checked in real processes by tests/test_api.py and tests/test_cli.py.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterable, Iterator

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dtrain"

# Top to bottom; a module may import its own layer or any below it. The doors are the modules directly
# under dtrain/ that are not named here, so a new top-level entry point needs no edit.
LAYERS: list[set[str]] = [
    {"doors"},
    {"run", "setup", "inference"},
    {"callbacks"},
    {"checkpoint", "loggers"},
    {"loop"},
    {"parallel", "models", "data"},
    {"runtime"},
    {"config"},
    {"errors"},
]
# Packages of one layer that stay independent of each other (a pair listed here may not import either way).
APART = [{"checkpoint", "loggers"}, {"parallel", "models", "data"}]

RANK = {room: depth for depth, rooms in enumerate(LAYERS) for room in rooms}


def module_name(path: Path, root: Path) -> str:
    parts = ["dtrain", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str, root: Path = PACKAGE) -> str:
    """The room (sub-package or top-level module) whose layer a dtrain module is in."""
    parts = module.split(".")
    if len(parts) == 1:
        return "doors"  # dtrain/__init__.py
    if parts[1] in RANK:
        return parts[1]
    if (root / parts[1]).is_dir():  # a new sub-package must be given its layer, not fall to the doors
        raise AssertionError(f"{module}: dtrain/{parts[1]}/ has no layer; add it to LAYERS in {Path(__file__).name}")
    return "doors"


def imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> Iterator[tuple[str, int]]:
    """(imported dtrain module, line) for every import in the tree; `from pkg import sub` names the submodule."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "dtrain":
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = module.split(".")[:len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "dtrain":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in known else base), node.lineno


def graph(root: Path = PACKAGE) -> dict[str, dict[str, str]]:
    """module -> {imported module: 'file:line' of the first such import}, dtrain modules only."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    edges: dict[str, dict[str, str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        out = edges.setdefault(module, {})
        for target, line in imports(tree, module, path.name == "__init__.py", set(files)):
            if target != module:
                out.setdefault(target, f"{path.relative_to(root.parent)}:{line}")
    return edges


def layer_violations(edges: dict[str, dict[str, str]], root: Path = PACKAGE) -> list[str]:
    found = []
    for module, targets in edges.items():
        mine = room(module, root)
        for target, where in targets.items():
            theirs = room(target, root)
            if RANK[theirs] < RANK[mine]:
                found.append(f"{where}: {module} ({mine}) imports {target}, a layer above ({theirs})")
            elif mine != theirs and any({mine, theirs} <= apart for apart in APART):
                found.append(f"{where}: {module} ({mine}) imports {target}: {mine} and {theirs} stay apart")
    return found


def cycles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """One circle per strongly connected component (Tarjan), written as a path back to its start."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return [circle_in(sorted(c), edges) for c in components]


def circle_in(component: list[str], edges: dict[str, dict[str, str]]) -> list[str]:
    """A shortest path from the component's first module back to itself, through the component."""
    start, inside = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(edges.get(node, {})):
                if nxt == start:
                    return paths[node] + [start]
                if nxt in inside and nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    raise AssertionError(f"no circle through {start}")  # cannot happen for a strongly connected component


def describe(circle: list[str], edges: dict[str, dict[str, str]]) -> str:
    return " -> ".join(circle) + "  (" + ", ".join(edges[a][b] for a, b in zip(circle, circle[1:])) + ")"


def fail_on(title: str, lines: Iterable[str]) -> None:
    lines = list(lines)
    if lines:
        pytest.fail(f"{title}:\n  " + "\n  ".join(lines), pytrace=False)


def test_every_module_sits_in_a_layer() -> None:
    for module in graph():
        room(module)  # raises for a sub-package without a layer


def test_no_module_imports_a_layer_above_it_or_a_sibling_it_stays_apart_from() -> None:
    fail_on("imports against the layers (doors > run > callbacks > checkpoint, loggers > loop > "
            "parallel, models, data > runtime > config > errors)", layer_violations(graph()))


def test_no_import_circles() -> None:
    edges = graph()
    fail_on("import circles", (describe(c, edges) for c in cycles(edges)))


def test_the_checks_catch_an_upward_import_a_sibling_and_a_circle(tmp_path: Path) -> None:
    """The contract is only worth its green if it goes red: a tiny package with one of each fault."""
    root = tmp_path / "dtrain"
    for rel, text in {
        "__init__.py": "",
        "errors.py": "def f():\n    from dtrain.config import schema\n",  # lazy, and upward
        "config/__init__.py": "",
        "config/schema.py": "from dtrain.config.typed import X\n",
        "config/typed.py": "from . import schema\nX = 1\n",  # relative, and a circle
        "loggers/__init__.py": "",
        "loggers/jsonl.py": "import dtrain.checkpoint.store\n",  # a sibling it stays apart from
        "checkpoint/__init__.py": "",
        "checkpoint/store.py": "from dtrain.errors import DTrainError\n",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    edges = graph(root)
    found = layer_violations(edges, root)
    circles = cycles(edges)
    assert sorted(line.split(": ", 1)[1] for line in found) == [
        "dtrain.errors (errors) imports dtrain.config.schema, a layer above (config)",
        "dtrain.loggers.jsonl (loggers) imports dtrain.checkpoint.store: loggers and checkpoint stay apart",
    ]
    assert circles == [["dtrain.config.schema", "dtrain.config.typed", "dtrain.config.schema"]]
    assert describe(circles[0], edges) == ("dtrain.config.schema -> dtrain.config.typed -> dtrain.config.schema  "
                                           "(dtrain/config/schema.py:1, dtrain/config/typed.py:1)")
