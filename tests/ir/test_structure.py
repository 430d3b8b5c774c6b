"""Structure discovery on real models: from name scopes, and from graph patterns alone."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
import pytest

from slimgraph.ir.structure import discover
from tests.conftest import LIGHT_DIR, SMALL_CONFIGS, copy_model


def strip_metadata_and_shapes(model: ir.Model) -> ir.Model:
    """The model as a plain .onnx from elsewhere would be: no name scopes, no value shapes."""
    proto = ir.serde.serialize_model(copy_model(model))
    del proto.graph.value_info[:]
    plain = ir.serde.deserialize_model(proto)
    common.ClearMetadataAndDocStringPass()(plain)
    return plain


def assert_minilm(found, blocks_source: str) -> None:
    assert found.blocks.count == 6 and found.blocks.source == blocks_source
    assert found.vocab_size == 30522
    assert len(found.attention) == 6
    assert {(a.heads, a.head_dim, a.kv_heads) for a in found.attention} == {(12, 32, 12)}
    assert len(found.ffns) == 6
    assert {(f.hidden, f.inner, f.activation, f.gate is None) for f in found.ffns} == {(384, 1536, "gelu", True)}
    assert found.lm_heads == []  # a sentence encoder has no LM head
    assert len(found.linears) == 6 * 6 + 1  # q, k, v, o, up, down per layer + pooler


def test_minilm_from_name_scopes(minilm):
    found = discover(minilm)
    assert found.named_from_scopes
    assert_minilm(found, "name scopes")
    assert found.blocks.prefix == "encoder.layer"
    first = found.attention[0]
    assert first.name == "encoder.layer.0.attention.self"
    assert (first.q.name, first.o.name) == ("encoder.layer.0.attention.self.query", "encoder.layer.0.attention.output.dense")
    assert found.ffns[3].up.name == "encoder.layer.3.intermediate.dense"
    assert found.ffns[3].down.weight == "encoder.layer.3.output.dense.weight"


def test_minilm_from_graph_patterns(minilm):
    found = discover(strip_metadata_and_shapes(minilm))
    assert not found.named_from_scopes
    assert_minilm(found, "attention blocks")
    # names fall back to the initializer names
    assert found.ffns[0].up.name == "encoder.layer.0.intermediate.dense"


@pytest.mark.parametrize("which", ["gpt2", "llama"])
@pytest.mark.parametrize("plain", [False, True], ids=["scopes", "patterns"])
def test_small_transformers(request, which, plain):
    model = request.getfixturevalue(f"{which}_ir")
    found = discover(strip_metadata_and_shapes(model) if plain else model)
    cfg = SMALL_CONFIGS[which]["kwargs"]
    layers = cfg.get("n_layer") or cfg["num_hidden_layers"]
    heads = cfg.get("n_head") or cfg["num_attention_heads"]
    hidden = cfg.get("n_embd") or cfg["hidden_size"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    inner = cfg.get("intermediate_size", 4 * hidden)
    assert found.blocks.count == layers
    assert found.vocab_size == cfg["vocab_size"]
    assert [(a.heads, a.head_dim, a.kv_heads) for a in found.attention] == [(heads, hidden // heads, kv_heads)] * layers
    assert [(f.hidden, f.inner) for f in found.ffns] == [(hidden, inner)] * layers
    assert [h.out_features for h in found.lm_heads] == [cfg["vocab_size"]]
    if which == "llama":
        assert found.attention[0].kv_groups == 2
        assert all(f.gate is not None and f.activation == "silu" for f in found.ffns)
        if not plain:
            assert found.ffns[0].gate.name == "model.layers.0.mlp.gate_proj"
            assert found.ffns[0].up.name == "model.layers.0.mlp.up_proj"
    else:
        assert all(f.gate is None and f.activation == "gelu_tanh" for f in found.ffns)


@pytest.mark.parametrize("name, count", [("light_resnet50", 16), ("light_shufflenet", 13)])
def test_residual_blocks_in_cnns(name, count):
    found = discover(ir.load(LIGHT_DIR / f"{name}.onnx"))
    assert found.blocks.count == count and found.blocks.source == "residual adds"


def test_no_structures_in_a_plain_cnn():
    found = discover(ir.load(LIGHT_DIR / "light_vgg19.onnx"))
    assert found.blocks is None and found.attention == [] and found.ffns == []


@pytest.mark.slow
@pytest.mark.parametrize("which", ["gpt2", "llama"])
@pytest.mark.parametrize("block", [0, 1])
def test_bypassing_a_block_equals_the_model_without_it(request, tmp_path, which, block):
    """Bypass block i through its entry/exit handles == the same model built with that layer left out."""
    import torch
    import transformers

    from slimgraph.frontend import load
    from slimgraph.ir import edit
    from slimgraph.measure import evaluate
    from slimgraph.measure.inputs import sample_inputs

    full = copy_model(request.getfixturevalue(f"{which}_ir"))
    spec = SMALL_CONFIGS[which]
    folder = request.getfixturevalue(f"{which}_folder")
    original = getattr(transformers, spec["cls"]).from_pretrained(folder)
    layers_key = "n_layer" if which == "gpt2" else "num_hidden_layers"
    config = getattr(transformers, spec["config"])(**{**spec["kwargs"], layers_key: spec["kwargs"][layers_key] - 1})
    shorter = getattr(transformers, spec["cls"])(config).eval()
    prefix = "transformer.h." if which == "gpt2" else "model.layers."
    state = {}
    for key, tensor in original.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            if int(index) == block:
                continue
            key = f"{prefix}{int(index) - (int(index) > block)}.{rest}"
        state[key] = tensor
    shorter.load_state_dict(state, strict=True)
    shorter.save_pretrained(tmp_path)
    with torch.no_grad():
        expected_model = load(tmp_path)

    found = discover(full)
    assert len(found.blocks.blocks) == found.blocks.count
    target = found.blocks.blocks[block]
    assert target.name == f"{prefix}{block}"
    edit.bypass(full, target.entry, target.exit)
    feeds = sample_inputs(full, batch=2, sequence=9, seed=5)
    got, want = evaluate.run(full, feeds), evaluate.run(expected_model, feeds)
    for name in want:
        assert np.abs(got[name] - want[name]).max() / np.abs(want[name]).max() < 1e-5, name


def test_resnet_blocks_with_an_identity_shortcut_can_be_bypassed():
    from slimgraph.ir import edit
    from slimgraph.measure import evaluate
    from slimgraph.measure.inputs import sample_inputs

    model = ir.load(LIGHT_DIR / "light_resnet50.onnx")
    found = discover(model)
    # 16 bottlenecks; the first of each of the 4 stages has a projection shortcut
    assert found.blocks.source == "residual adds" and len(found.blocks.blocks) == 12
    block = found.blocks.blocks[1]
    assert block.exit.producer().op_type == "Relu" and block.entry.producer().op_type == "Relu"
    ops = collections.Counter(n.op_type for n in model.graph)
    edit.bypass(model, block.entry, block.exit)
    gone = ops - collections.Counter(n.op_type for n in model.graph)
    assert {op: gone[op] for op in ("Conv", "BatchNormalization", "Relu", "Sum")} == {
        "Conv": 3, "BatchNormalization": 3, "Relu": 3, "Sum": 1}
    assert evaluate.run(model, sample_inputs(model, batch=1))["gpu_0/softmax_1"].shape == (1, 1000)


def test_an_unrolled_lstm_has_no_residual_adds():
    """Two steps of an LSTM cell as the TorchScript exporter unrolls it: W·x + U·h is cut into gates,
    c' = f·c + i·g multiplies gates; neither is a residual block (a CRNN was said to have 55)."""
    from onnx import TensorProto, helper, numpy_helper

    from slimgraph.ir.structure import residual_adds

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), name) for name in ("W", "U")]
    nodes, h, c = [], "h0", "c0"
    for t in range(2):
        nodes += [
            helper.make_node("Gemm", [f"x{t}", "W"], [f"wx{t}"]), helper.make_node("Gemm", [h, "U"], [f"uh{t}"]),
            helper.make_node("Add", [f"wx{t}", f"uh{t}"], [f"gates{t}"]),
            helper.make_node("Split", [f"gates{t}"], [f"i{t}", f"f{t}", f"g{t}", f"o{t}"], axis=1, num_outputs=4),
            *[helper.make_node("Sigmoid", [f"{k}{t}"], [f"{k}s{t}"]) for k in "ifo"],
            helper.make_node("Tanh", [f"g{t}"], [f"gt{t}"]),
            helper.make_node("Mul", [f"fs{t}", c], [f"fc{t}"]), helper.make_node("Mul", [f"is{t}", f"gt{t}"], [f"ig{t}"]),
            helper.make_node("Add", [f"fc{t}", f"ig{t}"], [f"c{t + 1}"]),
            helper.make_node("Tanh", [f"c{t + 1}"], [f"ct{t}"]),
            helper.make_node("Mul", [f"os{t}", f"ct{t}"], [f"h{t + 1}"]),
        ]
        h, c = f"h{t + 1}", f"c{t + 1}"
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8 if n.startswith("x") else 4])
              for n in ("x0", "x1", "h0", "c0")]
    graph = helper.make_graph(nodes, "lstm", inputs, [helper.make_tensor_value_info(h, TensorProto.FLOAT, [1, 4])],
                              initializer=weights)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert residual_adds(model) == []
