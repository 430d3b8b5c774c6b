"""mixed-precision: choose bits per linear layer under a size budget, then quantize each
(MatMul/Gemm → MatMulNBits at the chosen bits; 32 in `candidates` means keep float).

Sensitivity (EdgeMoE-style), on the calibration inputs:
- measure=output (default): the model's own output error, 1 − cosine against the original,
  with only that layer's weight replaced by its dequantized form, for every layer and width;
- measure=layer (fast): the layer's relative output error ||X(W − Q_b(W))||² / ||XW||².
Layer errors do not add up end to end (a layer at 2 bits can cost more than its share),
which is why the default measures the model. Choice: start every layer at its widest
candidate; while the model is over budget, make the narrowing that costs the least added
error per byte saved (a greedy solution of the multiple-choice knapsack).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir.edit import replace_linear, weight_matrix
from slimgraph.ir.nbits import quantize_rtn
from slimgraph.measure import evaluate
from slimgraph.measure.fidelity import compare
from slimgraph.measure.stats import human_bytes
from slimgraph.passes._infra.base import Pass, PassContext, PassResult
from slimgraph.passes._infra.options import option
from slimgraph.passes._infra.registry import register_pass
from slimgraph.passes.activations import linear_inputs
from slimgraph.passes.quantize.algorithms import gram, output_error
from slimgraph.passes.quantize.rewrite import (
    input_dtype,
    matmul_nbits,
    nothing_to_quantize,
    quantizable_linears,
)
from slimgraph.passes.quantize.weights import GroupSize

FLOAT = 32


@dataclass(frozen=True)
class Choice:
    bits: int
    nbytes: int
    error: float


def choose_bits(options: dict[str, list[Choice]], fixed_bytes: int, budget: int) -> dict[str, Choice]:
    """Greedy: narrow the layer with the least error added per byte saved until within budget."""
    chosen = {name: max(choices, key=lambda c: c.bits) for name, choices in options.items()}
    total = fixed_bytes + sum(c.nbytes for c in chosen.values())
    while total > budget:
        best = None
        for name, current in chosen.items():
            for candidate in options[name]:
                saved = current.nbytes - candidate.nbytes
                if saved > 0:
                    cost = max(candidate.error - current.error, 0.0) / saved
                    if best is None or cost < best[0]:
                        best = (cost, name, candidate)
        if best is None:
            break
        _, name, candidate = best
        total -= chosen[name].nbytes - candidate.nbytes
        chosen[name] = candidate
    return chosen


def _model_error(model: ir.Model, linear, dequantized: np.ndarray, reference: list, inputs: list) -> float:
    """1 − cosine of the model's outputs with this linear's weight swapped for `dequantized`."""
    value = linear.node.inputs[1]
    original = value.const_value
    if not value.is_initializer() or len(value.uses()) != 1:  # a tied weight: swapping it would touch others
        raise SlimgraphError(f"mixed-precision: {linear.name} shares its weight; use measure=layer")
    weight = dequantized.T if linear.node.op_type == "Gemm" and linear.node.attributes.get_int("transB", 0) else dequantized
    value.const_value = ir.tensor(np.ascontiguousarray(weight).astype(original.dtype.numpy()), name=value.name)
    try:
        outputs = evaluate.run_all(model, inputs)
    finally:
        value.const_value = original
    return compare(reference, outputs).drop


def _packed_nbytes(k: int, n: int, bits: int, block_size: int) -> int:
    """`BlockQuantized.nbytes()` of a [K, N] weight, without quantizing it (32: float)."""
    if bits == FLOAT:
        return k * n * 4
    blocks = -(-k // block_size)
    per_byte = 8 // bits
    zero_points = n * (-(-blocks // per_byte) * per_byte) * bits // 8
    return n * blocks * block_size * bits // 8 + n * blocks * 4 + zero_points


@dataclass(frozen=True)
class _Measuring:
    """What every layer's measurement shares: the pass's settings, and for measure=output the
    inputs and the model's outputs on them."""

    settings: MixedPrecision
    reference_outputs: list[dict[str, np.ndarray]]
    inputs: list[dict[str, np.ndarray]]


def _measure_layer(model: ir.Model, shared: _Measuring, item: tuple[str, np.ndarray | None]) -> list[Choice]:
    """One layer's choices: its bytes and error at each candidate width; `item` is the layer's
    name and, for measure=layer, the Gram matrix of its inputs."""
    name, h = item
    settings = shared.settings
    linear = next(lin for lin in quantizable_linears(model, settings.exclude)[0] if lin.name == name)
    weight = weight_matrix(linear)
    choices = []
    for bits in settings.candidates:
        if bits == FLOAT:
            choices.append(Choice(FLOAT, weight.nbytes, 0.0))
            continue
        q = quantize_rtn(weight, bits, settings.group_size, symmetric=False)
        if h is not None:
            error = output_error(h, q.dequantize() - weight) / max(output_error(h, weight), 1e-30)
        else:
            error = _model_error(model, linear, q.dequantize(), shared.reference_outputs, shared.inputs)
        choices.append(Choice(bits, q.nbytes(), error))
    return choices


@register_pass
@dataclass(frozen=True, kw_only=True)
class MixedPrecision(Pass):
    """MatMul/Gemm → MatMulNBits with bits chosen per layer to minimise error under a size budget."""

    name: ClassVar[str] = "mixed-precision"
    exact: ClassVar[bool] = False
    budget_mb: float = option(low=0, low_open=True)
    candidates: tuple[Literal[2, 4, 8, 32], ...] = (8, 4, 2)  # bits; 32: keep float
    group_size: GroupSize = 32
    measure: Literal["output", "layer"] = "output"
    exclude: tuple[str, ...] = ()
    accuracy_level: Literal[0, 4] = 4  # 4: onnxruntime's fast int8 kernels (level 0 is slow for 8 and 2 bits)

    def __post_init__(self) -> None:
        if not self.candidates:
            raise SlimgraphError(f"{self.name}: candidates must name at least one of 2, 4, 8 and 32 (keep float)")

    def check(self, model: ir.Model) -> None:
        """Refuse a budget below the smallest size the candidates can reach, before measuring."""
        super().check(model)
        linears, _ = quantizable_linears(model, self.exclude)
        if not linears:
            return
        graph = model.graph
        unused = sum(v.const_value.nbytes for v in graph.initializers.values()  # an earlier cleanup may drop them
                     if v.const_value is not None and not v.uses() and not v.is_graph_output())
        linear_bytes = sum(lin.in_features * lin.out_features * 4 for lin in linears)
        smallest = evaluate.initializer_bytes(model) - unused - linear_bytes + sum(
            min(_packed_nbytes(lin.in_features, lin.out_features, b, self.group_size) for b in self.candidates)
            for lin in linears)
        if smallest > self.budget_mb * 1e6:
            raise SlimgraphError(
                f"{self.name}: budget_mb={self.budget_mb} is below the smallest reachable size "
                f"{smallest / 1e6:.1f} MB (layers at {min(self.candidates)} bits)"
            )

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        linears, skipped = quantizable_linears(model, self.exclude)
        if not linears:
            return nothing_to_quantize(self.name, skipped, "linears quantized")
        activations = linear_inputs(model, linears, ctx) if self.measure == "layer" else {}
        shared = _Measuring(self, evaluate.run_all(model, ctx.inputs) if self.measure == "output" else [],
                            list(ctx.inputs) if self.measure == "output" else [])
        # each layer measured on its own (the model as it was, but for that layer): work for --workers
        items = [(linear.name, gram(activations.pop(linear.name)) if self.measure == "layer" else None)
                 for linear in linears]
        measured = ctx.workers.map(_measure_layer, model, shared, ctx.track(items, f"sensitivity ({self.measure})"))
        options = dict(zip((linear.name for linear in linears), measured))
        linear_bytes = sum(lin.in_features * lin.out_features * 4 for lin in linears)
        other_bytes = evaluate.initializer_bytes(model) - linear_bytes
        budget = int(self.budget_mb * 1e6)
        chosen = choose_bits(options, other_bytes, budget)
        total = other_bytes + sum(c.nbytes for c in chosen.values())
        if total > budget:
            smallest = other_bytes + sum(min(c.nbytes for c in choices) for choices in options.values())
            raise SlimgraphError(
                f"{self.name}: budget_mb={self.budget_mb} is below the smallest reachable size "
                f"{smallest / 1e6:.1f} MB (layers at {min(self.candidates)} bits)"
            )
        for linear in linears:
            bits = chosen[linear.name].bits
            if bits == FLOAT:
                continue
            q = quantize_rtn(weight_matrix(linear), bits, self.group_size, symmetric=False)
            node = matmul_nbits(model, linear, q, dtype=input_dtype(linear), accuracy_level=self.accuracy_level)
            replace_linear(model, linear, [node], node.outputs[0])
        histogram = {b: sum(c.bits == b for c in chosen.values()) for b in sorted(self.candidates, reverse=True)}
        return PassResult(True, {
            "bits chosen": ", ".join(f"{'float' if b == FLOAT else f'int{b}'}: {n}" for b, n in histogram.items() if n),
            "size": f"{human_bytes(total)} (budget {human_bytes(budget)})",
            f"summed {'output drop' if self.measure == 'output' else 'relative layer error'}":
                f"{sum(c.error for c in chosen.values()):.4f}",
        })
