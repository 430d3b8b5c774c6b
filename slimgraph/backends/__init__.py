"""Backends lower an optimized IR model to something that runs: `compile(model, backend=...)`.

Each backend is a module with an artifact class (the `Artifact` protocol: call it on inputs,
`save` it) registered here by name; the module is imported only when the backend is used.
A new backend is one folder plus one `register_backend` line.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from slimgraph.errors import SlimgraphError

if TYPE_CHECKING:  # `slimgraph --help` reads the registry: keep its import light
    import numpy as np
    import onnx_ir as ir


@runtime_checkable
class Artifact(Protocol):
    """A compiled model: `artifact(**inputs)` → output name → array; `artifact.save(path)`."""

    backend: str

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]: ...

    def save(self, path: str | os.PathLike) -> Path: ...


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # imported on first use
    artifact: str  # the artifact class in `module`; its `check_output(path)` validates -o before any work
    writes: str  # what it saves, for --help

    def artifact_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.artifact)


_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, module: str, artifact: str, writes: str) -> None:
    _BACKENDS[name] = Backend(name, module, artifact, writes)


register_backend("onnxruntime", "slimgraph.backends.onnxruntime", "OnnxRuntimeArtifact", "a .onnx file")
register_backend("onnxruntime-genai", "slimgraph.backends.onnxruntime_genai", "OnnxRuntimeGenaiArtifact",
                 "a folder ONNX Runtime GenAI runs (model.onnx, genai_config.json, the tokenizer)")
register_backend("pytorch", "slimgraph.backends.pytorch", "PyTorchArtifact",
                 "a folder (model.py + model.safetensors) or a .pt2 file")
register_backend("triton", "slimgraph.backends.triton", "TritonArtifact",
                 "a folder (model.py + kernels.py + model.safetensors)")


def backends() -> dict[str, Backend]:
    return dict(_BACKENDS)


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise SlimgraphError(f"unknown backend '{name}' (available: {', '.join(_BACKENDS)})")
    return _BACKENDS[name]


def check_output(backend: str, path: str | os.PathLike) -> None:
    """Refuse an output path the backend cannot write, before any model is loaded."""
    get_backend(backend).artifact_class().check_output(Path(path))


def compile(model: ir.Model, backend: str = "onnxruntime", **options: Any) -> Artifact:  # noqa: A001 - the public name
    """Lower `model` with `backend`: an artifact you can call on inputs and `.save(path)`.

    `options` go to the backend's artifact (onnxruntime: `threads`, `external_data`).
    """
    return get_backend(backend).artifact_class()(model, **options)
