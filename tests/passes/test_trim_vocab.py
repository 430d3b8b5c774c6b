"""trim-vocab: the kept logits are the full model's, ids map back, and what it refuses."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import slimgraph
from slimgraph.errors import SlimgraphError
from slimgraph.frontend.calibration import tokenize_lines
from slimgraph.measure import evaluate
from slimgraph.measure.inputs import sample_inputs
from slimgraph.measure.stats import human_bytes
from slimgraph.passes import PassContext, Pipeline
from tests.conftest import copy_model

# greedy next-token agreement on 16 held-out pydoc paragraphs after calibrating on 48 others (measured
# 98.3%; 99.1% after 256 in benchmarks/trim_vocab.py)
AGREEMENT_FLOOR = 0.975


def trimmed(model, text: str, ctx: PassContext, verify: bool = True):
    model = copy_model(model)
    report = Pipeline.parse(text).run(model, ctx, verify=verify)
    return model, report.records[0]


def calibration(model, vocab: int, seed: int = 0) -> PassContext:
    """Feeds that use a quarter of the vocabulary."""
    rng = np.random.default_rng(seed)
    feeds = sample_inputs(model, batch=8, sequence=64, seed=seed)
    feeds["input_ids"] = rng.integers(0, vocab // 4, size=feeds["input_ids"].shape)
    return PassContext(inputs=[feeds], inputs_source="ids below vocab/4")


def test_kept_logits_are_the_full_models_bit_for_bit(gpt2_ir):
    """GPT-2 (tied head): the head gets its own trimmed table, the embedding keeps all 1000 rows."""
    model, record = trimmed(gpt2_ir, "trim-vocab{keep=120,keep_ids=[0]}", calibration(gpt2_ir, 1000))
    feeds = sample_inputs(gpt2_ir, batch=2, sequence=9, seed=7)  # any ids: the embedding is whole
    full, got = evaluate.run(gpt2_ir, feeds), evaluate.run(model, feeds)
    ids = got["token_ids"]
    assert record.stats["tokens kept"].startswith(f"1,000 → {len(ids)} ")
    assert len(ids) in (120, 121) and ids[0] == 0 and np.all(np.diff(ids) > 0)
    np.testing.assert_array_equal(got["logits"], full["logits"][..., ids])
    assert record.fidelity.cosine > 0.999999  # what Verify compared: the logits at the kept ids


def test_the_trimmed_model_declares_what_it_returns_and_reads_as_changed(gpt2_ir, tmp_path):
    model = copy_model(gpt2_ir)
    report = Pipeline.parse("trim-vocab{keep=120,keep_ids=[0]}").run(model, calibration(gpt2_ir, 1000))
    kept = len(evaluate.run(model, sample_inputs(gpt2_ir, batch=1, sequence=4))["token_ids"])
    logits = next(v for v in model.graph.outputs if v.name == "logits")
    assert logits.shape[-1] == kept  # not the original vocabulary of 1000
    onnx.shape_inference.infer_shapes(onnx.load(slimgraph.save(model, tmp_path / "t.onnx")), strict_mode=True)
    assert not report.fidelity.unchanged and "no output changed" not in repr(report)
    assert "kept of 1,000 columns" in report.records[0].fidelity.worst_output().view
    before, after = report.records[0].stats["weights"].split(" → ")
    assert before == human_bytes(report.before.bytes)  # the file's weights, not those after untying the head


def test_trimmed_embeddings_remap_incoming_ids(llama_ir):
    model, record = trimmed(llama_ir, "trim-vocab{keep=200,keep_ids=[0],embeddings=trim}", calibration(llama_ir, 1000))
    feeds = sample_inputs(llama_ir, batch=2, sequence=9, seed=7)
    ids = evaluate.run(model, feeds)["token_ids"]
    feeds["input_ids"] = ids[np.random.default_rng(1).integers(0, len(ids), feeds["input_ids"].shape)]
    np.testing.assert_array_equal(evaluate.run(model, feeds)["logits"],
                                  evaluate.run(llama_ir, feeds)["logits"][..., ids])
    tables = [v for v in model.graph.initializers.values() if v.name.endswith("embed_tokens.weight")]
    assert tables and tables[0].const_value.shape[0] == len(ids)


@pytest.mark.slow
def test_smollm2_coverage_and_special_tokens(smollm2, smollm2_folder):
    from slimgraph.zoo import text

    lines = text.calibration_texts(48)
    ctx = PassContext(inputs=tokenize_lines(smollm2_folder, lines, ["input_ids", "attention_mask"]),
                      inputs_source="48 pydoc paragraphs")
    model, record = trimmed(smollm2, "trim-vocab", ctx, verify=False)  # agreement is measured below, held out
    ids = evaluate.run(model, ctx.inputs[0])["token_ids"]
    assert set(range(17)) <= set(ids.tolist())  # SmolLM2's special and chat-template tokens
    kept, share = record.stats["tokens kept"].split(" (")[0], record.stats["tokens kept"].split("(")[1]
    assert float(share.split("%")[0]) >= 99.0 and int(kept.split("→ ")[1].replace(",", "")) < 16384
    heldout = tokenize_lines(smollm2_folder, text.heldout_texts(16), ["input_ids", "attention_mask"])
    hits = total = 0
    original, trimmed_session = evaluate.make_session(smollm2), evaluate.make_session(model)  # one each, not per feed
    for feeds in heldout:
        want = evaluate.run(original, feeds)["logits"].argmax(-1)
        got = evaluate.run(trimmed_session, feeds)["logits"].argmax(-1)
        real = feeds["attention_mask"] != 0
        hits, total = hits + int(((ids[got] == want) & real).sum()), total + int(real.sum())
    assert hits / total >= AGREEMENT_FLOOR


def test_predict_keeps_the_tokens_of_most_predicted_probability(gpt2_ir):
    """source=predict: the kept ids are the `keep` with the most next-token probability summed over
    the calibration positions, plus keep_ids."""
    ctx = calibration(gpt2_ir, 1000)
    logits = evaluate.run(gpt2_ir, ctx.inputs[0])["logits"].astype(np.float64)
    probability = np.exp(logits - logits.max(-1, keepdims=True))
    mass = (probability / probability.sum(-1, keepdims=True)).sum(axis=(0, 1))
    model, _ = trimmed(gpt2_ir, "trim-vocab{keep=100,keep_ids=[0]}", ctx)
    kept = set(evaluate.run(model, ctx.inputs[0])["token_ids"].tolist())
    assert kept == set(np.argsort(-mass)[:100].tolist()) | {0}


def test_generated_continuations_count_too(gpt2_ir):
    with pytest.raises(SlimgraphError, match="source=generate needs the model's tokenizer"):
        trimmed(gpt2_ir, "trim-vocab{keep=100,keep_ids=[0],source=generate}", calibration(gpt2_ir, 1000))


@pytest.mark.parametrize("text, message", [
    ("trim-vocab{keep=100}", "special tokens to keep are unknown"),
    ("trim-vocab{keep=100,keep_ids=[5000]}", "keep_ids=5000 is not a token id"),
    ("trim-vocab{keep=1000,keep_ids=[0]}", "keep=1000 is not below the vocabulary"),
    ("trim-vocab{coverage=1.5}", r"coverage must be in \(0, 1\]"),
])
def test_bad_input(gpt2_ir, text, message):
    with pytest.raises(SlimgraphError, match=message):
        trimmed(gpt2_ir, text, calibration(gpt2_ir, 1000))


def test_a_model_without_an_lm_head(minilm):
    with pytest.raises(SlimgraphError, match="no LM head found"):
        trimmed(minilm, "trim-vocab{keep=100,keep_ids=[0]}", PassContext())


def test_it_runs_after_other_passes_and_before_exact_ones(gpt2_ir):
    """The added token_ids output is not an output an exact pass changed: cleanup before it,
    fuse-ort after it, both verified."""
    model = copy_model(gpt2_ir)
    report = Pipeline.parse("cleanup,trim-vocab{keep=120,keep_ids=[0]},fuse-ort").run(model, calibration(gpt2_ir, 1000))
    assert [r.exact_check is not None for r in report.records] == [True, False, True]
