import pytest

from slimgraph.measure.stats import human_bytes, human_count, model_stats
from tests.measure.test_flops import minilm_flops


def test_mlp_stats(mlp_model):
    stats = model_stats(mlp_model)
    # fc1 8×16 + bias 16 + fc2 16×4 + half 4 + unused 3
    assert stats.parameters == 8 * 16 + 16 + 16 * 4 + 4 + 3
    assert stats.bytes == stats.parameters * 4
    assert stats.bytes_by_dtype == {"float": stats.bytes}
    assert stats.nodes == len(mlp_model.graph)
    assert stats.op_histogram["MatMul"] == 2
    # Two MatMuls at batch 1 (the symbolic batch): 2·1·8·16 + 2·1·16·4
    assert stats.flops == 2 * 8 * 16 + 2 * 16 * 4
    assert stats.inputs == {"x": "float[batch×8]"}


def test_minilm_stats(minilm):
    stats = model_stats(minilm)
    assert 22_000_000 < stats.parameters < 23_000_000  # all-MiniLM-L6-v2 has 22.7M parameters
    assert stats.flops == minilm_flops([128] * 6) and stats.flops_unknown_nodes == 0


@pytest.mark.parametrize("n, text", [(512, "512 B"), (90_855_557, "90.9 MB"), (2.5e9, "2.5 GB")])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


def test_human_count():
    assert human_count(22_713_363) == "22.7M"
    assert human_count(12) == "12"


def test_int8_matmuls_count_their_multiply_adds(minilm):
    from slimgraph.passes import Pipeline
    from tests.conftest import copy_model

    model = copy_model(minilm)
    Pipeline.parse("quantize-dynamic").run(model, verify=False)
    assert model_stats(model).flops == pytest.approx(model_stats(minilm).flops, rel=0.01)
