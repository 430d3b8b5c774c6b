"""A pass from outside slimgraph (a plugin): Dropout(x) → x, since inference runs Dropout as the identity.

    slimgraph passes --plugin examples/remove_dropout.py remove-dropout
    slimgraph optimize model.onnx --plugin examples/remove_dropout.py -p remove-dropout,cleanup -o out.onnx

A package can instead name the module in a `slimgraph.passes` entry point (see the README),
and the pass is found without --plugin. The graph is changed through `slimgraph.ir.edit` (see
docs/editing.md; examples/decompose_gelu.py adds nodes with its Builder).
"""

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir

from slimgraph.ir import edit
from slimgraph.passes import Pass, PassContext, PassResult, register_pass


@register_pass
@dataclass(frozen=True, kw_only=True)
class RemoveDropout(Pass):
    """Dropout(x) → x: at inference Dropout passes its input through."""

    name: ClassVar[str] = "remove-dropout"
    exact: ClassVar[bool] = True  # Verify holds it to the outputs before it, within 1e-4

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        removed = 0
        for node in list(model.graph):
            if node.op_type != "Dropout" or node.domain not in ("", "ai.onnx"):
                continue
            mask_read = len(node.outputs) > 1 and bool(node.outputs[1].uses())
            training_mode = len(node.inputs) > 2 and node.inputs[2] is not None
            if mask_read or training_mode:
                continue
            edit.bypass(model, node.inputs[0], node.outputs[0])  # its readers read x; the Dropout goes
            removed += 1
        return PassResult(modified=removed > 0, stats={"Dropout nodes removed": removed})
