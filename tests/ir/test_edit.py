"""The editing layer: weights in their graph layout, tensors replaced (never written into), regions."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimgraph.errors import SlimgraphError
from slimgraph.ir import edit
from slimgraph.ir.graph import module_path
from slimgraph.ir.meta import NAME_SCOPES_KEY
from slimgraph.ir.structure import find_linears
from slimgraph.measure import evaluate
from tests.conftest import LIGHT_DIR, copy_model

RNG = np.random.default_rng(0)


def linear_model(layout: str, k: int = 4, n: int = 3) -> ir.Model:
    """x[2, K] → one linear (weight W [K, N] in the given layout) → y[2, N]; plus a table
    (for the tied layout) that an embedding Gather also reads."""
    w = RNG.standard_normal((k, n)).astype(np.float32)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])]
    if layout == "matmul":
        inits = [numpy_helper.from_array(w, "fc.weight")]
        nodes = [helper.make_node("MatMul", ["x", "fc.weight"], ["y"], name="fc")]
    elif layout == "gemm":
        inits = [numpy_helper.from_array(w.T.copy(), "fc.weight"), numpy_helper.from_array(np.ones(n, np.float32), "fc.bias")]
        nodes = [helper.make_node("Gemm", ["x", "fc.weight", "fc.bias"], ["y"], name="fc", transB=1)]
    else:  # tied: the head reads the embedding table [N, K] through Transpose
        inits = [numpy_helper.from_array(w.T.copy(), "table")]
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, [2]))
        outputs.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, k]))
        nodes = [helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
                 helper.make_node("MatMul", ["x", "table_t"], ["y"], name="head"),
                 helper.make_node("Gather", ["table", "ids"], ["e"], name="embed")]
    graph = helper.make_graph(nodes, "linear", inputs, outputs, initializer=inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("layout", ["matmul", "gemm", "tied"])
def test_weight_matrix_round_trips_in_every_layout(layout):
    model = linear_model(layout)
    feeds = {"x": RNG.standard_normal((2, 4)).astype(np.float32), "ids": np.array([0, 2])}
    before = evaluate.run(model, feeds)
    (linear,) = find_linears(model)
    w = edit.weight_matrix(linear)
    assert w.shape == (4, 3) and w.dtype == np.float32
    np.testing.assert_allclose(before["y"] - (1.0 if layout == "gemm" else 0.0), feeds["x"] @ w, rtol=1e-5)
    edit.set_weight_matrix(model, linear, 2 * w)
    after = evaluate.run(model, feeds)
    np.testing.assert_allclose(after["y"] - (1.0 if layout == "gemm" else 0.0), feeds["x"] @ (2 * w), rtol=1e-5)
    if layout == "tied":  # the embedding keeps its table: the head got its own weight
        np.testing.assert_array_equal(after["e"], before["e"])
        assert [n.op_type for n in model.graph] == ["MatMul", "Gather"]


def test_edits_never_write_into_shared_or_memory_mapped_tensors(tmp_path):
    model = linear_model("matmul", k=64, n=48)  # large enough to be stored as external data
    path = tmp_path / "m.onnx"
    ir.save(model, path, external_data="m.onnx.data")
    digest = hashlib.sha256((tmp_path / "m.onnx.data").read_bytes()).hexdigest()
    loaded = ir.load(path)  # weights memory-mapped from m.onnx.data
    reference = copy_model(loaded)  # shares the tensors, as a pipeline's reference model does
    original = loaded.graph.initializers["fc.weight"].const_value
    assert isinstance(original, ir.ExternalTensor)
    snapshot = original.numpy().copy()
    (linear,) = find_linears(loaded)
    edit.set_weight_matrix(loaded, linear, np.zeros((64, 48), np.float32))
    edit.take(loaded, loaded.graph.initializers["fc.weight"], 1, [0, 2])
    np.testing.assert_array_equal(original.numpy(), snapshot)
    np.testing.assert_array_equal(reference.graph.initializers["fc.weight"].const_value.numpy(), snapshot)
    assert hashlib.sha256((tmp_path / "m.onnx.data").read_bytes()).hexdigest() == digest
    assert loaded.graph.initializers["fc.weight"].const_value.shape == (64, 2)


def test_take_keeps_a_constant_of_shape_weight_compact():
    model = ir.load(LIGHT_DIR / "light_resnet50.onnx")
    conv = next(n for n in model.graph if n.op_type == "Conv")
    shape = edit.constant_shape(conv.inputs[1])
    edit.take(model, conv.inputs[1], 0, range(shape[0] // 2))
    assert conv.inputs[1].producer().op_type == "ConstantOfShape"
    assert edit.constant_shape(conv.inputs[1]) == (shape[0] // 2, *shape[1:])
    w = edit.conv_weight(conv)
    edit.set_conv_weight(model, conv, w * 2)  # materialized: an initializer now
    assert conv.inputs[1].is_initializer() and edit.conv_weight(conv).shape == w.shape
    with pytest.raises(SlimgraphError, match="rank 2"):
        edit.set_conv_weight(model, conv, w[:, :, 0, 0])


def test_replace_region_carries_the_module_path_and_output_name(mlp_model):
    fc1 = next(n for n in mlp_model.graph if n.name == "fc1")
    fc1.metadata_props[NAME_SCOPES_KEY] = "['', 'fc1', 'aten::linear']"  # as the exporter writes it
    (linear, _) = find_linears(mlp_model)
    x = linear.node.inputs[0]
    w = edit.add_initializer(mlp_model, "fc1.weight", edit.weight_matrix(linear))
    assert w.name == "fc1.weight.2"  # readable and unique
    gemm = ir.node("Gemm", [x, w, mlp_model.graph.initializers["fc1.bias"]])
    edit.replace_linear(mlp_model, linear, [gemm], gemm.outputs[0])
    assert module_path(gemm) == "fc1"
    assert [n.op_type for n in mlp_model.graph][:2] == ["Gemm", "Relu"]
    assert "fc1.weight" not in mlp_model.graph.initializers  # the replaced weight went with its node


def test_insert_after_and_bypass(mlp_model):
    feeds = {"x": RNG.standard_normal((3, 8)).astype(np.float32)}
    before = evaluate.run(mlp_model, feeds)["y"]
    y = mlp_model.graph.outputs[0]
    double = ir.node("Mul", [y, edit.add_initializer(mlp_model, "two", np.array(2.0, np.float32))])
    edit.insert_after(mlp_model, y, [double], double.outputs[0])
    assert mlp_model.graph.outputs[0].name == "y"
    np.testing.assert_allclose(evaluate.run(mlp_model, feeds)["y"], 2 * before, rtol=1e-6)
    relu = next(n for n in mlp_model.graph if n.name == "relu")
    edit.bypass(mlp_model, relu.inputs[0], relu.outputs[0])
    assert "relu" not in {n.name for n in mlp_model.graph}
    onnx.checker.check_model(ir.serde.serialize_model(mlp_model))


def test_builder_names_nodes_in_scopes_and_makes_each_constant_once(mlp_model):
    y = mlp_model.graph.outputs[0]
    build = edit.Builder(mlp_model, "head", name_scopes=["", "head"])
    with build.scope("experts.0"):
        two = build.constant("two", 2.0)
        assert build.constant("two", 2.0) is two  # the same name and value: made once
        assert build.constant("two", 3.0) is not two  # another value: another constant
        scaled = build.op("Mul", [y, two])
    out = build.op("Identity", [scaled], name="kept")
    nodes = build.take()
    assert build.take() == [] and [n.name for n in nodes] == ["head.experts.0/Mul_0", "kept"]
    assert nodes[0].metadata_props[NAME_SCOPES_KEY] == repr(["", "head", "head.experts", "head.experts.0",
                                                             "head.experts.0/Mul_0"])
    assert two.name == "head.two" and two.const_value.dtype == ir.DataType.FLOAT  # a float: a float32 scalar
    assert [v.name for v in mlp_model.graph.initializers.values()][-2:] == ["head.two", "head.two.2"]
    assert build.constant("axes", [0, 1]).const_value.numpy().dtype == np.int64  # a list: an int64 vector
    edit.insert_after(mlp_model, y, nodes, out)
    feeds = {"x": RNG.standard_normal((3, 8)).astype(np.float32)}
    assert mlp_model.graph.outputs[0].name == "y"
    onnx.checker.check_model(ir.serde.serialize_model(mlp_model))
    assert evaluate.run(mlp_model, feeds)["y"].shape == (3, 4)


def test_builder_templates_and_copies(mlp_model):
    relu = next(n for n in mlp_model.graph if n.name == "relu")
    build = edit.Builder(mlp_model, "a", node_names="{scope}_map_{n}", constant_names="{scope}.map_{name}",
                         copy_names="{name}_copy{n}", first=1, metadata={"note": "made"})
    first = build.op("Relu", [relu.inputs[0]])
    copied = build.copy(relu, [first])
    assert [n.name for n in build.nodes] == ["a_map_1", "relu_copy2"]
    assert copied.producer().op_type == "Relu" and copied.producer().metadata_props["note"] == "made"
    assert build.constant("k", 1.0).name == "a.map_k"


def test_redirect_and_insert_before(mlp_model):
    relu = next(n for n in mlp_model.graph if n.name == "relu")
    h1 = relu.inputs[0]
    users = [(node, i) for node, i in h1.uses() if node is relu]
    build = edit.Builder(mlp_model, "clip")
    clipped = build.op("Clip", [h1, build.constant("low", 0.0)])
    edit.insert_before(mlp_model, relu, build.take())
    edit.redirect(users, clipped)
    assert relu.inputs[0] is clipped and any(node.name == "relu_dup" for node, _ in h1.uses())  # the others stay
    nodes = list(mlp_model.graph)
    assert nodes.index(clipped.producer()) == nodes.index(relu) - 1
    onnx.checker.check_model(ir.serde.serialize_model(mlp_model))


def test_unique_name_takes_a_model_a_set_or_a_predicate(mlp_model):
    assert edit.unique_name(mlp_model, "fc1.weight") == "fc1.weight.2"
    assert edit.unique_name(mlp_model, "h1") == "h1.2"  # node outputs are taken too
    assert edit.unique_name({"x", "x_2"}, "x", sep="_") == "x_3"
    assert edit.unique_name(lambda name: name < "x_5", "x", sep="_") == "x_5"
    assert edit.unique_name(set(), "x", sep="_", start=4) == "x_4"


def test_remove_unused_initializers_says_what_it_removed(mlp_model):
    assert edit.remove_unused_initializers(mlp_model) == ["unused"]
    assert edit.remove_unused_initializers(mlp_model) == []
