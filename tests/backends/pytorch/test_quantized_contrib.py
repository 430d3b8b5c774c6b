"""The com.microsoft ops ONNX Runtime's quantizer writes (QLinearAdd/Mul/Sigmoid/LeakyRelu/
Concat/AveragePool/GlobalAveragePool, QGemm; DynamicQuantizeMatMul after ORT's own fusion), made by ORT's
quantize_static / quantize_dynamic from a small float model, against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import slimgraph
from slimgraph.measure import evaluate


def _float_cnn(path, rng) -> None:
    def weight(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    weights = [weight("c1", 8, 3, 3, 3), weight("c2", 8, 8, 1, 1), weight("fc", 16, 10), weight("fc_bias", 10)]
    nodes = [
        helper.make_node("Conv", ["x", "c1"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["a"], ["s"]),
        helper.make_node("Mul", ["a", "s"], ["m"]),
        helper.make_node("Conv", ["m", "c2"], ["b"]),
        helper.make_node("Add", ["m", "b"], ["r"]),
        helper.make_node("LeakyRelu", ["r"], ["l"], alpha=0.1),
        helper.make_node("Concat", ["l", "m"], ["cat"], axis=1),
        helper.make_node("AveragePool", ["cat"], ["pooled"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["pooled"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fc_bias"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


@pytest.mark.parametrize("per_channel", [False, True])
def test_static_quantization_operators(tmp_path, per_channel):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(0)
    _float_cnn(tmp_path / "cnn.onnx", rng)

    class Samples(CalibrationDataReader):
        def __init__(self) -> None:
            self.samples = iter([{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.samples, None)

    # reduce_range: 7-bit weights keep ORT's U8S8 kernel exact on CPUs without VNNI, where its
    # int16 pair sums saturate (ORT 1.32 on AVX2: QLinearConv codes off by up to 34)
    quantize_static(str(tmp_path / "cnn.onnx"), str(tmp_path / "q.onnx"), Samples(), quant_format=QuantFormat.QOperator,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
                    reduce_range=True)
    model = ir.load(tmp_path / "q.onnx")
    contrib = {n.op_type for n in model.graph if n.domain == "com.microsoft"}
    assert contrib == {"QLinearSigmoid", "QLinearMul", "QLinearAdd", "QLinearLeakyRelu", "QLinearConcat",
                       "QLinearAveragePool", "QLinearGlobalAveragePool", "QGemm"}
    output_scale = float(next(n for n in model.graph if n.op_type == "DequantizeLinear").inputs[1].const_value.numpy())
    artifact = slimgraph.compile(model, backend="pytorch")
    for batch in (1, 3):
        feeds = {"x": rng.standard_normal((batch, 3, 8, 8)).astype(np.float32)}
        # the same codes as ORT, but for a value on a .5 rounding boundary: one output step at most
        np.testing.assert_allclose(artifact(**feeds)["y"], evaluate.run(model, feeds)["y"], rtol=0,
                                   atol=output_scale * 1.01)


def test_dynamic_quantize_matmul_as_ort_fuses_it(tmp_path):
    """quantize_dynamic writes DynamicQuantizeLinear + MatMulInteger; ORT fuses them into
    com.microsoft.DynamicQuantizeMatMul (with the bias), and saves that when asked to."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(1)
    weights = [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w"),
               numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "linear.onnx")
    quantize_dynamic(str(tmp_path / "linear.onnx"), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(str(tmp_path / "q.onnx"), options, providers=["CPUExecutionProvider"])
    model = ir.load(tmp_path / "fused.onnx")
    assert [n.op_type for n in model.graph] == ["DynamicQuantizeMatMul"]
    feeds = {"x": rng.standard_normal((4, 16)).astype(np.float32)}
    want = evaluate.run(model, feeds)["y"]
    got = slimgraph.compile(model, backend="pytorch")(**feeds)["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
