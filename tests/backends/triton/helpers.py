"""Small models for the Triton backend's tests, and the comparison every test makes: the Triton
artifact against ONNX Runtime and against the PyTorch backend (whose lowering it replaces)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper

import slimgraph
from slimgraph.backends.triton.codegen import SETTINGS
from slimgraph.measure import evaluate

GPU_SETTINGS = {name: value for name, (value, _) in SETTINGS.items()}  # small tiles, as on a GPU


def linear_model(k: int, n: int, seed: int = 0, bias: bool = False) -> ir.Model:
    """x[rows..., k] → MatMul(W[k, n]) (+ b) → y."""
    rng = np.random.default_rng(seed)
    initializers = [helper.make_tensor("linear.weight", TensorProto.FLOAT, (k, n),
                                       rng.standard_normal((k, n)).astype(np.float32).ravel())]
    nodes = [helper.make_node("MatMul", ["x", "linear.weight"], ["y" if not bias else "h"], name="linear")]
    if bias:
        initializers.append(helper.make_tensor("linear.bias", TensorProto.FLOAT, (n,),
                                               rng.standard_normal(n).astype(np.float32)))
        nodes.append(helper.make_node("Add", ["h", "linear.bias"], ["y"], name="linear_bias"))
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])], initializers)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def assert_matches(model: ir.Model, feeds: dict, rtol: float = 1e-4, **options) -> slimgraph.backends.Artifact:
    """The Triton artifact's outputs equal ONNX Runtime's and the PyTorch backend's (relative to the
    largest magnitude); returns the artifact."""
    artifact = slimgraph.compile(model, backend="triton", device="cpu", **options)
    got = artifact(**feeds)
    want = evaluate.run(model, feeds)
    reference = slimgraph.compile(model, backend="pytorch")(**feeds)
    assert list(got) == list(want)
    for name in want:
        scale = max(float(np.abs(want[name]).max()), 1e-30)
        assert got[name].shape == want[name].shape, name
        assert np.abs(got[name] - want[name]).max() <= rtol * scale, (name, np.abs(got[name] - want[name]).max(), scale)
        assert np.abs(got[name] - reference[name]).max() <= rtol * scale, name
    return artifact
