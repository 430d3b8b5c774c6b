"""GatherBlockQuantized (quantized embeddings) and com.microsoft.MoE through the Triton kernels
(interpreted) against ONNX Runtime and the PyTorch backend."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from slimgraph.passes import Pipeline
from tests.backends.pytorch.test_moe import EXPERTS, HIDDEN, _moe_model
from tests.backends.triton.helpers import GPU_SETTINGS, assert_matches

ROWS, DIM = 100, 64  # (the pass quantizes tables whose rows are whole blocks)


def _embedding_model() -> ir.Model:
    """ids[batch, sequence] → Gather(table[100, 64]) → Relu (a consumer, so that the table reads as an embedding)."""
    table = np.random.default_rng(0).standard_normal((ROWS, DIM)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embed.weight", "ids"], ["e"], name="embed"),
         helper.make_node("Relu", ["e"], ["y"], name="relu")], "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", DIM])],
        [helper.make_tensor("embed.weight", TensorProto.FLOAT, table.shape, table.ravel())])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("options", ["bits=4", "bits=4,symmetric=true", "bits=8", "bits=4,group_size=16"])
@pytest.mark.parametrize("tiles", ["gpu", "interpreter"])
def test_gather_block_quantized(options, tiles):
    model = _embedding_model()
    Pipeline.parse(f"quantize-weights{{embeddings=true,{options}}}").run(model, verify=False)
    assert "GatherBlockQuantized" in [node.op_type for node in model.graph]
    ids = np.array([[3, 99, 0, 42], [7, 7, 1, 98]], dtype=np.int64)
    artifact = assert_matches(model, {"ids": ids}, launch=GPU_SETTINGS if tiles == "gpu" else None)
    spec = next(call.spec for call in artifact.plan.calls if call.spec.suffix == "gather")
    assert spec.signed == ("symmetric" in options) and spec.bits == (8 if "bits=8" in options else 4)


def test_gather_negative_indices():
    """ONNX's negative indices count from the end (compared with the PyTorch backend: ORT's contrib op
    does not take them)."""
    import slimgraph

    model = _embedding_model()
    Pipeline.parse("quantize-weights{embeddings=true,bits=4}").run(model, verify=False)
    ids = np.array([[-1, -100, 5]], dtype=np.int64)
    got = slimgraph.compile(model, backend="triton", device="cpu")(ids=ids)["y"]
    want = slimgraph.compile(model, backend="pytorch")(ids=ids)["y"]
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


@pytest.mark.parametrize("activation, attributes", [
    ("gelu", {}), ("relu", {"normalize_routing_weights": 1}), ("silu", {"k": 1}), ("identity", {"bias": False}),
    ("swiglu", {"swiglu_fusion": 1}),
    ("swiglu", {"swiglu_fusion": 1, "activation_alpha": 1.702, "activation_beta": 1.0, "swiglu_limit": 7.0}),
])
@pytest.mark.parametrize("tiles", ["gpu", "interpreter"])
def test_moe(activation, attributes, tiles):
    """Routing (softmax, top-k, renormalisation), grouped expert GEMMs, each activation; one token
    (decoding) and ten."""
    model = _moe_model(activation, **attributes)
    rng = np.random.default_rng(1)
    for tokens in (1, 10):
        feeds = {"x": rng.normal(size=(1, tokens, HIDDEN)).astype(np.float32),
                 "router": rng.normal(size=(tokens, EXPERTS)).astype(np.float32)}
        artifact = assert_matches(model, feeds, launch=GPU_SETTINGS if tiles == "gpu" else None)
    assert [call.spec.suffix for call in artifact.plan.calls] == ["moe"]


def test_moe_unsupported_activation_is_left_to_pytorch():
    """An MoE the kernels do not take (fc3 weights) stays on the PyTorch lowering, and the report says why;
    here the PyTorch lowering refuses it too, naming the op."""
    import slimgraph

    model = _moe_model("silu")
    node = next(iter(model.graph))
    fc3 = ir.Value(name="fc3", const_value=ir.tensor(np.zeros((EXPERTS, 16, HIDDEN), np.float32)))
    model.graph.register_initializer(fc3)
    node.resize_inputs(7)
    node.replace_input_with(6, fc3)
    with pytest.raises(slimgraph.SlimgraphError, match="fc3"):
        slimgraph.compile(model, backend="triton", device="cpu")
