"""A pass that adds nodes (a plugin, as remove_dropout.py): Gelu(x) → 0.5·x·(1 + erf(x/√2)), for a
runtime without the Gelu op (ONNX has had it since opset 20). Float32 models.

    slimgraph optimize model.onnx --plugin examples/decompose_gelu.py -p decompose-gelu -o out.onnx

The new nodes come from `slimgraph.ir.edit.Builder`: named in a scope per Gelu
(`gelu.<node>/Mul_0`), with constants made once and shared by every Gelu (`gelu.half`);
`edit.replace_region` puts them where the Gelu was, with its module path and output name.
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir

from slimgraph.ir import edit
from slimgraph.passes import Pass, PassContext, PassResult, register_pass


@register_pass
@dataclass(frozen=True, kw_only=True)
class DecomposeGelu(Pass):
    """Gelu(x) → 0.5·x·(1 + erf(x/√2)): the same function from Mul, Add and Erf."""

    name: ClassVar[str] = "decompose-gelu"
    exact: ClassVar[bool] = True

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        gelus = [node for node in model.graph if node.op_type == "Gelu" and node.domain in ("", "ai.onnx")
                 and node.attributes.get_string("approximate", "none") == "none"]
        build = edit.Builder(model, "gelu")
        for node in gelus:
            x = node.inputs[0]
            with build.scope(node.name or "node"):
                erf = build.op("Erf", [build.op("Mul", [x, build.constant("inv_sqrt2", 1 / math.sqrt(2))])])
                half_x = build.op("Mul", [x, build.constant("half", 0.5)])
                y = build.op("Mul", [half_x, build.op("Add", [erf, build.constant("one", 1.0)])])
            edit.replace_region(model, [node], build.take(), {node.outputs[0]: y})
        return PassResult(modified=bool(gelus), stats={"Gelu nodes decomposed": len(gelus)})
