"""Sample inputs synthesized from a graph's input types.

Symbolic dimensions get defaults (the first of an input: batch; later ones: sequence or
spatial size). Integer inputs get values that are valid for what consumes them: token ids
stay below the embedding table's row count, an attention mask is ones, token-type ids
are zeros, position ids count up.
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir.meta import EXAMPLE_INPUTS_KEY, EXAMPLE_INPUTS_SOURCE_KEY

DEFAULT_BATCH = 2
DEFAULT_SEQUENCE = 16


def concrete_shape(value: ir.Value, batch: int, sequence: int, dims: dict[str, int] | None = None) -> tuple[int, ...]:
    if value.shape is None:
        raise SlimgraphError(f"input {value.name!r} has no shape; pass example inputs explicitly")
    dims = dims or {}
    shape = []
    for axis, dim in enumerate(value.shape):
        if isinstance(dim, int):
            shape.append(dim)
        elif dim.value is not None and dim.value in dims:
            shape.append(dims[dim.value])
        else:
            shape.append(batch if axis == 0 else sequence)
    return tuple(shape)


def index_bound(value: ir.Value) -> int | None:
    """The row count of a constant table this integer input indexes (Gather data, axis 0)."""
    bounds = []
    for node, index in value.uses():
        if node.op_type == "Gather" and index == 1:
            table = node.inputs[0]
            axis = node.attributes.get_int("axis", 0)
            if table is not None and table.shape is not None and isinstance(table.shape[axis], int):
                bounds.append(table.shape[axis])
    return min(bounds) if bounds else None


def sample_value(value: ir.Value, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    dtype = value.dtype.numpy() if value.dtype is not None else np.float32
    name = (value.name or "").lower()
    if np.issubdtype(dtype, np.bool_):
        return np.ones(shape, dtype=dtype)
    if np.issubdtype(dtype, np.integer):
        if re.search(r"mask", name):
            return np.ones(shape, dtype=dtype)
        if re.search(r"token_type|segment", name):
            return np.zeros(shape, dtype=dtype)
        if re.search(r"position", name) and len(shape) >= 1:
            return np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        high = index_bound(value) or 100
        return rng.integers(0, high, size=shape, dtype=dtype)
    return rng.standard_normal(shape).astype(dtype)


def sample_inputs(
    model: ir.Model,
    *,
    batch: int = DEFAULT_BATCH,
    sequence: int = DEFAULT_SEQUENCE,
    dims: dict[str, int] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """One feed for every graph input that is not an initializer."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        feeds[value.name] = sample_value(value, concrete_shape(value, batch, sequence, dims), rng)
    return feeds


def model_inputs(model: ir.Model, *, seed: int = 0, count: int = 2) -> tuple[list[dict[str, np.ndarray]], str]:
    """The inputs a pipeline verifies and calibrates on, and where they came from.

    A frontend that knows real inputs (a tokenizer, the user's example inputs) stores them in
    `model.meta[EXAMPLE_INPUTS_KEY]`; otherwise they are synthesized.
    """
    examples = model.meta.get(EXAMPLE_INPUTS_KEY)
    if examples:
        return list(examples), model.meta.get(EXAMPLE_INPUTS_SOURCE_KEY, "example inputs")
    feeds = [sample_inputs(model, seed=seed + i, batch=1 + i) for i in range(count)]
    return feeds, "synthesized"
