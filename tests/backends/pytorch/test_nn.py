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
