"""FLOPs: each product at the size it runs at, fused or not, shapes computed at run time included."""

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from slimgraph.measure.flops import node_flops
from slimgraph.measure.stats import model_stats


def test_moe_flops_count_the_top_k_experts_a_token_goes_through():
    x = ir.Value(name="x", shape=ir.Shape(["batch", "sequence", 64]), type=ir.TensorType(ir.DataType.FLOAT))
    router = ir.Value(name="router", shape=ir.Shape(["batch", "sequence", 8]), type=ir.TensorType(ir.DataType.FLOAT))
    fc1, fc2 = (ir.Value(name=n, shape=ir.Shape(s), const_value=ir.tensor(np.zeros(s, np.float32)))
                for n, s in (("fc1", [8, 32, 64]), ("fc2", [8, 64, 32])))
    moe = ir.node("MoE", [x, router, fc1, None, fc2], {"k": 2}, domain="com.microsoft")
    moe.outputs[0].shape = ir.Shape(["batch", "sequence", 64])
    tokens = 1 * 128  # symbolic batch and sequence are counted at 1 and 128
    assert node_flops(moe, {"batch": 1, "sequence": 128}) == tokens * 2 * (2 * 32 * 64 + 2 * 64 * 32)


def test_conv_and_gemm_flops():
    w = numpy_helper.from_array(np.zeros((16, 3, 3, 3), np.float32), "w")
    g = numpy_helper.from_array(np.zeros((10, 16 * 30 * 30), np.float32), "g")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("Flatten", ["c"], ["f"]),
            helper.make_node("Gemm", ["f", "g"], ["y"], transB=1),
        ],
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        initializer=[w, g],
        value_info=[
            helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 16, 30, 30]),
            helper.make_tensor_value_info("f", TensorProto.FLOAT, [1, 16 * 30 * 30]),
        ],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph))
    conv, _, gemm = list(model.graph)
    assert node_flops(conv, {}) == 2 * 16 * 30 * 30 * 3 * 3 * 3
    assert node_flops(gemm, {}) == 2 * 1 * (16 * 30 * 30) * 10


def minilm_flops(tokens_per_layer: list[int]) -> int:
    """MiniLM's multiply-adds ×2 by hand: per layer the Q, K, V, output, up and down projections and
    the two attention products over n tokens, then the pooler."""
    hidden, ffn, heads, head_size = 384, 1536, 12, 32
    per_layer = [2 * n * (4 * hidden * hidden + 2 * hidden * ffn) + 2 * 2 * heads * n * n * head_size
                 for n in tokens_per_layer]
    return sum(per_layer) + 2 * hidden * hidden


def test_flops_count_the_length_a_graph_computes_at_run_time(minilm):
    """dct-tokens keeps ceil(0.75·127) + 1 = 97 of 128 tokens from layer 2 on: a length (and a head
    split) the graph computes, which no input names. Binding every unknown dim to 128 read 2.9G → 3.8G."""
    from slimgraph.passes import Pipeline
    from tests.conftest import copy_model

    model = copy_model(minilm)
    Pipeline.parse("dct-tokens{at=2,keep=0.75}").run(model, verify=False)
    stats = model_stats(model)
    layers = minilm_flops([128, 128, 97, 97, 97, 97])
    assert stats.flops_unknown_nodes == 0
    assert layers < stats.flops < layers * 1.01  # the DCT's own products are under 1%


def test_flops_of_a_copy_without_intermediate_shapes_are_the_same(minilm):
    """Inputs' dims renamed and no shapes on intermediate values (as another exporter may write it):
    shape inference names the heads and lengths anew, and the count must not move."""
    from tests.conftest import copy_model

    bare = copy_model(minilm)
    for value in bare.graph.inputs:
        value.shape = ir.Shape(["B", "S"])
    for node in bare.graph:
        for value in node.outputs:
            value.shape = None
    assert model_stats(bare).flops == model_stats(minilm).flops


def test_a_kv_decoder_counts_the_same_fused_or_not(gpt2_kv):
    """128 new tokens after a past of 128 (the mask spans `past_sequence + sequence` = 256): the
    fused GroupQueryAttention and int4 MatMulNBits count what the MatMuls they replace counted."""
    from slimgraph.passes import Pipeline
    from tests.conftest import copy_model

    hidden, layers, vocab, new, keys = 64, 2, 1000, 128, 256
    projections = 2 * new * (hidden * 3 * hidden + hidden * hidden + 2 * hidden * 4 * hidden)
    attention = 2 * 2 * new * keys * hidden
    expected = layers * (projections + attention) + 2 * new * hidden * vocab
    assert model_stats(gpt2_kv).flops == expected
    fused = copy_model(gpt2_kv)
    Pipeline.parse("fuse-ort,quantize-weights").run(fused, verify=False)
    assert {n.op_type for n in fused.graph} >= {"GroupQueryAttention", "MatMulNBits"}
    assert model_stats(fused).flops == expected


def _model(nodes, inputs, outputs, initializers=(), opsets=(("", 17),)) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    return ir.serde.deserialize_model(proto)


def test_an_unnamed_input_dim_is_bound_by_its_axis():
    """paddle2onnx's -1 dims are read as unnamed: a leading one counts at batch 1."""
    weight = numpy_helper.from_array(np.zeros((64, 32), np.float32), "w")
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
    stats = model_stats(model)
    assert (stats.flops, stats.flops_unknown_nodes) == (2 * 64 * 32, 0)


def test_shapes_after_an_fp16_matmul_nbits_and_a_fused_conv_are_known():
    """The stand-ins take their operand's dtype (a float placeholder beside fp16 stopped inference), and
    FusedConv counts as the Conv it is."""
    fp16 = TensorProto.FLOAT16
    blocks = numpy_helper.from_array(np.zeros((32, 2, 16), np.uint8), "q")
    scales = numpy_helper.from_array(np.ones(64, np.float16), "s")
    after = numpy_helper.from_array(np.zeros((32, 16), np.float16), "w")
    nbits = _model([helper.make_node("MatMulNBits", ["x", "q", "s"], ["h"], domain="com.microsoft", K=64, N=32,
                                     bits=4, block_size=32),
                    helper.make_node("MatMul", ["h", "w"], ["y"])],
                   [helper.make_tensor_value_info("x", fp16, ["batch", "sequence", 64])],
                   [helper.make_tensor_value_info("y", fp16, None)], [blocks, scales, after],
                   opsets=(("", 17), ("com.microsoft", 1)))
    assert model_stats(nbits).flops == 2 * 128 * (64 * 32 + 32 * 16)
    kernel = numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "k")
    conv = _model([helper.make_node("FusedConv", ["x", "k"], ["c"], domain="com.microsoft", activation="Relu",
                                    pads=[1, 1, 1, 1]),
                   helper.make_node("Flatten", ["c"], ["f"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                  [helper.make_tensor_value_info("f", TensorProto.FLOAT, None)], [kernel],
                  opsets=(("", 17), ("com.microsoft", 1)))
    assert model_stats(conv).flops == 2 * (8 * 16 * 16) * (3 * 3 * 3)
