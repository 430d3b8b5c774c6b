"""The onnxruntime-genai backend: the folder it writes runs in ONNX Runtime GenAI and gives the
tokens `slimgraph.generate` gives, with the cache fed back (as exported) and in place (fuse-ort)."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

import slimgraph
from slimgraph.errors import SlimgraphError
from slimgraph.frontend import load
from slimgraph.generate import SessionDecoder
from slimgraph.passes import Pipeline
from tests.conftest import copy_model

pytestmark = pytest.mark.slow  # an export of a transformer (cached on disk after the first run)
PROMPT = [5, 17, 300, 42, 9, 8, 111]


def slimgraph_tokens(model: ir.Model, new: int) -> list[int]:
    artifact = slimgraph.compile(model, backend="onnxruntime")
    decoder = SessionDecoder(artifact.model, artifact.session)
    ids = np.array([PROMPT])
    logits, tokens = decoder.start(ids, np.ones_like(ids)), []
    for _ in range(new):
        tokens.append(int(logits.argmax(-1)[0]))
        logits = decoder.advance(np.array(tokens[-1:]))
    return tokens


def genai_tokens(folder, new: int) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + new, min_length=len(PROMPT) + new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([PROMPT], np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(PROMPT):]]


@pytest.mark.parametrize("pipeline", ["cleanup", "cleanup,fuse-ort,quantize-weights{bits=4,accuracy_level=4}"])
def test_genai_runs_the_folder_token_for_token(llama_kv, pipeline, tmp_path):
    model = copy_model(llama_kv)
    Pipeline.parse(pipeline).run(model)
    folder = slimgraph.compile(model, backend="onnxruntime-genai").save(tmp_path / "genai")
    config = json.loads((folder / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == (3, 2, 16)
    assert decoder["num_attention_heads"] == 4 and config["model"]["type"] == "llama"
    assert config["search"]["past_present_share_buffer"] == ("fuse-ort" in pipeline)
    assert genai_tokens(folder, 12) == slimgraph_tokens(model, 12)


def test_the_cli_writes_the_folder_with_the_tokenizer(smollm2_folder, tmp_path):
    """From a folder with a tokenizer: the tokenizer files come along, and GenAI's own tokenizer
    reads them."""
    import onnxruntime_genai as og

    from slimgraph.cli import main

    out = tmp_path / "smollm2-genai"
    assert main(["optimize", str(smollm2_folder), "--kv-cache", "-p", "cleanup,fuse-ort", "--backend",
                 "onnxruntime-genai", "-o", str(out)]) == 0
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    tokenizer = og.Tokenizer(og.Model(str(out)))
    assert tokenizer.decode(tokenizer.encode("The capital of France is")) == "The capital of France is"


def test_what_genai_cannot_run_is_refused(llama_folder, llama_kv, tmp_path):
    with pytest.raises(SlimgraphError, match="needs a causal LM with a KV cache"):
        slimgraph.compile(load(llama_folder), backend="onnxruntime-genai")
    with pytest.raises(SlimgraphError, match="writes a folder"):
        slimgraph.compile(llama_kv, backend="onnxruntime-genai").save(tmp_path / "model.onnx")
