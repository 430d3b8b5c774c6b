"""quantize-weights on the trained MiniLM: fidelity floors on 64 held-out real sentences."""

from __future__ import annotations

import numpy as np
import pytest

import slimgraph
from slimgraph.errors import SlimgraphError
from slimgraph.measure import evaluate
from slimgraph.measure.inputs import sample_inputs
from slimgraph.passes import Pipeline
from tests.conftest import copy_model


def quantized_cosine(minilm, sentence_eval, text: str) -> tuple[float, object]:
    model = copy_model(minilm)
    report = Pipeline.parse(text).run(model, sentence_eval.context())
    return float(sentence_eval.cosines(model).mean()), report


FLOORS = {  # the acceptance floors
    "quantize-weights{bits=8}": 0.999,
    "quantize-weights": 0.96,  # int4 g32 rtn
}


@pytest.mark.parametrize("text", list(FLOORS))
def test_rtn_fidelity_floor(minilm, sentence_eval, text):
    cosine, report = quantized_cosine(minilm, sentence_eval, text)
    assert cosine >= FLOORS[text]
    record = report.records[0]
    assert record.stats["linears quantized"] == 37
    assert report.after.op_histogram["com.microsoft.MatMulNBits"] == 37
    assert "MatMul" not in report.after.op_histogram or report.after.op_histogram["MatMul"] == 12  # attention only
    assert report.after.bytes < report.before.bytes


@pytest.mark.slow
def test_awq_and_gptq_beat_rtn(minilm, sentence_eval):
    rtn, _ = quantized_cosine(minilm, sentence_eval, "quantize-weights{bits=4,group_size=32}")
    awq, awq_report = quantized_cosine(minilm, sentence_eval, "quantize-weights{bits=4,group_size=32,method=awq}")
    gptq, _ = quantized_cosine(minilm, sentence_eval, "quantize-weights{bits=4,group_size=32,method=gptq}")
    assert awq >= 0.98 and gptq >= 0.98
    assert awq > rtn and gptq > rtn
    assert awq_report.records[0].stats["calibration"] == "32 real sentences"


def test_embeddings_and_exclude(minilm, sentence_eval):
    cosine, report = quantized_cosine(
        minilm, sentence_eval, "quantize-weights{embeddings=true,exclude=[pooler.*,*.output.dense]}"
    )
    stats = report.records[0].stats
    assert stats["embeddings quantized"] == 3
    assert stats["linears quantized"] == 37 - 1 - 12  # pooler, attention.output.dense and output.dense excluded
    assert report.after.op_histogram["com.microsoft.GatherBlockQuantized"] == 3
    assert report.after.bytes < 0.35 * report.before.bytes  # the 13 excluded layers stay float
    assert cosine >= 0.96


def test_gpt2_gemm_and_tied_lm_head(gpt2_ir):
    model = copy_model(gpt2_ir)
    feeds = sample_inputs(model, batch=2, sequence=9)
    before = evaluate.run(model, feeds)["logits"]
    report = Pipeline.parse("quantize-weights{bits=8}").run(model)
    assert report.records[0].stats["linears quantized"] == 2 * 4 + 1  # c_attn, c_proj, c_fc, c_proj + lm_head
    after = evaluate.run(model, feeds)["logits"]
    assert report.records[0].fidelity.top1 >= 0.95
    assert np.mean(before.argmax(-1) == after.argmax(-1)) >= 0.95


@pytest.mark.parametrize("text", ["quantize-weights{bits=4,embeddings=true}",
                                  "quantize-weights{bits=8,embeddings=true,symmetric=true,method=awq}"])
def test_a_tied_head_and_its_embedding_share_one_quantized_table(gpt2_ir, text):
    """The head is quantized by rtn as the embedding is, so one table serves both: (rtn) the same
    outputs as quantizing them apart, and the table's bytes once (SmolLM2: 538 MB fp32 → 86.3 MB
    shared, 104.4 MB apart)."""
    from slimgraph.ir import edit
    from slimgraph.ir.structure import discover
    from slimgraph.measure.stats import model_stats

    shared, apart = copy_model(gpt2_ir), copy_model(gpt2_ir)
    edit.untie(apart, next(lin for lin in discover(apart).linears if lin.name == "lm_head"))
    report = Pipeline.parse(text).run(shared)
    Pipeline.parse(text).run(apart, verify=False)
    assert report.records[0].stats["tied head"].startswith("lm_head shares its int")
    assert report.records[0].fidelity.top1 >= 0.9
    gather = next(n for n in shared.graph if n.op_type == "GatherBlockQuantized")
    codes = gather.inputs[0].producer().inputs[0]  # through a Reshape
    assert [n.op_type for n, _ in codes.uses()].count("MatMulNBits") == 1
    table = discover(gpt2_ir).embeddings[0]
    assert model_stats(apart).bytes - model_stats(shared).bytes >= table.num_embeddings * table.dim // 8
    if "rtn" in text or "method" not in text:
        feeds = sample_inputs(shared, batch=2, sequence=9)
        want = evaluate.run(shared, feeds)["logits"]
        np.testing.assert_array_equal(want, evaluate.run(apart, feeds)["logits"])
        got = slimgraph.compile(shared, backend="pytorch")(**feeds)["logits"]  # (its uint8 GatherBlockQuantized)
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_nothing_to_quantize_warns_and_keeps_the_model():
    import onnx_ir as ir
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = ir.serde.deserialize_model(helper.make_model(graph))
    report = Pipeline.parse("quantize-weights").run(model)
    record = report.records[0]
    assert not record.modified
    assert record.warnings == ["quantize-weights: nothing to quantize (no MatMul/Gemm with a constant 2-D weight)"]
    assert [n.op_type for n in model.graph] == ["Relu"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("quantize-weights{bits=3}", "bits=3 is not a valid 2|4|8"),
        ("quantize-weights{group_size=48}", "group_size=48 is not a valid 16|32|64|128|256"),
        ("quantize-weights{group_size=512}", "group_size=512 is not a valid 16|32|64|128|256"),
        ("quantize-weights{method=hqq}", "method=hqq is not a valid rtn|awq|gptq"),
        ("quantize-weights{bits=2,embeddings=true}", "embeddings can be quantized to 4 or 8 bits"),
        ("quantize-weights{accuracy_level=2}", "accuracy_level=2 is not a valid 0|4"),
    ],
)
def test_bad_options(text, message):
    with pytest.raises(SlimgraphError, match=message.replace("|", r"\|")):
        Pipeline.parse(text)


def test_python_api_validates_too():
    from slimgraph.passes.quantize.weights import QuantizeWeights

    with pytest.raises(SlimgraphError, match=r"bits must be one of 2\|4\|8, got 3"):
        QuantizeWeights(bits=3)


def embedding_model(rows: int = 50, dim: int = 64):
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["embedded"], name="lookup")], "emb",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("embedded", TensorProto.FLOAT, ["batch", "sequence", dim])],
        initializer=[numpy_helper.from_array(table, "table")])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])), table


@pytest.mark.parametrize("text, bits, symmetric", [
    ("quantize-weights{embeddings=true,bits=4}", 4, False),
    ("quantize-weights{embeddings=true,bits=4,symmetric=true}", 4, True),
    ("quantize-weights{embeddings=true,bits=8}", 8, False),
])
def test_gather_block_quantized_returns_the_dequantized_rows(text, bits, symmetric):
    from slimgraph.ir.nbits import quantize_rtn

    model, table = embedding_model()
    report = Pipeline.parse(text).run(model)
    assert report.after.op_histogram == {"com.microsoft.GatherBlockQuantized": 1}
    ids = np.array([[0, 7, 49], [3, 3, 12]], np.int64)
    got = evaluate.run(model, {"ids": ids})["embedded"]
    expected = quantize_rtn(np.ascontiguousarray(table.T), bits, 32, symmetric).dequantize().T[ids]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert report.records[0].fidelity.cosine > 0.99


def test_dynamic_embeddings_are_uint8_rows():
    model, table = embedding_model()
    report = Pipeline.parse("quantize-dynamic{embeddings=true}").run(model)
    assert report.after.op_histogram == {"Gather": 1, "DequantizeLinear": 1}
    ids = np.array([[0, 7, 49], [3, 3, 12]], np.int64)
    got = evaluate.run(model, {"ids": ids})["embedded"]
    scale = (table.max() - min(table.min(), 0)) / 255
    assert np.abs(got - table[ids]).max() <= scale / 2 + 1e-6  # within half a quantization step
    assert report.records[0].stats["embeddings quantized"] == 1


def test_skipped_layers_are_summed_up_in_one_line_per_reason():
    from slimgraph.passes.quantize.rewrite import why_skipped

    skipped = [f"layers.{i}.mlp: weight dtype int8" for i in range(150)] + ["lm_head: excluded"]
    assert why_skipped(skipped) == "weight dtype int8 (150 layers: layers.0.mlp, layers.1.mlp, …); excluded (lm_head)"
