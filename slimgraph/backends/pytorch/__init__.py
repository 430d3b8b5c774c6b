"""PyTorch backend: the IR lowered to a torch.fx.GraphModule (readable code, float weights
as trainable parameters), callable like the other artifacts and saved as `model.py` +
`model.safetensors`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError


class PyTorchArtifact:
    """A model compiled to PyTorch: `artifact.module` is the torch.fx.GraphModule."""

    backend = "pytorch"

    def __init__(self, model: ir.Model) -> None:
        from slimgraph.backends.pytorch.builder import build_module, identifier

        self.model = model
        self.module = build_module(model)
        self.input_names = [v.name for v in model.graph.inputs if v not in set(model.graph.initializers.values())]
        self._arguments = [identifier(n, "input") for n in self.input_names]
        self.output_names = [v.name for v in model.graph.outputs]

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        """Run on positional inputs (graph order) and/or named inputs; returns name → numpy array."""
        import torch

        from slimgraph.backends.pytorch.builder import to_numpy, to_torch

        feeds = dict(zip(self.input_names, args))
        feeds.update(kwargs)
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise SlimgraphError(f"missing model inputs: {', '.join(missing)}")
        tensors = [feeds[n] if isinstance(feeds[n], torch.Tensor) else to_torch(np.asarray(feeds[n]))
                   for n in self.input_names]
        with torch.no_grad():
            outputs = self.module(*tensors)
        return {name: to_numpy(out) for name, out in zip(self.output_names, outputs)}

    def save(self, path: str | os.PathLike) -> Path:
        raise SlimgraphError("saving the pytorch backend's module is not implemented yet")
