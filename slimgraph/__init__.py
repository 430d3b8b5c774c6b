"""slimgraph: make trained neural networks smaller and faster, verified at every step.

    import slimgraph
    model = slimgraph.load("path/to/hf-folder-or.onnx")
    report = slimgraph.Pipeline.parse("cleanup").run(model)
    slimgraph.compile(model, backend="onnxruntime").save("out/model.onnx")

Attributes are imported on first use, so `import slimgraph` stays fast and never
imports torch, triton or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": "slimgraph.frontend",
    "save": "slimgraph.api",
    "inspect": "slimgraph.api",
    "diff": "slimgraph.api",
    "compile": "slimgraph.backends",
    "generate": "slimgraph.generate",
    "Pipeline": "slimgraph.passes",
    "Recipe": "slimgraph.passes",
    "Pass": "slimgraph.passes",
    "PassContext": "slimgraph.passes",
    "PassResult": "slimgraph.passes",
    "register_pass": "slimgraph.passes",
    "SlimgraphError": "slimgraph.errors",
    "FidelityError": "slimgraph.errors",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from slimgraph.api import diff, inspect, save
    from slimgraph.backends import compile
    from slimgraph.errors import FidelityError, SlimgraphError
    from slimgraph.frontend import load
    from slimgraph.generate import generate
    from slimgraph.passes import Pass, PassContext, PassResult, Pipeline, Recipe, register_pass


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'slimgraph' has no attribute {name!r}")


def __dir__() -> list[str]:
    # What completion should offer: the public API (imported on first use), not this module's imports.
    return sorted({*__all__, "__version__"})
