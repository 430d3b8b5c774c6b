"""The pass registry: name → Pass class, importing a pass's module only when it is asked for.

Built-in passes are listed by module so that `slimgraph passes` and pipeline parsing never
import more than they need; `@register_pass` adds a class (built-in or the user's own).
"""

from __future__ import annotations

import difflib
import importlib

from slimgraph.errors import SlimgraphError
from slimgraph.passes._infra.base import Pass

# Pass name → module that defines it. Importing the module runs its @register_pass.
BUILTIN_PASS_MODULES: dict[str, str] = {
    "cleanup": "slimgraph.passes.cleanup",
    "fold-constants": "slimgraph.passes.cleanup",
    "remove-dead-nodes": "slimgraph.passes.cleanup",
    "remove-identity": "slimgraph.passes.cleanup",
    "cse": "slimgraph.passes.cleanup",
    "remove-unused-initializers": "slimgraph.passes.cleanup",
    "quantize-weights": "slimgraph.passes.quantize.weights",
    "quantize-dynamic": "slimgraph.passes.quantize.dynamic",
    "ternarize": "slimgraph.passes.quantize.ternary",
    "mixed-precision": "slimgraph.passes.quantize.mixed",
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


def known_pass_names() -> list[str]:
    return sorted(set(BUILTIN_PASS_MODULES) | set(_REGISTRY))


def get_pass_class(name: str) -> type[Pass]:
    if name not in _REGISTRY and name in BUILTIN_PASS_MODULES:
        importlib.import_module(BUILTIN_PASS_MODULES[name])
    if name in _REGISTRY:
        return _REGISTRY[name]
    suggestion = difflib.get_close_matches(name, known_pass_names(), n=1)
    hint = f"; did you mean '{suggestion[0]}'?" if suggestion else ""
    raise SlimgraphError(f"unknown pass '{name}'{hint} (see `slimgraph passes`)")


def all_pass_classes() -> list[type[Pass]]:
    return [get_pass_class(name) for name in known_pass_names()]
