"""Graph surgery shared by the quantization passes: pick linears, read their weights,
and swap a linear (MatMul/Gemm + bias Add) for a quantized node that computes the same thing."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir.structure import Embedding, Linear, constant_tensor, find_embeddings, find_linears, weight_tensor
from slimgraph.passes._infra.base import PassResult
from slimgraph.passes.quantize.packing import BlockQuantized, pack, quantize_rtn

MS_DOMAIN = "com.microsoft"


def excluded(linear: Linear, patterns: Sequence[str]) -> bool:
    """True when a glob matches the linear's module path, weight name or node name."""
    names = [linear.name, linear.weight, linear.node.name or ""]
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns for name in names if name)


def quantizable_linears(model: ir.Model, exclude: Sequence[str]) -> tuple[list[Linear], list[str]]:
    """Linears a weight-quantization pass can rewrite, and why others were skipped."""
    chosen, skipped = [], []
    for linear in find_linears(model):
        if excluded(linear, exclude):
            skipped.append(f"{linear.name}: excluded")
            continue
        reason = _unsupported(linear)
        if reason:
            skipped.append(f"{linear.name}: {reason}")
        else:
            chosen.append(linear)
    return chosen, skipped


def nothing_to_quantize(pass_name: str, skipped: list[str], counter: str) -> PassResult:
    """The result of a quantization pass that found nothing: unchanged model, one warning."""
    reason = "; ".join(skipped) or "no MatMul/Gemm with a constant 2-D weight"
    return PassResult(False, {counter: 0}, warnings=[f"{pass_name}: nothing to quantize ({reason})"])


def _unsupported(linear: Linear) -> str | None:
    node = linear.node
    tensor = weight_tensor(node.inputs[1])[0]
    if tensor.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        return f"weight dtype {tensor.dtype.name.lower()}"
    if node.op_type == "Gemm":
        attrs = node.attributes
        if attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
            return "Gemm with alpha or beta other than 1"
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = constant_tensor(node.inputs[2])
            if bias is None or tuple(bias.shape) != (linear.out_features,):
                return "Gemm bias that is not a constant vector"
    return None


def weight_matrix(linear: Linear) -> np.ndarray:
    """The [K, N] float32 weight of a linear, whatever its layout in the graph."""
    tensor, _, transposed = weight_tensor(linear.node.inputs[1])
    w = np.asarray(tensor.numpy(), dtype=np.float32)  # no copy when it already is float32
    if transposed:
        w = w.T
    if linear.node.op_type == "Gemm" and linear.node.attributes.get_int("transB", 0):
        w = w.T
    return np.ascontiguousarray(w)


def bias_vector(linear: Linear) -> ir.Value | None:
    """The bias value a linear adds (MatMul + Add, or Gemm's C), if any."""
    if linear.bias is None:
        return None
    if linear.node.op_type == "Gemm":
        return linear.node.inputs[2]
    (add, _), = linear.node.outputs[0].uses()
    return next(v for v in add.inputs if v is not None and v.name == linear.bias)


def add_initializer(model: ir.Model, name: str, tensor: ir.TensorProtocol | np.ndarray) -> ir.Value:
    """Register a new initializer under a unique name derived from `name`."""
    taken = model.graph.initializers
    unique, i = name, 1
    while unique in taken:
        i += 1
        unique = f"{name}.{i}"
    if isinstance(tensor, np.ndarray):
        tensor = ir.tensor(tensor, name=unique)
    else:
        tensor.name = unique
    value = ir.Value(name=unique, const_value=tensor, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))
    model.graph.register_initializer(value)
    return value


def replace_linear(model: ir.Model, linear: Linear, nodes: list[ir.Node], output: ir.Value) -> None:
    """Put `nodes` (producing `output`) in place of the linear and its bias Add.

    The new nodes keep the old node's metadata (module path), so the Journal, `diff`
    and `inspect` still see which module they belong to.
    """
    graph = model.graph
    old_nodes = [linear.node]
    if linear.bias is not None and linear.node.op_type == "MatMul":
        old_nodes.append(linear.output.producer())
    for node in nodes:
        node.metadata_props.update(linear.node.metadata_props)
    graph.insert_before(linear.node, nodes)
    swap_output(model, old_nodes, linear.output, output)


def swap_output(model: ir.Model, old_nodes: list[ir.Node], old: ir.Value, new: ir.Value) -> None:
    """Make `new` stand where `old` stood (type, shape, users, graph-output name), then drop `old_nodes`."""
    was_graph_output, name = old.is_graph_output(), old.name
    new.type, new.shape = old.type, old.shape
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    model.graph.remove(old_nodes, safe=True)
    if was_graph_output:  # the model's output keeps its name
        new.name = name
    remove_dead_producers(model)
    remove_unused_initializers(model)


def remove_dead_producers(model: ir.Model) -> None:
    """Nodes whose outputs nobody reads any more (e.g. the Transpose of a tied weight)."""
    import onnx_ir.passes.common as common

    common.RemoveUnusedNodesPass()(model)


def remove_unused_initializers(model: ir.Model) -> None:
    """Initializers no node reads any more (the float weights a quantized node replaced)."""
    graph = model.graph
    keep = set(graph.inputs) | set(graph.outputs)
    for name, value in list(graph.initializers.items()):
        if not value.uses() and value not in keep:
            del graph.initializers[name]


def matmul_nbits(
    model: ir.Model, linear: Linear, q: BlockQuantized, *, accuracy_level: int = 0, symmetric: bool = False,
    input_value: ir.Value | None = None, dtype: ir.DataType = ir.DataType.FLOAT,
) -> ir.Node:
    """A MatMulNBits node for a quantized linear (bias fused); `input_value` overrides its input."""
    base = linear.weight or linear.name
    b = add_initializer(model, f"{base}.q{q.bits}", q.packed_b())
    scales = add_initializer(model, f"{base}.scales", q.scales.astype(dtype.numpy()))
    zero_points = None if symmetric else add_initializer(model, f"{base}.zero_points", q.packed_zero_points())
    inputs = [input_value or linear.node.inputs[0], b, scales, zero_points, None, bias_vector(linear)]
    while inputs[-1] is None:
        inputs.pop()
    attributes = {"K": linear.in_features, "N": linear.out_features, "bits": q.bits, "block_size": q.block_size}
    if accuracy_level:
        attributes["accuracy_level"] = accuracy_level
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    name = f"{linear.node.name or linear.name}_Q{q.bits}"
    return ir.node("MatMulNBits", inputs, attributes=attributes, domain=MS_DOMAIN, name=name)


def input_dtype(linear: Linear) -> ir.DataType:
    dtype = linear.node.inputs[0].dtype
    if dtype not in (None, ir.DataType.FLOAT, ir.DataType.FLOAT16):
        raise SlimgraphError(f"{linear.name}: activations of type {dtype.name.lower()} cannot be quantized")
    return dtype or ir.DataType.FLOAT


def embedding_tables(model: ir.Model, exclude: Sequence[str]) -> list[Embedding]:
    """Embedding Gathers not excluded by a glob on their module path or table name."""
    return [
        table for table in find_embeddings(model)
        if not any(fnmatch.fnmatchcase(name, p) for p in exclude for name in (table.name, table.table))
    ]


def quantize_embedding(model: ir.Model, table: Embedding, bits: int, block_size: int, symmetric: bool) -> bool:
    """Gather(table, ids) → com.microsoft.GatherBlockQuantized, blocks along the embedding dimension.

    4 bits: (u)int4 data; 8 bits: uint8 data with the `bits` attribute. False when the
    embedding dimension is not a whole number of blocks (the table is left as it was).
    """
    node = table.node
    if table.dim % block_size:
        return False
    weights = node.inputs[0].const_value.numpy().astype(np.float32)
    q = quantize_rtn(np.ascontiguousarray(weights.T), bits, block_size, symmetric)
    codes = q.codes[:, : table.dim]  # [rows, dim]
    if bits == 4:
        data_type = ir.DataType.INT4 if symmetric else ir.DataType.UINT4
        # the symmetric (signed int4) layout stores code − 8
        stored = (codes.astype(np.int16) - 8).astype(np.int8).view(np.uint8) if symmetric else codes
        data = ir.PackedTensor(pack(stored, 4).reshape(-1), dtype=data_type, shape=ir.Shape(codes.shape))
    else:
        data = ir.tensor(codes)
    inputs = [add_initializer(model, f"{table.table}.q{bits}", data), node.inputs[1],
              add_initializer(model, f"{table.table}.scales", q.scales)]
    if not symmetric:
        zp = q.zero_points
        zp_tensor = (ir.PackedTensor(pack(_even(zp), 4).reshape(-1), dtype=ir.DataType.UINT4, shape=ir.Shape(zp.shape))
                     if bits == 4 else ir.tensor(zp))
        inputs.append(add_initializer(model, f"{table.table}.zero_points", zp_tensor))
    attributes = {"gather_axis": 0, "quantize_axis": 1, "block_size": block_size}
    if bits != 4:
        attributes["bits"] = bits
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    new = ir.node("GatherBlockQuantized", inputs, attributes=attributes, domain=MS_DOMAIN,
                  name=f"{node.name or table.table}_Q{bits}")
    new.metadata_props.update(node.metadata_props)
    model.graph.insert_before(node, new)
    swap_output(model, [node], node.outputs[0], new.outputs[0])
    return True


def _even(values: np.ndarray) -> np.ndarray:
    """Pad the last axis to an even length for 4-bit packing (the pad is never read)."""
    if values.shape[-1] % 2 == 0:
        return values
    return np.concatenate([values, np.zeros((*values.shape[:-1], 1), values.dtype)], axis=-1)
