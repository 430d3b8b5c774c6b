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


@pytest.mark.parametrize("target, fmt, dtype, low, high", [
    ("cpu-vnni", "s8", np.int8, -127, 127),
    ("cpu-avx2", "s8-reduced", np.int8, -63, 63),  # U8S8 pair sums must fit int16 without VNNI
    ("cpu", "s8", np.int8, -127, 127),
])
def test_weight_format_follows_the_target(mlp_model, target, fmt, dtype, low, high):
    from slimgraph.measure.target import parse
    from slimgraph.passes import PassContext

    model = copy_model(mlp_model)
    report = Pipeline.parse("quantize-dynamic").run(model, PassContext(target=parse(target)))
    assert report.records[0].stats["weights"] == f"{fmt} per channel"
    assert report.target.startswith(target) and report.to_json()["target"] == report.target
    codes = [v.const_value.numpy() for v in model.graph.initializers.values() if v.name.endswith(".int8")]
    assert codes and all(c.dtype == dtype and c.min() >= low and c.max() <= high for c in codes)
    assert max(int(np.abs(c).max()) for c in codes) == high  # the whole range is used


def test_uint8_weights_hold_the_same_levels(mlp_model):
    s8, u8 = copy_model(mlp_model), copy_model(mlp_model)
    Pipeline.parse("quantize-dynamic{weights=s8}").run(s8)
    Pipeline.parse("quantize-dynamic{weights=u8}").run(u8)
    signed = {k[:-len(".int8")]: v.const_value.numpy() for k, v in s8.graph.initializers.items() if k.endswith(".int8")}
    unsigned = {k[:-len(".uint8")]: v.const_value.numpy() for k, v in u8.graph.initializers.items()
                if k.endswith(".uint8")}
    assert signed.keys() == unsigned.keys()
    for name in signed:
        np.testing.assert_array_equal(unsigned[name].astype(np.int16) - 128, signed[name])
