"""dct-tokens: the DCT maps are exact where they must be, and compressed models run and keep fidelity."""

from __future__ import annotations

import numpy as np
import pytest

from slimgraph.errors import SlimgraphError
from slimgraph.measure import evaluate
from slimgraph.measure.inputs import sample_inputs
from slimgraph.measure.stats import model_stats
from slimgraph.passes import PassContext, Pipeline
from slimgraph.passes.dct_tokens import compression, dct_matrix, grid_compression
from tests.conftest import copy_model

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("n", [1, 5, 16, 17])
def test_the_dct_is_orthonormal_and_keep_one_is_the_identity(n):
    c = dct_matrix(n)
    np.testing.assert_allclose(c @ c.T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(compression(n, n), np.eye(n), atol=1e-12)


@pytest.mark.parametrize("n, kept", [(16, 8), (17, 9), (12, 3)])
def test_the_mean_token_is_preserved(n, kept):
    tokens = RNG.standard_normal((n, 6))
    compressed = compression(n, kept) @ tokens
    assert compressed.shape == (kept, 6)
    np.testing.assert_allclose(compressed.mean(axis=0), tokens.mean(axis=0), atol=1e-12)
    square = RNG.standard_normal((16, 6))
    grid = grid_compression(4, 4, 2, 2) @ square
    np.testing.assert_allclose(grid.mean(axis=0), square.mean(axis=0), atol=1e-12)


def run(model, text: str, ctx: PassContext | None = None, verify: bool = True):
    model = copy_model(model)
    report = Pipeline.parse(text).run(model, ctx or PassContext(), verify=verify)
    return model, report.records[0]


def test_keep_one_is_exact_on_minilm(minilm):
    _, record = run(minilm, "dct-tokens{at=1,keep=1.0}")
    assert record.fidelity.max_rel_error < 1e-5
    assert record.stats["tokens"].startswith("N → ceil(1.0·N) tokens") and "1 CLS kept apart" in record.stats["tokens"]
    assert int(record.stats["masks pooled"]) == 5  # the attention of blocks 1–5


@pytest.mark.slow
def test_minilm_fidelity_floor_on_padded_sentences(minilm, sentence_eval):
    model, record = run(minilm, "dct-tokens{at=2,keep=0.5}", sentence_eval.context())
    assert record.stats["restored"] == "last_hidden_state"
    assert sentence_eval.cosines(model).mean() >= 0.78  # measured 0.816, training-free
    feeds = sentence_eval.evaluation[0]
    assert evaluate.run(model, feeds)["last_hidden_state"].shape == feeds["input_ids"].shape + (384,)


def test_without_restore_the_output_keeps_fewer_tokens(minilm):
    model, record = run(minilm, "dct-tokens{at=4,keep=0.5,restore=false}")
    assert record.fidelity is not None  # compared by the mean token
    feeds = sample_inputs(model, batch=2, sequence=16)
    hidden = evaluate.run(model, feeds)["last_hidden_state"]
    assert hidden.shape == (2, 1 + 8, 384)  # the CLS token and half of the other 15, rounded up


def test_its_nodes_are_one_module_in_the_change_tree(minilm):
    """The map's ~100 nodes were a change-tree line each, named after internal nodes (`layer_norm_4_dct_80`)."""
    from slimgraph.measure.diff import fold

    _, record = run(minilm, "dct-tokens{at=2,keep=0.75}")
    [change] = fold(record.changes.nodes)
    assert (change.module, change.kind) == ("dct-tokens", "added")
    assert "+ MatMul ×4" in change.after and "+ Ceil" in change.after


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """A ViT classifier (random weights): 8×8 patches + CLS."""
    import torch
    import transformers

    from slimgraph.frontend import load

    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=3,
                                    num_attention_heads=4, intermediate_size=96, num_labels=10)
    folder = tmp_path_factory.mktemp("vit")
    transformers.ViTForImageClassification(config).eval().save_pretrained(folder)
    return load(folder)


def test_vit_grid_keep_all_is_exact_and_half_grid_saves_flops(vit):
    _, exact = run(vit, "dct-tokens{at=1,layout=grid,grid=[8,8]}")
    assert exact.fidelity.max_rel_error < 1e-5 and exact.stats["tokens"] == "8×8 → 8×8 tokens (+1 CLS kept apart)"
    before = model_stats(vit).flops
    model, record = run(vit, "dct-tokens{at=1,layout=grid,grid=[4,4]}")
    assert record.stats["tokens"] == "8×8 → 4×4 tokens (+1 CLS kept apart)"
    assert model_stats(model).flops < 0.6 * before
    assert evaluate.run(model, sample_inputs(model, batch=2))["logits"].shape == (2, 10)


@pytest.mark.parametrize("text, message", [
    ("dct-tokens{at=1,keep=0}", r"keep must be in \(0, 1\]"),
    ("dct-tokens{keep=0.5}", "give at=BLOCK or value=NAME"),
    ("dct-tokens{at=9}", "at=9 does not exist"),
    ("dct-tokens{at=1,layout=grid,grid=[9,9]}", "larger than the 8×8 token grid"),
])
def test_bad_input(vit, text, message):
    with pytest.raises(SlimgraphError, match=message):
        run(vit, text)


def test_a_causal_lm_is_refused(llama_ir):
    with pytest.raises(SlimgraphError, match="causal LM"):
        run(llama_ir, "dct-tokens{at=1,keep=0.5}")


def test_a_sequence_that_is_not_a_grid(minilm):
    with pytest.raises(SlimgraphError, match="fixed token count"):
        run(minilm, "dct-tokens{at=1,layout=grid}")


@pytest.fixture(scope="module")
def llava():
    """A LLaVA-style model: 8×8 image tokens before 5 text tokens, a 2-block Llama decoder."""
    import torch

    from slimgraph.frontend import load
    from slimgraph.ir.graph import module_path
    from tests.conftest import llava_style

    module = llava_style(image_size=32, patch_size=4, vision_hidden=32, hidden=64, layers=2)
    pixels, ids = torch.randn(1, 3, 32, 32), torch.randint(0, 1000, (1, 5))
    model = load(module, example_inputs=(pixels, ids))
    projector = next(n.outputs[0].name for n in reversed(list(model.graph)) if module_path(n) == "projector")
    return module, model, projector, {"pixel_values": pixels.numpy(), "input_ids": ids.numpy()}


def test_image_tokens_joined_with_text_are_compressed_as_the_decoder_would_read_fewer(llava):
    """The joined sequence's reshape targets, positions (folded arange, rotary angles) and causal
    mask follow the shorter sequence: the graph equals the PyTorch model fed the compressed tokens."""
    import torch

    module, original, projector, feeds = llava
    _, exact = run(original, f"dct-tokens{{value={projector},layout=grid,grid=[8,8]}}")
    assert exact.fidelity.max_rel_error < 1e-5
    model, record = run(original, f"dct-tokens{{value={projector},layout=grid,grid=[4,4]}}")
    assert record.stats["joined"].endswith("69 → 21 tokens") and record.stats["position tables sliced"] == "4"  # 2 aranges (mask), cos, sin
    assert record.fidelity.outputs[0].view == "at the tokens around the compressed ones"
    logits = next(iter(evaluate.run(model, feeds).values()))
    with torch.no_grad():
        image_map = torch.tensor(grid_compression(8, 8, 4, 4), dtype=torch.float32)
        expected = module(*(torch.from_numpy(feeds[k]) for k in ("pixel_values", "input_ids")), image_map).numpy()
    assert logits.shape == expected.shape == (1, 16 + 5, 1000)
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    assert model_stats(model).flops < 0.65 * model_stats(original).flops  # 26.2M → 16.3M (the vision encoder stays)


def _joined_graph(extra_nodes, extra_inputs=(), extra_weights=()):
    """image [1, 16, 8] · projector, joined with text [1, 3, 8], then `extra_nodes` → y."""
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.eye(8, dtype=np.float32), "projector")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["image", "projector"], ["image_tokens"]),
         helper.make_node("Concat", ["image_tokens", "text"], ["joined"], axis=1), *extra_nodes], "vlm",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 16, 8]),
         helper.make_tensor_value_info("text", TensorProto.FLOAT, [1, 3, 8]), *extra_inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [weight, *(numpy_helper.from_array(w, n) for n, w in extra_weights)],
        value_info=[helper.make_tensor_value_info("image_tokens", TensorProto.FLOAT, [1, 16, 8])])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_joined_tokens_whose_length_cannot_be_followed_are_refused():
    """A constant of the joined length that is not a position table, or a caller's input that covers
    the joined sequence: remapping them is guesswork, so the pass says so instead."""
    from onnx import TensorProto, helper

    bias = _joined_graph([helper.make_node("Add", ["joined", "bias"], ["y"])],
                         extra_weights=[("bias", RNG.standard_normal((1, 19, 8)).astype(np.float32))])
    with pytest.raises(SlimgraphError, match="'bias' \\[1, 19, 8\\] has the joined sequence's length 19"):
        run(bias, "dct-tokens{value=image_tokens,layout=grid,grid=[2,2]}")
    mask = _joined_graph([helper.make_node("Mul", ["joined", "mask"], ["y"])],
                         extra_inputs=[helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 19, 1])])
    with pytest.raises(SlimgraphError, match="the input 'mask' \\[1, 19, 1\\] covers the joined 19 tokens"):
        run(mask, "dct-tokens{value=image_tokens,layout=grid,grid=[2,2]}")
    plain = _joined_graph([helper.make_node("Relu", ["joined"], ["y"])])
    with pytest.raises(SlimgraphError, match="compress them with layout=grid"):
        run(plain, "dct-tokens{value=image_tokens,keep=0.5}")
    model, record = run(plain, "dct-tokens{value=image_tokens,layout=grid,grid=[2,2]}")
    assert record.stats["joined"].endswith("19 → 7 tokens")
