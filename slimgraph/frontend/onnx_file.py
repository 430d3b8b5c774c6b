"""Frontend for `.onnx` files (with external data), any opset from 9 up."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from slimgraph.errors import SlimgraphError, first_line
from slimgraph.ir.meta import SOURCE_KEY

MIN_OPSET = 9


def load_onnx(path: Path) -> ir.Model:
    if path.stat().st_size == 0:
        raise SlimgraphError(f"{path} is empty")
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf's DecodeError and onnx_ir's errors alike
        raise SlimgraphError(f"{path} is not a valid ONNX model (corrupt or truncated): {first_line(exc)}") from exc
    if model.ir_version is None or model.ir_version <= 0 or "" not in model.opset_imports or len(model.graph) == 0:
        raise SlimgraphError(f"{path} is not a valid ONNX model: no graph, IR version or opset")
    opset = model.opset_imports[""]
    if opset < MIN_OPSET:
        raise SlimgraphError(f"{path} uses opset {opset}; slimgraph reads opset {MIN_OPSET} and newer")
    _check_external_data(model, path)
    model.meta[SOURCE_KEY] = str(path)
    return model


def _check_external_data(model: ir.Model, path: Path) -> None:
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            data = Path(tensor.base_dir) / tensor.location
            if not data.is_file():
                raise SlimgraphError(f"{path}: external data file '{tensor.location}' is missing")
            end = (tensor.offset or 0) + (tensor.length or 0)
            if data.stat().st_size < end:
                raise SlimgraphError(f"{path}: external data file '{tensor.location}' is truncated")
