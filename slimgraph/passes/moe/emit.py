"""A planned MoE written into the graph, beside the FFN it replaces.

On the FFN's input rows x [tokens, hidden] (other leading axes flattened, and restored after):

    logits = router(x)                                    # [tokens, experts]
    w, e   = TopK(Softmax(logits), k)                     # renormalised over the k if asked
    y      = shared(x) + Σ_j w_j · s · (E_{e_j}(x) − μ_{e_j}) + Σ_e μ_e   # s: `router.routing_scale`

- the shared expert is the original FFN narrowed to the shared neurons (the pass removes the other
  neurons through the FFN's dependency group, so up/gate columns, down rows and any reshape constant
  counting them change together), and the routed sum is added to its output, down bias included.
  With no shared neurons the FFN goes, and the down bias is added once after the routed sum;
- compensation (`means`): each expert's mean output on the calibration tokens, μ_e, is added once
  to the routed sum, and an expert that runs gives E_e(x) − μ_e: a token that skips an expert still
  gets its average contribution (FLAP's bias compensation, per expert). With every expert chosen at
  weight 1 the μ cancel, so the split stays exact;
- `onnxruntime`: one com.microsoft.MoE node. Weights are [experts, out, in]; for SiLU-gated FFNs
  fc1 interleaves gate and up rows (`swiglu_fusion=1`, the only layout ORT's CPU kernel accepts;
  alpha 1, beta 0, no limit). fc2's bias is −s · μ_e (it is weighted with the expert), never the
  down bias;
- `decomposed`: standard ONNX every backend runs: per expert, the tokens that chose it
  (NonZero of TopK's indices == e) are gathered, go through the expert's slice of the FFN (its
  activation copied from the original), are weighted, and are added back (ScatterND, add).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from slimgraph.ir import edit
from slimgraph.ir.meta import NAME_SCOPES_KEY
from slimgraph.ir.parts import FFN
from slimgraph.passes.moe.activation import Activation, copy_activation
from slimgraph.passes.moe.router import Router, routing_scale

MS_DOMAIN = "com.microsoft"
Form = Literal["onnxruntime", "decomposed"]


@dataclass(frozen=True)
class Weights:
    """An FFN's weights as [in, out] float32 matrices (see `slimgraph.ir.edit.weight_matrix`)."""

    up: np.ndarray
    up_bias: np.ndarray | None
    gate: np.ndarray | None
    gate_bias: np.ndarray | None
    down: np.ndarray
    down_bias: np.ndarray | None

    @classmethod
    def of(cls, ffn: FFN) -> Weights:
        def bias(linear):
            value = edit.bias_value(linear) if linear is not None else None
            return None if value is None else edit.constant_array(value).astype(np.float32)

        return cls(edit.weight_matrix(ffn.up), bias(ffn.up), edit.weight_matrix(ffn.gate) if ffn.gate else None,
                   bias(ffn.gate), edit.weight_matrix(ffn.down), bias(ffn.down))


@dataclass(frozen=True)
class MoEPlan:
    """What one FFN becomes: neuron ids of the shared expert and of each routed expert, and the router."""

    activation: Activation
    weights: Weights
    shared: np.ndarray
    experts: list[np.ndarray]
    router: Router
    top_k: int
    normalize: bool
    ort_activation: str | None  # the MoE op's activation_type when it computes this FFN's, else None
    means: np.ndarray | None = None  # [experts, out]: each expert's mean output, to compensate with

    @property
    def offset(self) -> np.ndarray | None:
        """What the routed sum adds once: the experts' mean outputs, and the down bias when no shared
        expert carries it."""
        parts = [p for p in (self.means.sum(axis=0) if self.means is not None else None,
                             self.weights.down_bias if not len(self.shared) else None) if p is not None]
        return sum(parts) if parts else None

    @property
    def ffn(self) -> FFN:
        return self.activation.ffn

    @property
    def scale(self) -> float:
        return routing_scale(self.top_k, len(self.experts), self.normalize)


def emit(model: ir.Model, plan: MoEPlan, form: Form) -> None:
    """Add the routed experts beside the FFN and make its readers read the sum (see the module
    docstring). The FFN's own neurons are not touched: the caller narrows them to the shared ones."""
    build = edit.Builder(model, plan.ffn.name, name_scopes=_scopes_of(plan.ffn))
    ffn, weights = plan.ffn, plan.weights
    x = ffn.up.node.inputs[0]
    flat = x.shape is not None and len(x.shape) == 2
    rows = x if flat else build.op("Reshape", [x, build.constant("rows_shape", [-1, ffn.hidden])])
    logits = _router(build, plan, rows)
    routed = _ort_moe(build, plan, rows, logits) if form == "onnxruntime" else _decomposed(build, plan, rows, logits)
    if plan.offset is not None:
        routed = build.op("Add", [routed, build.constant("experts.bias", plan.offset)])
    out = weights.down.shape[1]
    if not flat:
        leading = build.op("Shape", [x], start=0, end=-1)
        shape = build.op("Concat", [leading, build.constant("out_features", [out])], axis=0)
        routed = build.op("Reshape", [routed, shape])
    dense = ffn.down.output
    total = build.op("Add", [dense, routed]) if len(plan.shared) else build.op("Identity", [routed])
    total.type = dense.type
    edit.insert_after(model, dense, build.take(), total)


def _router(build: edit.Builder, plan: MoEPlan, rows: ir.Value) -> ir.Value:
    router = plan.router
    with build.scope("router"):
        if router.kind == "centroid":
            return build.op("MatMul", [rows, build.constant("router.weight", router.matrix)])
        h = _expert_activation(build, plan, router.neurons, rows, "router")
        scale = build.constant("router.scale", np.array(router.scale, np.float32))
        return build.op("Mul", [build.op("Abs", [h]), scale])


def _expert_activation(build: edit.Builder, plan: MoEPlan, neurons: np.ndarray, rows: ir.Value, module: str
                       ) -> ir.Value:
    """act(rows · gate[:, neurons]) · (rows · up[:, neurons]) with the FFN's own activation nodes, in
    the current scope (the FFN's `module`, which names the constants)."""
    weights = plan.weights

    def linear(matrix: np.ndarray, bias: np.ndarray | None, what: str) -> ir.Value:
        where = f"{module}.{what}"
        with build.scope(what):
            out = build.op("MatMul", [rows, build.constant(f"{where}.weight", matrix[:, neurons])])
            if bias is not None:
                out = build.op("Add", [out, build.constant(f"{where}.bias", bias[neurons])])
        return out

    up = linear(weights.up, weights.up_bias, "up_proj")
    gate = linear(weights.gate, weights.gate_bias, "gate_proj") if weights.gate is not None else None
    # the activation's constants are shared by every expert: one per source and values
    nodes, h = copy_activation(plan.activation, neurons, up, gate,
                               lambda source, array: build.constant(f"act_fn.{source.name or 'constant'}", array))
    with build.scope("act_fn"):
        build.add(nodes)
    return h


def _ort_moe(build: edit.Builder, plan: MoEPlan, rows: ir.Value, logits: ir.Value) -> ir.Value:
    weights = plan.weights
    experts = np.stack(plan.experts)  # [experts, size]
    if plan.ort_activation == "swiglu":  # rows interleaved: gate 0, up 0, gate 1, up 1, ...
        fc1 = np.empty((len(experts), 2 * experts.shape[1], weights.up.shape[0]), np.float32)
        fc1[:, 0::2] = weights.gate.T[experts]
        fc1[:, 1::2] = weights.up.T[experts]
        fc1_bias = None
        if weights.up_bias is not None or weights.gate_bias is not None:
            fc1_bias = np.zeros(fc1.shape[:2], np.float32)
            if weights.gate_bias is not None:
                fc1_bias[:, 0::2] = weights.gate_bias[experts]
            if weights.up_bias is not None:
                fc1_bias[:, 1::2] = weights.up_bias[experts]
    else:
        fc1 = weights.up.T[experts]
        fc1_bias = weights.up_bias[experts] if weights.up_bias is not None else None
    fc2 = np.ascontiguousarray(np.transpose(weights.down[experts] * plan.scale, (0, 2, 1)))  # [experts, out, size]
    fc2_bias = -plan.scale * plan.means if plan.means is not None else None  # weighted like fc2: w · s · (E − mean)
    attributes = {"k": plan.top_k, "activation_type": plan.ort_activation,
                  "normalize_routing_weights": int(plan.normalize)}
    if plan.ort_activation == "swiglu":
        attributes.update(swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)
    build.model.opset_imports.setdefault(MS_DOMAIN, 1)
    inputs = [rows, logits, build.constant("experts.fc1.weight", np.ascontiguousarray(fc1)),
              build.constant("experts.fc1.bias", fc1_bias) if fc1_bias is not None else None,
              build.constant("experts.fc2.weight", fc2),
              build.constant("experts.fc2.bias", fc2_bias) if fc2_bias is not None else None]
    while inputs[-1] is None:
        inputs.pop()
    out = build.op("MoE", inputs, attributes, domain=MS_DOMAIN)
    out.type = rows.type
    return out


def _decomposed(build: edit.Builder, plan: MoEPlan, rows: ir.Value, logits: ir.Value) -> ir.Value:
    weights = plan.weights
    probabilities = build.op("Softmax", [logits], axis=-1)
    chosen_weights, chosen = build.op("TopK", [probabilities, build.constant("router.top_k", [plan.top_k])],
                                      axis=-1, outputs=2)
    if plan.normalize:
        total = build.op("ReduceSum", [chosen_weights, build.constant("router.last_axis", [-1])], keepdims=1)
        chosen_weights = build.op("Div", [chosen_weights, total])
    tokens_count = build.op("Shape", [rows], start=0, end=1)
    out = weights.down.shape[1]
    shape = build.op("Concat", [tokens_count, build.constant("out_features", [out])], axis=0)
    total = build.op("ConstantOfShape", [shape], value=ir.tensor(np.zeros(1, np.float32)))
    first, last = build.constant("index_0", np.array(0)), build.constant("axis_1", [1])
    for e, neurons in enumerate(plan.experts):
        module = f"experts.{e}"
        with build.scope(module):
            hit = build.op("NonZero", [build.op("Equal", [chosen, build.constant(f"{module}.id", np.array(e))])])
            tokens = build.op("Gather", [hit, first], axis=0)  # hit: (token, slot), one per token
            weight = build.op("GatherND", [chosen_weights, build.op("Transpose", [hit], perm=[1, 0])])
            inputs = build.op("Gather", [rows, tokens], axis=0)
            h = _expert_activation(build, plan, neurons, inputs, module)
            down = build.constant(f"{module}.down_proj.weight", weights.down[neurons] * plan.scale)
            with build.scope("down_proj"):
                result = build.op("MatMul", [h, down])
                if plan.means is not None:
                    result = build.op("Add", [result, build.constant(f"{module}.down_proj.bias",
                                                                     -plan.scale * plan.means[e])])
            result = build.op("Mul", [result, build.op("Unsqueeze", [weight, last])])
            total = build.op("ScatterND", [total, build.op("Unsqueeze", [tokens, last]), result], reduction="add")
    return total


def _scopes_of(ffn: FFN) -> list[str] | None:
    """The name scopes down to the FFN's module (taken from its down projection), if recorded."""
    raw = ffn.down.node.metadata_props.get(NAME_SCOPES_KEY)
    try:
        scopes = ast.literal_eval(raw) if raw else None
    except (ValueError, SyntaxError):
        return None
    if not isinstance(scopes, list) or ffn.name not in scopes:
        return None
    return scopes[: scopes.index(ffn.name) + 1]
