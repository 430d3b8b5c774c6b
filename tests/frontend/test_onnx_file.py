"""`.onnx` files: opsets 9 and up, external data, and clear errors for bad files."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from slimgraph.api import save
from slimgraph.errors import SlimgraphError
from slimgraph.frontend import load
from slimgraph.ir import evaluate
from slimgraph.ir.inputs import sample_inputs
from tests.conftest import LIGHT_MODELS, make_mlp


@pytest.mark.parametrize("path", LIGHT_MODELS, ids=lambda p: p.stem)
def test_model_zoo_loads_and_runs(path):
    model = load(path)
    assert model.opset_imports[""] == 9
    outputs = evaluate.run(model, sample_inputs(model))
    assert all(np.isfinite(v).all() for v in outputs.values())


def test_external_data_round_trip(tmp_path):
    model = load(make_mlp(tmp_path / "mlp.onnx") and tmp_path / "mlp.onnx")
    out = tmp_path / "ext" / "mlp.onnx"
    save(model, out, external_data=True)
    assert (tmp_path / "ext" / "mlp.onnx.data").stat().st_size > 0
    again = load(out)
    feeds = sample_inputs(model)
    np.testing.assert_array_equal(evaluate.run(again, feeds)["y"], evaluate.run(model, feeds)["y"])


def _bytes(path):
    return path.read_bytes()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"\x8f\x02not a protobuf at all\xff\xfe" * 7, "not a valid ONNX model"),
        ("truncated", "not a valid ONNX model"),
    ],
)
def test_bad_files(tmp_path, mlp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(_bytes(mlp_path)[: len(_bytes(mlp_path)) // 2] if content == "truncated" else content)
    with pytest.raises(SlimgraphError, match=message):
        load(path)


def test_missing_and_truncated_external_data(tmp_path, mlp_model):
    out = tmp_path / "m.onnx"
    save(mlp_model, out, external_data=True)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:10])
    with pytest.raises(SlimgraphError, match="external data file 'm.onnx.data' is truncated"):
        load(out)
    data.unlink()
    with pytest.raises(SlimgraphError, match="external data file 'm.onnx.data' is missing"):
        load(out)


def test_too_old_opset(tmp_path):
    proto = make_mlp(redundant=False)
    proto.opset_import[0].version = 7
    path = tmp_path / "old.onnx"
    onnx.save(proto, path)
    with pytest.raises(SlimgraphError, match="uses opset 7; slimgraph reads opset 9 and newer"):
        load(path)


@pytest.mark.parametrize("name, message", [("nope.onnx", "no such file"), ("model.tflite", "unsupported file type '.tflite'")])
def test_missing_or_unsupported(tmp_path, name, message):
    if name.endswith(".tflite"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(SlimgraphError, match=message):
        load(tmp_path / name)


def test_unsupported_object():
    with pytest.raises(SlimgraphError, match="cannot load a int"):
        load(3)
