"""If, Loop and Scan through the PyTorch backend against ONNX Runtime, including subgraphs that
read outer values and nest, and saved as model.py (a class per subgraph)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import slimgraph
from slimgraph.measure import evaluate
from tests.backends.pytorch.standalone import run_standalone

# If: the branches read an outer value (w) and differ in shape; the then-branch nests a Loop
# that sums x * w over `steps` iterations and keeps every partial sum.
NESTED = """
<ir_version: 8, opset_import: ["" : 17]>
nested (bool flag, float[3] x, int64 steps) => (float[N] y) {
    w = Constant <value = float[3] {1.0, 2.0, 3.0}> ()
    y = If (flag) <
        then_branch = then () => (float[M] loop_y) {
            zero = Constant <value = float[3] {0.0, 0.0, 0.0}> ()
            true_ = Constant <value = bool {1}> ()
            total, partial = Loop (steps, true_, zero) <
                body = body (int64 i, bool c, float[3] acc) => (bool c_out, float[3] acc_out, float[3] seen) {
                    c_out = Identity (c)
                    step = Mul (x, w)
                    acc_out = Add (acc, step)
                    seen = Identity (acc_out)
                }
            >
            loop_y = Flatten <axis = 0> (partial)
        },
        else_branch = other () => (float[K] else_y) {
            else_y = Sub (x, w)
        }
    >
}
"""

# Scan: a running sum over axis 1 read backwards, its outputs stacked along axis 1 in reverse.
SCAN = """
<ir_version: 8, opset_import: ["" : 17]>
scanned (float[2] init, float[2, 5] xs) => (float[2] final, float[2, 5] sums) {
    final, sums = Scan (init, xs) <
        num_scan_inputs = 1, scan_input_axes = [1], scan_input_directions = [1],
        scan_output_axes = [1], scan_output_directions = [1],
        body = body (float[2] state, float[2] x) => (float[2] state_out, float[2] sum_out) {
            state_out = Add (state, x)
            sum_out = Identity (state_out)
        }
    >
}
"""


def _model(text: str) -> ir.Model:
    return ir.serde.deserialize_model(onnx.parser.parse_model(text))


def _assert_matches_onnxruntime(model: ir.Model, feeds: dict) -> None:
    got = slimgraph.compile(model, backend="pytorch")(**feeds)
    for name, want in evaluate.run(model, feeds).items():
        np.testing.assert_allclose(got[name], want, rtol=1e-6)


@pytest.mark.parametrize("flag, steps", [(True, 4), (True, 1), (False, 3)])
def test_if_with_a_nested_loop(flag, steps):
    feeds = {"flag": np.array(flag), "x": np.array([0.5, -1.0, 2.0], np.float32), "steps": np.array(steps)}
    _assert_matches_onnxruntime(_model(NESTED), feeds)


def test_scan_backwards_along_an_axis():
    feeds = {"init": np.array([1.0, -1.0], np.float32), "xs": np.arange(10, dtype=np.float32).reshape(2, 5)}
    _assert_matches_onnxruntime(_model(SCAN), feeds)


def test_saved_subgraphs_run_without_slimgraph(tmp_path):
    model = _model(NESTED)
    folder = slimgraph.compile(model, backend="pytorch").save(tmp_path / "nested")
    source = (folder / "model.py").read_text()
    assert "class Subgraph_then_branch(" in source and "class Subgraph_then_branch_loop_body(" in source
    printed = run_standalone(folder, "(y,) = load()(torch.tensor(True), torch.tensor([0.5, -1.0, 2.0]), "
                                     "torch.tensor(3))\nprint(y.tolist())")
    want = evaluate.run(model, {"flag": np.array(True), "x": np.array([0.5, -1.0, 2.0], np.float32),
                                "steps": np.array(3)})["y"]
    np.testing.assert_allclose(eval(printed), want, rtol=1e-6)


def test_pt2_refuses_control_flow_clearly(tmp_path):
    artifact = slimgraph.compile(_model(NESTED), backend="pytorch")
    with pytest.raises(slimgraph.SlimgraphError, match=r"calls runtime.if_then_else, runtime.loop: save it as a folder"):
        artifact.save(tmp_path / "nested.pt2")
    assert not (tmp_path / "nested.pt2").exists()


# Scan of opset 8: a batch axis, and per-entry sequence lengths (outputs zero past them).
SCAN_8 = """
<ir_version: 4, opset_import: ["" : 8]>
scanned8 (int64[2] lens, float[2, 2] init, float[2, 5, 2] xs) => (float[2, 2] final, float[2, 5, 2] sums) {
    final, sums = Scan (lens, init, xs) <
        num_scan_inputs = 1, directions = [1],
        body = body (float[2] state, float[2] x) => (float[2] state_out, float[2] sum_out) {
            state_out = Add (state, x)
            sum_out = Identity (state_out)
        }
    >
}
"""


def test_scan_of_opset_8_with_sequence_lengths():
    feeds = {"lens": np.array([3, 5]), "init": np.ones((2, 2), np.float32),
             "xs": np.arange(20, dtype=np.float32).reshape(2, 5, 2)}
    _assert_matches_onnxruntime(_model(SCAN_8), feeds)
