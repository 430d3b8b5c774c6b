"""Matching adapter modules to the IR (module path, weight name, fingerprint), and the fused weights in
each graph layout, on small handmade graphs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import slimgraph
from slimgraph.errors import SlimgraphError
from slimgraph.measure import evaluate
from slimgraph.passes.adapters.merge import MergeLora, MergeShira

safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="the torch extra installs safetensors")
RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((8, 6), np.float32)  # MatMul layout [in, out]
W2 = RNG.standard_normal((5, 6), np.float32)  # Gemm transB layout [out, in]


def two_linears(names=("w1", "w2"), w1=W1, w2=W2) -> ir.Model:
    """x[2, 8] → MatMul(x, w1) → Gemm(·, w2, transB) → y[2, 5]."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", names[0]], ["h"], name="first"),
         helper.make_node("Gemm", ["h", names[1]], ["y"], name="second", transB=1)],
        "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
        initializer=[numpy_helper.from_array(w1, names[0]), numpy_helper.from_array(w2, names[1])])
    return slimgraph.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def base_file(tmp_path: Path, w1=W1, w2=W2) -> Path:
    """The 'PyTorch' base the adapters were trained on: nn.Linear weights, [out, in]."""
    path = tmp_path / "base.safetensors"
    safetensors_numpy.save_file({"net.a.weight": np.ascontiguousarray(w1.T), "net.b.weight": w2}, path)
    return path


def lora(tmp_path: Path, base: Path | None, shapes=None, name="lora") -> tuple[Path, dict]:
    shapes = shapes or {"net.a": (6, 8), "net.b": (5, 6)}
    tensors = {}
    for module, (out, in_) in shapes.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = RNG.standard_normal((2, in_), np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = RNG.standard_normal((out, 2), np.float32)
    folder = tmp_path / name
    folder.mkdir()
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 3, "base_model_name_or_path": str(base) if base else None}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    safetensors_numpy.save_file(tensors, folder / "adapter_model.safetensors")
    return folder, tensors


def delta(tensors: dict, module: str) -> np.ndarray:
    a, b = (tensors[f"base_model.model.{module}.lora_{x}.weight"] for x in "AB")
    return 1.5 * b @ a  # alpha / r = 3 / 2


def test_fingerprints_find_renamed_weights_in_both_layouts(tmp_path):
    model = two_linears()
    folder, tensors = lora(tmp_path, base_file(tmp_path))
    result = MergeLora(adapter=(str(folder),))(model)
    assert result.stats["modules fused"] == "2 (2 by fingerprint)"
    assert result.stats["fused into"] == "net.a → w1, net.b → w2"
    np.testing.assert_allclose(model.graph.initializers["w1"].const_value.numpy(), W1 + delta(tensors, "net.a").T,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.graph.initializers["w2"].const_value.numpy(), W2 + delta(tensors, "net.b"),
                               rtol=1e-6, atol=1e-6)
    x = RNG.standard_normal((2, 8), np.float32)
    y = evaluate.run(evaluate.make_session(model), {"x": x})["y"]
    np.testing.assert_allclose(y, (x @ (W1 + delta(tensors, "net.a").T)) @ (W2 + delta(tensors, "net.b")).T,
                               rtol=1e-5, atol=1e-5)


def test_names_match_at_a_dot_from_either_end(tmp_path):
    model = two_linears(names=("bert.net.a.weight", "bert.net.b.weight"))
    folder, _ = lora(tmp_path, None)
    result = MergeLora(adapter=(str(folder),))(model)
    assert result.stats["modules fused"] == "2 (2 by weight name)"
    assert result.stats["base weights"].startswith("not available (the adapter names none")


def test_identical_weights_are_ambiguous(tmp_path):
    base = tmp_path / "base.safetensors"
    safetensors_numpy.save_file({"net.a.weight": np.ascontiguousarray(W1.T)}, base)
    model = two_linears(w1=W1, w2=np.ascontiguousarray(W1.T))  # same [out, in] values, other layout
    model.graph.node(1).replace_input_with(0, model.graph.inputs[0])  # (both read x, so both are [6, 8])
    folder, _ = lora(tmp_path, base, shapes={"net.a": (6, 8)})
    with pytest.raises(SlimgraphError, match=r"module 'net.a' matches 2 linears by fingerprint \(w1, w2\): cannot "
                                             "tell which one it adapts"):
        MergeLora(adapter=(str(folder),))(model)


def test_without_names_or_base_the_module_is_named(tmp_path):
    folder, _ = lora(tmp_path, tmp_path / "gone", shapes={"net.a": (6, 8)})
    with pytest.raises(SlimgraphError, match=r"module 'net.a' matches no linear of this model by module path or "
                                             r"weight name; the base weights to match by fingerprint are not "
                                             r"available \('.*gone' is not a local folder; give base=FOLDER"):
        MergeLora(adapter=(str(folder),))(two_linears())
    base = base_file(tmp_path)  # with base=: found
    assert MergeLora(adapter=(str(folder),), base=str(base))(two_linears()).stats["modules fused"] == \
        "1 (1 by fingerprint)"


def test_shape_mismatch_with_the_base(tmp_path):
    folder, _ = lora(tmp_path, None, shapes={"net.a": (6, 9)})
    with pytest.raises(SlimgraphError, match=r"module 'net.a' \(6×9\) does not fit 'net.a' \(6×8 as \[out, in\]\) "
                                             "in this model: shape mismatch with the base"):
        MergeLora(adapter=(str(folder),))(two_linears(names=("net.a.weight", "net.b.weight")))


def test_another_base_is_refused_before_anything_is_written(tmp_path):
    model = two_linears(names=("net.a.weight", "net.b.weight"))
    folder, _ = lora(tmp_path, base_file(tmp_path, w1=W1 + 1))
    before = {n: v.const_value for n, v in model.graph.initializers.items()}
    with pytest.raises(SlimgraphError, match="was trained on another base model: the weight of 'net.a'"):
        MergeLora(adapter=(str(folder),))(model)
    assert {n: v.const_value for n, v in model.graph.initializers.items()} == before


def test_lora_bias_on_a_linear_without_bias_adds_one(tmp_path):
    folder, tensors = lora(tmp_path, None, shapes={"net.b": (5, 6)})
    bias = RNG.standard_normal(5, np.float32)
    tensors["base_model.model.net.b.lora_B.bias"] = bias
    safetensors_numpy.save_file(tensors, folder / "adapter_model.safetensors")
    model = two_linears(names=("net.a.weight", "net.b.weight"))
    MergeLora(adapter=(str(folder),))(model)
    x = RNG.standard_normal((2, 8), np.float32)
    y = evaluate.run(evaluate.make_session(model), {"x": x})["y"]
    np.testing.assert_allclose(y, (x @ W1) @ (W2 + delta(tensors, "net.b")).T + 1.5 * bias, rtol=1e-5, atol=1e-5)


def test_merge_lora_refuses_a_shira_adapter_and_checks_options(tmp_path):
    folder = tmp_path / "shira"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "SHIRA", "r": 1}))
    safetensors_numpy.save_file({"base_model.model.net.a.shira_weight": np.ones(2, np.float32),
                                 "base_model.model.net.a.shira_indices": np.array([[0, 1], [2, 3]], np.int32)},
                                folder / "adapter_model.safetensors")
    with pytest.raises(SlimgraphError, match="is a SHIRA adapter: merge it with merge-shira, not merge-lora"):
        MergeLora(adapter=(str(folder),)).check(two_linears())
    with pytest.raises(SlimgraphError, match="weights= has 1 values for 2 adapters"):
        MergeShira(adapter=(str(folder), str(folder)), weights=(1.0,))
    model = two_linears(names=("net.a.weight", "net.b.weight"))
    MergeShira(adapter=(str(folder),), scale=2.0)(model)
    expected = W1.copy()
    expected[2, 0] += 2.0  # (row 0, col 2) of [out, in] is [2, 0] of the MatMul's [in, out]
    expected[3, 1] += 2.0
    assert np.array_equal(model.graph.initializers["net.a.weight"].const_value.numpy(), expected)
