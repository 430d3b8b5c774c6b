"""Random ops and training Dropout: the ONNX distributions (their streams cannot match any
other runtime's, so these check the statistics on many draws)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper

from slimgraph.backends.pytorch import PyTorchArtifact

N = 200_000


def _run(node, inputs: dict, input_types: dict, opset: int = 22) -> list[np.ndarray]:
    infos = [helper.make_tensor_value_info(name, input_types[name], list(np.shape(value)))
             for name, value in inputs.items()]
    outputs = [helper.make_tensor_value_info(name, 0, None) for name in node.output]
    graph = helper.make_graph([node], "g", infos, outputs)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))
    return list(PyTorchArtifact(model)(**inputs).values())


def test_training_dropout_scales_what_it_keeps():
    x = np.random.default_rng(0).normal(size=N).astype(np.float32)
    node = helper.make_node("Dropout", ["x", "ratio", "training"], ["y", "mask"])
    y, mask = _run(node, {"x": x, "ratio": np.array(0.3, np.float32), "training": np.array(True)},
                   {"x": TensorProto.FLOAT, "ratio": TensorProto.FLOAT, "training": TensorProto.BOOL})
    np.testing.assert_allclose(y, np.where(mask, x / 0.7, 0), rtol=1e-6)
    assert abs(mask.mean() - 0.7) < 0.01
    y, mask = _run(node, {"x": x, "ratio": np.array(0.3, np.float32), "training": np.array(False)},
                   {"x": TensorProto.FLOAT, "ratio": TensorProto.FLOAT, "training": TensorProto.BOOL})
    np.testing.assert_array_equal(y, x)
    assert mask.all()


def test_bernoulli_and_uniform_like():
    p = np.linspace(0, 1, N).astype(np.float32)
    (drawn,) = _run(helper.make_node("Bernoulli", ["p"], ["y"]), {"p": p}, {"p": TensorProto.FLOAT})
    assert set(np.unique(drawn)) <= {0.0, 1.0}
    assert abs(drawn.mean() - 0.5) < 0.01 and drawn[p == 0].sum() == 0 and drawn[p == 1].all()
    (uniform,) = _run(helper.make_node("RandomUniformLike", ["p"], ["y"], low=-2.0, high=4.0), {"p": p},
                      {"p": TensorProto.FLOAT})
    assert uniform.min() >= -2 and uniform.max() < 4 and abs(uniform.mean() - 1.0) < 0.05


def test_multinomial_frequencies_follow_the_softmax():
    logits = np.log(np.array([[0.1, 0.2, 0.7]], np.float32))
    (samples,) = _run(helper.make_node("Multinomial", ["logits"], ["y"], sample_size=N), {"logits": logits},
                      {"logits": TensorProto.FLOAT})
    np.testing.assert_allclose(np.bincount(samples[0], minlength=3) / N, [0.1, 0.2, 0.7], atol=0.01)
