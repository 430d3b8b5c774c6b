"""The PyTorch backend's builder, with the planned nodes replaced by calls of the generated launchers.

Every node goes through the PyTorch lowering table as before, except that the nodes of a kernel
call are skipped until the last of them, where one `kernels.<launcher>(...)` call stands for all.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
import torch.fx as fx

from slimgraph.backends.pytorch.builder import Builder
from slimgraph.backends.triton.plan import Plan


class TritonBuilder(Builder):
    def __init__(self, model: ir.Model, plan: Plan, launchers: dict[str, Any]) -> None:
        from slimgraph.backends.pytorch import ops  # noqa: F401  (registers the lowerings)

        super().__init__(model)
        self.calls = {call.nodes[-1]: call for call in plan.calls}
        self.absorbed = {node for call in plan.calls for node in call.nodes[:-1]}
        self.launchers = launchers

    def _lower(self, node: ir.Node) -> None:
        if node in self.absorbed:
            return  # computed by the kernel call made at the group's last node
        call = self.calls.get(node)
        if call is None:
            super()._lower(node)
            return
        arguments = [self.tensor(self.lookup(value)) for value in call.inputs]
        result: fx.Proxy = self.call(self.launchers[call.launcher], *arguments)
        if len(call.outputs) == 1:
            self.values[call.outputs[0]] = result
        else:
            for i, value in enumerate(call.outputs):
                self.values[value] = result[i]
