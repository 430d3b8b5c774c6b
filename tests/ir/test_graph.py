"""Graph queries: the cone of a value, down and up."""

from __future__ import annotations

from slimgraph.ir.graph import cone


def test_cone_goes_down_and_up_through_every_input(mlp_model):
    values = {v.name: v for node in mlp_model.graph for v in node.outputs}
    assert {v.name for v in cone(values["h1"])} == {"a", "a_dup", "a2", "a3", "y0", "y"}
    assert {v.name for v in cone(values["h1"], stop=lambda n: n.name == "sum_dup")} == {"a", "a_dup"}
    up = {v.name for v in cone(values["y"], up=True)}
    assert {"x", "fc1.weight", "half", "one", "y0"} <= up and "y" not in up  # constants and their nodes too
    stopped = {v.name for v in cone(values["y"], up=True, stop=lambda n: n.name == "const_add")}
    assert "one" in stopped and "half" not in stopped  # a stop node's output is reached, its inputs are not
