"""The scripts a user copies must run."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from slimgraph.measure import evaluate
from slimgraph.passes import Pipeline, load_plugin

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_compose_example(tmp_path):
    out = tmp_path / "minilm.onnx"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "compose.py"), str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "fold-constants" in result.stdout and "last_hidden_state (4, 12, 384)" in result.stdout
    assert out.is_file()


def test_decompose_gelu_example_adds_named_nodes_and_keeps_the_function():
    load_plugin(str(ROOT / "examples" / "decompose_gelu.py"))
    graph = helper.make_graph(
        [helper.make_node("Gelu", ["x"], ["h"], name="act1"), helper.make_node("Gelu", ["h"], ["y"], name="act2")],
        "gelus", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    feeds = {"x": np.linspace(-4, 4, 10, dtype=np.float32).reshape(2, 5)}
    want = evaluate.run(model, feeds)["y"]
    report = Pipeline.parse("decompose-gelu").run(model)  # verified: an exact pass
    assert report.records[0].stats == {"Gelu nodes decomposed": 2}
    assert [n.name for n in model.graph][:2] == ["gelu.act1/Mul_0", "gelu.act1/Erf_1"]
    assert sorted(model.graph.initializers) == ["gelu.half", "gelu.inv_sqrt2", "gelu.one"]  # made once, shared
    np.testing.assert_allclose(evaluate.run(model, feeds)["y"], want, rtol=1e-5, atol=1e-6)
