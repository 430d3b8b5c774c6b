"""The pass registry: name → Pass class, importing a pass's module only when it is asked for.

Built-in passes are found in the source of the passes package (`builtin_pass_modules`): a new pass is
one new file, and `slimgraph passes` and pipeline parsing never import more modules than they need.
`@register_pass` adds a class (built-in or the user's own).

Passes from other packages (plugins) are found two ways:
- an entry point in the `slimgraph.passes` group, named after the pass, whose value is the
  module (or `module:Class`) that registers it; it is imported when the pass is first named;
- `load_plugin("module")` (the CLI's `--plugin module`, or `--plugin path/to/file.py`)
  imports a module that calls `@register_pass`.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib
import importlib.util
import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from slimgraph.errors import SlimgraphError
from slimgraph.passes._infra.base import Pass

PASSES_DIR = Path(__file__).resolve().parents[1]  # slimgraph/passes
# A pass that trains through a backend (heal: the PyTorch lowering) lives beside it, since passes may
# not import backends; it is found there the same way, and imported only when named.
BACKENDS_DIR = PASSES_DIR.parent / "backends"


def builtin_pass_modules(root: Path = PASSES_DIR, package: str = "slimgraph.passes") -> dict[str, str]:
    """Pass name → the module under `root` that defines it, read from the source without importing it.

    A built-in pass registers itself by being in the passes package: a class decorated with
    `@register_pass` whose `name` is a string literal. Reading the source (not importing every module)
    keeps `slimgraph passes` and pipeline parsing fast.
    """
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        if "@register_pass" not in text or "_infra" in path.relative_to(root).parts:
            continue
        module = ".".join([package, *path.relative_to(root).with_suffix("").parts])
        for name in _registered_names(ast.parse(text)):
            if name in found:
                raise ValueError(f"pass name {name!r} is defined in both {found[name]} and {module}")
            found[name] = module
    return found


def _registered_names(tree: ast.Module) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(_is_register(d) for d in node.decorator_list):
            for stmt in node.body:
                target = stmt.target if isinstance(stmt, ast.AnnAssign) else (
                    stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 else None)
                if isinstance(target, ast.Name) and target.id == "name" and isinstance(stmt.value, ast.Constant):
                    names.append(stmt.value.value)
    return names


def _is_register(decorator: ast.expr) -> bool:
    return (isinstance(decorator, ast.Name) and decorator.id == "register_pass") or (
        isinstance(decorator, ast.Attribute) and decorator.attr == "register_pass")


@functools.cache
def builtin_passes() -> dict[str, str]:
    """Every built-in pass, name → module: the passes package's, and those that train through a backend."""
    return builtin_pass_modules() | builtin_pass_modules(BACKENDS_DIR, "slimgraph.backends")


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a Pass available by its `name` in pipelines and the CLI."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a class attribute `name`")
    existing = _REGISTRY.get(name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"pass name {name!r} is already registered by {existing.__qualname__}")
    _REGISTRY[name] = cls
    return cls


ENTRY_POINT_GROUP = "slimgraph.passes"


def _plugin_entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_plugin(module: str) -> None:
    """Import `module` (a dotted name, or a `.py` file) so that the passes it registers with
    `@register_pass` can be named in pipelines."""
    path = Path(module)
    try:
        if path.suffix == ".py":
            if not path.is_file():
                raise SlimgraphError(f"no such plugin file: {path}")
            spec = importlib.util.spec_from_file_location(f"slimgraph_plugin_{path.stem}", path)
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = loaded  # dataclasses look their module up while the file runs
            spec.loader.exec_module(loaded)
        else:
            importlib.import_module(module)
    except ImportError as exc:
        raise SlimgraphError(f"cannot import plugin module '{module}': {exc}") from exc


def known_pass_names() -> list[str]:
    return sorted(set(builtin_passes()) | set(_REGISTRY) | set(_plugin_entry_points()))


def get_pass_class(name: str) -> type[Pass]:
    if name not in _REGISTRY and name in builtin_passes():
        importlib.import_module(builtin_passes()[name])
    if name not in _REGISTRY:
        entry = _plugin_entry_points().get(name)
        if entry is not None:
            try:
                loaded = entry.load()  # importing the module runs its @register_pass
            except Exception as exc:
                raise SlimgraphError(f"the plugin for pass '{name}' ({entry.value}) cannot be loaded: {exc}") from exc
            if isinstance(loaded, type) and issubclass(loaded, Pass) and getattr(loaded, "name", None) == name:
                register_pass(loaded)  # `module:Class` may name an undecorated class
            if name not in _REGISTRY:
                raise SlimgraphError(f"plugin {entry.value} does not register a pass named '{name}'")
    if name in _REGISTRY:
        return _REGISTRY[name]
    suggestion = difflib.get_close_matches(name, known_pass_names(), n=1)
    hint = f"; did you mean '{suggestion[0]}'?" if suggestion else ""
    raise SlimgraphError(f"unknown pass '{name}'{hint} (see `slimgraph passes`)")


def all_pass_classes() -> list[type[Pass]]:
    return [get_pass_class(name) for name in known_pass_names()]
