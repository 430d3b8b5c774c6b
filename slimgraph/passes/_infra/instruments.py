"""Instruments hook into the pipeline before and after each pass.

- `Timing`: wall time of each pass.
- `Journal`: which nodes (by module path) and initializers each pass added, removed or
  changed, and the weight bytes and node count before and after it.
- `Verify`: after every pass, structural checks (ONNX checker, an ORT session builds), then
  numerics. Every pass's fidelity is measured against the *original* model (cosine,
  relative L2, max abs, top-1 agreement). An exact pass is held to the outputs *just before
  it*: within fp32 relative 1e-4 (max |y − y_prev| / max |y_prev|) or the run fails naming
  it, so an exact pass after a lossy one is not blamed for the lossy pass's error. The run
  fails once 1 − cosine against the original exceeds `max_drop`; a lossy pass that leaves
  the cosine below `COSINE_FLOOR` gets a warning even without a budget.
- `PrintAfterChange`: prints the IR after each pass that modified the model.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

import numpy as np
import onnx_ir as ir

from slimgraph.errors import FidelityError, SlimgraphError
from slimgraph.ir.meta import OUTPUT_MAPS_KEY
from slimgraph.measure import evaluate
from slimgraph.measure.diff import Change, describe, group_of, module_changes
from slimgraph.measure.fidelity import COSINE_FLOOR, EXACT_RTOL, OutputMap, compare
from slimgraph.measure.stats import node_count, weight_bytes
from slimgraph.passes._infra.base import Changes, Pass, PassContext, PassRecord, PipelineReport, Size

# 1 − cosine of two equal-up-to-rounding outputs is not exactly 0: `max_drop=0` means "no drop".
DROP_EPSILON = 1e-9


class Instrument:
    """Override what you need; every hook is optional."""

    def before_pipeline(self, model: ir.Model, ctx: PassContext) -> None: ...

    def before_pass(self, pass_: Pass, model: ir.Model, ctx: PassContext) -> None: ...

    def after_pass(self, pass_: Pass, model: ir.Model, ctx: PassContext, record: PassRecord) -> None: ...

    def after_pipeline(self, model: ir.Model, ctx: PassContext, report: PipelineReport) -> None: ...


class Timing(Instrument):
    def before_pass(self, pass_, model, ctx):
        self._start = time.perf_counter()

    def after_pass(self, pass_, model, ctx, record):
        record.seconds = time.perf_counter() - self._start


# --- Journal ------------------------------------------------------------------------------


def _node_signature(node: ir.Node) -> tuple:
    attributes = tuple(
        (name, id(attr.value) if attr.type in (ir.AttributeType.TENSOR, ir.AttributeType.GRAPH) else repr(attr.value))
        for name, attr in node.attributes.items()
    )
    return (node.op_type, node.domain, tuple(id(v) for v in node.inputs), attributes)


def _initializer_signature(value: ir.Value) -> tuple:
    tensor = value.const_value
    return (id(tensor), value.dtype, None if value.shape is None else tuple(value.shape))


def _reads_only_new_nodes(node: ir.Node, old_inputs: tuple, known: dict) -> bool:
    """Every input that changed now comes from a node this pass added."""
    changed = [v for v, old in zip(node.inputs, old_inputs) if id(v) != old]
    return bool(changed) and all(v is not None and v.producer() is not None and v.producer() not in known
                                 for v in changed)


class Journal(Instrument):
    """Records, per pass, the nodes and initializers it added, removed or changed."""

    def before_pass(self, pass_, model, ctx):
        self._nodes = {node: (_node_signature(node), group_of(node), describe(node)) for node in model.graph}
        self._inits = {name: _initializer_signature(v) for name, v in model.graph.initializers.items()}
        self._size = (weight_bytes(model), node_count(model))

    def after_pass(self, pass_, model, ctx, record):
        now = list(model.graph)
        present = set(now)
        added = [(group_of(n), describe(n)) for n in now if n not in self._nodes]
        removed = [(module, text) for n, (_, module, text) in self._nodes.items() if n not in present]
        changes = Changes(nodes=module_changes(removed, added))
        for node in now:
            if node in self._nodes:
                signature, module, before = self._nodes[node]
                current = _node_signature(node)
                if signature != current:
                    what = [label for label, i in (("op", 0), ("inputs rewired", 2), ("attributes", 3))
                            if signature[i] != current[i]]
                    if what == ["inputs rewired"] and _reads_only_new_nodes(node, signature[2], self._nodes):
                        continue  # it reads the replacement of a replaced node: shown as that replacement
                    changes.nodes.append(Change(group_of(node), "changed", before=before, after=describe(node),
                                                detail=", ".join(what)))
        inits = {name: _initializer_signature(v) for name, v in model.graph.initializers.items()}
        changes.added_initializers = [n for n in inits if n not in self._inits]
        changes.removed_initializers = [n for n in self._inits if n not in inits]
        changes.changed_initializers = [n for n, s in inits.items() if n in self._inits and self._inits[n] != s]
        record.changes = changes
        record.size = Size(self._size[0], weight_bytes(model), self._size[1], node_count(model))
        self._nodes, self._inits = {}, {}


# --- Verify -------------------------------------------------------------------------------


class Verify(Instrument):
    """Check every pass: exact ones against the outputs before them, all against the
    original; see the module docstring."""

    def __init__(self, rtol: float = EXACT_RTOL, floor: float = COSINE_FLOOR) -> None:
        self.rtol = rtol
        self.floor = floor
        self.inputs: list[dict[str, np.ndarray]] = []
        self.reference_outputs: list[dict[str, np.ndarray]] = []
        self.previous_outputs: list[dict[str, np.ndarray]] = []

    def before_pipeline(self, model, ctx):
        reference = ctx.reference or model
        self.inputs = ctx.verify_inputs if ctx.verify_inputs is not None else list(ctx.inputs)
        try:
            self.reference_outputs = evaluate.run_all(reference, self.inputs)
        except SlimgraphError as exc:
            from slimgraph.measure.inputs import refused_hint

            raise SlimgraphError(f"the input model cannot be verified: {exc}{refused_hint(ctx.verify_source)}") from exc
        self.previous_outputs = self.reference_outputs

    def after_pass(self, pass_, model, ctx, record):
        try:
            evaluate.check_model(model)
            outputs = evaluate.run_all(model, self.inputs)
        except SlimgraphError as exc:
            raise SlimgraphError(f"pass '{pass_.name}' produced a broken model: {exc}") from exc
        try:
            maps = model.meta.get(OUTPUT_MAPS_KEY) or {}
            fidelity = compare(self.reference_outputs, outputs, maps, self.inputs)
            before = fidelity
            if pass_.exact and self.previous_outputs is not self.reference_outputs:
                # against the previous pass's outputs only the positions that count carry over (padding is never read)
                real_tokens = {name: OutputMap(real_tokens=m.real_tokens) for name, m in maps.items() if m.real_tokens}
                before = compare(self.previous_outputs, outputs, real_tokens, self.inputs)
        except ValueError as exc:
            raise FidelityError(f"pass '{pass_.name}' changed the model's outputs: {exc}") from exc
        record.fidelity = fidelity
        if pass_.exact:
            record.exact_check = before
            if before.max_rel_error > self.rtol:
                worst = before.worst_output()
                what = "" if before is fidelity else " from the outputs before it"
                raise FidelityError(
                    f"pass '{pass_.name}' is declared exact but changed output '{worst.name}'{what} by "
                    f"{worst.max_rel_error:.2e} (relative to its largest value; allowed {self.rtol:.0e})"
                )
        elif fidelity.cosine < self.floor:
            worst = fidelity.worst_cosine_output()
            record.warnings.append(
                f"LOW FIDELITY after '{record.text}': output '{worst.name}' has cosine {worst.cosine:.3f} against the "
                f"original (below {self.floor}); the model may be unusable; set --max-drop to make this an error"
            )
        if ctx.max_drop is not None and fidelity.drop > ctx.max_drop + DROP_EPSILON:
            worst = fidelity.worst_cosine_output()
            raise FidelityError(
                f"fidelity budget exceeded after pass '{pass_.name}': 1 - cosine = {fidelity.drop:.4f} "
                f"(output '{worst.name}') > max_drop {ctx.max_drop}"
            )
        self.previous_outputs = outputs


class PrintAfterChange(Instrument):
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    def after_pass(self, pass_, model, ctx, record):
        if record.modified:
            print(f"// after {pass_.to_text()}", file=self.stream)
            print(str(model.graph), file=self.stream)

