"""com.microsoft.MoE through the PyTorch backend against ONNX Runtime's CPU kernel."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import slimgraph
from slimgraph.measure import evaluate

EXPERTS, HIDDEN, INTER = 4, 8, 16


def _moe_model(activation: str, k: int = 2, bias: bool = True, **attributes) -> ir.Model:
    fc1_rows = 2 * INTER if activation == "swiglu" else INTER
    rng = np.random.default_rng(0)
    weights = {"fc1": rng.normal(0, 0.3, (EXPERTS, fc1_rows, HIDDEN)), "fc1_bias": rng.normal(0, 0.1, (EXPERTS, fc1_rows)),
               "fc2": rng.normal(0, 0.3, (EXPERTS, HIDDEN, INTER)), "fc2_bias": rng.normal(0, 0.1, (EXPERTS, HIDDEN))}
    if not bias:
        weights = {name: w for name, w in weights.items() if not name.endswith("bias")}
    initializers = [helper.make_tensor(name, TensorProto.FLOAT, w.shape, w.astype(np.float32).ravel())
                    for name, w in weights.items()]
    inputs = ["x", "router", "fc1", "fc1_bias" if bias else "", "fc2", "fc2_bias" if bias else ""]
    node = helper.make_node("MoE", inputs, ["y"], domain="com.microsoft", k=k, activation_type=activation, **attributes)
    graph = helper.make_graph(
        [node], "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", HIDDEN]),
                        helper.make_tensor_value_info("router", TensorProto.FLOAT, ["tokens", EXPERTS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=opsets))


@pytest.mark.parametrize("activation, attributes", [
    ("gelu", {}), ("relu", {"normalize_routing_weights": 1}), ("silu", {"k": 1}), ("identity", {"bias": False}),
    ("swiglu", {"swiglu_fusion": 1}),
    ("swiglu", {"swiglu_fusion": 1, "activation_alpha": 1.702, "activation_beta": 1.0, "swiglu_limit": 7.0}),
])
def test_matches_onnxruntime(activation, attributes):
    model = _moe_model(activation, **attributes)
    rng = np.random.default_rng(1)
    feeds = {"x": rng.normal(size=(2, 5, HIDDEN)).astype(np.float32),
             "router": rng.normal(size=(10, EXPERTS)).astype(np.float32)}
    artifact = slimgraph.compile(model, backend="pytorch")
    assert f"MixtureOfExperts({EXPERTS}, {HIDDEN}, {INTER}, k=" in artifact.code.source  # a module, as written by hand
    got = artifact(**feeds)["y"]
    want = evaluate.run(model, feeds)["y"]
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_unsupported_layout_is_refused():
    with pytest.raises(slimgraph.SlimgraphError, match="interleaved"):
        slimgraph.compile(_moe_model("swiglu", swiglu_fusion=2), backend="pytorch")
