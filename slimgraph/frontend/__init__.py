"""Frontends: capture a model from any supported source into the IR (an onnx_ir.Model).

`load` dispatches on the source: an `ir.Model` or `onnx.ModelProto`, a torch `nn.Module`
(with example inputs), a `.pt2` file, a `.onnx` file, or a Hugging Face model folder.
Torch and transformers are imported only by the frontends that need them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx_ir as ir

from slimgraph.errors import SlimgraphError


def load(source: Any, *, example_inputs: Any = None, dynamic_shapes: Any = None, **options: Any) -> ir.Model:
    """Capture `source` into the IR.

    - `ir.Model` / `onnx.ModelProto`: used as is (a proto is deserialized).
    - `nn.Module`: exported with torch.export; needs `example_inputs` (a tuple of tensors or
      a dict of keyword tensors); `dynamic_shapes` maps input names to {axis: "dim name"}.
    - path to `.onnx`, `.pt2`, or a folder with `config.json` (Hugging Face).
    """
    if isinstance(source, ir.Model):
        return source
    module = type(source).__module__
    if module.startswith("onnx") and type(source).__name__ == "ModelProto":
        return ir.serde.deserialize_model(source)
    if module.startswith("torch") or _is_torch_module(source):
        from slimgraph.frontend import torch_module

        return torch_module.load_module(source, example_inputs=example_inputs, dynamic_shapes=dynamic_shapes, **options)
    if not isinstance(source, (str, os.PathLike)):
        raise SlimgraphError(f"cannot load a {type(source).__name__}: pass a path, an nn.Module or an onnx model")
    path = Path(source)
    if not path.exists():
        raise SlimgraphError(f"no such file or folder: {path}")
    if path.is_dir():
        from slimgraph.frontend import hf_folder

        return hf_folder.load_folder(path, example_inputs=example_inputs, dynamic_shapes=dynamic_shapes, **options)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from slimgraph.frontend import onnx_file

        return onnx_file.load_onnx(path)
    if suffix == ".pt2":
        from slimgraph.frontend import torch_module

        return torch_module.load_pt2(path, example_inputs=example_inputs, **options)
    raise SlimgraphError(f"unsupported file type '{suffix or path.name}': expected .onnx, .pt2 or a Hugging Face model folder")


def _is_torch_module(obj: Any) -> bool:
    return any(cls.__module__.startswith("torch.nn") and cls.__name__ == "Module" for cls in type(obj).__mro__)
