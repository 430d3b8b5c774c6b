"""Factor flow: which shape elements count a followed axis, through the ops between."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper, shape_inference

from slimgraph.ir.factors import Factor, FactorFlow, position_axes, same


def flow_through_reduction(axis: int) -> FactorFlow:
    """x [1, 6, 4] → x · ReduceMean(x, axis) → Reshape to [1, 6, 2, 2], with axis 1 (6) followed."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=1),
         helper.make_node("Mul", ["x", "mean"], ["scaled"]),
         helper.make_node("Reshape", ["scaled", "shape"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 2, 2])],
        [numpy_helper.from_array(np.array([axis], np.int64), "axes"),
         numpy_helper.from_array(np.array([1, 6, 2, 2], np.int64), "shape")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model = ir.serde.deserialize_model(shape_inference.infer_shapes(proto))
    x = model.graph.inputs[0]
    flow = FactorFlow()
    flow.run(model, {x: ((), (Factor(6, "tokens"),), flow.dim_factors(4))}, stop=lambda n: False, outputs_allowed=True)
    return flow


def test_a_reduction_over_another_axis_keeps_the_followed_one():
    flow = flow_through_reduction(axis=2)  # an RMSNorm's mean over the hidden axis
    tokens = flow.axes[next(iter(flow.axes))][1][0]
    assert not flow.lost
    assert [e.value for e in flow.elements if any(same(f, tokens) for f in e.factors)] == [6]


def test_a_reduction_over_the_followed_axis_is_a_loss():
    flow = flow_through_reduction(axis=1)  # a mean over the tokens depends on how many there are
    assert [why for _, why in flow.lost][:1] == ["a reduction over a followed axis"]


def test_position_axes_tell_tables_of_positions_from_other_constants():
    positions = np.arange(6, dtype=np.float32)
    angles = np.outer(positions, [1.0, 0.1, 0.01]).astype(np.float32)  # rotary angles [L, dim]
    causal = np.triu(np.full((6, 6), -1e9, np.float32), k=1)[None, None]
    assert position_axes(positions, 6) == [0]
    assert position_axes(np.cos(angles), 6) == [0]
    assert position_axes(causal, 6) == [2, 3]
    assert position_axes(np.random.default_rng(0).standard_normal((1, 6, 4)), 6) is None  # a learned bias
