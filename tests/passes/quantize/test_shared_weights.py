"""Every quantize pass on a graph as other exporters write it (not cleaned up first): one weight read by
several nodes (an unrolled LSTM's gates feed one Gemm per step) is quantized once, and a bias made
by a Constant between the MatMul and its Add keeps the graph topologically sorted."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimgraph.measure.stats import model_stats
from slimgraph.passes import Pipeline

STEPS = 6


def unrolled(seed: int = 0) -> ir.Model:
    """h_{t+1} = tanh(x_t · W + h_t · U + b) for STEPS steps: W and U each read by STEPS MatMuls, and
    each step's bias a Constant node placed between its MatMul and its Add (as exporters leave it)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32) * 0.1, name)
             for name in ("W", "U")]
    nodes, h = [], "h0"
    for t in range(STEPS):
        bias = helper.make_tensor(f"b{t}", TensorProto.FLOAT, [64], (rng.standard_normal(64) * 0.1).tolist())
        nodes += [
            helper.make_node("MatMul", [f"x{t}", "W"], [f"xw{t}"], name=f"xw{t}"),
            helper.make_node("MatMul", [h, "U"], [f"hu{t}"], name=f"hu{t}"),
            helper.make_node("Constant", [], [f"bias{t}"], name=f"bias{t}", value=bias),
            helper.make_node("Add", [f"xw{t}", f"bias{t}"], [f"xb{t}"], name=f"xb{t}"),
            helper.make_node("Add", [f"xb{t}", f"hu{t}"], [f"pre{t}"], name=f"pre{t}"),
            helper.make_node("Tanh", [f"pre{t}"], [f"h{t + 1}"], name=f"tanh{t}"),
        ]
        h = f"h{t + 1}"
    inputs = [helper.make_tensor_value_info(f"x{t}", TensorProto.FLOAT, [4, 64]) for t in range(STEPS)]
    inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, [4, 64]))
    graph = helper.make_graph(nodes, "unrolled", inputs, [helper.make_tensor_value_info(h, TensorProto.FLOAT,
                                                                                        [4, 64])], inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("pipeline, quantized_weights", [
    ("quantize-weights{bits=8}", 2),
    ("quantize-weights{bits=4}", 2),
    ("quantize-dynamic", 2),
    ("quantize-static", 2),
])
def test_a_shared_weight_is_quantized_once_and_the_graph_stays_sorted(pipeline, quantized_weights):
    model = unrolled()
    before = model_stats(model).bytes
    report = Pipeline.parse(pipeline).run(model)  # Verify runs the checker: sorted, single assignment
    assert report.fidelity.cosine >= 0.99
    integer = [v for v in model.graph.initializers.values()
               if v.const_value.dtype in (ir.DataType.INT8, ir.DataType.UINT8) and v.const_value.size >= 64 * 64 // 2]
    assert len(integer) == quantized_weights
    assert model_stats(model).bytes < before / 2
