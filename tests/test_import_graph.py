"""The package's import graph: no cycle among its modules, and no layer importing one above it.

Every module of ``moa_stream`` is parsed (not imported) and every import it makes is an edge:
those at module level, which run when the module is imported (*eager*), and those inside
functions, which run when the function is called (*lazy*). A lazy import still ties the two
modules together, and a cycle through one is a cycle of the design, so both count. Imports
under ``if TYPE_CHECKING:`` never run and are left out. In a module that calls
``importlib.import_module``, a string constant that names a module of the package counts as a
lazy import of that module (the command table, a package's exports loaded on first use).

Packages: ``import a.b.c`` runs ``a/__init__``, then ``a/b/__init__``, then ``a.b.c``. So an
import of ``a.b.c`` is an edge to ``a.b.c`` and one to each package on the way, except the
packages the importing module is itself inside: those are being imported already, and a
submodule is reached through them without reading their namespace. ``from a.b import c`` is an
edge to ``a.b.c`` when that is a module, else to ``a.b`` (a name its ``__init__`` defines), from
inside ``a.b`` too: reading a name of a package that is still being initialised is how a
package cycle fails. A package's ``__init__`` that imports its own submodules is therefore no
cycle, while a submodule that imports a name from its package's ``__init__``, which imports
that submodule, is one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

import moa_stream

PACKAGE = "moa_stream"
PACKAGE_DIR = Path(moa_stream.__file__).resolve().parent

#: Old public paths of modules that moved, kept as re-exports for code that imports them.
SHIMS = frozenset({"moa_stream.pytest_plugin", "moa_stream.llamacpp"})


@dataclass(frozen=True, slots=True)
class Edge:
    """``source`` imports ``target`` at ``line``; ``eager`` when that runs at import time,
    ``implicit`` when ``target`` is a package on the way to the module the line names."""

    source: str
    target: str
    line: int
    eager: bool
    implicit: bool = False

    def __str__(self) -> str:
        kind = "" if self.eager else " (lazy)"
        via = " (its package)" if self.implicit else ""
        return f"{self.source}:{self.line} -> {self.target}{via}{kind}"


def module_files(root: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Every module under ``root`` by its dotted name (a package by its ``__init__.py``)."""
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _within(name: str, prefix: str) -> bool:
    """``name`` is ``prefix`` or a module inside it."""
    return name == prefix or name.startswith(prefix + ".")


def _ancestors(name: str) -> set[str]:
    """``name`` and every package above it: ``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


class _Imports(ast.NodeVisitor):
    """The edges of one module."""

    def __init__(self, name: str, is_package: bool, modules: Iterable[str]) -> None:
        self.name = name
        self.root = name.partition(".")[0]
        self.package = name if is_package else name.rpartition(".")[0]
        self.modules = frozenset(modules)
        self.edges: list[Edge] = []
        self._depth = 0
        self._imports_by_name = False
        self._names: list[tuple[str, int]] = []

    # -- where an import runs ----------------------------------------------------------------
    def _in_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _in_function

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    # -- the imports -------------------------------------------------------------------------
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno, eager=self._depth == 0)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._resolve(node.module, node.level)
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            target = submodule if submodule in self.modules else base
            self._add(target, node.lineno, eager=self._depth == 0)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        if name == "import_module":
            self._imports_by_name = True
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and node.value in self.modules:
            self._names.append((node.value, node.lineno))

    def _resolve(self, module: str | None, level: int) -> str:
        if level == 0:
            return module or ""
        parts = self.package.split(".")
        parts = parts[: len(parts) - (level - 1)]
        return ".".join([*parts, module] if module else parts)

    def _known(self, target: str) -> str | None:
        """The module ``target`` names, or the longest module it starts with."""
        parts = target.split(".")
        for i in range(len(parts), 0, -1):
            candidate = ".".join(parts[:i])
            if candidate in self.modules:
                return candidate
        return None

    def _add(self, target: str, line: int, *, eager: bool) -> None:
        if not _within(target, self.root):
            return
        module = self._known(target)
        if module is None or module == self.name:
            return
        self.edges.append(Edge(self.name, module, line, eager))
        inside = _ancestors(self.name)
        for package in sorted(_ancestors(module) - {module} - inside):
            self.edges.append(Edge(self.name, package, line, eager, implicit=True))

    def finish(self) -> list[Edge]:
        if self._imports_by_name:
            for target, line in self._names:
                self._add(target, line, eager=False)
        return self.edges


def module_edges(name: str, is_package: bool, source: str, modules: Iterable[str]) -> list[Edge]:
    """The imports of the module ``name`` whose text is ``source``."""
    visitor = _Imports(name, is_package, modules)
    visitor.visit(ast.parse(source))
    return visitor.finish()


def build_graph(files: Mapping[str, Path]) -> list[Edge]:
    edges: list[Edge] = []
    for name, path in files.items():
        source = path.read_text(encoding="utf-8")
        edges += module_edges(name, path.name == "__init__.py", source, files)
    return edges


def find_cycles(edges: Iterable[Edge]) -> list[list[Edge]]:
    """One cycle per strongly connected group of modules (Tarjan), as the edges that close it."""
    out: dict[str, list[Edge]] = {}
    for edge in edges:
        out.setdefault(edge.source, []).append(edge)
        out.setdefault(edge.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for edge in out[node]:
            if edge.target not in index:
                connect(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in on_stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            group: set[str] = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(out):
        if node not in index:
            connect(node)
    return [_cycle_in(group, out) for group in groups]


def _cycle_in(group: set[str], out: Mapping[str, list[Edge]]) -> list[Edge]:
    """A shortest cycle through the first module (by name) of a strongly connected group."""
    start = min(group)
    paths: dict[str, list[Edge]] = {start: []}
    queue = [start]
    for node in queue:
        for edge in out[node]:
            if edge.target not in group:
                continue
            if edge.target == start:
                return [*paths[node], edge]
            if edge.target not in paths:
                paths[edge.target] = [*paths[node], edge]
                queue.append(edge.target)
    raise AssertionError(f"no cycle in {sorted(group)}")  # pragma: no cover


def loaded_on_import(module: str, edges: Iterable[Edge]) -> set[str]:
    """What importing ``module`` runs: its eager imports, theirs, and so on."""
    eager: dict[str, list[str]] = {}
    for edge in edges:
        if edge.eager:
            eager.setdefault(edge.source, []).append(edge.target)
    seen = {module}
    queue = [module]
    for node in queue:
        for target in eager.get(node, ()):
            if target not in seen:
                seen.add(target)
                queue.append(target)
    return seen


FILES = module_files()
EDGES = build_graph(FILES)


# -- the parser itself ------------------------------------------------------------------------
SAMPLE_MODULES = [
    "pkg",
    "pkg.a",
    "pkg.b",
    "pkg.sub",
    "pkg.sub.c",
    "pkg.sub.d",
    "pkg.typed",
    "pkg.lazy",
    "pkg.dyn",
]
SAMPLE = """
from __future__ import annotations
import importlib
import os
from typing import TYPE_CHECKING
from pkg import a
from pkg.b import thing
from . import d
from .. import b as also_b
from ..sub import c

if TYPE_CHECKING:
    from pkg import typed
else:
    import pkg.a

def later():
    from pkg.lazy import f
    return importlib.import_module("pkg.dyn")

class K:
    import pkg
"""


def test_the_parser_sees_every_kind_of_import() -> None:
    edges = module_edges("pkg.sub.c", False, SAMPLE, SAMPLE_MODULES)
    targets = {(e.target, e.eager) for e in edges}
    assert ("pkg.a", True) in targets  # from a package, its submodule
    assert ("pkg.b", True) in targets  # a name of a module, and a relative import of one
    assert ("pkg.sub.d", True) in targets  # from . import d
    assert ("pkg", True) in targets  # ``import pkg`` in a class body runs at import
    assert ("pkg.lazy", False) in targets  # inside a function
    assert ("pkg.dyn", False) in targets  # through importlib
    assert not any(target == "pkg.typed" for target, _ in targets)  # TYPE_CHECKING only
    assert not any(target == "pkg.sub.c" for target, _ in targets)  # never itself
    # pkg and pkg.sub hold this module: they are not reached through the import of a sibling.
    assert not any(target == "pkg.sub" for target, _ in targets)


def test_an_import_of_a_nested_module_runs_the_packages_on_the_way() -> None:
    edges = module_edges("pkg.a", False, "import pkg.sub.c\n", SAMPLE_MODULES)
    assert {(e.target, e.implicit) for e in edges} == {("pkg.sub", True), ("pkg.sub.c", False)}


def _edges(*pairs: tuple[str, str]) -> list[Edge]:
    return [Edge(source, target, 1, True) for source, target in pairs]


def test_a_package_importing_its_submodules_is_no_cycle_but_reading_it_back_is() -> None:
    fine = _edges(("p", "p.x"), ("p", "p.y"), ("p.x", "p.y"))
    assert find_cycles(fine) == []
    back = _edges(("p", "p.x"), ("p.x", "p.y"), ("p.y", "p"))
    (cycle,) = find_cycles(back)
    assert [e.source for e in cycle] == ["p", "p.x", "p.y"]


# -- the package ------------------------------------------------------------------------------
def test_the_graph_covers_the_package() -> None:
    assert {"moa_stream", "moa_stream.engine.spec", "moa_stream.server.app"} <= set(FILES)
    sources = {e.source for e in EDGES}
    assert len(sources) > len(FILES) // 2
    assert any(e.source == "moa_stream.engine.run" and e.eager for e in EDGES)
    assert any(not e.eager for e in EDGES), "no lazy import found: the parser misses them"


def test_no_import_cycle() -> None:
    cycles = find_cycles(EDGES)
    report = "\n\n".join("\n".join(str(e) for e in cycle) for cycle in cycles)
    assert not cycles, f"import cycles:\n{report}"


ENGINE = "moa_stream.engine"
#: What sits above the engine: it builds and runs MoAs and knows nothing of who calls it.
ABOVE_ENGINE = (
    "moa_stream.cli",
    "moa_stream.server",
    "moa_stream.integrations",
    "moa_stream._easy",
    "moa_stream.config",
    "moa_stream.tracing",
    "moa_stream.bench",
    "moa_stream.sim",
    "moa_stream.testing",
)


def _violations(sources: str, forbidden: Iterable[str], *, exempt: Iterable[str] = ()) -> list[str]:
    forbidden = tuple(forbidden)
    exempt = tuple(exempt)
    return [
        str(e)
        for e in EDGES
        if _within(e.source, sources)
        and not any(_within(e.source, x) for x in exempt)
        and any(_within(e.target, f) for f in forbidden)
    ]


def test_the_engine_imports_nothing_above_it() -> None:
    bad = _violations(ENGINE, ABOVE_ENGINE)
    bad += [str(e) for e in EDGES if _within(e.source, ENGINE) and e.target == PACKAGE]
    assert not bad, "the engine imports upward:\n" + "\n".join(bad)


#: The aiohttp integration mounts the server's own application (``add_moa_subapp``): it is the
#: one integration that needs it.
MOUNTS_THE_APP = "moa_stream.integrations.aiohttp"


def test_the_integrations_leave_the_server_app_alone() -> None:
    """Only the server's shared pieces (errors, the response writer): neither its application
    nor the ``moa_stream.server`` namespace, whose exports include it."""
    app_modules = ("moa_stream.server.app", "moa_stream.server._serve")
    bad = _violations("moa_stream.integrations", app_modules, exempt=[MOUNTS_THE_APP])
    bad += [
        str(e)
        for e in EDGES
        if _within(e.source, "moa_stream.integrations")
        and e.source != MOUNTS_THE_APP
        and e.target == "moa_stream.server"
        and not e.implicit
    ]
    assert not bad, "an integration imports the server's application:\n" + "\n".join(bad)
    for module in ("moa_stream.integrations._core", "moa_stream.integrations.fastapi"):
        loaded = loaded_on_import(module, EDGES)
        assert not loaded & set(app_modules), f"importing {module} loads the server app"


def test_nothing_in_the_library_imports_the_command_line() -> None:
    bad = _violations(PACKAGE, ["moa_stream.cli"], exempt=["moa_stream.cli"])
    assert not bad, "the library imports the command line:\n" + "\n".join(bad)


def test_nothing_in_the_library_imports_the_test_tooling() -> None:
    bad = _violations(PACKAGE, ["moa_stream.testing"], exempt=["moa_stream.testing", *SHIMS])
    bad += _violations(PACKAGE, SHIMS)
    assert not bad, "the library imports the test tooling:\n" + "\n".join(bad)


def test_the_server_imports_no_integration() -> None:
    bad = _violations("moa_stream.server", ["moa_stream.integrations"])
    assert not bad, "the server imports an integration:\n" + "\n".join(bad)


LOADED = """
import sys
import {module}
print("\\n".join(sorted(m for m in sys.modules if m.startswith("moa_stream"))))
"""


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        ("moa_stream", ["moa_stream.cli", "moa_stream.testing", "moa_stream.server.app"]),
        ("moa_stream.server.respond", ["moa_stream.server.app", "moa_stream.server._serve"]),
        ("moa_stream.integrations.fastapi", ["moa_stream.server.app", "moa_stream.cli"]),
    ],
)
def test_what_an_import_loads(module: str, absent: list[str]) -> None:
    """The same, as Python does it: a fresh interpreter imports ``module``."""
    done = subprocess.run(
        [sys.executable, "-c", LOADED.format(module=module)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert module in loaded
    assert not loaded & set(absent), sorted(loaded & set(absent))
