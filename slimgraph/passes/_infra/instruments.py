"""Instruments hook into the pipeline before and after each pass.

- `Timing`: wall time of each pass.
- `Journal`: which nodes and initializers each pass added, removed or changed.
- `Verify`: after every pass, structural checks (ONNX checker, an ORT session builds), then
  numerics against the *original* model: an exact pass must stay within fp32 relative 1e-4
  (max |y − y_ref| / max |y_ref|) or the run fails naming it; a lossy pass records cosine,
  relative L2, max abs and top-1 agreement, and the run fails once 1 − cosine exceeds
  `--max-drop`.
- `PrintAfterChange`: prints the IR after each pass that modified the model.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
import onnx_ir as ir

from slimgraph.errors import FidelityError, SlimgraphError
from slimgraph.ir import evaluate
from slimgraph.ir.fidelity import EXACT_RTOL, compare
from slimgraph.ir.structure import module_path
from slimgraph.passes._infra.base import Pass, PassContext

if TYPE_CHECKING:
    from slimgraph.passes._infra.pipeline import PassRecord, PipelineReport


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


@dataclass
class Changes:
    """What one pass touched; nodes are described as 'module: op (name)'."""

    added_nodes: list[str] = field(default_factory=list)
    removed_nodes: list[str] = field(default_factory=list)
    changed_nodes: list[str] = field(default_factory=list)
    added_initializers: list[str] = field(default_factory=list)
    removed_initializers: list[str] = field(default_factory=list)
    changed_initializers: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.__dict__.items()}

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def describe_node(node: ir.Node) -> str:
    op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
    scope = module_path(node)
    where = f"{scope}: " if scope else ""
    return f"{where}{op} ({node.name})" if node.name else f"{where}{op}"


def _node_signature(node: ir.Node) -> tuple:
    attributes = tuple(
        (name, id(attr.value) if attr.type in (ir.AttributeType.TENSOR, ir.AttributeType.GRAPH) else repr(attr.value))
        for name, attr in node.attributes.items()
    )
    return (node.op_type, node.domain, tuple(id(v) for v in node.inputs), attributes)


def _initializer_signature(value: ir.Value) -> tuple:
    tensor = value.const_value
    return (id(tensor), value.dtype, None if value.shape is None else tuple(value.shape))


class Journal(Instrument):
    def before_pass(self, pass_, model, ctx):
        self._nodes = {node: _node_signature(node) for node in model.graph}
        self._inits = {name: _initializer_signature(v) for name, v in model.graph.initializers.items()}

    def after_pass(self, pass_, model, ctx, record):
        changes = Changes()
        now = {node: _node_signature(node) for node in model.graph}
        for node, signature in now.items():
            if node not in self._nodes:
                changes.added_nodes.append(describe_node(node))
            elif self._nodes[node] != signature:
                changes.changed_nodes.append(describe_node(node))
        changes.removed_nodes = [describe_node(n) for n in self._nodes if n not in now]
        inits = {name: _initializer_signature(v) for name, v in model.graph.initializers.items()}
        changes.added_initializers = [n for n in inits if n not in self._inits]
        changes.removed_initializers = [n for n in self._inits if n not in inits]
        changes.changed_initializers = [n for n, s in inits.items() if n in self._inits and self._inits[n] != s]
        record.changes = changes
        self._nodes, self._inits = {}, {}


# --- Verify -------------------------------------------------------------------------------


class Verify(Instrument):
    """Check every pass against the original model; see the module docstring."""

    def __init__(self, rtol: float = EXACT_RTOL) -> None:
        self.rtol = rtol
        self.reference_outputs: list[dict[str, np.ndarray]] = []

    def before_pipeline(self, model, ctx):
        reference = ctx.reference or model
        try:
            self.reference_outputs = evaluate.run_all(reference, ctx.inputs)
        except SlimgraphError as exc:
            raise SlimgraphError(f"the input model cannot be verified: {exc}") from exc

    def after_pass(self, pass_, model, ctx, record):
        try:
            evaluate.check_model(model)
            outputs = evaluate.run_all(model, ctx.inputs)
        except SlimgraphError as exc:
            raise SlimgraphError(f"pass '{pass_.name}' produced a broken model: {exc}") from exc
        try:
            fidelity = compare(self.reference_outputs, outputs)
        except ValueError as exc:
            raise FidelityError(f"pass '{pass_.name}' changed the model's outputs: {exc}") from exc
        record.fidelity = fidelity
        if pass_.exact and fidelity.max_rel_error > self.rtol:
            worst = fidelity.worst_output()
            raise FidelityError(
                f"pass '{pass_.name}' is declared exact but changed output '{worst.name}' by "
                f"{worst.max_rel_error:.2e} (relative to its largest value; allowed {self.rtol:.0e})"
            )
        if ctx.max_drop is not None and fidelity.drop > ctx.max_drop:
            raise FidelityError(
                f"fidelity budget exceeded after pass '{pass_.name}': 1 - cosine = {fidelity.drop:.4f} "
                f"> --max-drop {ctx.max_drop}"
            )


class PrintAfterChange(Instrument):
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    def after_pass(self, pass_, model, ctx, record):
        if record.modified:
            print(f"// after {pass_.to_text()}", file=self.stream)
            print(str(model.graph), file=self.stream)

