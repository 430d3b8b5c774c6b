"""The fusion pass (which nodes become one kernel) and the fused kernels' numerics against ONNX Runtime
and the PyTorch backend: every op the fusion writes, norms, the rule that keeps a group legal."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from slimgraph.backends.triton import fusion
from slimgraph.ir.graph import ensure_shapes
from tests.backends.triton.helpers import GPU_SETTINGS, assert_matches

D = 50  # not a power of two: the row kernels mask their last lanes


def _graph(nodes, initializers=(), opset: int = 20, outputs=("y",)) -> ir.Model:
    graph = helper.make_graph(
        nodes, "fused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", D]),
                         helper.make_tensor_value_info("r", TensorProto.FLOAT, ["batch", "sequence", D])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs], list(initializers))
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def _vector(name: str, seed: int) -> TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT, (D,), np.random.default_rng(seed).uniform(0.5, 1.5, D)
                              .astype(np.float32))


def _scalar(name: str, value: float) -> TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT, (), [value])


def _feeds() -> dict:
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((2, 3, D)).astype(np.float32),
            "r": rng.standard_normal((2, 3, D)).astype(np.float32)}


def _calls(artifact) -> list[list[str]]:
    return [[n.op_type for n in call.nodes] for call in artifact.plan.calls]


def test_rms_norm_with_residual_is_one_kernel_with_two_outputs():
    """h = x + r; y = w · h / sqrt(mean(h²) + ε), as the exporter writes RMSNorm; h is read after it (by a Softmax) too."""
    nodes = [helper.make_node("Add", ["x", "r"], ["h"]), helper.make_node("Pow", ["h", "two"], ["h2"]),
             helper.make_node("ReduceMean", ["h2", "last"], ["mean"], keepdims=1),
             helper.make_node("Add", ["mean", "eps"], ["var"]), helper.make_node("Sqrt", ["var"], ["std"]),
             helper.make_node("Reciprocal", ["std"], ["inv"]), helper.make_node("Mul", ["h", "inv"], ["normed"]),
             helper.make_node("Mul", ["weight", "normed"], ["y"]), helper.make_node("Softmax", ["h"], ["later"], axis=-1)]
    initializers = [_scalar("two", 2.0), helper.make_tensor("last", TensorProto.INT64, (1,), [-1]),
                    _scalar("eps", 1e-6), _vector("weight", 1)]
    model = _graph(nodes, initializers, outputs=("y", "later"))
    artifact = assert_matches(model, _feeds(), launch=GPU_SETTINGS)
    assert _calls(artifact) == [["Add", "Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Mul", "Mul"]]
    assert [v.name for v in artifact.plan.calls[0].outputs] == ["h", "y"]


@pytest.mark.parametrize("opset, node, inputs", [
    (17, helper.make_node("LayerNormalization", ["h", "weight", "bias"], ["y"], epsilon=1e-5), ["weight", "bias"]),
    (17, helper.make_node("LayerNormalization", ["h", "weight"], ["y"], axis=-1), ["weight"]),
    (23, helper.make_node("RMSNormalization", ["h", "weight"], ["y"], epsilon=1e-6), ["weight"]),
    (17, helper.make_node("ReduceSum", ["h", "last"], ["y"], keepdims=1), []),
], ids=["layernorm", "layernorm-no-bias", "rmsnorm", "reducesum"])
def test_norms(opset, node, inputs):
    initializers = [_vector("weight", 1), _vector("bias", 2), helper.make_tensor("last", TensorProto.INT64, (1,), [-1])]
    model = _graph([helper.make_node("Add", ["x", "r"], ["h"]), node], initializers, opset=opset)
    artifact = assert_matches(model, _feeds())
    assert _calls(artifact) == [["Add", node.op_type]]


ELEMENTWISE = [
    helper.make_node("Gelu", ["a"], ["b"]), helper.make_node("Gelu", ["a"], ["b"], approximate="tanh"),
    helper.make_node("LeakyRelu", ["a"], ["b"], alpha=0.2), helper.make_node("Clip", ["a", "low", "high"], ["b"]),
    helper.make_node("Tanh", ["a"], ["b"]), helper.make_node("Erf", ["a"], ["b"]), helper.make_node("Exp", ["a"], ["b"]),
    helper.make_node("Neg", ["a"], ["b"]), helper.make_node("Relu", ["a"], ["b"]), helper.make_node("Sigmoid", ["a"], ["b"]),
    helper.make_node("Max", ["a", "r"], ["b"]), helper.make_node("Min", ["a", "r"], ["b"]),
    helper.make_node("Sub", ["a", "weight"], ["b"]), helper.make_node("Div", ["a", "weight"], ["b"]),
    helper.make_node("Pow", ["a", "three"], ["b"]), helper.make_node("Cast", ["a"], ["b"], to=TensorProto.FLOAT),
]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # (masked lanes past D: 0 / 0)
@pytest.mark.parametrize("node", ELEMENTWISE, ids=lambda n: n.op_type + "".join(
    f"-{a.name}" for a in n.attribute if a.name != "to"))
def test_elementwise_ops(node):
    """x · w → op → + r → abs-free square root chain: each op of the table inside a fused kernel."""
    nodes = [helper.make_node("Mul", ["x", "weight"], ["a"]), node, helper.make_node("Add", ["b", "r"], ["c"]),
             helper.make_node("Mul", ["c", "c"], ["c2"]), helper.make_node("Add", ["c2", "one"], ["c3"]),
             helper.make_node("Pow", ["c3", "half"], ["y"])]
    initializers = [_vector("weight", 3), _scalar("low", -0.5), _scalar("high", 0.7), _scalar("three", 3.0),
                    _scalar("one", 1.0), _scalar("half", 0.5)]
    model = _graph(nodes, initializers)
    artifact = assert_matches(model, _feeds())
    assert len(artifact.plan.calls) == 1 and len(artifact.plan.calls[0].nodes) == 6


def test_a_value_read_before_the_group_ends_splits_it():
    """t = x + r is read by a Softmax (not fusable) before Mul(t, s) would end the group: the Mul cannot
    join (the kernel would run after the Softmax that needs t), so it stays out."""
    nodes = [helper.make_node("Add", ["x", "r"], ["t"]), helper.make_node("Exp", ["t"], ["e"]),
             helper.make_node("Softmax", ["t"], ["s"], axis=-1), helper.make_node("Mul", ["e", "s"], ["y"])]
    model = _graph(nodes)
    ensure_shapes(model)
    groups = fusion.find_fusion_groups(model.graph)
    assert [[n.op_type for n in g.nodes] for g in groups] == [["Add", "Exp"], ["Mul"]]
    artifact = assert_matches(model, _feeds())
    assert _calls(artifact) == [["Add", "Exp"]]  # (a lone Mul gains nothing as a kernel)


def test_shapes_that_do_not_broadcast_as_rows_stay_out():
    """A [2, 1, D] tensor against [batch, sequence, D] rows: not a row, a vector or a scalar."""
    odd = helper.make_tensor("odd", TensorProto.FLOAT, (2, 1, D), np.arange(2 * D, dtype=np.float32))
    nodes = [helper.make_node("Add", ["x", "r"], ["t"]), helper.make_node("Mul", ["t", "odd"], ["u"]),
             helper.make_node("Relu", ["u"], ["y"])]
    artifact = assert_matches(_graph(nodes, [odd]), _feeds())
    assert all("Mul" not in ops for ops in _calls(artifact))


def test_fuse_false_keeps_only_the_kernel_ops():
    nodes = [helper.make_node("Add", ["x", "r"], ["t"]), helper.make_node("Relu", ["t"], ["y"])]
    artifact = assert_matches(_graph(nodes), _feeds(), fuse=False)
    assert artifact.plan.calls == []


def test_epilogue_inputs_keep_clear_of_the_matmul_kernels_names():
    """MatMul → Relu → Add(post.bias): the chain becomes the int4 kernel's epilogue, its vector input
    renamed (the kernel has a `bias` of its own)."""
    from slimgraph.passes import Pipeline

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
         helper.make_node("Add", ["a", "post.bias"], ["y"])], "epilogue",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 24])],
        [helper.make_tensor("w", TensorProto.FLOAT, (32, 24), rng.standard_normal(32 * 24).astype(np.float32)),
         helper.make_tensor("post.bias", TensorProto.FLOAT, (24,), rng.standard_normal(24).astype(np.float32))])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    Pipeline.parse("quantize-weights{bits=4,group_size=16}").run(model, verify=False)
    for rows in (1, 3):
        artifact = assert_matches(model, {"x": rng.standard_normal((rows, 32)).astype(np.float32)})
    (call,) = artifact.plan.calls
    assert call.spec.epilogue.ops == "Relu → Add" and "bias" not in call.spec.epilogue.parameters
