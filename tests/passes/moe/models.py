"""Small handmade FFN models: plain or gated, with or without biases, with a chosen activation."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

# activation → nodes from "a" (the gate, or up for a plain FFN) to "act"
ACTIVATIONS = {
    "relu": [("Relu", ["a"], ["act"], {})],
    "gelu_erf": [("Gelu", ["a"], ["act"], {})],
    "gelu_tanh": [("Gelu", ["a"], ["act"], {"approximate": "tanh"})],
    "silu": [("Sigmoid", ["a"], ["sig"], {}), ("Mul", ["a", "sig"], ["act"], {})],
    "hardswish": [("HardSwish", ["a"], ["act"], {})],
}


def ffn_model(*, gated: bool, bias: bool, activation: str = "silu", hidden: int = 16, inner: int = 96,
              seed: int = 0) -> ir.Model:
    """x[batch, sequence, hidden] → FFN → y, plus a residual Add (y = x + ffn(x))."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def linear(name: str, source: str, rows: int, cols: int) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32),
                                             f"{name}.weight"))
        nodes.append(helper.make_node("MatMul", [source, f"{name}.weight"], [f"{name}.mm"], name=f"{name}"))
        if not bias:
            return f"{name}.mm"
        inits.append(numpy_helper.from_array(rng.standard_normal(cols).astype(np.float32) * 0.1, f"{name}.bias"))
        nodes.append(helper.make_node("Add", [f"{name}.mm", f"{name}.bias"], [f"{name}.out"], name=f"{name}.add"))
        return f"{name}.out"

    up = linear("mlp.up_proj", "x", hidden, inner)
    first = linear("mlp.gate_proj", "x", hidden, inner) if gated else up
    for op, inputs, outputs, attrs in ACTIVATIONS[activation]:
        nodes.append(helper.make_node(op, [first if i == "a" else i for i in inputs], outputs, **attrs))
    if gated:
        nodes.append(helper.make_node("Mul", ["act", up], ["h"]))
    down = linear("mlp.down_proj", "h" if gated else "act", inner, hidden)
    nodes.append(helper.make_node("Add", ["x", down], ["y"], name="residual"))
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], producer_name="tests")
    model.ir_version = 10
    return ir.serde.deserialize_model(model)


def feeds(hidden: int = 16, samples: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 24, hidden)).astype(np.float32)} for _ in range(samples)]
