"""The fusion pass of the Triton backend: which elementwise and norm nodes run as one kernel.

It does not rewrite the IR; it groups nodes. A group is a connected chain of ops from
`expressions.FUSABLE` over one main shape `[..., D]` (static D): residual adds, RMSNorm written
out as Pow → ReduceMean → Add → Sqrt → Reciprocal → Mul → Mul, LayerNormalization, an activation,
SiLU(gate) · up. Nodes are taken in graph order; a node joins the groups of the producers it reads
(merging them) when

- its output is a row or a per-row number of that main shape, and every input broadcasts as a row,
  a per-row number, a `[D]` vector or a scalar (`expressions.kind_of`);
- no value the group made so far is read by a node outside it that stands before this node.

The second rule is what lets the kernel run where the group's last node stands: everything it reads
is computed by then, and everything outside that reads its results comes after. A group's values
read outside it become the kernel's outputs (a residual sum feeding both a norm and the next
residual add is one of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from slimgraph.backends.triton.expressions import FLOATS, FUSABLE, REDUCTIONS, ROW, STAT, kind_of, known
from slimgraph.ir.graph import constant_tensor, is_default_domain


@dataclass(eq=False)  # (groups are compared by identity: two groups never hold the same nodes)
class FusionGroup:
    main: ir.Shape
    nodes: list[ir.Node] = field(default_factory=list)

    @property
    def reduces(self) -> bool:
        return any(n.op_type in REDUCTIONS for n in self.nodes)

    def produced(self) -> set[ir.Value]:
        return {v for n in self.nodes for v in n.outputs if v is not None}

    def inputs(self) -> list[ir.Value]:
        """Values the group reads and does not make (constants included), in first-read order."""
        made, seen = self.produced(), []
        for node in self.nodes:
            for value in node.inputs:
                if value is not None and value not in made and value not in seen:
                    seen.append(value)
        return seen

    def outputs(self, graph_outputs: set[ir.Value]) -> list[ir.Value]:
        """Values the group makes that are read outside it (or are graph outputs)."""
        members = set(self.nodes)
        return [v for n in self.nodes for v in n.outputs[:1]
                if v in graph_outputs or any(user not in members for user, _ in v.uses())]


def find_fusion_groups(graph: ir.Graph, exclude: set[ir.Node] | None = None) -> list[FusionGroup]:
    """Fusion groups in graph order (see the module docstring). Nodes in `exclude` stay out."""
    exclude = exclude or set()
    position = {node: i for i, node in enumerate(graph)}
    group_of: dict[ir.Node, FusionGroup] = {}
    groups: list[FusionGroup] = []
    for node in graph:
        if node in exclude or not _fusable(node):
            continue
        output = node.outputs[0]
        producers = [v.producer() for v in node.inputs if v is not None and v.producer() in group_of]
        joined = None
        for candidate in dict.fromkeys(group_of[p] for p in producers):
            if not _fits(node, candidate.main):
                continue
            if joined is None:
                joined = candidate if _legal([candidate], node, position) else None
            elif candidate.main == joined.main and _legal([joined, candidate], node, position):
                joined.nodes = sorted(joined.nodes + candidate.nodes, key=position.__getitem__)  # one kernel for both
                for member in candidate.nodes:
                    group_of[member] = joined
                groups.remove(candidate)
        if joined is None:
            if kind_of(output, output.shape) != ROW or not known(output.shape) or not _fits(node, output.shape):
                continue  # (a per-row op cannot start a group: its row length is not known from it)
            joined = FusionGroup(main=output.shape)
            groups.append(joined)
        joined.nodes.append(node)
        group_of[node] = joined
    return groups


def _fusable(node: ir.Node) -> bool:
    if not is_default_domain(node) or node.op_type not in FUSABLE or not node.outputs:
        return False
    output = node.outputs[0]
    if output is None or output.dtype not in FLOATS or not known(output.shape) or not output.shape:
        return False
    if any(v is not None and v.uses() for v in node.outputs[1:]):
        return False  # (LayerNormalization's mean and deviation outputs)
    return all(constant_tensor(v) is not None or v.dtype in FLOATS for v in node.inputs[:1] if v is not None)


def _fits(node: ir.Node, main: ir.Shape) -> bool:
    """The node's output is a row or per-row number of `main`, and its data inputs broadcast into it."""
    last = main[-1] if len(main) else None
    if not isinstance(last, int) or last < 2:
        return False
    if kind_of(node.outputs[0], main) not in (ROW, STAT):
        return False
    data = node.inputs[:1] if node.op_type in ("ReduceMean", "ReduceSum", "Pow", "Clip") else node.inputs
    return all(v is None or kind_of(v, main) is not None for v in data)


def _legal(groups: list[FusionGroup], node: ir.Node, position: dict[ir.Node, int]) -> bool:
    """No value of the groups is read, outside them, before `node` (where the kernel would run)."""
    members = {n for g in groups for n in g.nodes} | {node}
    here = position[node]
    for group in groups:
        for value in group.produced():
            for user, _ in value.uses():
                if user not in members and (user not in position or position[user] < here):
                    return False  # (a reader inside a subgraph counts as early: its node's place is not checked)
    return True
