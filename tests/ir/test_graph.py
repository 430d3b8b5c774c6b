"""Graph queries: the cone of a value, down and up."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from slimgraph.ir.graph import cone


def test_cone_goes_down_and_up_through_every_input(mlp_model):
    values = {v.name: v for node in mlp_model.graph for v in node.outputs}
    assert {v.name for v in cone(values["h1"])} == {"a", "a_dup", "a2", "a3", "y0", "y"}
    assert {v.name for v in cone(values["h1"], stop=lambda n: n.name == "sum_dup")} == {"a", "a_dup"}
    up = {v.name for v in cone(values["y"], up=True)}
    assert {"x", "fc1.weight", "half", "one", "y0"} <= up and "y" not in up  # constants and their nodes too
    stopped = {v.name for v in cone(values["y"], up=True, stop=lambda n: n.name == "const_add")}
    assert "one" in stopped and "half" not in stopped  # a stop node's output is reached, its inputs are not


def test_a_value_removed_from_the_inputs_and_its_tensor_are_let_go():
    """onnx_ir's input and output containers keep a count for every value they held (torch's exporter
    lifts each parameter to an input, then makes it an initializer): a removed weight must not stay
    alive in it."""
    import gc
    import weakref

    from slimgraph.ir.graph import forget_removed_values

    graph = ir.Graph([], [], nodes=[], name="g")
    value = ir.Value(name="w", const_value=ir.Tensor(np.ones(1000, np.float32)))
    graph.inputs.append(value)
    graph.inputs.remove(value)
    tensor = weakref.ref(value.const_value)
    del value
    gc.collect()
    assert tensor() is not None  # what the counter keeps
    forget_removed_values(graph)
    gc.collect()
    assert tensor() is None
