"""quantize-static: int8 QDQ around the ops ONNX Runtime's CPU provider runs in int8, with
activation ranges from calibration.

    Conv(x, W, b) → Conv(DQ(Q(x)), DQ(W_int8), DQ(b_int32)) → Q → DQ → its readers

- Activations are uint8 (asymmetric, one scale per tensor, from `ranges`); each quantized tensor
  gets one QuantizeLinear → DequantizeLinear pair right after its producer, and every reader
  but an excluded node reads the dequantized value (so the producer can fuse with its Q). A
  graph output stays float.
- Weights of Conv, ConvTranspose, Gemm and MatMul (constant) are int8, symmetric, per output
  channel; in the target's form (`dynamic.weight_format`: 7-bit where AVX2's U8S8 kernel would
  saturate). A weight several nodes read is quantized once. Biases are int32 at scale
  x_scale · w_scale, which is what lets ONNX Runtime fuse the group into QLinearConv / QGemm.
- Ops that only move data (MaxPool, Resize, Reshape, Transpose, …) reuse their input's scale for
  their output, so ONNX Runtime runs them on the uint8 codes.
- A Relu (or Clip from 0) after a quantized op is removed: its output range, which starts at 0,
  is given to its input, and the uint8 saturation at 0 does what the Relu did — exactly.

At session load ONNX Runtime fuses each DQ → op → Q group into its int8 kernel (QLinearConv,
QLinearMatMul, QGemm, QLinearAdd, QLinearConcat, …); a group it cannot fuse runs in float on the
dequantized values, which is what the PyTorch backend always does (fake quantization, float).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir.edit import (
    add_initializer,
    constant_array,
    constant_shape,
    remove_unused_initializers,
    unique_name,
)
from slimgraph.ir.graph import constant_tensor, ensure_shapes, filled_constant, is_default_domain, module_path
from slimgraph.measure import evaluate
from slimgraph.measure.target import detect
from slimgraph.passes._infra.base import Pass, PassContext, PassResult
from slimgraph.passes._infra.options import option
from slimgraph.passes._infra.registry import register_pass
from slimgraph.passes.quantize.dynamic import WEIGHT_FORMATS, quantize_int8_symmetric, stored_codes, weight_format
from slimgraph.passes.quantize.ranges import activation_ranges, uint8_params
from slimgraph.passes.quantize.rewrite import why_skipped

FOLDS_NORM = ("Conv", "ConvTranspose", "Gemm")  # the ops a BatchNormalization after them folds into


@dataclass(frozen=True)
class OpRule:
    """How an op is quantized: which inputs are activations (None: every data input), which is a
    constant weight (quantized per channel) and bias (int32), and where its output's scale comes
    from: its own range ("own"), its input's ("input": data movement), or nowhere (not quantized)."""

    activations: tuple[int, ...] | None = (0,)
    weight: int | None = None
    bias: int | None = None
    output: Literal["own", "input"] = "own"


RULES: dict[str, OpRule] = {
    "Conv": OpRule(weight=1, bias=2),
    "ConvTranspose": OpRule(weight=1, bias=2),
    "Gemm": OpRule(weight=1, bias=2),
    "MatMul": OpRule(activations=None, weight=1),  # input 1: a weight when constant, else an activation
    "Add": OpRule(activations=None),
    "Mul": OpRule(activations=None),
    "Concat": OpRule(activations=None),
    "Sigmoid": OpRule(),
    "LeakyRelu": OpRule(),
    "Softmax": OpRule(),
    "AveragePool": OpRule(),
    "GlobalAveragePool": OpRule(),
    "MaxPool": OpRule(output="input"),
    "Resize": OpRule(output="input"),
    "Reshape": OpRule(output="input"),
    "Transpose": OpRule(output="input"),
    "Flatten": OpRule(output="input"),
    "Squeeze": OpRule(output="input"),
    "Unsqueeze": OpRule(output="input"),
    "Split": OpRule(output="input"),  # every output, at its input's scale
}
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# A tensor whose calibrated range reaches this far holds fill values (an attention mask's
# finfo.min): 256 levels over it would round every real value to the zero point. It stays float.
WIDEST_RANGE = 1e6
RECTIFIERS = ("Relu", "Clip")


@dataclass
class Plan:
    """What the pass will rewrite: the nodes, the activation tensors (in graph order), the
    rectifiers folded into their input's range (Relu output → its input), and why nodes were left."""

    nodes: list[ir.Node]
    tensors: list[ir.Value]
    rectifiers: dict[ir.Value, ir.Node]
    excluded: set[ir.Node]
    skipped: list[str]


@register_pass
@dataclass(frozen=True, kw_only=True)
class QuantizeStatic(Pass):
    """Conv/MatMul/Gemm/Add/… → int8 QDQ (QuantizeLinear/DequantizeLinear), activation ranges from calibration."""

    name: ClassVar[str] = "quantize-static"
    exact: ClassVar[bool] = False
    min_opset: ClassVar[int | None] = 13  # QuantizeLinear/DequantizeLinear with a per-channel axis
    reads_target: ClassVar[bool] = True  # the int8 weight format (weights=auto)
    method: Literal["minmax", "percentile", "mse", "entropy"] = "minmax"
    percentile: float = option(99.999, low=90, high=100, high_open=True)
    per_channel: bool = True
    weights: Literal["auto", "s8", "s8-reduced", "u8"] = "auto"
    ops: tuple[str, ...] = ()  # the op types to quantize; empty: every op in RULES
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [op for op in self.ops if op not in RULES]
        if unknown:
            raise SlimgraphError(f"{self.name}: ops={unknown[0]} is not an op it quantizes "
                                 f"(known: {', '.join(RULES)})")

    def check(self, model: ir.Model) -> None:
        names = [name for node in model.graph if node.op_type in RULES for name in _names(node)]
        unmatched = [p for p in self.exclude if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            example = f"'{names[0]}'" if names else "none in this model"
            raise SlimgraphError(f"{self.name}: exclude={unmatched[0]} matches no node it would quantize "
                                 f"(globs match node names, module paths and output names, e.g. {example})")

    def layer_sizes(self, model: ir.Model) -> dict[str, int]:
        """The nodes this pass rewrites, by node name (what `exclude` matches), in graph order, and their
        constant weights' sizes (0 for an Add, a Concat, a Conv of two activations…)."""
        model = model.clone()  # (shapes added to a copy: the plan reads value types)
        ensure_shapes(model)
        return {node.name: tensor.size if node.op_type in COMPUTE_OPS and len(node.inputs) > 1 and
                (tensor := constant_tensor(node.inputs[1])) is not None else 0
                for node in self._plan(model).nodes if node.name}

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        folded = fold_batch_norms(model)
        ensure_shapes(model)
        plan = self._plan(model)
        if not any(node.op_type in COMPUTE_OPS for node in plan.nodes):
            reason = why_skipped(plan.skipped, "no Conv, ConvTranspose, MatMul or Gemm with float inputs")
            stats = {"ops quantized": 0} | ({"BatchNormalization folded": folded} if folded else {})
            return PassResult(folded > 0, stats, warnings=[f"{self.name}: nothing to quantize ({reason})"])
        ranges = self._ranges(model, plan, ctx)
        wide = [v for v, (low, high) in ranges.items() if max(abs(low), abs(high)) > WIDEST_RANGE]
        for value in wide:
            del ranges[value]
        fmt = weight_format(self.weights, ctx.target or detect())
        levels, unsigned = WEIGHT_FORMATS[fmt]
        rewriter = _Rewriter(model, ranges, levels, unsigned, self.per_channel, plan)
        rewriter.rewrite()
        remove_unused_initializers(model)
        counts: dict[str, int] = {}
        for node in plan.nodes:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        stats = {
            "ops quantized": ", ".join(f"{op} {n}" for op, n in sorted(counts.items(), key=lambda kv: -kv[1])),
            "tensors quantized": len(rewriter.params),
            "weights": f"{fmt} {'per channel' if self.per_channel else 'per tensor'}",
            "ranges": f"{self.method} over {len(ctx.inputs)} samples",
        }
        if folded:
            stats["BatchNormalization folded"] = folded
        if plan.rectifiers:
            stats["Relu/Clip folded"] = len(plan.rectifiers)
        if wide:
            stats[f"left float (range beyond ±{WIDEST_RANGE:.0e})"] = ", ".join(v.name for v in wide[:3]) + \
                (f" and {len(wide) - 3} more" if len(wide) > 3 else "")
        warnings = []
        if ctx.inputs_source == "synthesized":
            warnings.append(f"{self.name}: activation ranges come from synthesized inputs; give real samples "
                            "with --calib (a .npz or a folder of images) for ranges the model will meet")
        return PassResult(True, stats, warnings=warnings)

    def _plan(self, model: ir.Model) -> Plan:
        ops = set(self.ops or RULES)
        nodes, excluded, skipped = [], set(), []
        for node in model.graph:
            if node.op_type not in ops or not is_default_domain(node):
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in self.exclude for name in _names(node)):
                excluded.add(node)
                skipped.append(f"{node.name}: excluded")
                continue
            reason = _unsupported(node)
            if reason:
                skipped.append(f"{node.name or node.op_type}: {reason}")
            else:
                nodes.append(node)
        chosen = set(nodes)
        rectifiers = {}
        for node in model.graph:
            if node.op_type in RECTIFIERS and _folds(node, chosen):
                rectifiers[node.outputs[0]] = node
        tensors: dict[ir.Value, None] = {}
        for node in nodes:
            for value in _activation_inputs(node):
                tensors.setdefault(value)
            for out in node.outputs if node.op_type == "Split" else node.outputs[:1]:
                if out.is_graph_output() or not out.uses():
                    continue
                relu = next((r for r in rectifiers.values() if r.inputs[0] is out), None)
                tensors.setdefault(relu.outputs[0] if relu is not None else out)
        order = {v: i for i, v in enumerate(_values_in_order(model))}
        return Plan(nodes, sorted(tensors, key=order.__getitem__), rectifiers, excluded, skipped)

    def _ranges(self, model: ir.Model, plan: Plan, ctx: PassContext) -> dict[ir.Value, tuple[float, float]]:
        """The calibrated range of every tensor whose scale is its own (not its input's)."""
        measured = [v for v in plan.tensors if not _shares_input_scale(v, set(plan.nodes))]
        names = [v.name for v in measured]
        if not ctx.inputs:
            raise SlimgraphError(f"{self.name}: no calibration inputs reach the model")

        def captures():
            return evaluate.capture(model, names, ctx.inputs)

        again = captures() if self.method != "minmax" else None
        found = activation_ranges(captures(), self.method, self.percentile, again)
        ranges = {}
        for value in measured:
            low, high = found.get(value.name, (0.0, 0.0))
            rectifier = plan.rectifiers.get(value)
            if rectifier is not None:  # the Q's saturation at the range's ends does the rectifier's work
                floor, ceiling = _rectifier_bounds(rectifier)
                low, high = max(low, floor), min(high, ceiling)
            ranges[value] = (low, high)
        return ranges


class _Rewriter:
    """The graph edits of a plan, in graph order (so the graph stays topologically sorted)."""

    def __init__(self, model: ir.Model, ranges: dict[ir.Value, tuple[float, float]], levels: int, unsigned: bool,
                 per_channel: bool, plan: Plan) -> None:
        self.model, self.ranges, self.levels, self.unsigned = model, ranges, levels, unsigned
        self.per_channel, self.plan, self.quantized = per_channel, plan, set(plan.nodes)
        self.params: dict[ir.Value, tuple[ir.Value, ir.Value]] = {}  # tensor → (scale, zero point) initializers
        self.sources: dict[ir.Value, ir.Value] = {}  # a DequantizeLinear output → the float tensor it stands for
        self.weights: dict[tuple[ir.Value, int], tuple[ir.Value, np.ndarray]] = {}  # (weight, axis) → (DQ, scales)
        self.biases: dict[tuple[ir.Value, ir.Value, ir.Value], ir.Value] = {}  # (bias, x scale, weight DQ) → DQ
        # node and value names in use (one set for both: harmless, and each name is looked up once,
        # where `edit.unique_name` scans the graph for every new name)
        self.taken = {node.name for node in model.graph if node.name} | set(model.graph.initializers) | {
            v.name for node in model.graph for v in node.outputs if v.name} | {v.name for v in model.graph.inputs}

    def _fresh(self, base: str) -> str:
        """`base`, or `base.2`, …: ONNX Runtime refuses two nodes of one name (a shared bias has several DQs)."""
        name = unique_name(lambda n: n in self.taken or n in self.model.graph.initializers, base)  # (added since)
        self.taken.add(name)
        return name

    def _dequantize(self, inputs: list[ir.Value], base: str, dtype: ir.DataType, shape: ir.Shape | None,
                    axis: int | None = None) -> ir.Node:
        """A DequantizeLinear node named after `base`, its output typed."""
        node = ir.node("DequantizeLinear", inputs, attributes={} if axis is None else {"axis": axis},
                       name=self._fresh(f"{base}_DequantizeLinear"))
        node.outputs[0].name = self._fresh(f"{base}_dequantized")
        node.outputs[0].type, node.outputs[0].shape = ir.TensorType(dtype), shape
        return node

    def rewrite(self) -> None:
        plan = self.plan
        tensors = [plan.rectifiers[v].inputs[0] if v in plan.rectifiers else v for v in plan.tensors]
        for output, rectifier in plan.rectifiers.items():
            source = rectifier.inputs[0]
            for user, index in list(output.uses()):
                user.replace_input_with(index, source)
            self.model.graph.remove(rectifier, safe=True)
            if output in self.ranges:
                self.ranges[source] = self.ranges.pop(output)
        for value in tensors:
            self._quantize_tensor(value)
        for node in plan.nodes:
            rule = RULES[node.op_type]
            weight = node.inputs[rule.weight] if rule.weight is not None and len(node.inputs) > rule.weight else None
            if _is_constant(weight):
                axis = _weight_axis(node)
                dq, scales = self._quantize_weight(node, weight, axis)
                node.replace_input_with(rule.weight, dq)
                if rule.bias is not None and len(node.inputs) > rule.bias and node.inputs[rule.bias] is not None:
                    self._quantize_bias(node, rule.bias, scales)

    def _quantize_tensor(self, value: ir.Value) -> None:
        producer = value.producer()
        source = self._float_source(producer.inputs[0]) if producer in self.quantized and \
            RULES[producer.op_type].output == "input" else None
        if source is not None:
            if source not in self.params:  # its input stays float: so does it
                return
            scale, zero_point = self.params[source]
        elif value not in self.ranges:
            return
        else:
            s, zp = uint8_params(*self.ranges[value])
            base = value.name or "tensor"
            scale = add_initializer(self.model, f"{base}.scale", np.array(s, np.float32))
            zero_point = add_initializer(self.model, f"{base}.zero_point", np.array(zp, np.uint8))
        self.params[value] = (scale, zero_point)
        readers = [(n, i) for n, i in value.uses() if n not in self.plan.excluded]
        # Shape reads no values: give it the uint8 tensor, so nothing is dequantized only to be measured
        shape_readers = [(n, i) for n, i in readers if n.op_type == "Shape"]
        readers = [r for r in readers if r not in shape_readers]
        q = ir.node("QuantizeLinear", [value, scale, zero_point], name=self._fresh(f"{value.name}_QuantizeLinear"))
        q.outputs[0].name = self._fresh(f"{value.name}_quantized")
        q.outputs[0].type, q.outputs[0].shape = ir.TensorType(ir.DataType.UINT8), value.shape
        dq = self._dequantize([q.outputs[0], scale, zero_point], value.name, ir.DataType.FLOAT, value.shape)
        if producer is not None:
            self.model.graph.insert_after(producer, [q, dq])
            q.metadata_props.update(producer.metadata_props)
            dq.metadata_props.update(producer.metadata_props)
        else:
            self.model.graph.insert_before(next(iter(self.model.graph)), [q, dq])
        for reader, index in readers:
            reader.replace_input_with(index, dq.outputs[0])
        for reader, index in shape_readers:
            reader.replace_input_with(index, q.outputs[0])
        self.sources[dq.outputs[0]] = value

    def _quantize_weight(self, node: ir.Node, weight: ir.Value, axis: int) -> tuple[ir.Value, np.ndarray]:
        key = (weight, axis)
        if key not in self.weights:
            array = np.asarray(constant_array(weight), dtype=np.float32)
            per_channel = self.per_channel and array.ndim > 1
            codes, scales = quantize_int8_symmetric(array, per_channel, self.levels, axis)
            base = weight.name or f"{node.name}_weight"
            stored, zero_points = stored_codes(codes, scales.shape, self.unsigned)
            if not per_channel:
                scales, zero_points = scales.reshape(()), zero_points.reshape(())
            inputs = [add_initializer(self.model, f"{base}.int8", stored),
                      add_initializer(self.model, f"{base}.scale", scales),
                      add_initializer(self.model, f"{base}.zero_point", zero_points)]
            dq = self._dequantize(inputs, base, ir.DataType.FLOAT, ir.Shape(array.shape),
                                  axis % array.ndim if per_channel else None)
            self.model.graph.insert_before(node, dq)
            self.weights[key] = (dq.outputs[0], scales)
        return self.weights[key]

    def _quantize_bias(self, node: ir.Node, index: int, weight_scales: np.ndarray) -> None:
        """bias → DQ(int32 codes, x_scale · w_scale): the scale ONNX Runtime's integer kernels accumulate at;
        made once for the readers of one bias with one input scale and weight."""
        bias = node.inputs[index]
        x_scale = self.params.get(self._float_source(node.inputs[0]))
        if x_scale is None or not _is_constant(bias):
            return
        key = (bias, x_scale[0], node.inputs[1])
        if key in self.biases:
            node.replace_input_with(index, self.biases[key])
            return
        array = np.asarray(constant_array(bias), dtype=np.float32)
        scales = (np.float32(constant_array(x_scale[0])) * weight_scales).astype(np.float32)
        scales = np.broadcast_to(scales, array.shape).copy() if scales.ndim else np.full(array.shape, scales)
        scales[scales == 0] = 1.0
        codes = np.clip(np.rint(array / scales), -(2**31), 2**31 - 1).astype(np.int32)
        base = bias.name or f"{node.name}_bias"
        inputs = [add_initializer(self.model, f"{base}.int32", codes),
                  add_initializer(self.model, f"{base}.scale", scales),
                  add_initializer(self.model, f"{base}.zero_point", np.zeros(array.shape, np.int32))]
        dq = self._dequantize(inputs, base, ir.DataType.FLOAT, ir.Shape(array.shape), axis=0)
        self.model.graph.insert_before(node, dq)
        node.replace_input_with(index, dq.outputs[0])
        self.biases[key] = dq.outputs[0]

    def _float_source(self, value: ir.Value) -> ir.Value:
        """The float tensor a DequantizeLinear output stands for (else `value` itself)."""
        return self.sources.get(value, value)


def fold_batch_norms(model: ir.Model) -> int:
    """BatchNormalization(Conv | ConvTranspose | Gemm) → one Conv | ConvTranspose | Gemm, with onnxscript's
    rules. ONNX Runtime folds them at load for float, but not across the Q → DQ pair int8 puts between
    them: unfolded, every such layer runs its BatchNormalization in float between two pairs (PP-LCNet's
    27: int8 0.6x the fp32 speed). The folded op keeps the layer's name and metadata, which `exclude`
    matches. Returns how many were folded."""
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.rules.common import (
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_conv_transpose_rule,
        fuse_batchnorm_into_gemm_rule,
    )

    layers = {norm.outputs[0].name: (layer.name, dict(layer.metadata_props)) for norm in model.graph
              if norm.op_type == "BatchNormalization" and (layer := norm.inputs[0].producer()) is not None}
    if not layers:
        return 0
    rewrite(model, [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule])
    folded = 0
    for node in model.graph:
        if node.op_type in FOLDS_NORM and node.outputs[0].name in layers:
            node.name, metadata = layers[node.outputs[0].name]
            node.metadata_props.update(metadata)
            folded += 1
    return folded


def _names(node: ir.Node) -> list[str]:
    return [n for n in (node.name, module_path(node), *(v.name for v in node.outputs)) if n]


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.FLOAT


def _is_constant(value: ir.Value | None) -> bool:
    """An initializer, a Constant's output, or a ConstantOfShape's (how onnx's zoo files hold weights)."""
    return constant_tensor(value) is not None or filled_constant(value) is not None


def _quantized_already(value: ir.Value) -> bool:
    """A value a DequantizeLinear makes, or that a QuantizeLinear reads: a model another tool quantized."""
    producer = value.producer()
    return (producer is not None and producer.op_type == "DequantizeLinear") or \
        any(user.op_type == "QuantizeLinear" for user, _ in value.uses())


def _activation_inputs(node: ir.Node) -> list[ir.Value]:
    rule = RULES[node.op_type]
    indices = range(len(node.inputs)) if rule.activations is None else rule.activations
    return [node.inputs[i] for i in indices if i < len(node.inputs) and _is_float(node.inputs[i])
            and not _is_constant(node.inputs[i])]


def _unsupported(node: ir.Node) -> str | None:
    """Why a node of a quantized op type stays float, or None."""
    rule = RULES[node.op_type]
    if not all(_is_float(v) for v in node.outputs[:1]):
        return "output is not float32"
    data = [v for v in node.inputs if v is not None and _is_float(v)]
    if any(_quantized_already(v) for v in data) or any(_quantized_already(v) for v in node.outputs[:1]):
        return "quantized already (a DequantizeLinear feeds it, or a QuantizeLinear reads it)"
    if rule.activations is None and node.op_type != "MatMul" and any(_is_constant(v) for v in data):
        return "a constant operand (kept float: one uint8 scale would round it)"
    if not _activation_inputs(node):
        return "no float activation input"
    if rule.weight is not None and node.op_type != "MatMul":
        if len(node.inputs) <= rule.weight or not _is_constant(node.inputs[rule.weight]):
            return "weight is not a constant"
    if node.op_type == "Gemm":
        attrs = node.attributes
        if attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0 or attrs.get_int("transA", 0):
            return "Gemm with alpha, beta or transA"
    if node.op_type == "MatMul" and _is_constant(node.inputs[1]) and len(constant_shape(node.inputs[1])) != 2:
        return "MatMul with a constant weight that is not 2-D"
    if node.op_type != "Split" and len(node.outputs) > 1 and any(v.uses() for v in node.outputs[1:]):
        return "more than one output in use"
    return None


def _weight_axis(node: ir.Node) -> int:
    """The output-channel axis of a node's weight."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    return 1  # MatMul [K, N]


def _folds(rectifier: ir.Node, chosen: set[ir.Node]) -> bool:
    """A Relu, or Clip from 0, that is its quantized producer's only reader."""
    source = rectifier.inputs[0]
    producer = source.producer() if source is not None else None
    if producer not in chosen or RULES[producer.op_type].output != "own" or len(source.uses()) != 1:
        return False
    if source.is_graph_output() or rectifier.outputs[0].is_graph_output() or not is_default_domain(rectifier):
        return False
    if rectifier.op_type == "Clip":
        try:
            floor, _ = _rectifier_bounds(rectifier)
        except SlimgraphError:
            return False
        return floor == 0.0
    return True


def _rectifier_bounds(node: ir.Node) -> tuple[float, float]:
    if node.op_type == "Relu":
        return 0.0, np.inf
    if len(node.inputs) > 1:  # opset 11+: min and max are inputs
        bounds = [node.inputs[i] if len(node.inputs) > i else None for i in (1, 2)]
        if any(b is not None and constant_tensor(b) is None for b in bounds):
            raise SlimgraphError("Clip bounds are not constants")
        floor = float(constant_array(bounds[0])) if bounds[0] is not None else -np.inf
        ceiling = float(constant_array(bounds[1])) if bounds[1] is not None else np.inf
        return floor, ceiling
    return node.attributes.get_float("min", -np.inf), node.attributes.get_float("max", np.inf)


def _shares_input_scale(value: ir.Value, chosen: set[ir.Node]) -> bool:
    producer = value.producer()
    return producer in chosen and RULES[producer.op_type].output == "input"


def _values_in_order(model: ir.Model) -> Sequence[ir.Value]:
    values = list(model.graph.inputs)
    for node in model.graph:
        values.extend(node.outputs)
    return values
