"""Cleanup passes are exact: outputs kept within fp32 rounding, never more nodes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from slimgraph.measure import evaluate
from slimgraph.measure.inputs import sample_inputs
from slimgraph.passes import Pipeline
from tests.conftest import LIGHT_MODELS


def outputs_of(model: ir.Model, feeds) -> dict[str, np.ndarray]:
    return evaluate.run(model, feeds)


def assert_same_outputs(before: dict, after: dict, rtol: float = 1e-5) -> None:
    assert list(before) == list(after)
    for name in before:
        scale = max(float(np.abs(before[name]).max()), 1e-30)
        assert np.abs(before[name] - after[name]).max() <= rtol * scale, name


def op_types(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


@pytest.mark.parametrize(
    "pipeline, gone",
    [
        ("remove-identity", ["Identity"]),
        ("cse", ["relu_dup"]),
        ("fold-constants", ["const_add"]),
    ],
)
def test_each_cleanup_pass(mlp_model, pipeline, gone):
    feeds = sample_inputs(mlp_model)
    before = outputs_of(mlp_model, feeds)
    report = Pipeline.parse(pipeline).run(mlp_model)
    names = {n.name for n in mlp_model.graph} | set(op_types(mlp_model))
    assert not set(gone) & names
    assert report.records[0].modified
    assert_same_outputs(before, outputs_of(mlp_model, feeds))


def test_remove_unused_initializers(mlp_model):
    Pipeline.parse("remove-unused-initializers").run(mlp_model)
    assert "unused" not in mlp_model.graph.initializers
    assert "fc1.weight" in mlp_model.graph.initializers


def test_remove_dead_nodes(mlp_model):
    dead = ir.node("Neg", [mlp_model.graph.inputs[0]], name="dead")
    mlp_model.graph.append(dead)
    report = Pipeline.parse("remove-dead-nodes").run(mlp_model)
    assert "dead" not in {n.name for n in mlp_model.graph}
    assert report.records[0].stats["nodes removed"] == 1


def test_cleanup_runs_everything_and_reports(mlp_model):
    feeds = sample_inputs(mlp_model)
    before = outputs_of(mlp_model, feeds)
    report = Pipeline.parse("cleanup").run(mlp_model)
    assert op_types(mlp_model).count("Relu") == 1
    assert "Identity" not in op_types(mlp_model)
    assert report.after.nodes < report.before.nodes
    stats = report.records[0].stats
    assert stats["nodes removed"] == report.before.nodes - report.after.nodes
    assert_same_outputs(before, outputs_of(mlp_model, feeds))
    again = Pipeline.parse("cleanup").run(mlp_model)
    assert not again.records[0].modified


def test_cleanup_counts_constants_lifted_to_initializers_as_added():
    """A TorchScript export keeps constants in Constant nodes: cleanup turns them into initializers,
    which once read `initializers removed: -170` on a CRNN."""
    nodes = [helper.make_node("Constant", [], [f"c{i}"], value=numpy_helper.from_array(np.full((4,), i, np.float32)))
             for i in range(3)]
    nodes += [helper.make_node("Add", ["x", "c0"], ["a0"]), helper.make_node("Add", ["a0", "c1"], ["a1"]),
              helper.make_node("Add", ["a1", "c2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    stats = Pipeline.parse("cleanup").run(model).records[0].stats
    assert all(v >= 0 for v in stats.values())
    assert stats["nodes removed"] == 3 and stats["initializers added (folded constants)"] == 3


@pytest.mark.parametrize("path", LIGHT_MODELS, ids=lambda p: p.stem)
@pytest.mark.slow
def test_cleanup_keeps_model_zoo_outputs(path):
    model = ir.load(path)
    feeds = sample_inputs(model)
    before = outputs_of(model, feeds)
    report = Pipeline.parse("cleanup").run(model)
    assert report.after.nodes <= report.before.nodes
    assert_same_outputs(before, outputs_of(model, feeds))


def test_cleanup_keeps_minilm_outputs(minilm):
    feeds = minilm.meta["slimgraph.example_inputs"][0]
    before = outputs_of(minilm, feeds)
    report = Pipeline.parse("cleanup").run(minilm)
    assert report.after.nodes <= report.before.nodes
    assert_same_outputs(before, outputs_of(minilm, feeds))


# --- property test: random small graphs -------------------------------------------------

UNARY = ["Relu", "Neg", "Tanh", "Identity", "Abs"]
BINARY = ["Add", "Mul", "Sub", "Max"]


@st.composite
def random_graphs(draw) -> onnx.ModelProto:
    """A DAG of elementwise ops over x[2, 3] and small constants, with duplicates and dead ends."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    values = ["x"]
    constants = []
    nodes = []
    for i in range(draw(st.integers(1, 3))):
        name = f"c{i}"
        constants.append(numpy_helper.from_array(rng.uniform(-1, 1, (2, 3)).astype(np.float32), name))
        values.append(name)
    for i in range(draw(st.integers(2, 12))):
        out = f"v{i}"
        if draw(st.booleans()):
            op = draw(st.sampled_from(UNARY))
            ins = [draw(st.sampled_from(values))]
        else:
            op = draw(st.sampled_from(BINARY))
            ins = [draw(st.sampled_from(values)), draw(st.sampled_from(values))]
        nodes.append(helper.make_node(op, ins, [out], name=f"n{i}"))
        if draw(st.integers(0, 3)) == 0 and nodes:  # an exact duplicate, for CSE
            nodes.append(helper.make_node(op, ins, [f"{out}_dup"], name=f"n{i}_dup"))
            values.append(f"{out}_dup")
        values.append(out)
    outputs = sorted({values[-1], draw(st.sampled_from(values[1:]))} - {"x"} - {c.name for c in constants})
    if not outputs:
        outputs = [values[-1]] if values[-1] != "x" else []
    if not outputs or all(o.startswith("c") for o in outputs):
        nodes.append(helper.make_node("Add", ["x", values[-1]], ["final"], name="final"))
        outputs = ["final"]
    graph = helper.make_graph(
        nodes,
        "random",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [2, 3]) for o in outputs],
        initializer=constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs())
def test_cleanup_is_exact_on_random_graphs(proto):
    model = ir.serde.deserialize_model(proto)
    feeds = {"x": np.random.default_rng(1).uniform(-2, 2, (2, 3)).astype(np.float32)}
    before = outputs_of(model, feeds)
    nodes_before = len(model.graph)
    Pipeline.parse("cleanup").run(model, verify=False)
    assert len(model.graph) <= nodes_before
    assert_same_outputs(before, outputs_of(model, feeds))


def _if_model_with_identity_outputs() -> ir.Model:
    """y = If(c) { then: Identity(outer) } else { Identity(Neg(outer)) }, outer = Relu(x):
    each branch's output is an Identity, the then-branch's of a value from the outer graph."""
    then_branch = helper.make_graph(
        [helper.make_node("Identity", ["outer"], ["then_out"])], "then", [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [2, 3])])
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["outer"], ["negated"]), helper.make_node("Identity", ["negated"], ["else_out"])],
        "else", [], [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [2, 3])])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["outer"]),
         helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        "if_identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_remove_identity_keeps_a_branch_output_made_in_the_outer_graph():
    model = _if_model_with_identity_outputs()
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    before = [outputs_of(model, {"x": x, "c": np.array(flag)}) for flag in (True, False)]
    Pipeline.parse("cleanup").run(model, verify_inputs=[{"x": x, "c": np.array(True)}])
    evaluate.check_model(model)  # the then-branch output must still be made by a node of the branch
    if_node = next(n for n in model.graph if n.op_type == "If")
    then_ops = [n.op_type for n in if_node.attributes["then_branch"].value]
    else_ops = [n.op_type for n in if_node.attributes["else_branch"].value]
    assert then_ops == ["Identity"] and else_ops == ["Neg"]  # the inner Identity went, the outer-value one stayed
    assert "outer" in {v.name for n in model.graph for v in n.outputs}  # the outer value was not renamed
    for flag, expected in zip((True, False), before):
        assert_same_outputs(expected, outputs_of(model, {"x": x, "c": np.array(flag)}))


def guarded_attention(mask_branch: str) -> ir.Model:
    """Softmax(Q·Kᵀ + mask) with torch's NaN guard after it; the mask a Where between 0 and
    `mask_branch` (a finite minimum, or −inf)."""
    low = {"finite": np.finfo(np.float32).min, "-inf": -np.inf}[mask_branch]
    nodes = [
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Where", ["keep", "zero", "low"], ["mask"]),
        helper.make_node("Add", ["scores", "mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("IsNaN", ["probs"], ["nan"]),
        helper.make_node("Where", ["nan", "zero", "probs"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, [2, 4, 8]),
         helper.make_tensor_value_info("kt", TensorProto.FLOAT, [2, 8, 4]),
         helper.make_tensor_value_info("keep", TensorProto.BOOL, [2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 4])],
        [numpy_helper.from_array(np.array(0, np.float32), "zero"), numpy_helper.from_array(np.array(low, np.float32), "low")])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_nan_guards_go_where_the_mask_is_finite():
    model = guarded_attention("finite")
    keep = np.random.default_rng(0).random((2, 4, 4)) > 0.5
    keep[0, 1] = False  # a row with every key masked: uniform with a finite mask, never NaN
    feeds = {"q": np.random.default_rng(1).normal(size=(2, 4, 8)).astype(np.float32),
             "kt": np.random.default_rng(2).normal(size=(2, 8, 4)).astype(np.float32), "keep": keep}
    want = evaluate.run(model, feeds)["y"]
    report = Pipeline.parse("remove-nan-guards").run(model, verify_inputs=[feeds])
    assert report.records[0].stats["NaN guards removed"] == 1
    assert [n.op_type for n in model.graph] == ["MatMul", "Where", "Add", "Softmax"]
    np.testing.assert_array_equal(evaluate.run(model, feeds)["y"], want)
    kept = guarded_attention("-inf")  # there the guard turns the all-masked row's NaN into 0: it stays
    Pipeline.parse("remove-nan-guards").run(kept, verify_inputs=[feeds])
    assert "IsNaN" in [n.op_type for n in kept.graph]


def test_cleanup_removes_minilm_nan_guards(minilm):
    model = minilm.clone()
    Pipeline.parse("cleanup").run(model)  # verified exact against the original
    assert not any(node.op_type == "IsNaN" for node in model.graph)
