"""Diff on real pairs: identical after cleanup, one weight changed, renamed graphs, replaced ops."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
import pytest

from slimgraph.measure.diff import Change, WeightChange, diff_models, fold
from slimgraph.passes import Pipeline
from slimgraph.report import render_diff
from tests.conftest import LIGHT_DIR, assert_golden, copy_model, render_text

DIFF_SCHEMA = json.loads(resources.files("slimgraph").joinpath("schemas/diff.schema.json").read_text())


def validate(result) -> dict:
    data = json.loads(json.dumps(result.to_json()))
    jsonschema.validate(data, DIFF_SCHEMA)
    return data


def test_minilm_vs_its_cleaned_copy_is_identical(minilm):
    """What cleanup's graph passes do to a fresh export is nothing (remove-nan-guards aside: it
    removes the guards, below)."""
    after = copy_model(minilm)
    Pipeline.parse("fold-constants,remove-identity,cse,remove-dead-nodes,remove-unused-initializers").run(after)
    result = diff_models(minilm, after, weights=True)
    assert result.identical
    assert result.matched["name"] == result.matched["a_nodes"] == len(minilm.graph)
    assert validate(result)["identical"] is True


def test_cleanup_removes_exactly_the_nan_guards(minilm):
    after = copy_model(minilm)
    Pipeline.parse("cleanup").run(after)
    result = diff_models(minilm, after)
    assert not result.identical
    assert [(c.module, c.kind, c.before) for c in result.changes] == [
        (f"encoder.layer.{i}.attention.self", "removed", "IsNaN + Where") for i in range(6)]


def test_one_changed_weight_is_found_exactly(minilm):
    changed = copy_model(minilm)
    name = "encoder.layer.3.intermediate.dense.weight"
    value = changed.graph.initializers[name]
    value.const_value = ir.tensor(value.const_value.numpy() * 1.01, name=name)
    fingerprinted = diff_models(minilm, changed)  # without weights=True: by fingerprint, no values
    assert not fingerprinted.identical and fingerprinted.changes == [] and fingerprinted.rewired == []
    assert fingerprinted.weights == [WeightChange(name, (384, 1536), "changed")]
    assert fingerprinted.weights_compared == len(minilm.graph.initializers)
    result = diff_models(minilm, changed, weights=True)
    assert not result.identical
    assert [(w.name, w.shape, w.kind) for w in result.weights] == [(name, (384, 1536), "changed")]
    assert result.weights[0].rel_l2 == pytest.approx(0.01, rel=1e-4)
    assert validate(result)["weights"][0]["name"] == name
    assert "differ in 1 tensor (1 changed)" in render_text(render_diff(result))


def test_renamed_resnet_matches_structurally():
    original = ir.load(LIGHT_DIR / "light_resnet50.onnx")
    renamed = original.clone()
    for i, node in enumerate(renamed.graph):
        node.name = f"renamed_{i}"
    result = diff_models(original, renamed)
    assert result.identical
    assert result.matched["name"] == 0
    assert result.matched["signature"] + result.matched["structure"] == len(original.graph)


def test_everything_renamed_still_matches(minilm):
    """No names, no scopes, no initializer names in common: only structure is left."""
    scrambled = copy_model(minilm)
    common.ClearMetadataAndDocStringPass()(scrambled)
    for i, node in enumerate(scrambled.graph):
        node.name = f"n{i}"
    for i, value in enumerate(list(scrambled.graph.initializers.values())):
        value.name = f"w{i}"
    result = diff_models(minilm, scrambled, weights=True)
    assert result.matched["structure"] == len(minilm.graph)
    assert result.identical


def gelu_to_relu(model: ir.Model) -> ir.Model:
    changed = copy_model(model)
    for node in changed.graph:
        if node.op_type == "Gelu":
            node.op_type = "Relu"
            node.attributes.pop("approximate", None)
    return changed


def test_replaced_ops_fold_per_block(minilm):
    result = diff_models(minilm, gelu_to_relu(minilm), a_name="minilm", b_name="minilm-relu")
    folded = result.folded()
    assert folded == [Change("encoder.layer.0–5.intermediate.intermediate_act_fn", "replaced", "Gelu", "Relu", count=6)]
    assert result.op_delta() == {"Gelu": (6, 0), "Relu": (0, 6)}
    assert result.rewired == []  # the down projections read the replacement: not a rewiring
    assert validate(result)["changes"][0]["count"] == 6
    assert_golden("diff_minilm_gelu_relu.txt", render_text(render_diff(result)))


def test_rewired_and_removed_render(mlp_model):
    after = mlp_model.clone()
    Pipeline.parse("cleanup").run(after)
    result = diff_models(mlp_model, after, a_name="mlp.onnx", b_name="mlp-cleanup.onnx")
    kinds = {(c.module, c.kind) for c in result.changes}
    assert {("relu_dup", "removed"), ("identity", "removed"), ("half", "removed")} <= kinds
    assert {c.module for c in result.rewired} == {"fc2", "sum_dup", "one"}
    assert_golden("diff_mlp_cleanup.txt", render_text(render_diff(result)))
    assert_golden("diff_mlp_cleanup_depth0.txt", render_text(render_diff(result, depth=0)))
    removed_only = render_text(render_diff(result, only="removed"))
    assert "removed" in removed_only and "rewired" not in removed_only


def test_changed_attributes_and_io():
    from onnx import TensorProto, helper

    def model(axis: int, out_dim: int):
        graph = helper.make_graph(
            [helper.make_node("Softmax", ["x"], ["y"], name="softmax", axis=axis)],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, out_dim])],
        )
        return ir.serde.deserialize_model(helper.make_model(graph))

    result = diff_models(model(1, 3), model(0, 4))
    assert result.changes == [Change("softmax", "changed", "Softmax", "Softmax", "axis 1 → 0")]
    assert result.outputs == ["output y: float[2×3] → float[2×4]"]


def test_exporter_numbering_folds_like_block_indices():
    changes = [Change(f"/Constant_{i}", "removed", before="Constant") for i in range(1, 20)]
    changes.append(Change("/lstm/cell_3/Constant", "removed", before="Constant"))
    changes.append(Change("/lstm/cell_4/Constant", "removed", before="Constant"))
    assert fold(changes) == [Change("/Constant_1–19", "removed", before="Constant", count=19),
                             Change("/lstm/cell_3–4/Constant", "removed", before="Constant", count=2)]


def test_fold_keeps_distinct_changes_apart():
    changes = [
        Change("layers.0.mlp", "removed", before="Relu"),
        Change("layers.1.mlp", "removed", before="Relu"),
        Change("layers.3.mlp", "removed", before="Relu"),
        Change("layers.2.mlp", "removed", before="Gelu"),
    ]
    assert fold(changes) == [
        Change("layers.{0,1,3}.mlp", "removed", before="Relu", count=3),
        Change("layers.2.mlp", "removed", before="Gelu"),
    ]


def _generated_graphs():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "diff.py"
    spec = importlib.util.spec_from_file_location("bench_diff", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generated


def test_renamed_and_replaced_generated_graph():
    generated = _generated_graphs()
    a, b = generated(200), generated(200, rename=True, replace_every=50)
    result = diff_models(a, b)
    assert result.matched["structure"] == len(a.graph) == 1000
    assert [(c.module, c.kind, c.before, c.after) for c in result.folded()] == [
        (f"r{i}/act", "replaced", "Relu", "Sigmoid") for i in (0, 50, 100, 150)
    ]
    assert result.rewired == []


def test_minilm_vs_int4_names_every_quantized_linear(minilm, tmp_path):
    import slimgraph

    quantized = copy_model(minilm)
    Pipeline.parse("quantize-weights{bits=4,group_size=32}").run(quantized, verify=False)
    slimgraph.save(quantized, tmp_path / "minilm-int4.onnx")  # diff what a user would: the written file
    result = diff_models(minilm, slimgraph.load(tmp_path / "minilm-int4.onnx"), a_name="minilm", b_name="minilm-int4")
    folded = result.folded()
    replaced = {c.module: (c.before, c.after, c.count) for c in folded if c.kind == "replaced"}
    assert len(replaced) == 7  # six linears per block, folded over the 6 layers, plus the pooler
    assert replaced["encoder.layer.0–5.intermediate.dense"] == (
        "MatMul [384×1536 f32] + Add [1536 f32]", "com.microsoft.MatMulNBits [384×1536 int4 g32]", 6)
    assert replaced["pooler.dense"] == ("Gemm [384×384 f32]", "com.microsoft.MatMulNBits [384×384 int4 g32]", 1)
    assert sum(c.count for c in folded if c.kind == "replaced") == 37
    assert [c for c in folded if c.kind != "replaced"] == [] and result.rewired == []
    assert result.op_delta()["com.microsoft.MatMulNBits"] == (0, 37)
    # every quantized matrix is a replaced weight: packed codes, scales and zero points
    assert len(result.weights) == 37 and {w.kind for w in result.weights} == {"replaced"}
    query = next(w for w in result.weights if w.name == "encoder.layer.0.attention.self.query.weight")
    assert query.detail == "f32[384×384] → u8[384×12×16] + f32[384×12] + u8[384×6]"
    validate(result)
    assert_golden("diff_minilm_int4.txt", render_text(render_diff(result)))


def test_weights_flag_never_calls_replaced_matrices_equal(mlp_model):
    """`--weights` on int8-replaced matrices: they differ (replaced), whatever the values flag."""
    quantized = copy_model(mlp_model)
    Pipeline.parse("quantize-weights{bits=8,group_size=16}").run(quantized, verify=False)
    for values in (False, True):
        result = diff_models(mlp_model, quantized, weights=values)
        replaced = {w.name: w.detail for w in result.weights if w.kind == "replaced"}
        assert replaced == {"fc1.weight": "f32[8×16] → u8[16×1×16] + f32[16×1] + u8[16×1]",
                            "fc2.weight": "f32[16×4] → u8[4×1×16] + f32[4×1] + u8[4×1]"}
        assert "equal" not in render_text(render_diff(result)).split("weights", 1)[1].split("\n")[0]


def test_removed_and_added_initializers_differ():
    a = ir.serde.deserialize_model(__import__("tests.conftest", fromlist=["make_mlp"]).make_mlp())
    b = copy_model(a)
    del b.graph.initializers["unused"]
    extra = ir.Value(name="extra", const_value=ir.tensor(np.ones(2, np.float32), name="extra"))
    b.graph.register_initializer(extra)
    result = diff_models(a, b)
    assert {(w.name, w.kind, w.detail) for w in result.weights} == {("unused", "removed", "f32[3]"),
                                                                   ("extra", "added", "f32[2]")}
    assert result.changes == [] and not result.identical
    assert repr(result).startswith("<DiffResult A → B: different: 2 weights differ;")


def test_names_and_attributes_beyond_ascii(mlp_model):
    """Structural matching hashes node labels as ASCII; a PaddleOCR model's `×` broke it (fuzzing)."""
    a, b = copy_model(mlp_model), copy_model(mlp_model)
    for model in (a, b):
        for node in model.graph:
            node.name = f"{node.name}·3×3"
            node.attributes["kernel"] = ir.AttrString("kernel", "3×3")  # as a label: only attributes count
    for node in b.graph:
        node.name = f"renamed {node.name}"
    result = diff_models(a, b)
    assert not any(c.kind in ("added", "removed") for c in result.changes)
