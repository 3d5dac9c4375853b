"""Keep peftlab's layering honest: no import cycles, and each room imports only the rooms below it.

The graph is read from the source with `ast` (nothing is imported), so it sees module-level and
function-level imports alike; imports under `if TYPE_CHECKING:` never run and are left out.

LAYERS is the layer table (docs refer to it). A module's room is the longest key that prefixes its
dotted name under `peftlab`; the value lists the rooms it may import besides its own. From the bottom:

- errors, cache, config.sections, cpu, runs: leaves (at most errors below them);
- model, data, methods: the working parts, built on config sections;
- config (config.run, config.loading, config/__init__): the whole run's config, above methods;
- sizing, run_setup, evaluation, reports: what a run needs around training;
- train: the recipe that ties them together;
- cli (may use everything) and __main__ (only cli) on top; the top package `peftlab` ("") uses nothing.

A new top-level module has no room until it is placed in LAYERS, and the test fails until then.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "peftlab"
SRC = Path(__file__).resolve().parents[2] / "src"
EVERYTHING = ("*",)

# fmt: off
LAYERS: dict[str, tuple[str, ...]] = {
    "errors": (),
    "cache": (),
    "config.sections": ("errors",),
    "cpu": ("errors",),
    "runs": ("errors",),
    "model": ("config.sections", "errors", "cache", "cpu"),
    "data": ("config.sections", "errors", "cache"),
    "methods": ("config.sections", "model", "errors"),
    "config": ("config.sections", "methods", "errors"),
    "sizing": ("config", "config.sections", "methods", "model", "errors", "cpu"),
    "run_setup": ("config", "config.sections", "model", "data", "methods", "errors"),
    "evaluation": (
        "config", "config.sections", "data", "model", "methods", "runs", "cache", "errors", "run_setup", "cpu",
    ),
    "reports": ("runs", "sizing", "errors"),
    "train": (
        "config", "config.sections", "cpu", "data", "evaluation", "methods", "model",
        "run_setup", "runs", "sizing", "reports", "errors", "cache",
    ),
    "compare": ("config", "config.sections", "errors", "runs", "train", "sizing"),
    "cli": EVERYTHING,
    "__main__": ("cli",),
    "": (),  # the top package `peftlab` itself (__init__.py)
}
# fmt: on

Graph = dict[str, set[str]]


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file; a package's __init__.py is the package's own module."""
    names = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """Collects imported names anywhere in a module (functions and methods too)."""

    def __init__(self, module: str, is_package: bool, modules: set[str]) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.modules = modules
        self.targets: set[str] = set()

    def _longest_module(self, name: str) -> None:
        # `import a.b.c` binds a.b.c; fall back to the longest prefix that is a module of ours.
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in self.modules:
                self.targets.add(".".join(parts[:end]))
                return

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):  # annotation-only imports never run: no edge
            for stmt in node.orelse:
                self.visit(stmt)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._longest_module(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: `.` is this module's package, each extra dot one level up
            parts = self.package.split(".")
            parts = parts[: len(parts) - node.level + 1]
            base = ".".join([*parts, base] if base else parts)
        for alias in node.names:
            sub = f"{base}.{alias.name}"  # `from pkg import name` may name a submodule
            self._longest_module(sub if sub in self.modules else base)


def build_graph(root: Path = SRC, package: str = PACKAGE) -> Graph:
    files = module_names(root, package)
    graph: Graph = {}
    for module, path in files.items():
        visitor = _Imports(module, path.name == "__init__.py", set(files))
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        graph[module] = visitor.targets - {module}
    return graph


def find_cycles(graph: Graph) -> list[list[str]]:
    """Every cycle closed by a DFS back edge, as a path [a, b, ..., a]."""
    cycles: list[list[str]] = []
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> None:
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in done:
                visit(nxt)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node)
    return cycles


def room_of(module: str, layers: dict[str, tuple[str, ...]] = LAYERS) -> str | None:
    rel = "" if module == PACKAGE else module.removeprefix(PACKAGE + ".")
    rooms = [key for key in layers if rel == key or rel.startswith(key + ".")]
    return max(rooms, key=len) if rooms else None  # "" matches only the top package


def layer_violations(graph: Graph, layers: dict[str, tuple[str, ...]] = LAYERS) -> list[str]:
    problems = []
    for module in sorted(graph):
        room = room_of(module, layers)
        if room is None:
            problems.append(f"{module} has no room in LAYERS")
            continue
        for target in sorted(graph[module]):
            used = room_of(target, layers)
            if used != room and layers[room] != EVERYTHING and used not in layers[room]:
                problems.append(f"{module} imports {target} (room {room} may not use room {used})")
    return problems


def test_no_import_cycles() -> None:
    cycles = find_cycles(build_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_layers() -> None:
    problems = layer_violations(build_graph())
    assert not problems, "layer violations:\n" + "\n".join(problems)


def test_graph_is_real() -> None:
    graph = build_graph()
    assert len(graph) > 50
    assert "peftlab.sizing.plan" in graph["peftlab.train.recipe"]
    assert "peftlab.methods" in graph["peftlab.config.run"]
    assert "peftlab.train.recipe" in graph["peftlab.cli"]  # imported only inside a function
    assert "peftlab.config.sections" not in graph["peftlab.methods.registry"]  # TYPE_CHECKING only


def test_builder_on_a_tiny_package(tmp_path: Path) -> None:
    files = {
        "pkg/__init__.py": "",
        "pkg/b.py": "",
        "pkg/d.py": "",
        "pkg/sub/__init__.py": "from .. import b\n",
        "pkg/sub/c.py": "import pkg.sub\n",
        "pkg/a.py": (
            "from typing import TYPE_CHECKING\nfrom . import b\nif TYPE_CHECKING:\n    from pkg import d\n"
            "class K:\n    def f(self):\n        from .sub import c\n        from pkg.sub import helper\n"
        ),
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = build_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.b", "pkg.sub.c", "pkg.sub"}
    assert graph["pkg.sub"] == {"pkg.b"}
    assert graph["pkg.sub.c"] == {"pkg.sub"}


def test_checkers_on_a_hand_made_graph() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    assert room_of("peftlab.config.sections") == "config.sections"
    assert room_of("peftlab.config") == room_of("peftlab.config.run") == "config"
    assert room_of("peftlab") == ""
    assert room_of("peftlab.newthing") is None
    graph = {
        "peftlab.model.loading": {"peftlab.errors", "peftlab.train.recipe"},
        "peftlab.config.sections": {"peftlab.config.run"},
        "peftlab.config.run": {"peftlab.config.sections", "peftlab.config.loading"},
        "peftlab.cli": {"peftlab.train.recipe"},
        "peftlab.newthing": set(),
    }
    assert layer_violations(graph) == [
        "peftlab.config.sections imports peftlab.config.run (room config.sections may not use room config)",
        "peftlab.model.loading imports peftlab.train.recipe (room model may not use room train)",
        "peftlab.newthing has no room in LAYERS",
    ]
