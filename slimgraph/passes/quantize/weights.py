"""quantize-weights: MatMul/Gemm(x, W) [+ bias] → com.microsoft.MatMulNBits(x, q, scales, zp, bias);
with embeddings=true, Gather(table, ids) → com.microsoft.GatherBlockQuantized.

Weights are quantized in blocks of `group_size` input channels per output column, to 8, 4
or 2 bits: rtn (round to nearest; bit-identical to onnxruntime's MatMulNBitsQuantizer),
awq (activation-aware channel scales + clip search; the layer reads x / s through a Mul)
or gptq (error feedback through the inverse Hessian). awq and gptq use the pipeline's
calibration inputs (--calib), or synthesized ones, as the report says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir.stats import human_bytes
from slimgraph.ir.structure import Embedding, find_embeddings
from slimgraph.passes._infra.base import Pass, PassContext, PassResult
from slimgraph.passes._infra.registry import register_pass
from slimgraph.passes.quantize import algorithms
from slimgraph.passes.quantize.calibration import linear_inputs
from slimgraph.passes.quantize.packing import SUPPORTED_BITS, BlockQuantized, pack, quantize_rtn
from slimgraph.passes.quantize.rewrite import (
    MS_DOMAIN,
    add_initializer,
    excluded,
    input_dtype,
    matmul_nbits,
    quantizable_linears,
    replace_linear,
    swap_output,
    weight_matrix,
)

GROUP_SIZES = (16, 32, 64, 128, 256)


def validate_bits_and_group(pass_name: str, bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise SlimgraphError(f"{pass_name}: bits must be 2, 4 or 8 (MatMulNBits), got {bits}")
    if group_size not in GROUP_SIZES:
        raise SlimgraphError(
            f"{pass_name}: group_size must be a power of two from 16 to 256 "
            f"({', '.join(map(str, GROUP_SIZES))}), got {group_size}"
        )


@register_pass
@dataclass(frozen=True, kw_only=True)
class QuantizeWeights(Pass):
    """MatMul/Gemm(x, W) → com.microsoft.MatMulNBits (weights block-quantized to 8, 4 or 2 bits)."""

    name: ClassVar[str] = "quantize-weights"
    exact: ClassVar[bool] = False
    bits: Literal[2, 4, 8] = 4
    group_size: int = 32
    symmetric: bool = False
    method: Literal["rtn", "awq", "gptq"] = "rtn"
    exclude: tuple[str, ...] = ()
    embeddings: bool = False
    accuracy_level: Literal[0, 4] = 0

    def __post_init__(self) -> None:
        validate_bits_and_group(self.name, self.bits, self.group_size)
        if self.method not in ("rtn", "awq", "gptq"):
            raise SlimgraphError(f"{self.name}: method must be rtn, awq or gptq, got {self.method!r}")
        if self.accuracy_level not in (0, 4):
            raise SlimgraphError(f"{self.name}: accuracy_level must be 0 or 4, got {self.accuracy_level}")
        if self.embeddings and self.bits == 2:
            raise SlimgraphError(f"{self.name}: embeddings can be quantized to 4 or 8 bits, not 2")

    def quantize(self, weight: np.ndarray, x: np.ndarray | None) -> tuple[BlockQuantized, np.ndarray | None]:
        """The quantized weight, and the input scale s the layer must divide by (awq) or None."""
        if self.method == "rtn":
            return quantize_rtn(weight, self.bits, self.group_size, self.symmetric), None
        if self.method == "awq":
            return algorithms.quantize_awq(weight, x, self.bits, self.group_size, self.symmetric)
        return algorithms.quantize_gptq(weight, x, self.bits, self.group_size, self.symmetric), None

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        linears, skipped = quantizable_linears(model, self.exclude)
        tables = [e for e in find_embeddings(model) if not _excluded_embedding(e, self.exclude)] if self.embeddings else []
        if not linears and not tables:
            reason = "; ".join(skipped) or "no MatMul/Gemm with a constant 2-D weight"
            return PassResult(False, {"linears quantized": 0}, warnings=[f"{self.name}: nothing to quantize ({reason})"])
        before = _initializer_bytes(model)
        activations = linear_inputs(model, linears, ctx) if self.method != "rtn" else {}
        for linear in linears:
            q, input_scale = self.quantize(weight_matrix(linear), activations.get(linear.name))
            dtype = input_dtype(linear)
            nodes, x = [], linear.node.inputs[0]
            if input_scale is not None:
                inverse = add_initializer(model, f"{linear.weight or linear.name}.awq_inv_scale",
                                          (1.0 / input_scale).astype(dtype.numpy()))
                mul = ir.node("Mul", [x, inverse], name=f"{linear.node.name or linear.name}_awq_scale")
                mul.outputs[0].type, mul.outputs[0].shape = x.type, x.shape
                nodes.append(mul)
                x = mul.outputs[0]
            node = matmul_nbits(model, linear, q, accuracy_level=self.accuracy_level, symmetric=self.symmetric,
                                input_value=x, dtype=dtype)
            nodes.append(node)
            replace_linear(model, linear, nodes, node.outputs[0])
        quantized_tables = [self._quantize_embedding(model, table) for table in tables]
        stats = {
            "linears quantized": len(linears),
            "method": f"{self.method} int{self.bits} g{self.group_size}" + (" sym" if self.symmetric else ""),
            "weights": f"{human_bytes(before)} → {human_bytes(_initializer_bytes(model))}",
        }
        if self.embeddings:
            stats["embeddings quantized"] = sum(quantized_tables)
        if self.method != "rtn":
            stats["calibration"] = ctx.inputs_source
        if skipped:
            stats["skipped"] = len(skipped)
        return PassResult(True, stats)

    def _quantize_embedding(self, model: ir.Model, table: Embedding) -> bool:
        """Gather(table, ids) → GatherBlockQuantized, blocks along the embedding dimension."""
        node = table.node
        if table.dim % self.group_size:
            return False
        weights = node.inputs[0].const_value.numpy().astype(np.float32)
        q = quantize_rtn(np.ascontiguousarray(weights.T), self.bits, self.group_size, self.symmetric)
        codes = q.codes[:, : table.dim]  # [rows, dim]
        base = table.table
        if self.bits == 4:
            data_type = ir.DataType.INT4 if self.symmetric else ir.DataType.UINT4
            # int4 codes are stored as value - 8 for the symmetric (signed) layout
            stored = (codes.astype(np.int16) - 8).astype(np.int8) if self.symmetric else codes
            data = ir.PackedTensor(pack(stored.astype(np.uint8), 4).reshape(-1), dtype=data_type,
                                   shape=ir.Shape(codes.shape))
        else:
            data = ir.tensor(codes)
        data_value = add_initializer(model, f"{base}.q{self.bits}", data)
        scales = add_initializer(model, f"{base}.scales", q.scales)
        inputs = [data_value, node.inputs[1], scales]
        if not self.symmetric:
            zp = q.zero_points
            zp_tensor = (ir.PackedTensor(pack(_even(zp), 4).reshape(-1), dtype=ir.DataType.UINT4, shape=ir.Shape(zp.shape))
                         if self.bits == 4 else ir.tensor(zp))
            inputs.append(add_initializer(model, f"{base}.zero_points", zp_tensor))
        attributes = {"gather_axis": 0, "quantize_axis": 1, "block_size": self.group_size}
        if self.bits != 4:
            attributes["bits"] = self.bits
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        new = ir.node("GatherBlockQuantized", inputs, attributes=attributes, domain=MS_DOMAIN,
                      name=f"{node.name or base}_Q{self.bits}")
        new.metadata_props.update(node.metadata_props)
        model.graph.insert_before(node, new)
        swap_output(model, [node], node.outputs[0], new.outputs[0])
        return True


def _even(values: np.ndarray) -> np.ndarray:
    """Pad the last axis to an even length for 4-bit packing (the pad is never read)."""
    if values.shape[-1] % 2 == 0:
        return values
    return np.concatenate([values, np.zeros((*values.shape[:-1], 1), values.dtype)], axis=-1)


def _excluded_embedding(table: Embedding, patterns: tuple[str, ...]) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in (table.name, table.table))


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
