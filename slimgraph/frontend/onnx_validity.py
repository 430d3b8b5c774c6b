"""What a `.onnx` file must satisfy before slimgraph works on it, each failure one line.

onnx_ir reads much that no runtime runs, and the first step to trip over it used to crash with
a traceback (all found by fuzzing malformed files, `tests/cli/fuzzing.py`):

- names that are not text (a bit flipped inside a string: protobuf hands back bytes);
- a value that no node, graph input or initializer provides, a graph output (of the graph or of
  a subgraph) that nothing computes, and a cycle; nodes merely out of order are sorted, as ONNX
  Runtime sorts them;
- an ONNX op that does not exist, lacks a required input or attribute, or has an attribute of
  the wrong type (checked against onnx's operator schemas at the model's opset);
- a tensor whose data does not fit its shape and type (an initializer, a `Constant`'s value),
  and a `ConstantOfShape` whose constant shape is negative or absurdly large (the model-zoo
  files store their weights that way, so slimgraph reads those shapes as weight shapes).

Ops of other domains (`com.microsoft`, custom ones) are left to the runtime, and so are the ops
ONNX Runtime registers in the default domain itself (`SimplifiedLayerNormalization`, which
`fuse-ort` writes): slimgraph loads every file it writes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from slimgraph.errors import SlimgraphError, first_line
from slimgraph.ir.opset import ort_default_domain_ops

MAX_GENERATED_VALUES = 1 << 40  # a ConstantOfShape beyond this many values is not a model anyone runs


def check_model(model: ir.Model, path: Path) -> None:
    graphs = list(all_graphs(model.graph))
    opset = model.opset_imports.get("", None)
    for graph in graphs:
        for value in (*graph.inputs, *graph.initializers.values()):
            if not isinstance(value.name, str):  # (invalid UTF-8 in the file: found by fuzzing)
                raise SlimgraphError(f"{path}: graph input or initializer {value.name!r} has a name that is not "
                                     "text (a corrupt file?)")
        for value in graph.initializers.values():
            _check_tensor(value.const_value, f"initializer {value.name!r}", path)
        for node in graph:
            _check_names(node, path)
            for value in node.inputs:
                if value is not None and not _provided(value):
                    raise SlimgraphError(f"{path}: node {node.name!r} ({node.op_type}) reads {value.name!r}, which no "
                                         "node, graph input or initializer provides")
            if node.domain in ("", "ai.onnx") and opset is not None and node.op_type not in ort_default_domain_ops():
                _check_schema(node, opset, path)
            _check_node_tensors(node, path)
        for value in graph.outputs:
            if not isinstance(value.name, str) or not _provided(value):
                raise SlimgraphError(f"{path}: graph output {value.name!r} of graph {graph.name!r} is not computed "
                                     "by any node")
    try:
        model.graph.sort()  # stable: a sorted graph keeps its order; subgraphs are sorted too
    except ValueError as exc:
        raise SlimgraphError(f"{path}: the graph has a cycle (a node depends on its own output)") from exc


def all_graphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    """The graph and every subgraph in it, empty ones included."""
    yield graph
    for node in graph:
        for attr in node.attributes.values():
            if not isinstance(attr, ir.Attr):
                continue
            if attr.type == ir.AttributeType.GRAPH:
                yield from all_graphs(attr.value)
            elif attr.type == ir.AttributeType.GRAPHS:
                for subgraph in attr.value:
                    yield from all_graphs(subgraph)


def _provided(value: ir.Value) -> bool:
    return value.producer() is not None or value.is_graph_input() or value.is_initializer() or (
        value.const_value is not None)


def _check_names(node: ir.Node, path: Path) -> None:
    if not all(isinstance(text, str) for text in (node.op_type, node.domain, node.name or "")):
        raise SlimgraphError(f"{path}: a node's name or op type is not text (a corrupt file?)")
    for value in (*node.inputs, *node.outputs):
        if value is not None and not isinstance(value.name, str):
            raise SlimgraphError(f"{path}: node {node.name!r} ({node.op_type}) has a value whose name is not text "
                                 "(a corrupt file?)")


def _check_schema(node: ir.Node, opset: int, path: Path) -> None:
    where = f"{path}: node {node.name!r}"
    try:
        schema = onnx.defs.get_schema(node.op_type, max(opset, 1), "")
    except onnx.defs.SchemaError:
        raise SlimgraphError(f"{where}: {node.op_type!r} is not an ONNX op (opset {opset})") from None
    for i, formal in enumerate(schema.inputs):
        if formal.option == onnx.defs.OpSchema.FormalParameterOption.Single and (
                i >= len(node.inputs) or node.inputs[i] is None):
            raise SlimgraphError(f"{where} ({node.op_type}) lacks its required input {formal.name!r}")
    for name, spec in schema.attributes.items():
        attr = node.attributes.get(name)
        if attr is None:
            if spec.required:
                raise SlimgraphError(f"{where} ({node.op_type}) lacks its required attribute {name!r}")
            continue
        if isinstance(attr, ir.Attr) and attr.type.value != spec.type.value:
            raise SlimgraphError(f"{where} ({node.op_type}): attribute {name!r} is {attr.type.name}; "
                                 f"{node.op_type} takes {spec.type.name}")


def _check_node_tensors(node: ir.Node, path: Path) -> None:
    for attr in node.attributes.values():
        if isinstance(attr, ir.Attr) and attr.type == ir.AttributeType.TENSOR:
            _check_tensor(attr.value, f"node {node.name!r} ({node.op_type}): attribute {attr.name!r}", path)
    if node.op_type == "ConstantOfShape" and node.domain in ("", "ai.onnx") and node.inputs:
        shape = node.inputs[0].const_value if node.inputs[0] is not None else None
        if shape is not None:
            dims = [int(d) for d in shape.numpy().reshape(-1)]
            if any(d < 0 for d in dims) or math.prod(dims) > MAX_GENERATED_VALUES:
                raise SlimgraphError(f"{path}: node {node.name!r} (ConstantOfShape) builds a tensor of shape {dims}")


def _check_tensor(tensor: ir.TensorProtocol | None, what: str, path: Path) -> None:
    """The tensor's data fits its shape and type (reading it: a memory map or a view of the bytes)."""
    if tensor is None:
        return
    try:
        tensor.numpy()
    except Exception as exc:  # onnx_ir's ValueError for a size mismatch, TypeError for a bad dtype, …
        raise SlimgraphError(f"{path}: {what}: its data does not fit its shape and type ({first_line(exc)})") from None
