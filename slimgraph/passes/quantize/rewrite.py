"""What the quantization passes share beyond the editing layer (`slimgraph.ir.edit`): which
linears and embeddings can be quantized, and the quantized nodes that replace them
(com.microsoft.MatMulNBits, GatherBlockQuantized)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir.edit import add_initializer, bias_value, replace_region
from slimgraph.ir.graph import constant_tensor, transposed_source, weight_tensor
from slimgraph.ir.nbits import BlockQuantized, pack, quantize_rtn
from slimgraph.ir.parts import Embedding, Linear
from slimgraph.ir.structure import find_embeddings, find_linears
from slimgraph.passes._infra.base import PassResult

MS_DOMAIN = "com.microsoft"
T = TypeVar("T")


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
    """The result of a quantization pass that found nothing: unchanged model, one warning line
    that counts the layers skipped for each reason (`name: reason` in `skipped`)."""
    return PassResult(False, {counter: 0}, warnings=[f"{pass_name}: nothing to quantize ({why_skipped(skipped)})"])


def why_skipped(skipped: Sequence[str], default: str = "no MatMul/Gemm with a constant 2-D weight") -> str:
    """`["a: excluded", "b: weight dtype int8", "c: weight dtype int8"]` → "excluded (a); weight
    dtype int8 (2 layers: b, c)": one entry per reason, however many layers share it."""
    names: dict[str, list[str]] = {}
    for entry in skipped:
        name, _, reason = entry.rpartition(": ")
        names.setdefault(reason, []).append(name)
    parts = []
    for reason, layers in names.items():
        shown = ", ".join(layers[:2]) + (", …" if len(layers) > 2 else "")
        parts.append(f"{reason} ({shown})" if len(layers) == 1 else f"{reason} ({len(layers)} layers: {shown})")
    return "; ".join(parts) or default


def _unsupported(linear: Linear) -> str | None:
    node = linear.node
    tensor = weight_tensor(node.inputs[1])[0]
    if tensor.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):  # read as float32
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


class SharedWeights:
    """What a pass makes once per stored weight: a weight that several nodes read (an unrolled LSTM's
    gate weights feed one Gemm per time step) is quantized once, and every reader reads the same
    codes. Readers share when they read the same constant in the same layout (`weight_key`)."""

    def __init__(self) -> None:
        self._made: dict[tuple, Any] = {}

    def get(self, linear: Linear, make: Callable[[], T]) -> T:
        key = weight_key(linear)
        for done in [k for k in self._made if k != key and not k[0].uses()]:
            del self._made[done]  # every reader of that weight has been rewritten: a model's codes are not held at once
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]


def weight_key(linear: Linear) -> tuple:
    """The stored constant behind a linear's weight and its layout: equal keys, equal [K, N] matrices."""
    value = linear.node.inputs[1]
    source = transposed_source(value)
    trans_b = linear.node.op_type == "Gemm" and bool(linear.node.attributes.get_int("transB", 0))
    return (source if source is not None else value, source is not None, trans_b)


def matmul_nbits(
    model: ir.Model, linear: Linear, q: BlockQuantized, *, accuracy_level: int = 0, symmetric: bool = False,
    input_value: ir.Value | None = None, dtype: ir.DataType = ir.DataType.FLOAT, shared: SharedWeights | None = None,
) -> ir.Node:
    """A MatMulNBits node for a quantized linear (bias fused); `input_value` overrides its input;
    with `shared`, linears reading one weight read one set of codes."""
    base = linear.weight or linear.name

    def initializers() -> tuple[ir.Value, ir.Value, ir.Value | None]:
        return (add_initializer(model, f"{base}.q{q.bits}", q.packed_b()),
                add_initializer(model, f"{base}.scales", q.scales.astype(dtype.numpy())),
                None if symmetric else add_initializer(model, f"{base}.zero_points", q.packed_zero_points()))

    b, scales, zero_points = shared.get(linear, initializers) if shared is not None else initializers()
    inputs = [input_value or linear.node.inputs[0], b, scales, zero_points, None, bias_value(linear)]
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
    replace_region(model, [node], [new], {node.outputs[0]: new.outputs[0]})
    return True


def tied_table(linear: Linear, tables: Sequence[Embedding]) -> Embedding | None:
    """The embedding whose table this linear reads as its weight (a tied LM head: `x · Eᵀ`)."""
    weight = linear.node.inputs[1]
    source = transposed_source(weight)
    if source is None and linear.node.op_type == "Gemm" and linear.node.attributes.get_int("transB", 0):
        source = weight
    for table in tables:
        if source is not None and table.node.inputs[0] is source and \
                (table.num_embeddings, table.dim) == (linear.out_features, linear.in_features):
            return table
    return None


def share_quantized_table(model: ir.Model, table: Embedding, head: ir.Node) -> None:
    """Gather(E, ids) → GatherBlockQuantized reading the tied head's MatMulNBits codes, scales and
    zero points (reshaped to [vocab, …]): the table is stored once. With uint8 data, the op reads
    MatMulNBits' layout (two 4-bit codes a byte, low nibble first; default zero point 2^(bits−1)),
    and a head quantized by rtn holds exactly the codes the embedding's own quantization would."""
    bits, block_size = head.attributes.get_int("bits"), head.attributes.get_int("block_size")
    node = table.node

    def rows(value: ir.Value, what: str) -> ir.Value:
        shape = add_initializer(model, f"{table.table}.{what}_rows", np.array([table.num_embeddings, -1], np.int64))
        reshape = ir.node("Reshape", [value, shape], name=f"{node.name or table.table}_{what}_rows")
        nodes.append(reshape)
        return reshape.outputs[0]

    nodes: list[ir.Node] = []
    inputs = [rows(head.inputs[1], "codes"), node.inputs[1], rows(head.inputs[2], "scales")]
    if len(head.inputs) > 3 and head.inputs[3] is not None:
        inputs.append(rows(head.inputs[3], "zero_points"))
    gather = ir.node("GatherBlockQuantized", inputs, domain=MS_DOMAIN, name=f"{node.name or table.table}_Q{bits}",
                     attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": block_size, "bits": bits})
    replace_region(model, [node], [*nodes, gather], {node.outputs[0]: gather.outputs[0]})


def _even(values: np.ndarray) -> np.ndarray:
    """Pad the last axis to an even length for 4-bit packing (the pad is never read)."""
    if values.shape[-1] % 2 == 0:
        return values
    return np.concatenate([values, np.zeros((*values.shape[:-1], 1), values.dtype)], axis=-1)
