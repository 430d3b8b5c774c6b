"""Cleanup passes (all exact), built from onnxscript's constant folder and onnx_ir's common passes.

- fold-constants:             op(c1, c2) with constant inputs → initializer c
- remove-identity:            Identity(x) → x
- cse:                        two identical op(x, y) → one
- remove-dead-nodes:          nodes (and functions, opsets) no graph output depends on → removed
- remove-unused-initializers: initializers no node reads → removed
- remove-nan-guards:          Where(IsNaN(p), 0, p) after p = Softmax(scores + finite mask) → p
- cleanup:                    all of the above, repeated until nothing changes

The NaN guard is what torch's exporter writes after an attention Softmax (a row whose keys are all
masked with −inf gives NaN there; 0 is what SDPA returns). With the additive mask transformers
builds (`Where(keep, 0, float32 min)`: finite) no row is ever all −inf, so the guard is two
elementwise ops over every [batch, heads, query, key] score that change nothing: 17% of the time of
MiniLM's fp32 export at 8 × 128 (ONNX Runtime 1.32, 2 threads), the gap to Optimum's export. It is
exact wherever the scores are finite (a NaN or infinite score would be a broken model either way).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from slimgraph.errors import SlimgraphError
from slimgraph.ir import edit
from slimgraph.ir.graph import constant_tensor
from slimgraph.passes._infra.base import Pass, PassContext, PassResult
from slimgraph.passes._infra.registry import register_pass

DEFAULT_MAX_ELEMENTS = 1 << 24  # folded tensors up to 16M elements (64 MB of fp32)


def _counts(model: ir.Model) -> tuple[int, int]:
    return len(model.graph), len(model.graph.initializers)


def _removed(before: tuple[int, int], after: tuple[int, int]) -> dict[str, int]:
    """`nodes removed`, `initializers removed` — or `… added` where folding made more (Constant
    nodes become initializers): never a negative count."""
    stats = {}
    for what, b, a in (("nodes", before[0], after[0]), ("initializers", before[1], after[1])):
        stats[f"{what} removed" if a <= b else f"{what} added (folded constants)"] = abs(b - a)
    return stats


def _run(model: ir.Model, *steps: Callable[[ir.Model], ir.passes.PassResult]) -> PassResult:
    """Run onnx_ir/onnxscript passes (anything returning a result with `.modified`) in order."""
    before = _counts(model)
    modified = False
    for step in steps:
        modified |= step(model).modified
    return PassResult(modified, _removed(before, _counts(model)))


@register_pass
@dataclass(frozen=True, kw_only=True)
class FoldConstants(Pass):
    """Fold ops whose inputs are all constant: op(c1, c2) → initializer c."""

    name: ClassVar[str] = "fold-constants"
    max_elements: int = DEFAULT_MAX_ELEMENTS

    def __post_init__(self) -> None:
        if self.max_elements < 1:
            raise SlimgraphError(f"fold-constants: max_elements must be >= 1, got {self.max_elements}")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        import onnxscript.optimizer

        fold = functools.partial(onnxscript.optimizer.fold_constants, onnx_shape_inference=True,
                                 input_size_limit=self.max_elements, output_size_limit=self.max_elements)
        return _run(
            model,
            fold,
            common.RemoveUnusedNodesPass(),
            common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        )


class _IdentityElimination(common.IdentityEliminationPass):
    """onnx_ir's pass, plus two rules it lacks (onnx_ir 1.1.0), both for `y = Identity(x)`
    where y is a graph output:
    - keep it when x is a graph output too; otherwise x is renamed to y and the model loses
      output x (found by the random-graph property test in tests/passes/test_cleanup.py);
    - keep it when x is not made by a node of y's own graph: in an `If`/`Loop` branch, x from
      the enclosing graph would be renamed and the branch output made by no node of the
      branch, which ONNX forbids (found on Silero VAD, benchmarks/real_models.py)."""

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        source = node.inputs[0] if node.op_type == "Identity" and node.inputs else None
        if source is not None and node.outputs[0].is_graph_output():
            producer = source.producer()
            if source.is_graph_output() or producer is None or producer.graph is not node.graph:
                return False
        return super()._try_eliminate_identity_node(node)


@register_pass
@dataclass(frozen=True, kw_only=True)
class RemoveIdentity(Pass):
    """Identity(x) → x."""

    name: ClassVar[str] = "remove-identity"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        return _run(model, _IdentityElimination())


@register_pass
@dataclass(frozen=True, kw_only=True)
class EliminateCommonSubexpressions(Pass):
    """Two identical op(x, y) → one, its users rewired."""

    name: ClassVar[str] = "cse"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        return _run(model, common.CommonSubexpressionEliminationPass(), common.RemoveUnusedNodesPass())


@register_pass
@dataclass(frozen=True, kw_only=True)
class RemoveDeadNodes(Pass):
    """Nodes no graph output depends on → removed (with unused functions and opset imports)."""

    name: ClassVar[str] = "remove-dead-nodes"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        return _run(
            model, common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()
        )


@register_pass
@dataclass(frozen=True, kw_only=True)
class RemoveUnusedInitializers(Pass):
    """Initializers that no node, subgraph or graph output reads → removed."""

    name: ClassVar[str] = "remove-unused-initializers"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        # onnx_ir only removes unused initializers together with dead nodes; this pass
        # does the initializer half alone, so it can be used without touching nodes.
        unused = edit.remove_unused_initializers(model)
        return PassResult(bool(unused), {"initializers removed": len(unused)})


@register_pass
@dataclass(frozen=True, kw_only=True)
class RemoveNanGuards(Pass):
    """Where(IsNaN(p), 0, p) after p = Softmax(scores + finite mask) → p: the guard never fires."""

    name: ClassVar[str] = "remove-nan-guards"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        removed = 0
        for node in list(model.graph):
            probs, guarded = _guarded_softmax(node), node.outputs[0]
            if probs is None or (guarded.is_graph_output() and probs.is_graph_output()):
                continue
            name = guarded.name
            ir.convenience.replace_all_uses_with(guarded, probs, replace_graph_outputs=True)
            if probs.is_graph_output():  # the model's output keeps its name
                guarded.name, probs.name = None, name
            removed += 1
        if removed:
            edit.remove_dead(model)
        return PassResult(bool(removed), {"NaN guards removed": removed})


def _guarded_softmax(where: ir.Node) -> ir.Value | None:
    """The Softmax output `where` guards (`Where(IsNaN(p), 0, p)`), if that Softmax reads Q·Kᵀ
    plus nothing, or plus a mask that cannot be −inf (a finite constant, or `Where` between two)."""
    if where.op_type != "Where" or len(where.inputs) != 3:
        return None
    isnan = where.inputs[0].producer() if where.inputs[0] is not None else None
    probs = where.inputs[2]
    if isnan is None or isnan.op_type != "IsNaN" or isnan.inputs[0] is not probs or not _is_zero(where.inputs[1]):
        return None
    softmax = probs.producer()
    if softmax is None or softmax.op_type != "Softmax":
        return None
    scores = softmax.inputs[0].producer()
    if scores is None:
        return None
    if scores.op_type == "MatMul":
        return probs
    if scores.op_type != "Add":
        return None
    for mask in scores.inputs:
        made = mask.producer()
        if _is_finite_constant(mask) or (made is not None and made.op_type == "Where"
                                         and all(_is_finite_constant(v) for v in made.inputs[1:])):
            return probs
    return None


def _is_zero(value: ir.Value | None) -> bool:
    tensor = constant_tensor(value)
    return tensor is not None and tensor.size == 1 and float(tensor.numpy().reshape(())) == 0.0


def _is_finite_constant(value: ir.Value | None) -> bool:
    tensor = constant_tensor(value)
    return tensor is not None and bool(np.isfinite(tensor.numpy()).all())


@register_pass
@dataclass(frozen=True, kw_only=True)
class Cleanup(Pass):
    """fold-constants, remove-identity, cse, remove-dead-nodes, remove-unused-initializers, remove-nan-guards until nothing changes."""

    name: ClassVar[str] = "cleanup"
    max_elements: int = DEFAULT_MAX_ELEMENTS
    max_rounds: int = 4

    def __post_init__(self) -> None:
        if self.max_rounds < 1:
            raise SlimgraphError(f"cleanup: max_rounds must be >= 1, got {self.max_rounds}")
        FoldConstants(max_elements=self.max_elements)  # validates max_elements

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        steps = [
            FoldConstants(max_elements=self.max_elements),
            RemoveIdentity(),
            EliminateCommonSubexpressions(),
            RemoveDeadNodes(),
            RemoveUnusedInitializers(),
            RemoveNanGuards(),
        ]
        before = _counts(model)
        modified, rounds = False, 0
        for rounds in range(1, self.max_rounds + 1):
            changed = False
            for step in steps:
                changed |= step(model, ctx).modified
            modified |= changed
            if not changed:
                break
        return PassResult(modified, _removed(before, _counts(model)) | {"rounds": rounds})
