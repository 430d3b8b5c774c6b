"""`slimgraph.generate`: greedy decoding with both backends, token for token against transformers'
`generate` (small random Llama; SmolLM2-135M), with and without a KV cache, and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import slimgraph
from slimgraph.errors import SlimgraphError
from slimgraph.frontend import load
from slimgraph.generate import Decoder, generate

BACKENDS = ["onnxruntime", "pytorch"]


class DigitTokenizer:
    """Just enough of a transformers tokenizer for the random-weight Llama (no tokenizer files):
    a prompt is token ids written as numbers, "5 17 300"."""

    pad_token_id = 0

    def __init__(self, eos_token_id: int | None = None) -> None:
        self.eos_token_id = eos_token_id

    def __call__(self, text: str) -> dict:
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i == self.eos_token_id))


PROMPTS = ["5 17 300 42 9 8 111", "7 8 999"]


@pytest.fixture(scope="module")
def llama_reference(llama_folder):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(llama_folder, local_files_only=True).eval()


def transformers_generate(model, tokenizer, prompts: list[str], new_tokens: int, eos: int | None = None
                          ) -> list[list[int]]:
    """transformers' greedy `generate` on the same left-padded batch, new tokens per row (to the end of sequence)."""
    from slimgraph.generate import left_pad

    rows = [list(tokenizer(p)["input_ids"]) for p in prompts]
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=tokenizer.pad_token_id)
    new = out[:, ids.shape[1]:].tolist()
    return [row[: row.index(eos) + 1] if eos is not None and eos in row else row for row in new]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_small_llama_batch_equals_transformers(llama_kv, llama_reference, backend):
    tokenizer = DigitTokenizer()
    artifact = slimgraph.compile(llama_kv, backend=backend)
    got = generate(artifact, tokenizer, PROMPTS, max_new_tokens=12)
    assert got.token_ids == transformers_generate(llama_reference, tokenizer, PROMPTS, 12)
    assert [len(t) for t in got.token_ids] == [12, 12]
    assert got.texts == [tokenizer.decode(t) for t in got.token_ids]
    assert got.prompt_ids == [[5, 17, 300, 42, 9, 8, 111], [7, 8, 999]]


@pytest.mark.slow
def test_without_a_cache_the_same_tokens(llama_ir, llama_kv):
    """The export without a cache runs the whole sequence each step and picks the same tokens."""
    tokenizer = DigitTokenizer()
    cached = generate(slimgraph.compile(llama_kv), tokenizer, PROMPTS, 8)
    whole = generate(slimgraph.compile(llama_ir), tokenizer, PROMPTS, 8)
    assert Decoder(llama_ir, lambda feeds: {}).has_cache is False
    assert whole.token_ids == cached.token_ids


@pytest.mark.slow
def test_stops_at_the_end_of_sequence_token(llama_kv, llama_reference):
    free = generate(slimgraph.compile(llama_kv), DigitTokenizer(), PROMPTS, 10)
    eos = free.token_ids[0][3]  # the first row's fourth token ends it; the other row continues or ends later
    tokenizer = DigitTokenizer(eos_token_id=eos)
    got = generate(slimgraph.compile(llama_kv), tokenizer, PROMPTS, 10)
    assert got.token_ids[0] == free.token_ids[0][: free.token_ids[0].index(eos) + 1]
    assert got.token_ids == transformers_generate(llama_reference, tokenizer, PROMPTS, 10, eos=eos)
    assert str(eos) not in got.texts[0].split()  # special tokens are skipped in the text
    everything = generate(slimgraph.compile(llama_kv), tokenizer, PROMPTS, 10, stop_at_eos=False)
    assert everything.token_ids == free.token_ids


def test_errors(mlp_model):
    artifact = slimgraph.compile(mlp_model)
    with pytest.raises(SlimgraphError, match="not a causal language model graph: generation needs an input 'input_ids'"):
        generate(artifact, DigitTokenizer(), "1 2", 3)
    with pytest.raises(SlimgraphError, match="takes a compiled model"):
        generate(mlp_model, DigitTokenizer(), "1 2", 3)
    with pytest.raises(SlimgraphError, match="max_new_tokens=0"):
        generate(artifact, DigitTokenizer(), "1 2", 0)
    with pytest.raises(SlimgraphError, match="not loaded with a tokenizer"):
        generate(artifact, None, "1 2", 3)
    with pytest.raises(SlimgraphError, match="expected a string or a list of strings"):
        generate(artifact, DigitTokenizer(), [1, 2], 3)


def test_the_package_attribute_is_callable_after_the_module_is_imported():
    import slimgraph.generate as module

    assert callable(slimgraph.generate) and callable(module)
    with pytest.raises(SlimgraphError, match="takes a compiled model"):
        slimgraph.generate(None, None, "x", 1)


# --- SmolLM2-135M, a real trained decoder -------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_kv(smollm2_folder):
    return load(smollm2_folder, kv_cache=True)


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_folder):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_folder, local_files_only=True).eval()


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_smollm2_token_for_token(smollm2_kv, smollm2_reference, smollm2_folder, backend):
    """20 tokens after "The capital of France is", then a batch of two prompts of different lengths
    (left-padded): the tokens transformers' `generate` picks, from both backends."""
    from slimgraph.frontend.calibration import load_tokenizer
    from slimgraph.zoo import smollm2

    tokenizer = load_tokenizer(smollm2_folder)
    artifact = slimgraph.compile(smollm2_kv, backend=backend)
    got = generate(artifact, None, smollm2.PROMPT, max_new_tokens=20)  # the tokenizer the model was loaded with
    want = transformers_generate(smollm2_reference, tokenizer, [smollm2.PROMPT], 20, eos=tokenizer.eos_token_id)
    assert got.token_ids == want
    assert got.text.startswith(" " + smollm2.ANSWER)
    prompts = ["def fibonacci(n):", "The three primary colours are red,"]
    got = generate(artifact, tokenizer, prompts, max_new_tokens=12)
    assert got.token_ids == transformers_generate(smollm2_reference, tokenizer, prompts, 12, eos=tokenizer.eos_token_id)
    assert np.diff([len(got.prompt_ids[0]), len(got.prompt_ids[1])]) != 0  # the batch was padded


@pytest.mark.slow
def test_smollm2_fused_for_ort_still_token_for_token(smollm2_kv, smollm2_reference, smollm2_folder):
    """fuse-ort (GroupQueryAttention writing the cache in place, RotaryEmbedding, RMSNorm): the
    tokens transformers picks, for one prompt and for a left-padded batch."""
    from slimgraph.frontend.calibration import load_tokenizer
    from slimgraph.passes import Pipeline
    from slimgraph.zoo import smollm2
    from tests.conftest import copy_model

    tokenizer = load_tokenizer(smollm2_folder)
    model = copy_model(smollm2_kv)
    Pipeline.parse("cleanup,fuse-ort").run(model)
    artifact = slimgraph.compile(model, backend="onnxruntime")
    got = generate(artifact, tokenizer, smollm2.PROMPT, max_new_tokens=20)
    assert got.token_ids == transformers_generate(smollm2_reference, tokenizer, [smollm2.PROMPT], 20,
                                                  eos=tokenizer.eos_token_id)
    prompts = ["def fibonacci(n):", "The three primary colours are red,"]
    got = generate(artifact, tokenizer, prompts, max_new_tokens=12)
    assert got.token_ids == transformers_generate(smollm2_reference, tokenizer, prompts, 12, eos=tokenizer.eos_token_id)


@pytest.mark.slow
def test_text_calibrates_a_cache_graph(smollm2_kv, tmp_path):
    """Text calibration fills a decoder's cache inputs (an empty past, positions from the mask) as
    generate's first step does; AWQ runs on it."""
    from slimgraph.frontend.calibration import load_calibration
    from slimgraph.passes import Pipeline
    from slimgraph.passes.quantize.weights import QuantizeWeights
    from slimgraph.zoo.text import calibration_texts
    from tests.conftest import copy_model

    text = tmp_path / "calib.txt"
    text.write_text("\n".join(p.replace("\n", " ") for p in calibration_texts(2)))
    feeds, source = load_calibration(text, smollm2_kv)
    assert source == "calib.txt: 2 prompts"
    assert feeds[0]["past_key_values.0.key"].shape[2] == 0
    assert feeds[0]["position_ids"].shape == feeds[0]["input_ids"].shape
    model = copy_model(smollm2_kv)
    awq = QuantizeWeights(bits=4, method="awq", exclude=("model.layers.[1-9]*", "lm_head"))  # layer 0: quick
    report = Pipeline([awq]).run(model, calib=text)
    assert report.records[-1].stats["linears quantized"] == 7 and report.records[-1].fidelity.cosine > 0.99


def test_a_trimmed_vocabulary_is_scattered_back_to_its_ids():
    from slimgraph.generate import last_logits

    logits = np.array([[[0.0, 0.0, 0.0], [1.0, 3.0, 2.0]]], np.float32)  # [batch 1, 2 positions, 3 kept ids]
    full = last_logits({"logits": logits, "token_ids": np.array([5, 9, 2])})
    assert full.shape == (1, 10) and full.argmax(-1).tolist() == [9]
    assert full[0, 2] == 2.0 and full[0, 0] == -np.inf
