"""quantize-dynamic: MatMul/Gemm(x, W) [+ bias] →
Cast(MatMulInteger(DynamicQuantizeLinear(x), W_int8)) · (x_scale · w_scale) [+ bias].

W8A8 as onnxruntime's quantize_dynamic builds it: int8 weights (per output channel, or per
tensor), activations quantized to uint8 per tensor at run time. `weights=auto` follows the target
(`slimgraph.measure.target`): int8 where ONNX Runtime's U8S8 kernel is exact (VNNI), 7-bit int8 (ORT's
reduce_range) on AVX2 without VNNI, where U8S8's int16 pair sums would saturate; `u8` (uint8 with
zero point 128: the same levels, ORT's slower U8U8 kernel) is the other remedy. One
DynamicQuantizeLinear is shared by the linears that read the same input (q, k, v). The
node pattern is the one ONNX Runtime fuses into MatMulIntegerToFloat. With embeddings=true,
Gather(table, ids) → DequantizeLinear(Gather(table_uint8, ids), scale, zp): the table is
stored as uint8 (per tensor) and only the gathered rows are dequantized. (An 8-bit
GatherBlockQuantized measured 2.5% slower end to end on MiniLM in ONNX Runtime 1.32.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from slimgraph.ir.edit import add_initializer, bias_value, replace_linear, replace_region, weight_matrix
from slimgraph.ir.parts import Embedding, Linear
from slimgraph.measure.target import Target, detect
from slimgraph.passes._infra.base import Pass, PassContext, PassResult
from slimgraph.passes._infra.registry import register_pass
from slimgraph.passes.quantize.rewrite import (
    SharedWeights,
    embedding_tables,
    input_dtype,
    nothing_to_quantize,
    quantizable_linears,
)


def _quantize_table_uint8(model: ir.Model, table: Embedding) -> None:
    """Gather(table, ids) → DequantizeLinear(Gather(q, ids), scale, zp), q uint8 per tensor."""
    node = table.node
    weights = node.inputs[0].const_value.numpy().astype(np.float32)
    low, high = min(float(weights.min()), 0.0), max(float(weights.max()), 0.0)
    scale = np.float32((high - low) / 255.0 or 1.0)
    zero_point = np.uint8(np.clip(np.rint(-low / scale), 0, 255))
    codes = np.clip(np.rint(weights / scale) + zero_point, 0, 255).astype(np.uint8)
    q = add_initializer(model, f"{table.table}.uint8", codes)
    scale_value = add_initializer(model, f"{table.table}.scale", np.array(scale))
    zp_value = add_initializer(model, f"{table.table}.zero_point", np.array(zero_point))
    gather = ir.node("Gather", [q, node.inputs[1]], attributes={"axis": 0}, name=f"{node.name or table.table}_uint8")
    dequantize = ir.node("DequantizeLinear", [gather.outputs[0], scale_value, zp_value],
                         name=f"{node.name or table.table}_dequantize")
    replace_region(model, [node], [gather, dequantize], {node.outputs[0]: dequantize.outputs[0]})


def _int8_weight(model: ir.Model, linear: Linear, per_channel: bool, levels: int, unsigned: bool
                 ) -> tuple[ir.Value, ir.Value, ir.Value]:
    """A linear's weight as initializers: int8 codes (or uint8 with zero point 128), zero points, scales."""
    codes, scale = quantize_int8_symmetric(weight_matrix(linear), per_channel, levels)
    base = linear.weight or linear.name
    stored, zero_points = stored_codes(codes, scale.shape, unsigned)
    return (add_initializer(model, f"{base}.{stored.dtype}", stored),
            add_initializer(model, f"{base}.zero_point", zero_points),
            add_initializer(model, f"{base}.scale", scale))


def stored_codes(codes: np.ndarray, scale_shape: tuple[int, ...], unsigned: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes as stored, and their zero points: int8 with zero points 0, or (`unsigned`)
    the same levels as uint8 shifted by the zero point 128."""
    if unsigned:
        return (codes.astype(np.int16) + 128).astype(np.uint8), np.full(scale_shape, 128, np.uint8)
    return codes, np.zeros(scale_shape, np.int8)


def quantize_int8_symmetric(weight: np.ndarray, per_channel: bool, levels: int = 127, axis: int = -1
                            ) -> tuple[np.ndarray, np.ndarray]:
    """float → int8 codes in [-levels, levels] and scales (one per index of the channel `axis`, or
    [1] per tensor); q = round(w / scale). A linear's [K, N] has its channels on the last axis."""
    axis = axis % weight.ndim
    if per_channel:
        absmax = np.abs(weight).max(axis=tuple(a for a in range(weight.ndim) if a != axis))
    else:
        absmax = np.array([np.abs(weight).max()])
    scale = (absmax / levels).astype(np.float32)
    scale[scale == 0] = 1.0
    broadcast = [1] * weight.ndim
    broadcast[axis] = -1
    codes = np.clip(np.rint(weight / scale.reshape(broadcast if per_channel else [1] * weight.ndim)),
                    -levels, levels).astype(np.int8)
    return codes, scale


# Weight formats: (code levels, stored as uint8 with zero point 128?)
WEIGHT_FORMATS = {"s8": (127, False), "s8-reduced": (63, False), "u8": (127, True)}


def weight_format(requested: str, target: Target) -> str:
    """`auto`: int8 weights where the target's U8S8 kernel is exact (VNNI, non-x86); 7-bit weights
    where its int16 pair sums would saturate (AVX2 without VNNI): the fast U8S8 kernel stays, its
    sums fit (255·63·2 < 2¹⁵). On MiniLM: sentence cosine 0.9937 (s8), 0.9926 (s8-reduced), 0.9937
    (u8, the U8U8 kernel: same levels, but 1.5x slower than U8S8 on a VNNI machine)."""
    if requested != "auto":
        return requested
    return "s8-reduced" if target.int8_saturates else "s8"


@register_pass
@dataclass(frozen=True, kw_only=True)
class QuantizeDynamic(Pass):
    """MatMul/Gemm(x, W) → MatMulInteger(DynamicQuantizeLinear(x), W_int8) · scales (W8A8, dynamic)."""

    name: ClassVar[str] = "quantize-dynamic"
    exact: ClassVar[bool] = False
    min_opset: ClassVar[int | None] = 11  # DynamicQuantizeLinear (found on an opset-9 model, benchmarks/real_models.py)
    reads_target: ClassVar[bool] = True  # the int8 weight format (weights=auto)
    per_channel: bool = True
    embeddings: bool = True  # 4x smaller tables at no cost in speed or fidelity (MiniLM: 59.6 → 23.5 MB)
    exclude: tuple[str, ...] = ()
    weights: Literal["auto", "s8", "s8-reduced", "u8"] = "auto"

    def layer_sizes(self, model: ir.Model) -> dict[str, int]:
        """The layers this pass rewrites, by the name `exclude` matches, and their weights' sizes."""
        return {lin.name: lin.in_features * lin.out_features for lin in quantizable_linears(model, ())[0]}

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        target = ctx.target or detect()
        fmt = weight_format(self.weights, target)
        levels, unsigned = WEIGHT_FORMATS[fmt]
        linears, skipped = quantizable_linears(model, self.exclude)
        linears = [lin for lin in linears if input_dtype(lin) == ir.DataType.FLOAT]
        tables = embedding_tables(model, self.exclude) if self.embeddings else []
        if not linears and not tables:
            return nothing_to_quantize(self.name, skipped, "linears quantized")
        quantized_inputs: dict[ir.Value, ir.Node] = {}
        stored = SharedWeights()
        for linear in linears:
            x = linear.node.inputs[0]
            nodes = []
            if x not in quantized_inputs:
                quantized_inputs[x] = ir.node("DynamicQuantizeLinear", [x], num_outputs=3,
                                              name=f"{linear.node.name or linear.name}_quantize_input")
                nodes.append(quantized_inputs[x])
            x_q, x_scale, x_zp = quantized_inputs[x].outputs
            w_q, w_zp, w_scale = stored.get(linear, lambda: _int8_weight(model, linear, self.per_channel, levels,
                                                                           unsigned))
            prefix = linear.node.name or linear.name
            matmul = ir.node("MatMulInteger", [x_q, w_q, x_zp, w_zp], name=f"{prefix}_MatMulInteger")
            cast = ir.node("Cast", [matmul.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=f"{prefix}_cast")
            scales = ir.node("Mul", [x_scale, w_scale], name=f"{prefix}_scales")
            output = ir.node("Mul", [cast.outputs[0], scales.outputs[0]], name=f"{prefix}_rescale")
            nodes += [matmul, cast, scales, output]
            bias = bias_value(linear)
            if bias is not None:
                nodes.append(ir.node("Add", [output.outputs[0], bias], name=f"{prefix}_bias"))
            replace_linear(model, linear, nodes, nodes[-1].outputs[0])
        per = "per channel" if self.per_channel else "per tensor"
        stats = {"linears quantized": len(linears), "weights": f"{fmt} {per}"}
        for table in tables:
            _quantize_table_uint8(model, table)
        if self.embeddings:
            stats["embeddings quantized"] = len(tables)
        if skipped:
            stats["skipped"] = len(skipped)
        return PassResult(True, stats)
