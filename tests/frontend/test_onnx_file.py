"""`.onnx` files: opsets 9 and up, external data, and clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from slimgraph.api import save
from slimgraph.errors import SlimgraphError
from slimgraph.frontend import load
from slimgraph.measure import evaluate
from slimgraph.measure.inputs import sample_inputs
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


def test_a_valid_file_the_ir_cannot_hold_is_not_called_corrupt():
    """onnxruntime's own logreg_iris.onnx (OnnxMLTools): ZipMap's output is a sequence of maps."""
    import onnxruntime

    path = Path(onnxruntime.__file__).parent / "datasets" / "logreg_iris.onnx"
    onnx.checker.check_model(onnx.load(path))  # valid ONNX
    with pytest.raises(SlimgraphError) as raised:
        load(path)
    assert str(raised.value).endswith("is valid ONNX, but slimgraph's IR (onnx_ir) cannot hold part of it "
                                      "(value 'probabilities'): map types are not supported yet")


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


@pytest.mark.parametrize("opset", [7, 8])
def test_old_opsets_are_upgraded(tmp_path, opset):
    """Opset 7/8 files (Upsample with a `scales` attribute, BatchNormalization, MaxPool of
    their time) are converted to opset 9 with the same outputs."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in
               [("w", (4, 2, 3, 3)), ("scale", (4,)), ("bias", (4,)), ("mean", (4,)), ("var", (4,))]]
    weights[-1] = numpy_helper.from_array(np.abs(numpy_helper.to_array(weights[-1])) + 0.5, "var")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["b"]),
         helper.make_node("MaxPool", ["b"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
         helper.make_node("Upsample", ["p"], ["y"], scales=[1.0, 1.0, 2.0, 2.0], mode="nearest")],
        "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 8, 8])]
        # IR version 3: initializers are graph inputs too, as the exporters of the time wrote them
        + [helper.make_tensor_value_info(w.name, TensorProto.FLOAT, list(w.dims)) for w in weights],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])], initializer=weights)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=3)
    path = tmp_path / "old.onnx"
    onnx.save(proto, path)
    feeds = {"x": rng.standard_normal((2, 2, 8, 8)).astype(np.float32)}
    import onnxruntime as ort

    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    model = load(path)
    assert model.opset_imports[""] == 9
    # the weights are constants at IR 3 (ONNX Runtime overrides initializers only from IR 4): written at
    # IR 4, they stay constants, not inputs a feed could override
    assert model.ir_version == 4 and [v.name for v in model.graph.inputs] == ["x"]
    assert "Upsample" in {n.op_type for n in model.graph}  # opset 9's Upsample takes scales as an input
    np.testing.assert_allclose(evaluate.run(model, feeds)["y"], expected, rtol=1e-5, atol=1e-6)
    assert path.read_bytes() == proto.SerializeToString()  # the file is left as it was


@pytest.mark.parametrize("name, message", [("nope.onnx", "no such file"), ("model.tflite", "unsupported file type '.tflite'")])
def test_missing_or_unsupported(tmp_path, name, message):
    if name.endswith(".tflite"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(SlimgraphError, match=message):
        load(tmp_path / name)


def test_unsupported_object():
    with pytest.raises(SlimgraphError, match="cannot load a int"):
        load(3)


def test_minus_one_dims_load_as_unknown(tmp_path):
    """paddle2onnx and early converters write -1 for "any length": loaded as an unnamed symbolic
    axis, so that nothing downstream takes -1 for a length."""
    proto = onnx.parser.parse_model("""
        <ir_version: 7, opset_import: ["" : 11]>
        g (float[N, 3, H, W] x) => (float[N, 3, H, W] y) { y = Relu (x) }""")
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    proto.graph.output[0].type.tensor_type.shape.dim[2].dim_value = -1
    onnx.save(proto, tmp_path / "old.onnx")
    model = load(tmp_path / "old.onnx")
    x, y = model.graph.inputs[0], model.graph.outputs[0]
    assert not isinstance(x.shape[0], int) and x.shape[0].value is None and x.shape[1] == 3
    assert not isinstance(y.shape[2], int)


def test_a_name_that_is_not_utf8_is_refused(tmp_path):
    """Corrupt bytes inside an unused graph input's name (found by fuzzing): one clear error, not a
    crash later when the model is written."""
    proto = make_mlp()
    proto.graph.input.append(onnx.helper.make_tensor_value_info("spare_zzzz", onnx.TensorProto.FLOAT, [2]))
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(proto.SerializeToString().replace(b"spare_zzzz", b"spare_\xf6\xf3\xfc\x18"))
    with pytest.raises(SlimgraphError, match="has a name that is not text"):
        load(path)


@pytest.mark.slow
def test_ir_version_3_model_takes_new_initializers_through_the_cli(tmp_path):
    """onnx's zoo ResNet-50 is IR version 3, where every initializer must be a graph input: the pruned
    model (new initializers) is written at IR 4 and passes the checker through `slimgraph optimize`."""
    import onnx

    from slimgraph.cli import main

    source = Path(onnx.__file__).parent / "backend/test/data/light/light_resnet50.onnx"
    assert onnx.load(source, load_external_data=False).ir_version == 3
    out = tmp_path / "pruned.onnx"
    assert main(["optimize", str(source), "-p", "prune-width{target=channels,ratio=0.5}", "-o", str(out)]) == 0
    written = onnx.load(out)
    assert written.ir_version >= 4
    onnx.checker.check_model(written)
