"""The lowering table: one function per ONNX op (with the opsets it covers), and the
context lowerings use to read their inputs.

A lowering receives the node and its inputs and returns its output(s), written as plain
torch code over traced values (torch.fx proxies). Inputs arrive as one of:
- a traced tensor (`torch.fx.Proxy`),
- a constant known while building (`numpy.ndarray`): initializers and Constant outputs,
- `Dims`: a 1-D int64 value known element by element, as Python ints or traced sizes
  (`x.size(0)`), so `Shape → Gather → Concat → Reshape` becomes `x.reshape(x.size(0), 12, 32)`.
Lowerings registered with `tensors=True` (the default) get every input as a tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError


class Dims:
    """A 1-D (or, with scalar=True, 0-D) int64 value: Python ints and traced sizes."""

    def __init__(self, items: list, scalar: bool = False) -> None:
        self.items = list(items)
        self.scalar = scalar

    def known(self) -> np.ndarray | None:
        """The value as an array when every element is a Python int."""
        if all(isinstance(i, (int, np.integer)) for i in self.items):
            array = np.array(self.items, dtype=np.int64)
            return array.reshape(()) if self.scalar else array
        return None


@dataclass(frozen=True)
class Lowering:
    op_type: str
    domain: str
    since: int
    until: int | None
    fn: Callable
    tensors: bool


_TABLE: dict[tuple[str, str], list[Lowering]] = {}


def lowers(op_type: str, *, domain: str = "", since: int = 1, until: int | None = None, tensors: bool = True):
    """Register `fn` as the lowering of `op_type` for opsets since..until (inclusive)."""

    def register(fn: Callable) -> Callable:
        _TABLE.setdefault((domain, op_type), []).append(Lowering(op_type, domain, since, until, fn, tensors))
        return fn

    return register


def find_lowering(node: ir.Node, opset: int) -> Lowering:
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    for lowering in _TABLE.get((domain, node.op_type), []):
        if lowering.since <= opset and (lowering.until is None or opset <= lowering.until):
            return lowering
    known = "known for other opsets" if (domain, node.op_type) in _TABLE else "not supported"
    raise SlimgraphError(
        f"pytorch backend: op {domain or 'ai.onnx'}::{node.op_type} (opset {opset}) is {known}; "
        f"node {node.name or '(unnamed)'}"
    )


def supported_ops() -> dict[str, list[tuple[int, int | None]]]:
    """'domain::Op' → opset ranges, for the docs."""
    return {f"{d or 'ai.onnx'}::{op}": [(lw.since, lw.until) for lw in lws] for (d, op), lws in sorted(_TABLE.items())}


def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    """An attribute's Python value (ints, floats, strings, lists, tensors as numpy)."""
    a = node.attributes.get(name)
    if a is None:
        return default
    if a.type == ir.AttributeType.TENSOR:
        return a.as_tensor().numpy()
    if a.type == ir.AttributeType.STRING:
        return a.value
    if a.type in (ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS):
        return list(a.value)
    return a.value
