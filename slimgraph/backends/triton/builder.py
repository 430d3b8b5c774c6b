"""The PyTorch backend's builder, with the planned nodes replaced by calls of the generated launchers.

Every node goes through the PyTorch lowering table (or a recognised layer, for structured code) as
before, except that the nodes of a kernel call are skipped until the last of them, where one
`kernels.<launcher>(...)` call stands for all.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
import torch.fx as fx

from slimgraph.backends.pytorch.builder import Builder
from slimgraph.backends.pytorch.layers import Layer
from slimgraph.backends.triton.plan import Plan


class TritonBuilder(Builder):
    def __init__(self, model: ir.Model, plan: Plan, launchers: dict[str, Any],
                 layers: dict[ir.Node, Layer] | None = None) -> None:
        """`layers`: the recognised layers (structured code); those with a node in a kernel call are
        left out, the kernel computes them."""
        from slimgraph.backends.pytorch import ops  # noqa: F401  (registers the lowerings)

        self.calls = {call.nodes[-1]: call for call in plan.calls}
        self.absorbed = {node for call in plan.calls for node in call.nodes[:-1]}
        planned = self.absorbed | set(self.calls)
        layers = {node: layer for node, layer in (layers or {}).items() if planned.isdisjoint(layer.nodes)}
        super().__init__(model, layers)
        self.launchers = launchers

    def _lower_op(self, node: ir.Node) -> None:
        if node in self.absorbed:
            return  # computed by the kernel call made at the group's last node
        call = self.calls.get(node)
        if call is None:
            super()._lower_op(node)
            return
        arguments = [self.tensor(self.lookup(value)) for value in call.inputs]
        result: fx.Proxy = self.call(self.launchers[call.launcher], *arguments)
        if len(call.outputs) == 1:
            self.values[call.outputs[0]] = result
        else:
            for i, value in enumerate(call.outputs):
                self.values[value] = result[i]
