"""quantize-weights on com.microsoft.MoE → QMoE: ONNX Runtime computes MoE on the dequantized experts,
the PyTorch backend computes the same, and MoEs it cannot rewrite are said why."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import slimgraph
from slimgraph.ir.graph import constant_tensor
from slimgraph.ir.nbits import unpack
from slimgraph.measure import evaluate
from slimgraph.passes import PassContext, Pipeline
from slimgraph.passes.quantize.experts import MS_DOMAIN
from tests.conftest import copy_model
from tests.passes.moe.models import feeds, ffn_model


def moe_model(gated: bool, inner: int = 128) -> ir.Model:
    model = ffn_model(gated=gated, bias=True, activation="silu", hidden=32, inner=inner)
    Pipeline.parse("moe-convert{experts=4,top_k=2,shared=0,emit=onnxruntime}").run(
        model, PassContext(inputs=feeds(hidden=32), inputs_source="test feeds"), verify=False)
    assert [n.op_type for n in model.graph if n.op_type in ("MoE", "QMoE")] == ["MoE"]
    return model


def dequantize_experts(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int
                       ) -> np.ndarray:
    """A QMoE's expert weights as float32 [E, out, in], from ORT's layout, written apart from the pass:
    codes [E, out, in·bits/8] low bits first, scales [E, out, blocks], zero points packed along the
    blocks (None: the implicit 2^(bits-1))."""
    experts, out, _ = codes.shape
    scales = scales.reshape(experts, out, -1).astype(np.float32)
    blocks = unpack(codes, bits).astype(np.float32).reshape(experts, out, scales.shape[2], -1)
    if zero_points is None:
        offsets = np.float32(1 << (bits - 1))
    else:
        offsets = unpack(zero_points, bits)[:, :, : scales.shape[2], None].astype(np.float32)
    return ((blocks - offsets) * scales[:, :, :, None]).reshape(experts, out, -1)


def as_float_moe(model: ir.Model) -> ir.Model:
    """The QMoE node back as MoE over its dequantized experts: what the quantized model should compute."""
    model = copy_model(model)
    (node,) = [n for n in model.graph if n.op_type == "QMoE"]
    bits = node.attributes.get_int("expert_weight_bits")
    inputs = list(node.inputs) + [None] * (13 - len(node.inputs))

    def weights(codes: int, scales: int, zero_points: int) -> ir.Value:
        array = dequantize_experts(*(constant_tensor(inputs[i]).numpy() for i in (codes, scales)),
                                   None if inputs[zero_points] is None else constant_tensor(inputs[zero_points]).numpy(),
                                   bits)
        return ir.Value(name=f"{inputs[codes].name}.float", const_value=ir.tensor(array))

    fc1, fc2 = weights(2, 3, 11), weights(5, 6, 12)
    for value in (fc1, fc2):
        model.graph.register_initializer(value)
    moe_inputs = [inputs[0], inputs[1], fc1, inputs[4], fc2, inputs[7]]
    while moe_inputs[-1] is None:
        moe_inputs.pop()
    keep = {k: a for k, a in node.attributes.items() if k not in ("expert_weight_bits", "block_size", "accuracy_level")}
    moe = ir.node("MoE", moe_inputs, attributes=keep, domain=MS_DOMAIN)
    model.graph.insert_before(node, moe)
    ir.convenience.replace_all_uses_with(node.outputs[0], moe.outputs[0], replace_graph_outputs=True)
    moe.outputs[0].name, node.outputs[0].name = node.outputs[0].name, None
    model.graph.remove(node, safe=True)
    return model


def run(model: ir.Model) -> np.ndarray:
    session = evaluate.make_session(model)
    return np.concatenate([evaluate.run(session, f)["y"] for f in feeds(hidden=32)])


@pytest.mark.parametrize("gated", [True, False], ids=["swiglu", "silu"])
@pytest.mark.parametrize("bits, symmetric, inner", [(4, False, 128), (4, True, 128), (2, False, 128), (4, False, 120)],
                         ids=["int4", "int4-sym", "int2", "int4-padded"])
def test_qmoe_computes_moe_on_the_dequantized_experts(gated, bits, symmetric, inner):
    """inner 120: experts of 30 neurons, each grown by 2 zero neurons to two groups of 16."""
    model = moe_model(gated, inner)
    want_float = run(model)
    before = evaluate.initializer_bytes(model)
    report = Pipeline.parse(f"quantize-weights{{bits={bits},group_size=16,symmetric={str(symmetric).lower()}}}").run(
        model, verify=False)
    assert report.records[0].stats["MoE quantized"] == 1
    (node,) = [n for n in model.graph if n.op_type in ("MoE", "QMoE")]
    assert node.op_type == "QMoE" and (len(node.inputs) > 11) == (not symmetric)
    assert evaluate.initializer_bytes(model) < before / 3
    got, want = run(model), run(as_float_moe(model))
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
    assert np.linalg.norm(got - want_float) < (0.2 if bits == 4 else 0.7) * np.linalg.norm(want_float)  # not garbage


def test_the_pytorch_backend_runs_a_qmoe_as_onnx_runtime_does():
    model = moe_model(gated=True)
    Pipeline.parse("quantize-weights{bits=4,group_size=16}").run(model, verify=False)
    module = slimgraph.compile(model, backend="pytorch")
    for f in feeds(hidden=32):
        want = evaluate.run(model, f)["y"]
        np.testing.assert_allclose(module(**f)["y"], want, atol=1e-5 * np.abs(want).max())


def test_an_moe_whose_hidden_size_is_not_whole_groups_is_left_and_said_why():
    model = moe_model(gated=False)  # hidden 32: not a multiple of 64
    report = Pipeline.parse("quantize-weights{bits=4,group_size=64,exclude=[mlp.router*]}").run(model, verify=False)
    assert [n.op_type for n in model.graph if n.op_type in ("MoE", "QMoE")] == ["MoE"]
    assert "hidden size 32 is not a multiple of group_size 64" in report.records[0].warnings[0]


def test_flops_inspect_and_diff_read_a_qmoe_as_its_moe():
    from slimgraph.ir.structure import discover
    from slimgraph.measure.diff import diff_models
    from slimgraph.measure.stats import model_stats

    model = moe_model(gated=True)
    quantized = copy_model(model)
    Pipeline.parse("quantize-weights{bits=4,group_size=16}").run(quantized, verify=False)
    assert model_stats(quantized).flops == model_stats(model).flops
    (before,), (after,) = discover(model).moes, discover(quantized).moes
    assert (after.form, after.experts, after.top_k, after.hidden, after.expert_inner) == (
        "com.microsoft.QMoE", before.experts, before.top_k, before.hidden, before.expert_inner)
    replaced = [c for c in diff_models(model, quantized).changes if "QMoE" in (c.after or "")]
    assert replaced and "com.microsoft.QMoE [4×(32→32) top-2 swiglu int4 g16]" in replaced[0].after


def test_exclude_matches_an_moe_by_its_node_name():
    model = moe_model(gated=True)
    (node,) = [n for n in model.graph if n.op_type == "MoE"]
    report = Pipeline.parse(f"quantize-weights{{bits=4,group_size=16,exclude=[{node.name}]}}").run(model, verify=False)
    assert [n.op_type for n in model.graph if n.op_type in ("MoE", "QMoE")] == ["MoE"]
    assert report.records[0].stats["skipped"] == 1
