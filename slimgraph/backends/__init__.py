"""Backends lower an optimized IR model to something that runs: `compile(model, backend=...)`."""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from slimgraph.errors import SlimgraphError

BACKENDS = ("onnxruntime", "pytorch")


def compile(model: ir.Model, backend: str = "onnxruntime", **options: Any):  # noqa: A001 - the public name
    """An artifact you can call on inputs and `.save(path)`."""
    if backend == "onnxruntime":
        from slimgraph.backends.onnxruntime import OnnxRuntimeArtifact

        return OnnxRuntimeArtifact(model, **options)
    if backend == "pytorch":
        from slimgraph.backends.pytorch import PyTorchArtifact

        return PyTorchArtifact(model, **options)
    raise SlimgraphError(f"unknown backend '{backend}' (available: {', '.join(BACKENDS)})")
