"""fuse-ort: a transformer's subgraphs → ONNX Runtime's fused ops, equal to the unfused model; a
model with nothing to fuse, or a backend that cannot run the fused ops, is refused in one line."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import slimgraph
from slimgraph.cli import main
from slimgraph.errors import SlimgraphError
from slimgraph.ir import evaluate
from slimgraph.ir.fidelity import EXACT_RTOL
from slimgraph.ir.inputs import sample_inputs
from slimgraph.passes import Pipeline
from tests.conftest import copy_model


def fused_ops(model) -> Counter:
    return Counter(n.op_type for n in model.graph if n.domain == "com.microsoft")


def assert_same_outputs(model, original, feeds_list) -> None:
    for feeds in feeds_list:
        want, got = evaluate.run(original, feeds), evaluate.run(model, feeds)
        for name, value in want.items():
            assert np.abs(got[name] - value).max() <= EXACT_RTOL * np.abs(value).max(), name


def test_minilm_attention_layernorm_and_gelu_are_fused(minilm, sentence_eval):
    original = copy_model(minilm)
    report = Pipeline.parse("cleanup,fuse-ort").run(minilm)  # verified as exact against the original
    assert fused_ops(minilm) == {"MultiHeadAttention": 6, "SkipLayerNormalization": 12, "BiasGelu": 6}
    left = Counter(n.op_type for n in minilm.graph)
    assert left["Softmax"] == left["Gelu"] == 0 and left["LayerNormalization"] == 1  # the embeddings' (no residual)
    assert report.records[-1].exact_check.max_rel_error <= EXACT_RTOL
    # padded sentences of different lengths: the attention mask reaches the fused Attention
    assert_same_outputs(minilm, original, sentence_eval.evaluation)


@pytest.mark.slow
def test_llama_normalization_and_rotary_embeddings_are_fused(llama_ir):
    model, original = copy_model(llama_ir), copy_model(llama_ir)
    Pipeline.parse("cleanup,fuse-ort").run(model)
    assert fused_ops(model)  # which ones depends on onnxscript's rules; Verify held them to the original
    assert_same_outputs(model, original, [sample_inputs(original, batch=2, sequence=12)])


def test_a_model_with_nothing_to_fuse_is_refused(mlp_model):
    with pytest.raises(SlimgraphError, match="fuse-ort: nothing to fuse"):
        Pipeline.parse("fuse-ort").run(mlp_model)


def test_backends_that_cannot_run_fused_ops_are_refused_before_work(tmp_path, mlp_path, capsys):
    out = tmp_path / "out"
    assert main(["optimize", str(mlp_path), "-p", "cleanup,fuse-ort", "--backend", "pytorch", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "fuse-ort writes ops that only the onnxruntime backend runs, not pytorch" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    with pytest.raises(SlimgraphError, match="Attention"):
        model = slimgraph.load(mlp_path)
        model.graph.node(0).domain, model.graph.node(0).op_type = "com.microsoft", "Attention"
        slimgraph.compile(model, backend="pytorch")


def test_packed_attention_holds_the_projections(minilm):
    """attention=packed: one Attention per layer with the Q, K, V weights packed into one; the default
    keeps them as MatMuls, which W8A8 quantizes."""
    packed = copy_model(minilm)
    Pipeline.parse("cleanup,fuse-ort{attention=packed}").run(packed)
    assert fused_ops(packed)["Attention"] == 6
    Pipeline.parse("cleanup,fuse-ort,quantize-dynamic").run(minilm)
    assert sum(n.op_type == "MatMulInteger" for n in minilm.graph) == 6 * 6 + 1  # q, k, v, o, up, down; pooler
