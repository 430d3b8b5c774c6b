"""Hugging Face folders: MiniLM (trained) and small GPT-2/Llama configs, against PyTorch."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from slimgraph.errors import SlimgraphError
from slimgraph.frontend import load
from slimgraph.measure import evaluate
from slimgraph.measure.inputs import sample_inputs

SENTENCES = ["A man is eating food.", "The new movie is awesome, I loved every minute of it."]


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def tokenize(minilm_path, sentences):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    return tokenizer(sentences, padding=True, return_tensors="pt")


def test_minilm_folder_matches_pytorch(minilm, minilm_path, minilm_torch):
    assert [v.name for v in minilm.graph.outputs] == ["last_hidden_state", "pooler_output"]
    encoded = tokenize(minilm_path, SENTENCES)
    got = evaluate.run(minilm, {k: v.numpy() for k, v in encoded.items()})
    with torch.no_grad():
        want = minilm_torch(**encoded)
    assert rel_error(got["last_hidden_state"], want.last_hidden_state.numpy()) < 1e-4
    assert rel_error(got["pooler_output"], want.pooler_output.numpy()) < 1e-4


@pytest.mark.slow
def test_minilm_as_module_matches_pytorch(minilm_path, minilm_torch):
    encoded = tokenize(minilm_path, SENTENCES)
    model = load(
        minilm_torch,
        example_inputs=dict(encoded),
        dynamic_shapes={k: {0: "batch", 1: "sequence"} for k in encoded},
    )
    longer = tokenize(minilm_path, SENTENCES + ["Three sentences now, and this one is the longest of them all."])
    got = evaluate.run(model, {k: v.numpy() for k, v in longer.items()})
    with torch.no_grad():
        want = minilm_torch(**longer).last_hidden_state.numpy()
    assert rel_error(next(iter(got.values())), want) < 1e-4


@pytest.mark.parametrize("which", ["gpt2", "llama"])
@pytest.mark.slow
def test_small_lms_with_dynamic_axes(request, which):
    model = request.getfixturevalue(f"{which}_ir")
    folder = request.getfixturevalue(f"{which}_folder")
    from slimgraph.frontend.hf_folder import load_transformers_model

    reference = load_transformers_model(folder)
    assert [str(v.shape) for v in model.graph.inputs] == ["[batch,sequence]"] * 2
    assert [v.name for v in model.graph.outputs] == ["logits"]
    assert model.meta["slimgraph.example_inputs_source"] == "synthesized from config"
    for batch, sequence in [(1, 5), (3, 23)]:
        feeds = sample_inputs(model, batch=batch, sequence=sequence)
        got = evaluate.run(model, feeds)["logits"]
        with torch.no_grad():
            want = reference(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
        assert got.shape == (batch, sequence, 1000)
        assert rel_error(got, want) < 1e-4


def test_folder_without_config(tmp_path):
    with pytest.raises(SlimgraphError, match="not a Hugging Face model folder: no config.json"):
        load(tmp_path)


def test_folder_with_bad_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SlimgraphError, match="config.json is not valid JSON"):
        load(tmp_path)


def test_folder_with_corrupt_weights(tmp_path, gpt2_folder):
    import shutil

    shutil.copy(gpt2_folder / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(SlimgraphError, match="model.safetensors is not a safetensors file: its header is not JSON"):
        load(tmp_path)


def test_a_sentence_transformers_folder_is_verified_as_sentences(minilm, gpt2_ir):
    """MiniLM's folder mean-pools its token states (1_Pooling): Verify compares those sentences;
    a folder without a Pooling module keeps the token-by-token comparison."""
    from slimgraph.ir.meta import OUTPUT_MAPS_KEY
    from slimgraph.measure.fidelity import OutputMap

    assert minilm.meta[OUTPUT_MAPS_KEY] == {"last_hidden_state": OutputMap(pooled_by="attention_mask")}
    assert OUTPUT_MAPS_KEY not in gpt2_ir.meta


@pytest.mark.slow
def test_a_bf16_decoder_computes_in_float32_and_quantizes_to_int4(tmp_path):
    """Most published decoders ship bf16: the export computes in float32 (what ONNX Runtime's CPU
    provider runs) and equals transformers' own bf16 model; every linear becomes MatMulNBits, whose
    logits are as close to the bf16 model as int4 is to float32."""
    import transformers

    from slimgraph.passes import Pipeline
    from tests.conftest import SMALL_CONFIGS

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMALL_CONFIGS["llama"]["kwargs"])
    reference = transformers.LlamaForCausalLM(config).eval().to(torch.bfloat16)
    reference.save_pretrained(tmp_path / "llama-bf16")
    assert '"bfloat16"' in (tmp_path / "llama-bf16" / "config.json").read_text()
    ids = torch.randint(0, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())}
    with torch.no_grad():
        bf16 = reference(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().numpy()

    def cosine(a, b):
        return float(np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b))

    model = load(tmp_path / "llama-bf16")
    assert {v.const_value.dtype for v in model.graph.initializers.values() if v.const_value.size > 1000} \
        == {ir.DataType.FLOAT}
    exported = evaluate.run(model, feeds)["logits"]
    assert cosine(exported, bf16) >= 0.9999  # bf16 weights widen exactly; bf16's own arithmetic is all that differs

    report = Pipeline.parse("quantize-weights{bits=4}").run(model)
    linears = 3 * 7 + 1  # q, k, v, o, gate, up, down per block, and the LM head
    histogram = report.after.op_histogram
    assert histogram["com.microsoft.MatMulNBits"] == linears
    assert histogram["MatMul"] == 3 * 2  # what is left: attention's q·kᵀ and p·v, which have no weight
    int4 = evaluate.run(model, feeds)["logits"]
    # a 64-wide random model at group size 32 loses about 1.4% of cosine to int4 whatever the reference
    assert cosine(int4, bf16) >= cosine(int4, exported) - 1e-3 >= 0.98
