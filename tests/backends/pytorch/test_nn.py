"""Convolution-family lowerings on random cases beyond the conformance suite."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from slimgraph.backends.pytorch import PyTorchArtifact


def test_deform_conv_with_groups_strides_dilations_padding_and_mask():
    n, channels, out_channels, height, width, k = 2, 4, 6, 9, 8, 3
    strides, dilations, pads = [2, 1], [1, 2], [1, 2, 0, 1]
    oh = (height + pads[0] + pads[2] - ((k - 1) * dilations[0] + 1)) // strides[0] + 1
    ow = (width + pads[1] + pads[3] - ((k - 1) * dilations[1] + 1)) // strides[1] + 1
    shapes = {"x": [n, channels, height, width], "w": [out_channels, channels // 2, k, k], "offset":
              [n, 2 * 2 * k * k, oh, ow], "b": [out_channels], "mask": [n, 2 * k * k, oh, ow]}
    rng = np.random.default_rng(0)
    feeds = {name: rng.normal(size=shape).astype(np.float32) * (2.0 if name == "offset" else 1.0)
             for name, shape in shapes.items()}
    node = helper.make_node("DeformConv", list(shapes), ["y"], group=2, offset_group=2, strides=strides,
                            dilations=dilations, pads=pads, kernel_shape=[k, k])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
                                            for name, shape in shapes.items()],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)])
    (want,) = ReferenceEvaluator(proto).run(None, feeds)
    got = PyTorchArtifact(ir.serde.deserialize_model(proto))(**feeds)["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_col2im_in_two_and_three_dimensions_with_uneven_pads():
    rng = np.random.default_rng(1)
    for image, block, pads, strides, dilations in [([7, 6], [2, 3], [1, 0, 2, 1], [2, 1], [1, 2]),
                                                    ([5, 4, 6], [2, 2, 3], [0, 1, 1, 1, 0, 2], [1, 2, 1], [2, 1, 1])]:
        padded = [i + pads[d] + pads[d + len(image)] for d, i in enumerate(image)]
        blocks = int(np.prod([(p - (d * (b - 1) + 1)) // s + 1
                              for p, b, d, s in zip(padded, block, dilations, strides)]))
        x = rng.normal(size=(2, 3 * int(np.prod(block)), blocks)).astype(np.float32)
        node = helper.make_node("Col2Im", ["x", "image", "block"], ["y"], pads=pads, strides=strides,
                                dilations=dilations)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [helper.make_tensor("image", TensorProto.INT64, [len(image)], image),
                                   helper.make_tensor("block", TensorProto.INT64, [len(block)], block)])
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        (want,) = ReferenceEvaluator(proto).run(None, {"x": x})
        got = PyTorchArtifact(ir.serde.deserialize_model(proto))(x=x)["y"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fused_conv_as_onnxruntime_computes_it():
    """com.microsoft.FusedConv, which ONNX Runtime's optimizer writes into saved files (the corpus's
    marblenet-vad): every activation, with a bias and the Z input added before it."""
    from slimgraph.measure import evaluate

    rng = np.random.default_rng(2)
    x, w, b, z = (rng.normal(size=s).astype(np.float32) for s in ([2, 4, 9, 9], [6, 2, 3, 3], [6], [2, 6, 5, 9]))
    for activation, params in [("Relu", []), ("Tanh", []), ("Sigmoid", []), ("LeakyRelu", [0.2]),
                               ("Clip", [-0.5, 0.7]), ("HardSigmoid", [0.3, 0.4])]:
        node = helper.make_node("FusedConv", ["x", "w", "b", "z"], ["y"], domain="com.microsoft", group=2,
                                strides=[2, 1], pads=[1, 1, 1, 1], activation=activation,
                                **({"activation_params": params} if params else {}))
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, a.shape)
                                                for n, a in (("x", x), ("z", z))],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel()),
                                   helper.make_tensor("b", TensorProto.FLOAT, b.shape, b)])
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        model = ir.serde.deserialize_model(proto)
        want = evaluate.run(model, {"x": x, "z": z})["y"]
        got = PyTorchArtifact(model)(x=x, z=z)["y"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=activation)
