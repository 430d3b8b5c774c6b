"""moe-convert: a dense FFN → a shared expert plus `experts` routed experts, top-k routed by a
router built without training (Dense2MoE, MoEfication).

1. On the calibration tokens, each FFN's input x and activations h = act(gate·x) ⊙ (up·x) (or
   act(up·x)) are recorded (`slimgraph.passes.activations.value_rows`).
2. Shared expert: the `shared` fraction of the neurons, always active: neurons with massive
   activations, then those most often among each token's strongest (`slimgraph.passes.moe.clustering`).
3. The other neurons split into `experts` equal experts, each a multiple of 8 neurons (what is left
   over joins the shared expert): clusters of co-activation patterns, balanced k-means on the
   normalised gate/up rows, or (a baseline) at random.
4. Router: centroid or representative-neuron scores, softmax, top-k, renormalised if asked
   (`slimgraph.passes.moe.router`).
5. y = shared(x) + Σ_{e ∈ top-k} w_e · E_e(x), the down bias once; with `compensate=mean` a skipped
   expert still adds its mean output on the calibration tokens (`slimgraph.passes.moe.emit`):
   com.microsoft.MoE (`emit=onnxruntime`) where it computes the FFN's activation exactly, else
   standard ONNX (`emit=decomposed`, which every backend runs).

With top_k = experts and every weight 1 the result equals the dense FFN: the split loses nothing
by itself; what routing loses is measured as routing recall, per layer, in the pass's stats.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir import edit
from slimgraph.ir.groups import remove_channels
from slimgraph.ir.opset import upgrade_opset
from slimgraph.ir.parts import FFN
from slimgraph.ir.structure import Structures, discover
from slimgraph.measure.stats import human_count
from slimgraph.passes._infra.base import Pass, PassContext, PassResult
from slimgraph.passes._infra.options import option
from slimgraph.passes._infra.registry import register_pass
from slimgraph.passes.activations import capture_chunks, value_rows
from slimgraph.passes.moe import clustering
from slimgraph.passes.moe.activation import ORT_KINDS, Activation, find_activation, kind
from slimgraph.passes.moe.emit import MoEPlan, Weights, emit
from slimgraph.passes.moe.router import Recall, centroid_router, neuron_router, recall

SIZE_MULTIPLE = 8  # expert widths stay multiples of 8 (kernels, SIMD)


@register_pass
@dataclass(frozen=True, kw_only=True)
class MoEConvert(Pass):
    """Dense FFNs → a shared expert plus top-k routed experts, with a router built without training."""

    name: ClassVar[str] = "moe-convert"
    exact: ClassVar[bool] = False
    min_opset: ClassVar[int | None] = 16  # ScatterND with reduction, for decomposed experts
    experts: int = option(8, low=2)
    top_k: int = option(2, low=1)
    shared: float = option(0.125, low=0, high=1, high_open=True)
    # k-means measured better than co-activation clusters on MiniLM at every top-k and on SmolLM2 at
    # top-1/2 (benchmarks/moe.py); co-activation is kept as the second method
    method: Literal["kmeans", "coactivation", "random"] = "kmeans"
    router: Literal["centroid", "neuron"] = "centroid"
    normalize: bool = True
    layers: Literal["all"] | tuple[int, ...] = "all"
    emit: Literal["onnxruntime", "decomposed"] = "onnxruntime"
    compensate: Literal["mean", "none"] = "mean"

    def __post_init__(self) -> None:
        if self.top_k > self.experts:
            raise SlimgraphError(f"{self.name}: top_k must be between 1 and experts={self.experts}, got {self.top_k}")
        if self.layers != "all" and (not self.layers or min(self.layers) < 0 or len(set(self.layers)) != len(self.layers)):
            raise SlimgraphError(f"{self.name}: layers must be 'all' or distinct FFN indices from 0, got {list(self.layers)}")

    def sizes(self, inner: int) -> tuple[int, int]:
        """(shared neurons, neurons per routed expert) for an FFN of `inner` neurons."""
        routed = inner - int(round(self.shared * inner))
        size = routed // self.experts // SIZE_MULTIPLE * SIZE_MULTIPLE
        return inner - size * self.experts, size

    def chosen(self, found: Structures) -> list[FFN]:
        """The dense FFNs to convert (those already part of an MoE are not)."""
        inside = {id(part) for moe in found.moes for part in moe.parts}
        dense = [f for f in found.ffns if id(f) not in inside]
        if not dense:
            return []
        if self.layers == "all":
            return dense
        missing = [i for i in self.layers if i >= len(dense)]
        if missing:
            raise SlimgraphError(f"{self.name}: layers={missing[0]} does not exist (FFNs 0..{len(dense) - 1})")
        return [dense[i] for i in sorted(self.layers)]

    def check(self, model: ir.Model) -> tuple[Structures, list[FFN]]:
        """What `run` converts: the model's structures and the FFNs chosen among them."""
        super().check(model)
        found = discover(model)
        ffns = self.chosen(found)
        if not ffns:
            raise SlimgraphError(f"{self.name}: found no dense FFN to convert (looked for up[, gate] → activation → down)")
        groups = {g.name for g in found.groups_of("ffn")}
        for ffn in ffns:
            shared, size = self.sizes(ffn.inner)
            if size < SIZE_MULTIPLE:
                raise SlimgraphError(
                    f"{self.name}: experts={self.experts} cannot split {ffn.name}'s {ffn.inner - round(self.shared * ffn.inner)} "
                    f"routed neurons into experts of at least {SIZE_MULTIPLE} (a multiple of {SIZE_MULTIPLE} each); "
                    "use fewer experts or a smaller shared fraction")
            if shared and ffn.name not in groups:
                why = next((n for n in found.not_prunable if n.startswith(ffn.name)), "its neurons have no dependency group")
                raise SlimgraphError(f"{self.name}: cannot narrow {ffn.name} to its shared expert: {why}")
            dtype = ffn.up.node.inputs[0].dtype
            if dtype not in (None, ir.DataType.FLOAT):
                raise SlimgraphError(f"{self.name}: {ffn.name} computes in {dtype.name.lower()}; only float32 is supported")
            find_activation(model, ffn)
        return found, ffns

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        upgrade_opset(model, self.min_opset)  # the pipeline did already; a direct call may not have
        found, ffns = self.check(model)
        activations = {ffn.name: find_activation(model, ffn) for ffn in ffns}
        kinds = {ffn.name: kind(model, activations[ffn.name]) for ffn in ffns}
        rows = calibration_rows(model, ffns, ctx)
        plans, recalls = [], []
        for ffn in ctx.track(ffns, f"{self.method} clustering"):
            x, h = rows.pop(ffn.name)
            if not len(x):
                raise SlimgraphError(f"{self.name}: no calibration tokens reach {ffn.name}")
            plan = self.plan(activations[ffn.name], x, h, kinds[ffn.name], ctx.seed)
            plans.append(plan)
            recalls.append(recall(np.abs(h), plan.experts, plan.router.logits(x, h), self.top_k))
        forms = {plan.ffn.name: self.form(plan, kinds[plan.ffn.name]) for plan in plans}
        for plan in plans:
            emit(model, plan, forms[plan.ffn.name][0])
        groups = {g.name: g for g in found.groups_of("ffn")}
        narrowed = {groups[p.ffn.name]: np.concatenate(p.experts) for p in plans if len(p.shared)}
        if narrowed:
            remove_channels(model, narrowed)
        edit.remove_dead(model)
        return PassResult(True, self.stats(plans, recalls, forms, ctx), self.warnings(forms))

    def plan(self, activation: Activation, x: np.ndarray, h: np.ndarray, activation_kind: str, seed: int) -> MoEPlan:
        """Shared expert, routed experts and router for one FFN from its calibration rows."""
        ffn = activation.ffn
        weights = Weights.of(ffn)
        magnitudes = np.abs(h)
        shared_count, _ = self.sizes(ffn.inner)
        shared = clustering.shared_neurons(magnitudes, shared_count, np.linalg.norm(weights.down, axis=1))
        routed = np.setdiff1d(np.arange(ffn.inner), shared)
        listening = (weights.gate if weights.gate is not None else weights.up).T  # [inner, hidden]
        if self.method == "random":
            local = clustering.random_clusters(len(routed), self.experts, seed)
        else:
            features = listening[routed] if self.method == "kmeans" else magnitudes[:, routed].T
            local = clustering.balanced_clusters(features, self.experts, seed)
        experts = [routed[group] for group in local]
        router = (centroid_router(listening, experts, x) if self.router == "centroid"
                  else neuron_router(magnitudes, experts))
        means = None
        if self.compensate == "mean":
            mean_h = h.astype(np.float64).mean(axis=0)
            means = np.stack([mean_h[e] @ weights.down[e] for e in experts])
        return MoEPlan(activation, weights, shared, experts, router, self.top_k, self.normalize,
                       activation_kind if activation_kind in ORT_KINDS else None, means)

    def form(self, plan: MoEPlan, kind: str) -> tuple[str, str | None]:
        """How the plan is emitted, and why not as asked (None: as asked)."""
        if self.emit == "decomposed":
            return "decomposed", None
        if plan.ort_activation is None:
            return "decomposed", (f"its activation is {kind}; com.microsoft.MoE computes relu, gelu (tanh "
                                  "approximation), silu, identity and swiglu")
        if plan.weights.down.shape[1] != plan.ffn.hidden:
            return "decomposed", "com.microsoft.MoE needs the output as wide as the input"
        return "onnxruntime", None

    def stats(self, plans: list[MoEPlan], recalls: list[Recall], forms: dict, ctx: PassContext) -> dict:
        dense = activated = router = 0
        for plan in plans:
            per_neuron = _neuron_parameters(plan.weights)
            bias = plan.weights.down_bias.size if plan.weights.down_bias is not None else 0
            dense += plan.ffn.inner * per_neuron + bias
            activated += (len(plan.shared) + self.top_k * len(plan.experts[0])) * per_neuron + bias
            router += plan.router.parameters if plan.router.kind == "centroid" else \
                len(plan.experts) * (per_neuron - plan.weights.down.shape[1])
        layouts = collections.Counter(
            f"{len(p.experts)} × {len(p.experts[0])} of {p.ffn.inner} neurons, top-{self.top_k}, shared {len(p.shared)}"
            for p in plans)
        values = np.array([r.mean for r in recalls])
        best = np.mean([r.best for r in recalls])
        emitted = collections.Counter(form if why is None else f"{form} (see the warning)" for form, why in forms.values())
        return {
            "converted": f"{len(plans)} FFNs",
            "experts": ", ".join(f"{n} × {text}" if n > 1 else text for text, n in layouts.items()),
            "activated FFN parameters": f"{(activated + router) / dense:.1%} of dense "
                                        f"({(activated + router) / dense - 1:+.1%}, router included)",
            "FFN parameters": f"{human_count(dense)} → {human_count(dense + router)} (router {human_count(router)})",
            "clustering": f"{self.method} ({ctx.inputs_source})",
            "router": f"{self.router}, softmax top-{self.top_k}" + (", renormalised" if self.normalize else ""),
            "compensation": "each skipped expert's mean output" if self.compensate == "mean" else "none",
            "routing recall": f"{values.mean():.3f} mean (layers {values.min():.3f}–{values.max():.3f}; "
                              f"the best experts would hold {best:.3f})",
            "routing recall per layer": _per_layer(values),
            "emitted": ", ".join(f"{text} ×{n}" for text, n in emitted.items()),
        }

    def warnings(self, forms: dict) -> list[str]:
        fallen = [name for name, (_, why) in forms.items() if why is not None]
        if not fallen:
            return []
        return [f"{self.name}: emit=onnxruntime fell back to decomposed for {len(fallen)} FFNs "
                f"({fallen[0]}{', ...' if len(fallen) > 1 else ''}): {forms[fallen[0]][1]}"]


def _per_layer(values: np.ndarray, shown: int = 12) -> str:
    """Every layer's figure, or, past `shown` layers (SmolLM2 has 30), the lowest few by layer."""
    if len(values) <= shown:
        return " ".join(f"{v:.2f}" for v in values)
    lowest = np.argsort(values, kind="stable")[:4]
    return "lowest: " + ", ".join(f"layer {i} {values[i]:.2f}" for i in sorted(lowest)) + f" (of {len(values)})"


def _neuron_parameters(weights: Weights) -> int:
    """Parameters one neuron owns: its up (and gate) column and bias, and its down row."""
    count = weights.up.shape[0] + weights.down.shape[1]
    count += weights.gate.shape[0] if weights.gate is not None else 0
    count += sum(b is not None for b in (weights.up_bias, weights.gate_bias))
    return count


def calibration_rows(model: ir.Model, ffns: list[FFN], ctx: PassContext) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """FFN name → (x [tokens, hidden], h [tokens, inner]) on the same calibration tokens. The values
    are captured a few at a time (`capture_chunks`), so that memory stays bounded on deep models;
    `value_rows` draws the same tokens in every call, so the chunks' rows line up."""
    if not ctx.inputs:
        raise SlimgraphError("moe-convert: no calibration inputs reach the model")
    values = {v: -1 for f in ffns for v in (f.up.node.inputs[0], f.down.node.inputs[0])}
    captured: dict[ir.Value, np.ndarray] = {}
    for chunk in capture_chunks(values):
        captured.update(value_rows(model, list(chunk), ctx))
    return {f.name: (captured[f.up.node.inputs[0]], captured[f.down.node.inputs[0]]) for f in ffns}
