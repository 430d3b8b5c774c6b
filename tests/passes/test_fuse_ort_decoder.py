"""fuse-ort on KV-cache decoders: GroupQueryAttention and RotaryEmbedding, equal to the unfused
graph at every real token (left-padded batches included), step after step."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest

import slimgraph
from slimgraph.frontend.reader import READER
from slimgraph.generate import Decoder, SessionDecoder, left_pad
from slimgraph.ir.cache_signature import empty_past, position_ids, shares_cache_buffers
from slimgraph.ir.meta import EXAMPLE_INPUTS_KEY
from slimgraph.measure import evaluate
from slimgraph.measure.fidelity import at_real_tokens
from slimgraph.passes import Pipeline
from slimgraph.passes.fuse_ort_decoder import fuse_kv_attention, rotary_positions
from tests.conftest import copy_model

pytestmark = pytest.mark.slow  # exports of transformers (cached on disk after the first run)


def ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph)


def padded_prompt(vocab: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return left_pad([rng.integers(3, vocab, n).tolist() for n in (7, 4, 1)], 0)


def test_llama_attention_becomes_gqa_with_rotary(llama_kv):
    model = copy_model(llama_kv)
    assert fuse_kv_attention(model, rotary_positions(READER.model_config(llama_kv))) == 3
    found = ops(model)
    assert found["GroupQueryAttention"] == 3 and found["RotaryEmbedding"] == 6
    assert found["Softmax"] == 0 and found["Neg"] == 0  # the exporter's attention and rotate_half are gone
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    assert (gqa.attributes["num_heads"].value, gqa.attributes["kv_num_heads"].value) == (4, 2)
    assert gqa.attributes["scale"].value == pytest.approx(16 ** -0.5)
    table = next(v for v in model.graph.initializers.values() if v.name.endswith("rotary.cos_table"))
    assert table.const_value.shape == (128, 8)  # max_position_embeddings of the config × head_dim / 2
    assert shares_cache_buffers(model) and not shares_cache_buffers(llama_kv)


def test_gpt2_without_rotary_fuses_too(gpt2_kv):
    model = copy_model(gpt2_kv)
    assert fuse_kv_attention(model) == 2
    assert ops(model)["RotaryEmbedding"] == 0 and ops(model)["GroupQueryAttention"] == 2


@pytest.mark.parametrize("which", ["llama_kv", "gpt2_kv"])
def test_fused_steps_equal_the_export_at_real_tokens(request, which):
    original = request.getfixturevalue(which)
    fused = copy_model(original)
    fuse_kv_attention(fused)
    ids, mask = padded_prompt()
    decoders = [Decoder(m, lambda feeds, s=evaluate.make_session(m): evaluate.run(s, feeds)) for m in (original, fused)]
    logits = [d.start(ids, mask) for d in decoders]
    for step in range(6):
        np.testing.assert_allclose(logits[1], logits[0], rtol=1e-4, atol=1e-4)
        token = logits[0].argmax(-1)
        mask = np.concatenate([mask, np.ones((3, 1), np.int64)], axis=1)
        logits = [d.advance(token) for d in decoders]
    # the presents too, at the positions the mask keeps (padding is never read)
    feeds = original.meta[EXAMPLE_INPUTS_KEY][0]
    want, got = evaluate.run(original, feeds), evaluate.run(fused, feeds)
    for name in want:
        axis = 1 if name == "logits" else 2
        np.testing.assert_allclose(at_real_tokens(got[name], feeds["attention_mask"], axis),
                                   at_real_tokens(want[name], feeds["attention_mask"], axis), rtol=1e-4, atol=1e-5)


def test_fuse_ort_runs_it_and_verify_passes(llama_kv):
    model = copy_model(llama_kv)
    report = Pipeline.parse("cleanup,fuse-ort").run(model)  # Verify: exact at real tokens
    assert "GroupQueryAttention ×3" in report.records[-1].stats["fused ops"]
    table = next(v for v in model.graph.initializers.values() if v.name.endswith("rotary.cos_table"))
    assert table.const_value.shape == (128, 8)  # the pass reads the config through the model's reader


def test_the_session_decoder_writes_the_cache_in_place_and_grows_it(llama_kv):
    fused = copy_model(llama_kv)
    fuse_kv_attention(fused)
    ids, mask = padded_prompt()
    plain = Decoder(fused, lambda feeds, s=evaluate.make_session(fused): evaluate.run(s, feeds))
    bound = SessionDecoder(fused, evaluate.make_session(fused))
    assert bound.in_place
    a, b = plain.start(ids, mask), bound.start(ids, mask, capacity=ids.shape[1] + 2)  # grows twice below
    for _ in range(8):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
        token = a.argmax(-1)
        a, b = plain.advance(token), bound.advance(token)
    assert bound._capacity >= ids.shape[1] + 8


def test_the_session_decoder_feeds_back_ort_values_without_gqa(llama_kv):
    ids, mask = padded_prompt()
    plain = Decoder(llama_kv, lambda feeds, s=evaluate.make_session(llama_kv): evaluate.run(s, feeds))
    bound = SessionDecoder(llama_kv, evaluate.make_session(llama_kv))
    assert not bound.in_place
    a, b = plain.start(ids, mask), bound.start(ids, mask)
    for _ in range(4):
        np.testing.assert_array_equal(b, a)
        token = a.argmax(-1)
        a, b = plain.advance(token), bound.advance(token)


def test_generate_with_the_fused_int4_model_equals_its_unfused_form(llama_kv, llama_folder, tmp_path):
    tokens = {}
    for pipeline in ("quantize-weights{bits=4}", "fuse-ort,quantize-weights{bits=4}"):
        model = copy_model(llama_kv)
        Pipeline.parse(pipeline).run(model)
        path = tmp_path / f"{len(tokens)}.onnx"
        slimgraph.compile(model, backend="onnxruntime").save(path)
        artifact = slimgraph.compile(slimgraph.load(path), backend="onnxruntime")  # slimgraph loads what it wrote
        ids, mask = padded_prompt()
        decoder = SessionDecoder(artifact.model, artifact.session)
        logits, row = decoder.start(ids, mask), []
        for _ in range(5):
            row.append(logits.argmax(-1).tolist())
            logits = decoder.advance(logits.argmax(-1))
        tokens[pipeline] = row
    assert tokens["quantize-weights{bits=4}"] == tokens["fuse-ort,quantize-weights{bits=4}"]


def test_the_tied_head_stays_a_linear_quantize_reads():
    import torch
    import transformers

    tied = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=176, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=1000, max_position_embeddings=64, tie_word_embeddings=True)).eval()
    prompt = {"input_ids": torch.arange(3, 9)[None], "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    model = slimgraph.load(tied, example_inputs=prompt, kv_cache=True)
    Pipeline.parse("fuse-ort,quantize-weights{bits=4,embeddings=true}").run(model)
    found = ops(model)
    assert found["FusedMatMul"] == 0 and found["MatMul"] == 0  # the head is MatMulNBits, sharing the table
    assert found["GatherBlockQuantized"] == 1


def test_positions_in_the_fused_graph_come_from_the_mask(llama_kv):
    """Left padding shifts no real token: the rotary reads position_ids (cumsum of the mask − 1)."""
    fused = copy_model(llama_kv)
    fuse_kv_attention(fused)
    ids, mask = padded_prompt()
    alone = np.array([ids[1, mask[1] == 1]])
    session = evaluate.make_session(fused)
    feeds = lambda i, m: {"input_ids": i, "attention_mask": m, "position_ids": position_ids(m)}  # noqa: E731
    batch = evaluate.run(session, feeds(ids, mask) | empty_past(fused, 3))["logits"][1, -1]
    single = evaluate.run(session, feeds(alone, np.ones_like(alone)) | empty_past(fused, 1))["logits"][0, -1]
    np.testing.assert_allclose(batch, single, rtol=1e-4, atol=1e-4)
