"""Helpers the lowerings share: ONNX → torch dtypes, axes, pads, scalars, static lengths."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from slimgraph.backends.pytorch.lowering import Dims
from slimgraph.errors import SlimgraphError

TORCH_DTYPES = {
    "FLOAT": torch.float32, "DOUBLE": torch.float64, "FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16,
    "INT8": torch.int8, "INT16": torch.int16, "INT32": torch.int32, "INT64": torch.int64, "UINT8": torch.uint8,
    "UINT16": torch.uint16, "UINT32": torch.uint32, "UINT64": torch.uint64, "BOOL": torch.bool,
    "COMPLEX64": torch.complex64, "COMPLEX128": torch.complex128,
}


def torch_dtype(onnx_type: int) -> torch.dtype:
    name = ir.DataType(onnx_type).name
    if name not in TORCH_DTYPES:
        raise SlimgraphError(f"pytorch backend: torch has no dtype for {name.lower()}")
    return TORCH_DTYPES[name]


def axis_of(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def torch_pads(begin: list, end: list) -> list:
    """ONNX pads (begins per axis, ends per axis) as F.pad wants them: pairs, last dim first."""
    pairs = []
    for b, e in zip(reversed(begin), reversed(end)):
        pairs += [b, e]
    return pairs


def scalar(value):
    """A 0-D input as a Python number or traced size (a traced tensor becomes .item())."""
    if isinstance(value, Dims):
        return value.items[0]
    if isinstance(value, np.ndarray):
        return value.reshape(()).item()
    if isinstance(value, (int, float)):
        return value
    return value.item()


def static_length(value: ir.Value) -> int:
    """The static length of a 1-D input (how many axes a run-time `axes` or `pads` names)."""
    if value.shape is None or not isinstance(value.shape[0], int):
        raise SlimgraphError(f"pytorch backend: the length of {value.name!r} is not known")
    return value.shape[0]
