"""AWQ's input scales, applied to the float model before quantization, and folded where exact.

Linears that read the same input (q, k and v; gate and up) share one scale `s` (AutoAWQ does the
same), searched on their weights side by side. The float model is then rewritten exactly:

    x → Mul(x, 1/s) → linear with weight diag(s)·W

and the `Mul` is folded into what produced `x` where that is exact:

- a LayerNormalization whose output only this Mul reads (also through a Reshape that keeps the
  last axis): `γ/s`, `β/s`;
- a constant `Mul` (the weight of a decomposed RMSNorm) whose output only this Mul reads;
- a linear whose output only this Mul reads, directly or as one factor of a product (the `up`
  of a gated FFN feeding `down`): its output columns and bias `/s`.

Norm folds are onnxscript rewrite rules; linear folds edit the weights in place (the linear is
quantized next, so its node must stay the same). A Mul that cannot be folded (the norm's output
also feeds a residual, as in post-LN BERT) stays, one per shared input.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import pattern

from slimgraph.ir import edit
from slimgraph.ir.graph import constant_tensor
from slimgraph.ir.parts import Linear
from slimgraph.ir.structure import find_linear
from slimgraph.passes.quantize.algorithms import awq_scale


@dataclass(frozen=True)
class ScaleSummary:
    """How many input scales were applied, and how many of them folded into the op before."""

    groups: int = 0
    folded: int = 0

    def __add__(self, other: ScaleSummary) -> ScaleSummary:
        return ScaleSummary(self.groups + other.groups, self.folded + other.folded)

    def __str__(self) -> str:
        return f"{self.groups} ({self.folded} folded into a norm or linear, {self.groups - self.folded} as Mul)"


def apply_input_scales(model: ir.Model, linears: Sequence[Linear], activations: dict[str, np.ndarray], bits: int,
                       group_size: int, symmetric: bool, known: dict[str, np.ndarray] | None = None
                       ) -> tuple[dict[str, np.ndarray], ScaleSummary]:
    """Search, apply and fold the AWQ scales. Returns each linear's scale `s` (its input is now x/s)
    and how many were folded, how many stay as a Mul. `known`: the scales (linear name → s) found
    before, applied without searching (a block-wise run resumed)."""
    by_input: dict[ir.Value, list[Linear]] = collections.defaultdict(list)
    for linear in linears:
        by_input[linear.node.inputs[0]].append(linear)
    scales: dict[str, np.ndarray] = {}
    muls: set[ir.Node] = set()
    for x, group in by_input.items():
        weights = [edit.weight_matrix(lin) for lin in group]
        s = known[group[0].name] if known is not None else \
            awq_scale(np.concatenate(weights, axis=1), activations[group[0].name], bits, group_size, symmetric)
        for linear, w in zip(group, weights):
            edit.set_weight_matrix(model, linear, (w * s[:, None]).astype(np.float32))
            scales[linear.name] = s
        muls.add(_divide_input(model, x, group, s))
    return scales, ScaleSummary(len(by_input), fold_scales(model, muls))


def _divide_input(model: ir.Model, x: ir.Value, group: list[Linear], s: np.ndarray) -> ir.Node:
    """Make the group's linears read Mul(x, 1/s); returns the Mul."""
    first = group[0]
    dtype = x.dtype.numpy() if x.dtype is not None else np.float32
    build = edit.Builder(model, first.weight or first.name, metadata=first.node.metadata_props, floats=dtype)
    scaled = build.op("Mul", [x, build.constant("awq_inv_scale", (1.0 / s).astype(dtype))],
                      name=f"{first.node.name or first.name}_awq_scale")
    scaled.type, scaled.shape = x.type, x.shape
    edit.insert_before(model, first.node, build.take())
    edit.redirect([(linear.node, 0) for linear in group], scaled)
    return scaled.producer()


# --- folding ------------------------------------------------------------------------------


def fold_scales(model: ir.Model, muls: set[ir.Node]) -> int:
    """Fold the scale Muls `muls` into their producers where exact; returns how many were folded."""
    folded = sum(_fold_into_linear(model, node) for node in list(model.graph) if node in muls)
    rules = [cls.rule(muls) for cls in (_NormScale, _ReshapedNormScale, _ConstantMulScale)]
    folded += pattern.RewriteRuleSet(rules, commute=True).apply_to_model(model)
    # the rules write the folded weights as Constant nodes: make them initializers like the others
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    edit.remove_dead(model)
    return folded


class _ScaleRule(pattern.RewriteRuleClassBase):
    """A rule that only folds the given scale Muls (never another Mul of the model)."""

    def __init__(self, muls: set[ir.Node]) -> None:
        super().__init__()
        self.muls = muls

    def is_scale(self, value: ir.Value) -> bool:
        return value.producer() in self.muls


def _fold_into_linear(model: ir.Model, mul: ir.Node) -> bool:
    """x = linear(y) or x = a · linear(y), read only by this Mul: scale the linear's columns instead."""
    x, inverse = mul.inputs
    producer = x.producer()
    if producer is None or len(x.uses()) != 1:
        return False
    target = x
    if producer.op_type == "Mul" and constant_tensor(producer.inputs[1]) is None:
        # a gated product: fold into whichever factor is a linear output read only here
        target = next((v for v in producer.inputs if _linear_output_of(v) is not None and len(v.uses()) == 1), None)
        if target is None:
            return False
    linear = _linear_output_of(target)
    if linear is None or len(linear.node.outputs[0].uses()) != 1:
        return False
    c = constant_tensor(inverse).numpy().astype(np.float32)
    w = edit.weight_matrix(linear)
    if w.shape[1] != c.shape[-1]:
        return False
    edit.set_weight_matrix(model, linear, w * c)
    bias = edit.bias_value(linear)
    if bias is not None:
        if len(bias.uses()) != 1:
            return False
        edit.replace_constant(bias, (edit.constant_array(bias) * c).astype(edit.constant_array(bias).dtype))
    edit.bypass(model, x, mul.outputs[0])  # the Mul goes: its readers read x
    return True


def _linear_output_of(value: ir.Value | None) -> Linear | None:
    """The linear (MatMul/Gemm + bias) whose output `value` is."""
    node = value.producer() if value is not None else None
    if node is None:
        return None
    if node.op_type == "Add":  # the bias Add after a MatMul
        for operand in node.inputs:
            inner = operand.producer() if operand is not None else None
            if inner is not None and (linear := find_linear(inner)) is not None and linear.output is value:
                return linear
        return None
    linear = find_linear(node)
    return linear if linear is not None and linear.output is value else None


class _NormScale(_ScaleRule):
    """Mul(LayerNormalization(x, γ, β), c) → LayerNormalization(x, γ·c, β·c), for an AWQ Mul."""

    def pattern(self, op, x, gamma, beta, c):
        return op.Mul(op.LayerNormalization(x, gamma, beta, _allow_other_attributes=True, _outputs=["normed"]), c,
                      _outputs=["scaled"])

    def check(self, context, x, gamma, beta, c, normed, scaled, **_):
        result = pattern.MatchResult()
        if not self.is_scale(scaled):
            return result.fail("not an AWQ scale")
        if constant_tensor(gamma) is None or constant_tensor(beta) is None or constant_tensor(c) is None:
            return result.fail("norm parameters are not constant")
        if normed.producer().attributes.get_int("axis", -1) != -1:
            return result.fail("the norm is not over the last axis")
        return result

    def rewrite(self, op, x, gamma, beta, c, normed, **_):
        scale = constant_tensor(c).numpy()
        g, b = constant_tensor(gamma).numpy(), constant_tensor(beta).numpy()
        return op.LayerNormalization(x, op.Constant(value=ir.tensor((g * scale).astype(g.dtype), name=f"{gamma.name}.awq")),
                                     op.Constant(value=ir.tensor((b * scale).astype(b.dtype), name=f"{beta.name}.awq")),
                                     **normed.producer().attributes)


class _ReshapedNormScale(_NormScale):
    """Mul(Reshape(LayerNormalization(x, γ, β)), c) → Reshape(LayerNormalization(x, γ·c, β·c)), when the
    reshape keeps the last axis (GPT-2 flattens tokens before its Gemm)."""

    def pattern(self, op, x, gamma, beta, c, shape):
        normed = op.LayerNormalization(x, gamma, beta, _allow_other_attributes=True, _outputs=["normed"])
        return op.Mul(op.Reshape(normed, shape, _allow_other_attributes=True, _outputs=["reshaped"]), c,
                      _outputs=["scaled"])

    def check(self, context, x, gamma, beta, c, normed, scaled, reshaped, **_):
        result = super().check(context, x, gamma, beta, c, normed, scaled)
        width = constant_tensor(gamma).shape[-1] if constant_tensor(gamma) is not None else None
        if result and (reshaped.shape is None or reshaped.shape[-1] != width):
            return result.fail("the reshape changes the last axis")
        return result

    def rewrite(self, op, x, gamma, beta, c, normed, shape, reshaped, **_):
        return op.Reshape(super().rewrite(op, x, gamma, beta, c, normed), shape, **reshaped.producer().attributes)


class _ConstantMulScale(_ScaleRule):
    """Mul(Mul(y, w), c) → Mul(y, w·c) for an AWQ Mul and a constant w (an RMSNorm's weight)."""

    def pattern(self, op, y, w, c):
        return op.Mul(op.Mul(y, w), c, _outputs=["scaled"])

    def check(self, context, y, w, c, scaled, **_):
        result = pattern.MatchResult()
        if not self.is_scale(scaled):
            return result.fail("not an AWQ scale")
        weight, scale = constant_tensor(w), constant_tensor(c)
        if weight is None or scale is None or constant_tensor(y) is not None:
            return result.fail("not a constant weight")
        if weight.shape[-1:] != scale.shape[-1:]:
            return result.fail("the weight is not per channel")
        return result

    def rewrite(self, op, y, w, c, **_):
        weight = constant_tensor(w).numpy()
        scaled = (weight * constant_tensor(c).numpy()).astype(weight.dtype)
        return op.Mul(y, op.Constant(value=ir.tensor(scaled, name=f"{w.name}.awq")))
