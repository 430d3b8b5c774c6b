"""Model statistics: parameters, bytes by dtype, nodes, op histogram, FLOPs estimate."""

from __future__ import annotations

import collections
import math
from dataclasses import asdict, dataclass, field

import onnx_ir as ir

from slimgraph.ir.graph import ensure_shapes
from slimgraph.measure.flops import graph_flops, input_sizes


@dataclass(frozen=True)
class ModelStats:
    parameters: int
    bytes: int
    bytes_by_dtype: dict[str, int]
    nodes: int
    op_histogram: dict[str, int]
    flops: int
    flops_unknown_nodes: int = 0  # MatMul/Gemm/Conv nodes whose shapes were not known
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    # Tensors the graph builds at run time (ConstantOfShape of a constant shape, e.g. the
    # model-zoo CNNs' weights), which `parameters` and `bytes` do not count: they are not in the file.
    generated_tensors: int = 0
    generated_values: int = 0
    # The inputs' symbolic dims and the values the FLOPs estimate binds them to.
    symbolic_dims: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    def __repr__(self) -> str:
        return (f"<ModelStats {human_count(self.parameters)} parameters, {human_bytes(self.bytes)}, "
                f"{self.nodes:,} nodes, {human_count(self.flops)} FLOPs>")


def _constant_tensors(model: ir.Model) -> list[ir.TensorProtocol]:
    tensors = [v.const_value for v in model.graph.initializers.values() if v.const_value is not None]
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attr = node.attributes.get("value")
            if attr is not None and attr.type == ir.AttributeType.TENSOR:
                tensors.append(attr.as_tensor())
    return tensors


def weight_bytes(model: ir.Model) -> int:
    """Bytes of the initializers and Constant tensors (what `ModelStats.bytes` counts)."""
    return sum(t.nbytes for t in _constant_tensors(model))


def node_count(model: ir.Model) -> int:
    """Nodes, those in subgraphs included (what `ModelStats.nodes` counts)."""
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def generated_tensors(model: ir.Model) -> tuple[int, int]:
    """(count, values) of the tensors ConstantOfShape builds from a constant shape, e.g. the
    model-zoo CNNs' Conv and Gemm weights (their files hold only the shapes)."""
    count = values = 0
    for node in model.graph:
        if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx"):
            continue
        shape = node.inputs[0].const_value if node.inputs and node.inputs[0] is not None else None
        if shape is None:
            continue
        count += 1
        values += math.prod(int(d) for d in shape.numpy().reshape(-1))
    return count, values


def op_key(node: ir.Node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def describe_value(value: ir.Value) -> str:
    dtype = value.dtype.name.lower() if value.dtype is not None else "?"
    shape = "?" if value.shape is None else "×".join(str(d) for d in value.shape)
    return f"{dtype}[{shape}]"


# Inputs of quantized ops that hold scales and zero points: quantization metadata, not parameters.
QUANT_METADATA_INPUTS = {("com.microsoft", "MatMulNBits"): (2, 3), ("com.microsoft", "GatherBlockQuantized"): (2, 3)}


def _logical_sizes(model: ir.Model) -> dict[str, int]:
    """Parameter counts of quantized initializers: K·N for packed MatMulNBits weights, 0 for
    scales and zero points (a packed tensor's size would count bytes, not weights)."""
    sizes = {}
    for node in model.graph:
        metadata = QUANT_METADATA_INPUTS.get((node.domain, node.op_type))
        if metadata is None:
            continue
        if node.op_type == "MatMulNBits" and node.inputs[1] is not None:
            sizes[node.inputs[1].name] = node.attributes.get_int("K") * node.attributes.get_int("N")
        for index in metadata:
            if index < len(node.inputs) and node.inputs[index] is not None:
                sizes[node.inputs[index].name] = 0
    return sizes


def model_stats(model: ir.Model) -> ModelStats:
    """Statistics of `model` (infers shapes first when the graph carries few).

    `parameters` counts weights (a 4-bit weight is one parameter); `bytes` is what they
    and their scales take.
    """
    ensure_shapes(model)
    tensors = _constant_tensors(model)
    logical = _logical_sizes(model)
    by_dtype: dict[str, int] = collections.Counter()
    parameters = 0
    for tensor in tensors:
        by_dtype[tensor.dtype.name.lower()] += tensor.nbytes
        parameters += logical.get(tensor.name, tensor.size)
    histogram = collections.Counter(op_key(node) for node in ir.traversal.RecursiveGraphIterator(model.graph))
    flops, unknown = graph_flops(model)
    generated, generated_count = generated_tensors(model)
    return ModelStats(
        parameters=parameters,
        bytes=sum(by_dtype.values()),
        bytes_by_dtype=dict(sorted(by_dtype.items(), key=lambda kv: -kv[1])),
        nodes=sum(histogram.values()),
        op_histogram=dict(histogram.most_common()),
        flops=flops,
        flops_unknown_nodes=unknown,
        inputs={v.name: describe_value(v) for v in model.graph.inputs if not v.is_initializer()},
        outputs={v.name: describe_value(v) for v in model.graph.outputs},
        generated_tensors=generated,
        generated_values=generated_count,
        symbolic_dims=input_sizes(model),
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or unit == "T":
            return f"{n:.0f}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"
