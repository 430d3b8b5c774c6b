"""A Hugging Face folder is captured without reading its weights: each is read where it lies, when used."""

from __future__ import annotations

import collections
import shutil
from pathlib import Path

import numpy as np
import pytest

from slimgraph.frontend import hf_folder, lazy_weights, load
from slimgraph.frontend.lazy_weights import bound_sources, safetensors_index
from slimgraph.ir.meta import EXAMPLE_INPUTS_KEY
from slimgraph.measure import evaluate
from slimgraph.passes import Pipeline

pytestmark = pytest.mark.slow


def _save_llama(folder: Path, seed: int, **config) -> Path:
    import torch
    import transformers

    from tests.conftest import SMALL_CONFIGS

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL_CONFIGS["llama"]["kwargs"], **config))
    model.eval().to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tied_bf16_llama(tmp_path_factory) -> Path:
    """bf16, as most decoders ship, with the LM head tied to the embedding (one tensor, two names)."""
    return _save_llama(tmp_path_factory.mktemp("llama-bf16-tied"), seed=0, tie_word_embeddings=True)


@pytest.fixture
def no_cache(monkeypatch) -> None:
    monkeypatch.setenv("SLIMGRAPH_NO_CACHE", "1")


@pytest.fixture
def reads(monkeypatch) -> collections.Counter:
    """Tensor name in the folder → how many times its bytes were read."""
    counts: collections.Counter = collections.Counter()
    read = lazy_weights.WeightSource.read

    def counting_read(source):
        counts[source.key] += 1
        return read(source)

    monkeypatch.setattr(lazy_weights.WeightSource, "read", counting_read)
    return counts


def _eager(folder: Path, monkeypatch, **options) -> object:
    """The folder loaded as before lazy weights: transformers reads every weight, torch exports them."""
    with monkeypatch.context() as patch:
        patch.setattr(hf_folder, "build_without_weights", lambda path: None)
        return load(folder, **options)


def test_no_weight_is_read_until_a_pass_reads_it_and_each_once(tied_bf16_llama, no_cache, reads):
    model = load(tied_bf16_llama)
    stored = safetensors_index(tied_bf16_llama)
    assert all(len(stored[key].shape) == 1 for key in reads)  # only norm vectors, which the exporter's optimizer folds
    reads.clear()
    bound = bound_sources(model)
    linears = {key for key, source in stored.items() if len(source.shape) == 2 and "embed" not in key}
    assert linears <= {source.key for source in bound.values()}
    assert all(source.transposed for source in bound.values() if source.key in linears)  # read as [in, out]

    Pipeline.parse("quantize-weights{bits=4}").run(model, verify=False)
    assert set(reads) == linears | {"model.embed_tokens.weight"}  # the tied head quantizes the table once
    assert set(reads.values()) == {1}
    assert "model.embed_tokens.weight" in {s.key for s in bound_sources(model).values()}  # the Gather's, unread


def test_the_graph_and_its_outputs_equal_the_export_of_the_loaded_weights(tied_bf16_llama, no_cache, monkeypatch):
    lazy = load(tied_bf16_llama)
    eager = _eager(tied_bf16_llama, monkeypatch)
    assert [n.op_type for n in lazy.graph] == [n.op_type for n in eager.graph]
    assert sorted(lazy.graph.initializers) == sorted(eager.graph.initializers)
    for name, value in eager.graph.initializers.items():
        np.testing.assert_array_equal(lazy.graph.initializers[name].const_value.numpy(), value.const_value.numpy(),
                                      err_msg=name)
    feeds = eager.meta[EXAMPLE_INPUTS_KEY][0]
    np.testing.assert_array_equal(evaluate.run(lazy, feeds)["logits"], evaluate.run(eager, feeds)["logits"])


def test_the_cache_holds_the_graph_and_the_weights_are_read_from_the_folder(tmp_path, monkeypatch):
    """The entry records where each weight lies, not its bytes: new values under the same names
    (a fine-tuned checkpoint saved over the old) are read fresh without exporting again."""
    monkeypatch.setenv("SLIMGRAPH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SLIMGRAPH_NO_CACHE", raising=False)
    folder = _save_llama(tmp_path / "llama", seed=0)
    first = load(folder)
    [entry] = (tmp_path / "cache" / "exports").iterdir()
    assert (entry / "model.onnx.data").stat().st_size < 10_000  # rotary frequencies, not weights
    feeds = first.meta[EXAMPLE_INPUTS_KEY][0]
    before = evaluate.run(first, feeds)["logits"]

    shutil.rmtree(folder)
    _save_llama(folder, seed=1)  # same names and shapes, other values
    exports = []
    real_export = hf_folder._export
    monkeypatch.setattr(hf_folder, "_export", lambda *a: exports.append(a) or real_export(*a))
    again = load(folder)
    assert exports == []
    after = evaluate.run(again, feeds)["logits"]
    assert not np.allclose(after, before)
    monkeypatch.setenv("SLIMGRAPH_NO_CACHE", "1")
    np.testing.assert_array_equal(after, evaluate.run(_eager(folder, monkeypatch), feeds)["logits"])


def test_a_folder_whose_tensors_are_named_otherwise_is_loaded_whole(tmp_path, no_cache, monkeypatch):
    """A checkpoint saved from the base model (no `model.` prefix) is one transformers maps by name
    on load; slimgraph does not bind it, and reads it whole instead, as transformers does."""
    from safetensors.torch import load_file, save_file

    folder = _save_llama(tmp_path / "llama", seed=0, tie_word_embeddings=True)
    tensors = load_file(folder / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    model = load(folder)
    assert bound_sources(model) == {}
    reference = _eager(folder, monkeypatch)
    feeds = reference.meta[EXAMPLE_INPUTS_KEY][0]
    np.testing.assert_array_equal(evaluate.run(model, feeds)["logits"], evaluate.run(reference, feeds)["logits"])


def test_a_kv_cache_export_runs_its_prompt_one_module_at_a_time_and_equals_the_whole_load(tied_bf16_llama, no_cache,
                                                                                        monkeypatch):
    """The example steps' past keys and values come from running the model on the prompt: each
    module's weights are read just before it runs, and dropped after."""
    lazy = load(tied_bf16_llama, kv_cache=True)
    eager = _eager(tied_bf16_llama, monkeypatch, kv_cache=True)
    assert bound_sources(lazy) and not bound_sources(eager)
    assert [n.op_type for n in lazy.graph] == [n.op_type for n in eager.graph]
    for got, want in zip(lazy.meta[EXAMPLE_INPUTS_KEY], eager.meta[EXAMPLE_INPUTS_KEY], strict=True):
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    for feeds in eager.meta[EXAMPLE_INPUTS_KEY]:
        got, want = evaluate.run(lazy, feeds), evaluate.run(eager, feeds)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_a_kv_cache_entry_is_exported_again_when_the_weights_are_rewritten(tmp_path, monkeypatch):
    """Its example steps were computed with the weights (the graph was not): a checkpoint saved over
    the old one gets steps of its own."""
    monkeypatch.setenv("SLIMGRAPH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SLIMGRAPH_NO_CACHE", raising=False)
    folder = _save_llama(tmp_path / "llama", seed=0)
    first = load(folder, kv_cache=True)
    shutil.rmtree(folder)
    _save_llama(folder, seed=1)
    again = load(folder, kv_cache=True)
    past = [name for name in first.meta[EXAMPLE_INPUTS_KEY][1] if name.startswith("past_key_values")]
    assert past and not np.allclose(first.meta[EXAMPLE_INPUTS_KEY][1][past[0]], again.meta[EXAMPLE_INPUTS_KEY][1][past[0]])
    monkeypatch.setenv("SLIMGRAPH_NO_CACHE", "1")
    want = _eager(folder, monkeypatch, kv_cache=True).meta[EXAMPLE_INPUTS_KEY][1]
    np.testing.assert_array_equal(again.meta[EXAMPLE_INPUTS_KEY][1][past[0]], want[past[0]])
