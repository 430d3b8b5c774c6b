"""quantize-dynamic (W8A8) on MiniLM, against onnxruntime's quantize_dynamic on the same sentences."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnxruntime.quantization import quantize_dynamic

import slimgraph
from slimgraph.passes import Pipeline
from slimgraph.passes.quantize.dynamic import quantize_int8_symmetric
from tests.conftest import copy_model


@pytest.mark.slow
def test_fidelity_floor_and_no_worse_than_onnxruntime(minilm, sentence_eval, tmp_path):
    ours = copy_model(minilm)
    report = Pipeline.parse("quantize-dynamic").run(ours, sentence_eval.context())
    assert report.after.op_histogram["MatMulInteger"] == 37
    assert report.after.op_histogram["DynamicQuantizeLinear"] == 25  # q, k, v share one
    ours_cos = sentence_eval.cosines(ours).mean()
    assert ours_cos >= 0.99

    source = tmp_path / "minilm.onnx"
    slimgraph.save(minilm, source)
    quantize_dynamic(str(source), str(tmp_path / "ort.onnx"), per_channel=True)
    ort_cos = sentence_eval.cosines(ir.load(tmp_path / "ort.onnx")).mean()
    assert ours_cos >= ort_cos - 1e-4  # the most faithful onnxruntime setting


def test_per_tensor_is_less_faithful(minilm, sentence_eval):
    per_tensor = copy_model(minilm)
    Pipeline.parse("quantize-dynamic{per_channel=false}").run(per_tensor, sentence_eval.context())
    per_channel = copy_model(minilm)
    Pipeline.parse("quantize-dynamic").run(per_channel, sentence_eval.context())
    assert sentence_eval.cosines(per_tensor).mean() < sentence_eval.cosines(per_channel).mean()


def test_int8_symmetric_codes():
    weight = np.array([[1.0, -0.5], [-2.0, 0.25]], np.float32)
    codes, scale = quantize_int8_symmetric(weight, per_channel=True)
    np.testing.assert_allclose(scale, [2.0 / 127, 0.5 / 127])
    np.testing.assert_array_equal(codes, [[64, -127], [-127, 64]])
    codes, scale = quantize_int8_symmetric(np.zeros((2, 2), np.float32), per_channel=False)
    assert scale.tolist() == [1.0] and not codes.any()
