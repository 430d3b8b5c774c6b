"""Causal LMs exported with a KV cache (`load(..., kv_cache=True)`): the signature Optimum and ONNX
Runtime GenAI use, equality with transformers step by step, the passes on it, and the errors."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

import slimgraph
from slimgraph.errors import SlimgraphError
from slimgraph.frontend import cache, load
from slimgraph.generate import Decoder, left_pad
from slimgraph.ir.cache_signature import TOTAL_SEQUENCE, cache_layers, empty_past, position_ids
from slimgraph.ir.meta import EXAMPLE_INPUTS_KEY
from slimgraph.measure import evaluate
from tests.conftest import copy_model

pytestmark = pytest.mark.slow  # an export of a transformer (cached on disk after the first run)


def reference_model(folder):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


def test_the_signature_is_optimums(llama_kv):
    inputs = {v.name: v for v in llama_kv.graph.inputs}
    outputs = {v.name: v for v in llama_kv.graph.outputs}
    layers = 3
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert list(inputs)[3:] == [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    assert list(outputs) == ["logits"] + [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    assert cache_layers(llama_kv) == layers
    dims = lambda v: [str(d) for d in v.shape]  # noqa: E731
    assert dims(inputs["attention_mask"]) == ["batch", TOTAL_SEQUENCE]
    assert dims(inputs["past_key_values.1.value"]) == ["batch", "2", "past_sequence", "16"]  # 2 KV heads of 16
    assert dims(outputs["present.2.key"]) == ["batch", "2", TOTAL_SEQUENCE, "16"]
    assert dims(outputs["logits"]) == ["batch", "sequence", "1000"]
    # the example inputs are two generation steps: the prompt with an empty past, then one token
    prompt, step = llama_kv.meta[EXAMPLE_INPUTS_KEY]
    assert prompt["past_key_values.0.key"].shape[2] == 0 and step["input_ids"].shape[1] == 1
    assert step["past_key_values.0.key"].shape[2] == prompt["input_ids"].shape[1]
    assert step["attention_mask"].shape[1] == prompt["input_ids"].shape[1] + 1


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_steps_equal_transformers_on_the_whole_sequence(request, which):
    """A left-padded batch fed in three steps (4 tokens, then 1, then 2) gives the logits transformers
    computes on the whole sequence at once, without a cache."""
    model = request.getfixturevalue(f"{which}_kv")
    reference = reference_model(request.getfixturevalue(f"{which}_folder"))
    rng = np.random.default_rng(0)
    ids, mask = left_pad([rng.integers(1, 1000, 7).tolist(), rng.integers(1, 1000, 5).tolist()], 0)
    session = evaluate.make_session(model)
    got, past = [], {}
    for start, stop in ((0, 4), (4, 5), (5, 7)):
        feeds = {"input_ids": ids[:, start:stop], "attention_mask": mask[:, :stop],
                 "position_ids": position_ids(mask[:, :stop])[:, start:stop]}
        out = evaluate.run(session, feeds | (past or empty_past(model, batch=2)))
        past = {k.replace("present", "past_key_values"): v for k, v in out.items() if k.startswith("present")}
        got.append(out["logits"])
    with torch.no_grad():
        want = reference(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                         position_ids=torch.from_numpy(position_ids(mask)), use_cache=False).logits.numpy()
    got = np.concatenate(got, axis=1)
    kept = mask.astype(bool)  # padded positions are not compared: nothing reads their logits
    np.testing.assert_allclose(got[kept], want[kept], rtol=1e-4, atol=1e-4)


def test_an_nn_module_exports_with_a_cache_and_keeps_its_forward(llama_folder, llama_kv):
    module = reference_model(llama_folder)
    ids = torch.tensor([[5, 17, 300, 42, 9, 8]])
    model = load(module, example_inputs={"input_ids": ids}, kv_cache=True)
    assert [v.name for v in model.graph.inputs] == [v.name for v in llama_kv.graph.inputs]
    assert "forward" not in vars(module)  # the replacement was for the export only
    assert module(input_ids=ids).logits.shape == (1, 6, 1000)


def test_the_export_cache_is_keyed_on_kv_cache(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text("{}")
    plain = cache.entry_key("hf-folder", tmp_path / "a")
    assert cache.entry_key("hf-folder", tmp_path / "a", {"kv_cache": True}) != plain
    assert cache.entry_key("hf-folder", tmp_path / "a", None) == plain


def test_a_cached_kv_export_equals_a_fresh_one(llama_folder, llama_kv, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMGRAPH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SLIMGRAPH_NO_CACHE", raising=False)
    fresh = load(llama_folder, kv_cache=True)  # exported, written to the cache
    again = load(llama_folder, kv_cache=True)  # read back
    plain = load(llama_folder)
    assert cache_layers(again) == 3 and cache_layers(plain) == 0
    assert len(list((tmp_path / "cache" / "exports").iterdir())) == 2
    for feeds in fresh.meta[EXAMPLE_INPUTS_KEY]:
        want, got = evaluate.run(fresh, feeds), evaluate.run(again, feeds)
        assert all(np.array_equal(want[k], got[k]) for k in want)
    assert [f.keys() for f in again.meta[EXAMPLE_INPUTS_KEY]] == [f.keys() for f in fresh.meta[EXAMPLE_INPUTS_KEY]]


def teacher_forced_logits(model: ir.Model, tokens: np.ndarray, steps: int) -> list[np.ndarray]:
    """The last-position logits of a prompt and then `steps` given tokens, one at a time."""
    session = evaluate.make_session(model)
    decoder = Decoder(model, lambda feeds: evaluate.run(session, feeds))
    logits = [decoder.start(tokens[:, :-steps], np.ones_like(tokens[:, :-steps]))]
    for i in range(steps, 0, -1):
        logits.append(decoder.advance(tokens[:, -i]))
    return logits


@pytest.mark.parametrize("pipeline", ["cleanup", "quantize-weights{bits=8}", "quantize-dynamic",
                                      "prune-width{target=ffn,ratio=0.25}"])
def test_passes_keep_the_cache_working(llama_kv, pipeline):
    """Each pass runs verified on the two generation steps, keeps the signature, and the result
    decodes with its cache as the original does (teacher-forced, logits compared)."""
    model = copy_model(llama_kv)
    report = slimgraph.Pipeline(pipeline).run(model)
    assert report.records[-1].fidelity.cosine > 0.99
    assert [v.name for v in model.graph.inputs] == [v.name for v in llama_kv.graph.inputs]
    assert [v.name for v in model.graph.outputs] == [v.name for v in llama_kv.graph.outputs]
    tokens = np.random.default_rng(1).integers(1, 1000, (2, 9))
    for want, got in zip(teacher_forced_logits(llama_kv, tokens, 4), teacher_forced_logits(model, tokens, 4)):
        cosine = (want * got).sum(-1) / np.linalg.norm(want, axis=-1) / np.linalg.norm(got, axis=-1)
        assert cosine.min() > (0.9999 if pipeline == "cleanup" else 0.98), pipeline


def test_pruning_heads_is_refused_because_the_cache_is_an_output(llama_kv):
    from slimgraph.ir.groups import attention_groups
    from slimgraph.ir.structure import discover

    attention = discover(llama_kv).attention[0]
    why = attention_groups(llama_kv, attention)
    assert isinstance(why, str) and "present.0.key" in why and "KV cache" in why
    for target in ("heads", "kv-heads"):
        with pytest.raises(SlimgraphError, match="KV cache"):
            slimgraph.Pipeline(f"prune-width{{target={target}}}").run(copy_model(llama_kv))


def test_errors_are_one_line(minilm_path, llama_folder, mlp_path, tmp_path):
    with pytest.raises(SlimgraphError, match="kv_cache needs a transformers causal language model.*BertModel"):
        load(minilm_path, kv_cache=True)
    with pytest.raises(SlimgraphError, match="chooses the dynamic axes itself"):
        load(llama_folder, kv_cache=True, dynamic_shapes={"input_ids": {0: "batch"}})
    with pytest.raises(SlimgraphError, match="expected True or False"):
        load(llama_folder, kv_cache="yes")
    with pytest.raises(SlimgraphError, match="has no KV cache inputs"):
        load(mlp_path, kv_cache=True)
    with pytest.raises(SlimgraphError, match="at least 4 tokens"):
        load(reference_model(llama_folder), example_inputs={"input_ids": torch.tensor([[1, 2]])}, kv_cache=True)
