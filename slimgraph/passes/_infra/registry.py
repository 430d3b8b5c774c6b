"""The pass registry: name → Pass class, importing a pass's module only when it is asked for.

Built-in passes are listed by module so that `slimgraph passes` and pipeline parsing never
import more than they need; `@register_pass` adds a class (built-in or the user's own).

Passes from other packages (plugins) are found two ways:
- an entry point in the `slimgraph.passes` group, named after the pass, whose value is the
  module (or `module:Class`) that registers it; it is imported when the pass is first named;
- `load_plugin("module")` (the CLI's `--plugin module`, or `--plugin path/to/file.py`)
  imports a module that calls `@register_pass`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from slimgraph.errors import SlimgraphError
from slimgraph.passes._infra.base import Pass

# Pass name → module that defines it. Importing the module runs its @register_pass.
BUILTIN_PASS_MODULES: dict[str, str] = {
    "cleanup": "slimgraph.passes.cleanup",
    "fold-constants": "slimgraph.passes.cleanup",
    "remove-dead-nodes": "slimgraph.passes.cleanup",
    "remove-identity": "slimgraph.passes.cleanup",
    "cse": "slimgraph.passes.cleanup",
    "fuse-ort": "slimgraph.passes.fuse_ort",
    "remove-unused-initializers": "slimgraph.passes.cleanup",
    "quantize-weights": "slimgraph.passes.quantize.weights",
    "quantize-dynamic": "slimgraph.passes.quantize.dynamic",
    "quantize-static": "slimgraph.passes.quantize.static",
    "ternarize": "slimgraph.passes.quantize.ternary",
    "mixed-precision": "slimgraph.passes.quantize.mixed",
    "prune-width": "slimgraph.passes.prune.width",
    "prune-depth": "slimgraph.passes.prune.depth",
    "low-rank": "slimgraph.passes.low_rank",
    "trim-vocab": "slimgraph.passes.trim_vocab",
    "dct-tokens": "slimgraph.passes.dct_tokens",
    "merge-lora": "slimgraph.passes.adapters.merge",
    "merge-shira": "slimgraph.passes.adapters.merge",
    "moe-convert": "slimgraph.passes.moe.convert",
}

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
    return sorted(set(BUILTIN_PASS_MODULES) | set(_REGISTRY) | set(_plugin_entry_points()))


def get_pass_class(name: str) -> type[Pass]:
    if name not in _REGISTRY and name in BUILTIN_PASS_MODULES:
        importlib.import_module(BUILTIN_PASS_MODULES[name])
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
