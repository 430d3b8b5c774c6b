"""`slimgraph optimize --backend triton`: the folder it writes, the report of what runs as kernels, and
bad input (a path with a suffix, triton missing) as one line and exit 2, before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import slimgraph
from slimgraph.errors import SlimgraphError
from tests.backends.triton.helpers import linear_model


def run_cli(*args: str, prelude: str = "") -> subprocess.CompletedProcess:
    code = f"{prelude}\nimport sys\nfrom slimgraph.cli import main\nsys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow  # (a slimgraph process)
def test_optimize_writes_the_folder_and_reports_the_lowering(mlp_path, tmp_path):
    out = tmp_path / "out"
    done = run_cli("optimize", str(mlp_path), "-p", "cleanup,quantize-weights{bits=4,group_size=16}", "--backend",
                   "triton", "-o", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["kernels.py", "model.py", "model.safetensors"]
    lowering = json.loads(done.stdout)["lowering"]
    assert lowering["triton_nodes"] == {"com.microsoft::MatMulNBits": 2, "Relu": 1, "Add": 1}  # in the epilogues
    assert [k["calls"] for k in lowering["kernels"].values()] == [1, 1]
    text = run_cli("optimize", str(mlp_path), "-p", "cleanup,quantize-weights", "--backend", "triton", "-o",
                   str(tmp_path / "again"))
    assert text.returncode == 0, text.stderr
    flat = " ".join(text.stdout.split())  # wrapped to the terminal's width (80 when not a terminal)
    assert "Triton kernels: 2 launchers, 2 calls, 4 nodes (com.microsoft::MatMulNBits 2, Relu 1, Add 1)" in flat
    assert max(len(line) for line in text.stdout.splitlines()) <= 80


@pytest.mark.slow  # (a slimgraph process)
def test_a_path_with_a_suffix_is_refused_before_loading(mlp_path, tmp_path):
    done = run_cli("optimize", str(mlp_path), "-p", "cleanup", "--backend", "triton", "-o", str(tmp_path / "m.onnx"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "writes a folder" in done.stderr
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow  # (a slimgraph process)
def test_triton_missing_is_one_line(mlp_path, tmp_path):
    done = run_cli("optimize", str(mlp_path), "-p", "cleanup", "--backend", "triton", "-o", str(tmp_path / "out"),
                   prelude="import sys; sys.modules['triton'] = None  # as if it were not installed")
    assert done.returncode == 2
    assert done.stderr.strip() == "slimgraph: error: the triton backend needs triton: pip install 'slimgraph[triton]'"
    assert not (tmp_path / "out").exists()


def test_missing_triton_from_python(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(SlimgraphError, match="needs triton"):
        slimgraph.compile(linear_model(8, 4), backend="triton")


def test_bad_options():
    model = linear_model(32, 8)
    with pytest.raises(SlimgraphError, match="ternary='fast'"):
        slimgraph.compile(model, backend="triton", device="cpu", ternary="fast")
    with pytest.raises(SlimgraphError, match="unknown launch settings GEMV_ROWS"):
        slimgraph.compile(model, backend="triton", device="cpu", launch={"GEMV_ROWS": 2})


def test_kernel_ops_the_templates_do_not_take_are_left_to_pytorch_and_reported():
    """A MatMulNBits with a g_idx input (act-order) runs on the PyTorch lowering, with its results; the
    report says why. (ONNX Runtime is not compared: it reads this g_idx differently from the PyTorch
    lowering, which ignores g_idx.)"""
    import onnx_ir as ir

    from slimgraph.passes import Pipeline

    model = linear_model(64, 24)
    Pipeline.parse("quantize-weights{bits=4,group_size=32}").run(model, verify=False)
    node = next(iter(model.graph))
    g_idx = ir.Value(name="g_idx", const_value=ir.tensor(np.arange(64, dtype=np.int32) // 32))
    model.graph.register_initializer(g_idx)
    node.resize_inputs(5)
    node.replace_input_with(4, g_idx)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)}
    artifact = slimgraph.compile(model, backend="triton", device="cpu")
    assert np.array_equal(artifact(**feeds)["y"], slimgraph.compile(model, backend="pytorch")(**feeds)["y"])
    assert artifact.plan.calls == []
    assert artifact.report.left == [("com.microsoft::MatMulNBits", node.name, "a g_idx input (act-order blocks)")]
    assert f"left to PyTorch: com.microsoft::MatMulNBits {node.name}: a g_idx input" in str(artifact.report)
