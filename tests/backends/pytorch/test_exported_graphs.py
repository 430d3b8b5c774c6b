"""Graphs as exporters write them (paddle2onnx, older PyTorch and Keras converters), found on the
real-model corpus (benchmarks/real_models.py): older opsets' semantics, unknown ranks, and
constants the lowerings make, through the backend and its saved model.py, against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

import slimgraph
from slimgraph.measure import evaluate
from tests.backends.pytorch.standalone import run_standalone


def _check(model: ir.Model, feeds: dict, tmp_path=None) -> None:
    artifact = slimgraph.compile(model, backend="pytorch")
    want = evaluate.run(model, feeds)
    got = artifact(**feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
    if tmp_path is not None:
        artifact.save(tmp_path / "saved")
        arguments = ", ".join(f"torch.from_numpy(np.array({feeds[n].tolist()}, dtype=np.{feeds[n].dtype}))"
                              for n in artifact.input_names)
        printed = run_standalone(tmp_path / "saved", f"print(repr(load()({arguments})[0].detach().numpy().tolist()))")
        np.testing.assert_allclose(np.array(eval(printed)), want[artifact.output_names[0]], rtol=1e-5, atol=1e-6)


def test_softmax_and_reduce_mean_of_opset_11_with_an_unknown_rank():
    """paddle2onnx writes Softmax-11 (flatten to 2-D at `axis`) and ReduceMean with `axes` as an
    attribute, on values whose rank shape inference cannot tell (a Reshape to a run-time shape)."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["r"]),
         helper.make_node("Softmax", ["r"], ["s"], axis=-1),
         helper.make_node("ReduceMean", ["s"], ["m"], axes=[-1], keepdims=1),
         helper.make_node("Softmax", ["r"], ["t"], axis=1),
         helper.make_node("Add", ["m", "t"], ["y"])],
        "paddle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 24]),
                   helper.make_tensor_value_info("shape", TensorProto.INT64, ["K"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]))
    from slimgraph.ir.graph import ensure_shapes

    ensure_shapes(model)
    assert model.graph.node(0).outputs[0].shape is None  # a run-time shape of run-time length: rank unknown
    rng = np.random.default_rng(0)
    _check(model, {"x": rng.standard_normal((2, 24)).astype(np.float32), "shape": np.array([2, 3, 8])})


def test_slice_of_opset_9_and_a_reversing_slice_saved(tmp_path):
    """Slice-9 takes starts/ends/axes as attributes; a negative step makes an index tensor while
    building, which the saved code must hold as a buffer (it once wrote `dtype=int64`, undefined)."""
    graph = helper.make_graph(
        [helper.make_node("Slice", ["x"], ["a"], starts=[1], ends=[3], axes=[1])],
        "old_slice", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 2])])
    old = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)]))
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    _check(old, {"x": x})
    reverse = ir.serde.deserialize_model(onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[2, 4] x) => (float[2, 3] y)
            <int64[1] starts = {-1}, int64[1] ends = {0}, int64[1] axes = {1}, int64[1] steps = {-1}> {
            y = Slice (x, starts, ends, axes, steps)
        }"""))
    _check(reverse, {"x": x}, tmp_path)
