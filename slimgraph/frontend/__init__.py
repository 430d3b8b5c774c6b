"""Frontends: capture a model from any supported source into the IR (an onnx_ir.Model).

`load` dispatches on the source: an `ir.Model` or `onnx.ModelProto`, a torch `nn.Module`
(with example inputs), a `.pt2` file, a `.onnx` file, a `.gguf` file, or a Hugging Face model folder.
Torch and transformers are imported only by the frontends that need them; `reader` reads the files
passes need (calibration, tokenizers, adapters).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.frontend.kv_cache import output_maps
from slimgraph.frontend.reader import READER
from slimgraph.ir.meta import OUTPUT_MAPS_KEY, READER_KEY


def load(source: Any, *, example_inputs: Any = None, dynamic_shapes: Any = None,
         stage: Callable[[str], None] | None = None, **options: Any) -> ir.Model:
    """Capture `source` into the IR.

    - `ir.Model` / `onnx.ModelProto`: used as is (a proto is deserialized).
    - `nn.Module`: exported with torch.export; needs `example_inputs` (a tuple of tensors or
      a dict of keyword tensors); `dynamic_shapes` maps input names to {axis: "dim name"}.
    - path to `.onnx`, `.pt2`, `.gguf` (dequantized to float32), or a folder with `config.json` (Hugging Face).

    `stage(text)` hears which stage the load of a folder or `.gguf` is in (from the export cache,
    exporting with torch, …); given one, an export runs in a worker process, so that the caller's
    display keeps moving (`slimgraph.frontend.export_worker`). The model carries the frontend's reader (`model.meta[READER_KEY]`), through which passes read its
    calibration files, tokenizer and adapters.
    """
    model = _load(source, example_inputs=example_inputs, dynamic_shapes=dynamic_shapes, stage=stage, **options)
    model.meta[READER_KEY] = READER
    if kv_maps := output_maps(model):
        model.meta[OUTPUT_MAPS_KEY] = kv_maps | dict(model.meta.get(OUTPUT_MAPS_KEY) or {})
    return model


def _load(source: Any, *, example_inputs: Any, dynamic_shapes: Any, stage: Callable[[str], None] | None,
          **options: Any) -> ir.Model:
    if isinstance(source, ir.Model):
        return _as_exported(source, options)
    module = type(source).__module__
    if module.startswith("onnx") and type(source).__name__ == "ModelProto":
        return _as_exported(ir.serde.deserialize_model(source), options)
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

        return hf_folder.load_folder(path, example_inputs=example_inputs, dynamic_shapes=dynamic_shapes, stage=stage,
                                     **options)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from slimgraph.frontend import onnx_file

        return _as_exported(onnx_file.load_onnx(path), options)
    if suffix == ".pt2":
        from slimgraph.frontend import torch_module

        if options.pop("kv_cache", False):
            raise SlimgraphError("kv_cache applies to exports of a Hugging Face folder, a .gguf or an nn.Module; "
                                 "a .pt2 program has its inputs fixed already")
        return torch_module.load_pt2(path, example_inputs=example_inputs, **options)
    if suffix == ".gguf":
        from slimgraph.frontend import gguf_file

        return gguf_file.load_gguf(path, example_inputs=example_inputs, dynamic_shapes=dynamic_shapes, stage=stage,
                                   **options)
    raise SlimgraphError(
        f"unsupported file type '{suffix or path.name}': expected .onnx, .pt2, .gguf or a Hugging Face model folder")


def _as_exported(model: ir.Model, options: dict[str, Any]) -> ir.Model:
    """An ONNX model is used as it was exported: `kv_cache=True` only confirms it has a KV cache."""
    if options.pop("kv_cache", False):
        from slimgraph.ir.cache_signature import cache_layers

        if not cache_layers(model):
            raise SlimgraphError("kv_cache=True: this ONNX model has no KV cache inputs (past_key_values.N.key/value); "
                                 "export it again from its Hugging Face folder or .gguf with kv_cache")
    return model


def _is_torch_module(obj: Any) -> bool:
    return any(cls.__module__.startswith("torch.nn") and cls.__name__ == "Module" for cls in type(obj).__mro__)
