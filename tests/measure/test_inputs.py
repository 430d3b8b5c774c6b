import numpy as np
import onnx
import onnx_ir as ir
import pytest

from slimgraph.errors import SlimgraphError
from slimgraph.measure import evaluate
from slimgraph.measure.inputs import model_inputs, sample_inputs


def test_token_inputs_are_valid(minilm):
    feeds = sample_inputs(minilm, batch=3, sequence=7)
    assert set(feeds) == {"input_ids", "token_type_ids", "attention_mask"}
    assert feeds["input_ids"].shape == (3, 7) and feeds["input_ids"].dtype == np.int64
    assert 0 <= feeds["input_ids"].min() and feeds["input_ids"].max() < 30522
    assert (feeds["attention_mask"] == 1).all()
    assert (feeds["token_type_ids"] == 0).all()


def test_float_inputs_and_fixed_dims(mlp_model):
    feeds = sample_inputs(mlp_model, batch=5)
    assert feeds["x"].shape == (5, 8) and feeds["x"].dtype == np.float32
    again = sample_inputs(mlp_model, batch=5)
    np.testing.assert_array_equal(feeds["x"], again["x"])  # seeded


def test_model_inputs_prefers_real_examples(minilm, mlp_model):
    feeds, source = model_inputs(minilm)
    assert source.startswith("tokenizer")
    assert feeds[0]["input_ids"][0, 0] == 101  # [CLS]
    feeds, source = model_inputs(mlp_model)
    assert source == "synthesized" and len(feeds) == 2


def _model(text: str) -> ir.Model:
    return ir.serde.deserialize_model(onnx.parser.parse_model(text))


def test_minus_one_dims_are_open_axes():
    """Older exporters write -1 for "any length" (dim_value -1): sized like a symbolic axis."""
    proto = onnx.parser.parse_model("""
        <ir_version: 7, opset_import: ["" : 11]>
        g (float[N, 3, H, W] x) => (float[N, 3, H, W] y) { y = Relu (x) }""")
    for dim in proto.graph.input[0].type.tensor_type.shape.dim[::2]:  # N and H: -1; W stays symbolic
        dim.dim_value = -1
    model = ir.serde.deserialize_model(proto)
    feeds = sample_inputs(model, batch=2, sequence=7, spatial=32)
    assert feeds["x"].shape == (2, 3, 32, 32)
    feeds, source = model_inputs(model)
    assert source == "synthesized" and [f["x"].shape for f in feeds] == [(1, 3, 64, 64), (2, 3, 64, 64)]


def test_axes_sharing_a_name_share_a_length_and_state_is_zero():
    model = _model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[B, T] audio, float[2, B, 8] state, int64 sr, float[B, T] gain) => (float[B, T] y) {
            y = Mul (audio, gain)
        }""")
    feeds = sample_inputs(model, batch=3, sequence=5)
    assert feeds["audio"].shape == feeds["gain"].shape == (3, 5)
    assert feeds["state"].shape == (2, 3, 8) and not feeds["state"].any()
    assert feeds["sr"].shape == () and int(feeds["sr"]) == 16000


# An image model that takes only multiples of 96 (pooled by 96, upsampled back and added, as
# feature pyramids do with 32), and an audio model that needs more than 64 samples (reflection
# padding, as Silero VAD's STFT).
STRIDED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, H, W] x) => (float[N, 3, H, W] y) <float[4] scales = {1.0, 1.0, 96.0, 96.0}> {
    pooled = MaxPool <kernel_shape = [96, 96], strides = [96, 96]> (x)
    up = Resize <mode = "nearest"> (pooled, , scales)
    y = Add (x, up)
}
"""
AUDIO = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[B, T] audio, int64 sr) => (float[B, S] y) <int64[4] pads = {0, 64, 0, 64}> {
    y = Pad <mode = "reflect"> (audio, pads)
}
"""


def test_model_inputs_try_shapes_until_the_model_runs():
    strided = _model(STRIDED)
    feeds, _ = model_inputs(strided)
    assert [f["x"].shape for f in feeds] == [(1, 3, 96, 96), (2, 3, 96, 96)]
    evaluate.run_all(strided, feeds)
    audio = _model(AUDIO)
    feeds, _ = model_inputs(audio)
    assert feeds[0]["audio"].shape[1] > 64 and int(feeds[0]["sr"]) == 16000
    evaluate.run_all(audio, feeds)


def test_a_model_that_refuses_every_shape_gets_a_hint(tmp_path):
    """Nothing runs: the inputs come back anyway (passes that need none still work with
    --no-verify), and the verifier's error says how to pass inputs."""
    from slimgraph.passes import Pipeline

    model = _model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, K] x) => (float[N, 5] y) { y = MatMul (x, w) }""")
    model.graph.initializers["w"] = w = ir.Value(name="w", const_value=ir.tensor(np.ones((7777, 5), np.float32)))
    model.graph.inputs.append(w)
    model.graph[0].replace_input_with(1, w)
    feeds, source = model_inputs(model)
    assert source == "synthesized" and len(feeds) == 2
    with pytest.raises(SlimgraphError, match=r"--calib inputs\.npz .* --no-verify"):
        Pipeline.parse("cleanup").run(model)
    Pipeline.parse("cleanup").run(model, verify=False)


def test_sizes_that_empty_an_activation_are_never_run():
    """A 32-pixel side through five 3×3 stride-2 poolings leaves an empty axis, which some ONNX
    Runtime kernels divide by (SIGFPE: the whole process stops); such sizes are skipped before running."""
    from onnx import TensorProto, helper

    from slimgraph.measure.inputs import _empties_an_activation, _outline, model_inputs

    pools = [helper.make_node("MaxPool", [f"p{i}"], [f"p{i + 1}"], kernel_shape=[3, 1], strides=[2, 1])
             for i in range(5)]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["p0"]), *pools, helper.make_node("Flatten", ["p5"], ["y"])], "pool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, "height", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    outline = _outline(model)
    assert _empties_an_activation(outline, {"x": np.zeros((1, 1, 32, 8), np.float32)})
    assert not _empties_an_activation(outline, {"x": np.zeros((1, 1, 64, 8), np.float32)})
    feeds, _ = model_inputs(model)
    assert feeds[0]["x"].shape[2] >= 64


def test_an_input_of_undefined_type_is_a_clear_error():
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.UNDEFINED, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(SlimgraphError, match="element type UNDEFINED, which cannot be synthesized"):
        sample_inputs(model)
