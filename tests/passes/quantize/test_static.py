"""quantize-static (int8 QDQ) on a small CNN made here, and on a real detector from a wheel against
onnxruntime's quantize_static with the same calibration images."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimgraph.errors import SlimgraphError
from slimgraph.measure import evaluate
from slimgraph.passes import PassContext, Pipeline
from slimgraph.passes.quantize.ranges import activation_ranges, uint8_params


def small_cnn(seed: int = 0) -> ir.Model:
    """x → Conv(b) → Relu → Conv(W) → Conv(W, the same weight) → Add(residual) → MaxPool → GAP → Flatten → Gemm."""
    rng = np.random.default_rng(seed)

    def weight(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    inits = [weight("w1", 8, 3, 3, 3), weight("b1", 8), weight("w2", 8, 8, 3, 3), weight("b2", 8),
             weight("b3", 8), weight("fc", 10, 8), weight("fc_b", 10)]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c2", "w2", "b3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c3", "r1"], ["s"], name="residual"),
        helper.make_node("MaxPool", ["s"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["p"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc", "fc_b"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(proto)


def feeds(count: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.random((1, 3, 16, 16), dtype=np.float32)} for _ in range(count)]


def quantized(text: str = "quantize-static", target: str = "cpu-vnni", model: ir.Model | None = None):
    from slimgraph.measure.target import parse

    model = model or small_cnn()
    report = Pipeline.parse(text).run(model, PassContext(target=parse(target)), calib=feeds(16))
    return model, report


def ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def test_rewrite_keeps_the_cnn_within_int8_error_and_onnxruntime_fuses_it(tmp_path):
    model, report = quantized()
    stats = report.records[0].stats
    assert stats["ops quantized"] == "Conv 3, Add 1, MaxPool 1, GlobalAveragePool 1, Flatten 1, Gemm 1"
    assert stats["Relu/Clip folded"] == 1 and "Relu" not in ops(model)
    assert report.fidelity.cosine >= 0.999  # held out: the last 4 of the 16 feeds
    # every quantized tensor reads one scale, every Conv and the Gemm their int8 weight and int32 bias
    int8 = [v for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.INT8 and v.shape.rank()
            > 1]
    assert sorted(v.name for v in int8) == ["fc.int8", "w1.int8", "w2.int8"]  # w2, read twice, quantized once
    assert not any(v.const_value.dtype == ir.DataType.FLOAT and v.shape.rank() > 1
                   for v in model.graph.initializers.values())
    # ONNX Runtime fuses the groups into its integer kernels (the bias at x_scale · w_scale is what lets it)
    options = evaluate.session_options()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    evaluate.make_session(model, options=options)
    fused = [node.op_type for node in onnx.load(tmp_path / "optimized.onnx").graph.node]
    assert fused.count("QLinearConv") == 3 and "Conv" not in fused
    assert "QGemm" in fused and "QLinearAdd" in fused


def test_bias_is_int32_at_the_input_scale_times_the_weight_scale():
    model, _ = quantized()
    conv = next(node for node in model.graph if node.op_type == "Conv" and node.name == "conv2")
    x_scale = conv.inputs[0].producer().inputs[1].const_value.numpy()
    w_scale = conv.inputs[1].producer().inputs[1].const_value.numpy()
    bias = conv.inputs[2].producer()
    assert bias.inputs[0].const_value.dtype == ir.DataType.INT32
    np.testing.assert_allclose(bias.inputs[1].const_value.numpy(), x_scale * w_scale, rtol=1e-6)
    assert w_scale.shape == (8,)  # per output channel


def test_relu_is_folded_exactly_into_the_saturation_at_zero():
    """The folded Conv's output range starts at 0, so its uint8 zero point is 0: what the Relu cut off
    saturates to 0 in QuantizeLinear."""
    model, _ = quantized()
    conv1 = next(node for node in model.graph if node.name == "conv1")
    q = next(user for user, _ in conv1.outputs[0].uses())
    assert q.op_type == "QuantizeLinear" and q.inputs[2].const_value.numpy() == 0


def test_avx2_target_uses_7_bit_weights():
    model, report = quantized(target="cpu-avx2")
    assert report.records[0].stats["weights"] == "s8-reduced per channel"
    codes = model.graph.initializers["w1.int8"].const_value.numpy()
    assert np.abs(codes).max() == 63


def test_exclude_keeps_a_node_float_and_an_unmatched_glob_is_an_error():
    model, report = quantized("quantize-static{exclude=[conv3]}")
    conv3 = next(node for node in model.graph if node.name == "conv3")
    assert conv3.inputs[1].const_value is not None  # its float weight, read directly
    assert conv3.inputs[0].producer().op_type != "DequantizeLinear"
    with pytest.raises(SlimgraphError, match="exclude=nothing-like-this matches no node"):
        quantized("quantize-static{exclude=[nothing-like-this]}")


def _with_batch_norm(model: ir.Model) -> ir.Model:
    """`small_cnn` with a BatchNormalization after conv1, as paddle2onnx and onnx-caffe2 leave them."""
    proto = ir.serde.serialize_model(model)
    rng = np.random.default_rng(5)
    params = [rng.uniform(0.5, 1.5, 8), rng.standard_normal(8) * 0.1, rng.standard_normal(8) * 0.1,
              rng.uniform(0.5, 1.5, 8)]
    proto.graph.initializer.extend(numpy_helper.from_array(p.astype(np.float32), f"bn_{i}") for i, p in enumerate(params))
    proto.graph.node[0].output[0] = "c1_raw"  # conv1
    proto.graph.node.insert(1, helper.make_node("BatchNormalization", ["c1_raw"] + [f"bn_{i}" for i in range(4)],
                                                ["c1"], name="bn1"))
    return ir.serde.deserialize_model(proto)


def test_batch_norm_is_folded_into_its_conv_first_and_the_layer_keeps_its_name(tmp_path):
    """Unfolded, a BatchNormalization runs in float between the Conv's Q → DQ and the next one's, and
    ONNX Runtime cannot fold it any more (orientation, PP-LCNet: int8 0.6x the fp32 speed)."""
    model, report = quantized(model=_with_batch_norm(small_cnn()))
    assert report.records[0].stats["BatchNormalization folded"] == 1
    assert "BatchNormalization" not in ops(model)
    assert report.fidelity.cosine >= 0.999
    options = evaluate.session_options()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    evaluate.make_session(model, options=options)
    assert [node.op_type for node in onnx.load(tmp_path / "optimized.onnx").graph.node].count("QLinearConv") == 3
    # with nothing left to quantize, the fold is still reported: the model did change
    _, report = quantized("quantize-static{ops=[Softmax]}", model=_with_batch_norm(small_cnn()))
    assert report.records[0].modified and report.records[0].stats["BatchNormalization folded"] == 1
    # the folded Conv is still `conv1`: exclude finds it
    model, _ = quantized("quantize-static{exclude=[conv1]}", model=_with_batch_norm(small_cnn()))
    conv1 = next(node for node in model.graph if node.name == "conv1")
    assert conv1.inputs[0].name == "x" and conv1.inputs[1].const_value is not None


@pytest.mark.parametrize("method", ["percentile", "mse", "entropy"])
def test_histogram_methods_run_and_stay_faithful(method):
    _, report = quantized(f"quantize-static{{method={method}}}")
    assert report.fidelity.cosine >= 0.995
    assert report.records[0].stats["ranges"] == f"{method} over 12 samples"


def test_a_mask_filled_with_huge_values_stays_float():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    mask = helper.make_tensor_value_info("mask", TensorProto.FLOAT, [2, 4])
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "mask"], ["s"]),
             helper.make_node("Softmax", ["s"], ["p"]), helper.make_node("MatMul", ["p", "w"], ["y"])]
    graph = helper.make_graph(nodes, "masked", [x, mask], [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                       [2, 4])], [w])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((2, 4), dtype=np.float32),
              "mask": np.where(rng.random((2, 4)) < 0.3, np.float32(-3.4e38), np.float32(0))} for _ in range(8)]
    report = Pipeline.parse("quantize-static").run(model, calib=calib)
    assert "mask" in report.records[0].stats["left float (range beyond ±1e+06)"]
    assert report.fidelity.cosine >= 0.99


def test_nothing_to_quantize_says_so_once():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    report = Pipeline.parse("quantize-static").run(model)
    assert not report.records[0].modified
    assert len(report.warnings) == 1 and "nothing to quantize" in report.warnings[0]


def test_an_old_opset_is_upgraded_for_per_channel_scales():
    model = small_cnn()
    model.opset_imports[""] = 11
    Pipeline.parse("quantize-static").run(model, calib=feeds(8))
    assert model.opset_imports[""] >= 13
    assert any(node.attributes.get_int("axis", None) == 0 for node in model.graph if node.op_type == "DequantizeLinear")


def test_pytorch_backend_runs_the_qdq_graph_as_onnxruntime_does():
    import slimgraph

    model, _ = quantized()
    feed = feeds(1, seed=9)[0]
    expected = evaluate.run(model, feed)["y"]
    got = slimgraph.compile(model, backend="pytorch")(**feed)["y"]
    # fake quantization in float against ONNX Runtime's integer kernels: they differ by requantization rounding
    cosine = float(np.dot(expected.ravel(), got.ravel()) / np.linalg.norm(expected) / np.linalg.norm(got))
    assert cosine >= 0.9999


def test_option_errors_name_the_option():
    with pytest.raises(SlimgraphError, match=r"method=kl is not a valid minmax\|percentile\|mse\|entropy"):
        Pipeline.parse("quantize-static{method=kl}")
    with pytest.raises(SlimgraphError, match="ops=Tanh is not an op it quantizes"):
        Pipeline.parse("quantize-static{ops=[Conv,Tanh]}")


def test_ranges():
    rng = np.random.default_rng(0)
    values = [{"t": rng.standard_normal(20000).astype(np.float32)} for _ in range(3)]
    low, high = activation_ranges(iter(values), "minmax")["t"]
    assert (low, high) == (min(v["t"].min() for v in values), max(v["t"].max() for v in values))
    for method in ("percentile", "mse", "entropy"):
        lo, hi = activation_ranges(iter(values), method, 99.9, again=iter(values))["t"]
        assert low <= lo < 0 < hi <= high and hi - lo < high - low, method
    scale, zero_point = uint8_params(-1.0, 3.0)
    assert scale == np.float32(4 / 255) and zero_point == 64
    assert uint8_params(0.0, 0.0) == (1.0, 0)  # a tensor that is always 0


@pytest.mark.slow
def test_real_detector_from_a_wheel_is_as_faithful_as_onnxruntime_quantize_static(tmp_path):
    """nudenet's YOLOv8n (exported by ultralytics, not here), calibrated on 15 photos from scikit-image and
    measured on the 5 others, against ONNX Runtime's own quantize_static (QDQ, per channel) on the same images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from slimgraph.frontend.images import load_images, split_spec
    from tests.frontend.test_images import photo_folder
    from tests.zoo.test_real_models import _path

    source = _path("nudenet-320n")
    folder, preprocess = split_spec(f"{photo_folder(tmp_path / 'photos')}/{{size=[320,320]}}")
    model = ir.load(source)
    images, _ = load_images(folder, preprocess, model)
    calib, held_out = images[:15], images[15:]
    report = Pipeline.parse("quantize-static").run(model, calib=calib, verify_inputs=held_out)
    assert report.fidelity.cosine >= 0.99

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(calib)

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(source), str(tmp_path / "ort.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    original, theirs = ir.load(source), ir.load(tmp_path / "ort.onnx")
    from slimgraph.measure.fidelity import compare

    reference = evaluate.run_all(original, held_out)
    ours_cos = compare(reference, evaluate.run_all(model, held_out)).cosine
    ort_cos = compare(reference, evaluate.run_all(theirs, held_out)).cosine
    assert ours_cos >= ort_cos - 1e-3


def test_a_model_another_tool_quantized_is_left_as_it_is():
    """A QDQ model (here slimgraph's own output) gets no second Q/DQ pair: one warning says why."""
    model, _ = quantized()
    nodes = len(list(model.graph))
    report = Pipeline.parse("quantize-static").run(model, calib=feeds(8))
    assert not report.records[0].modified and len(list(model.graph)) == nodes
    assert "quantized already" in report.warnings[0]


def test_weights_made_by_constant_of_shape_are_quantized():
    """onnx's zoo files hold their weights as ConstantOfShape outputs."""
    model = small_cnn()
    w1 = model.graph.initializers["w1"]
    shape = ir.Value(name="w1_shape", const_value=ir.tensor(np.array(w1.shape.numpy(), np.int64)))
    model.graph.register_initializer(shape)
    fill = ir.node("ConstantOfShape", [shape], attributes={"value": ir.tensor(np.array([0.05], np.float32))})
    model.graph.insert_before(next(iter(model.graph)), fill)
    conv1 = next(node for node in model.graph if node.name == "conv1")
    conv1.replace_input_with(1, fill.outputs[0])
    Pipeline.parse("quantize-static").run(model, calib=feeds(8))
    assert conv1.inputs[1].producer().op_type == "DequantizeLinear"
    assert conv1.inputs[1].producer().inputs[0].const_value.numpy().max() == 127


def test_split_outputs_share_its_input_scale_and_shape_reads_the_codes():
    """YOLOv8's C2f blocks: Conv → Split → Convs, and Shape nodes reading conv outputs."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in (("w0", (8, 3, 3, 3)), ("wa", (4, 4, 3, 3)), ("wb", (4, 4, 3, 3)))]
    inits.append(numpy_helper.from_array(np.array([4, 4], np.int64), "halves"))
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Shape", ["c"], ["c_shape"], name="shape"),
             helper.make_node("Split", ["c", "halves"], ["a", "b"], name="split", axis=1),
             helper.make_node("Conv", ["a", "wa"], ["ya"], name="conva", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["b", "wb"], ["yb"], name="convb", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["ya", "yb"], ["y"], name="add")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16]),
               helper.make_tensor_value_info("c_shape", TensorProto.INT64, [4])]
    graph = helper.make_graph(nodes, "split", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                             [1, 3, 16, 16])], outputs, inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    report = Pipeline.parse("quantize-static").run(model, calib=feeds(8))
    assert report.fidelity.cosine >= 0.999
    split = next(node for node in model.graph if node.op_type == "Split")
    source_scale = split.inputs[0].producer().inputs[1]
    for out in split.outputs:
        (q, _), = out.uses()
        assert q.op_type == "QuantizeLinear" and q.inputs[1] is source_scale
    shape = next(node for node in model.graph if node.op_type == "Shape")
    assert shape.inputs[0].producer().op_type == "QuantizeLinear"
