"""Passes and the machinery to run them. Pass modules are imported when first named."""

from slimgraph.passes._infra.base import Changes, Pass, PassContext, PassRecord, PassResult, PipelineReport
from slimgraph.passes._infra.instruments import Instrument, Journal, PrintAfterChange, Timing, Verify
from slimgraph.passes._infra.pipeline import Pipeline, Recipe, make_pass
from slimgraph.passes._infra.registry import (
    all_pass_classes,
    get_pass_class,
    known_pass_names,
    load_plugin,
    register_pass,
)

__all__ = [
    "Changes",
    "Instrument",
    "Journal",
    "Pass",
    "PassContext",
    "PassRecord",
    "PassResult",
    "Pipeline",
    "PipelineReport",
    "PrintAfterChange",
    "Recipe",
    "Timing",
    "Verify",
    "all_pass_classes",
    "get_pass_class",
    "known_pass_names",
    "load_plugin",
    "make_pass",
    "register_pass",
]


def __getattr__(name: str):
    # `from slimgraph.passes import FoldConstants` works without importing every pass module.
    import importlib

    from slimgraph.passes._infra.registry import builtin_pass_modules

    for module in dict.fromkeys(builtin_pass_modules().values()):
        mod = importlib.import_module(module)
        if hasattr(mod, name):
            return getattr(mod, name)
    raise AttributeError(f"module 'slimgraph.passes' has no attribute {name!r}")
