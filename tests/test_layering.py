"""The package's layering: imports point one way (ir ← measure ← passes ← frontend/backends ← cli), no circles.

Every `import` counts, the ones inside functions too: a lazy import is still a dependency. Imports
under `if TYPE_CHECKING:` never run, so they may point anywhere a type is needed, but they must not close
a circle either: a type-only circle still means two modules that cannot be read apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import slimgraph

ROOT = Path(slimgraph.__file__).parent
# Lower numbers may not import higher ones. The package's own `__init__` (lazy re-exports) is the top.
LAYERS = {
    "slimgraph.errors": 0,
    "slimgraph.ir": 1,
    "slimgraph.measure": 2,
    "slimgraph.workers": 2,  # imports only errors; passes map their work over it
    "slimgraph.passes": 3,
    "slimgraph.frontend": 4,
    "slimgraph.backends": 4,
    "slimgraph.zoo": 4,
    "slimgraph.api": 5,
    "slimgraph.generate": 5,
    "slimgraph.adapters": 5,
    "slimgraph.bench": 5,
    "slimgraph.report": 6,
    "slimgraph.search": 6,
    "slimgraph.cli": 7,
    "slimgraph.__main__": 7,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(path: Path, name: str, known: set[str], *, type_only_too: bool = False) -> set[str]:
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                 for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in type_only and not type_only_too:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            submodules = {f"{base}.{a.name}" for a in node.names} & known
            found.update(submodules)
            if len(submodules) < len(node.names):  # names defined in `base` itself
                found.add(base)
    # A module's own parent packages are imported before it in any case.
    return {m for m in found if m in known and m != name and not name.startswith(m + ".")}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def layer(name: str) -> int | None:
    for prefix, rank in LAYERS.items():
        if name == prefix or name.startswith(prefix + "."):
            return rank
    return None


def import_graph(*, type_only_too: bool = False) -> nx.DiGraph:
    mods = modules()
    graph = nx.DiGraph()
    for name, path in mods.items():
        if name == "slimgraph":
            continue
        graph.add_node(name)
        for target in imports_of(path, name, set(mods), type_only_too=type_only_too):
            if target != "slimgraph":
                graph.add_edge(name, target)
    return graph


def test_every_module_has_a_layer():
    assert [m for m in import_graph() if layer(m) is None] == []


def test_imports_point_down():
    upward = [(a, b) for a, b in import_graph().edges if layer(b) > layer(a)]
    assert upward == []


def test_no_import_circles():
    cycles = list(nx.simple_cycles(import_graph(type_only_too=True), length_bound=8))
    assert cycles == []
