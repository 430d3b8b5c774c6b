"""Switching adapters in place on compiled artifacts (ONNX Runtime and PyTorch): after any sequence of
`set_adapter` calls the outputs are the base's bit for bit when none is active, and each adapter's
weights are its merged model's, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

import slimgraph
from slimgraph.errors import SlimgraphError
from slimgraph.passes.adapters.merge import MergeLora, MergeShira
from tests.conftest import copy_model
from tests.passes.adapters.peft_adapters import relative

pytestmark = pytest.mark.slow
BACKENDS = ["onnxruntime", "pytorch"]


def merged(model, made, merge_pass):
    model = copy_model(model)
    merge_pass(adapter=(str(made.path),))(model)
    return model


def live_weights(artifact, names):
    if artifact.backend == "onnxruntime":
        return {n: artifact.model.graph.initializers[n].const_value.numpy() for n in names}
    return {n: artifact.graph_weight(n) for n in names}


@pytest.mark.parametrize("backend", BACKENDS)
def test_switching_round_trip(backend, minilm, minilm_adapter):
    adapters = {"lora": (minilm_adapter("lora"), MergeLora), "dora": (minilm_adapter("dora"), MergeLora),
                "shira": (minilm_adapter("shira"), MergeShira)}
    feeds = adapters["lora"][0].feeds
    artifact = slimgraph.compile(minilm, backend=backend)
    for name, (made, _) in adapters.items():
        artifact.load_adapter(made.path, name)
    assert artifact.adapters["shira"] == "SHiRA on 37 modules (168,960 values)" and artifact.active_adapter is None
    base = artifact(**feeds)
    references = {name: merged(minilm, made, merge_pass) for name, (made, merge_pass) in adapters.items()}
    seen = {}
    for name in ["shira", "lora", "dora", "shira", "lora", None, "dora", "shira", None]:
        artifact.set_adapter(name)
        assert artifact.active_adapter == name
        out = artifact(**feeds)
        if name is None:
            assert all(np.array_equal(out[k], base[k]) for k in base)
            continue
        assert relative(out["last_hidden_state"], base["last_hidden_state"]) > 1e-3
        reference = references[name]
        changed = [n for n, v in reference.graph.initializers.items() if v.const_value is not
                   minilm.graph.initializers[n].const_value]
        for weight, value in live_weights(artifact, changed).items():
            assert np.array_equal(value, reference.graph.initializers[weight].const_value.numpy()), weight
        expected = slimgraph.compile(reference, backend=backend)(**feeds)["last_hidden_state"]
        if backend == "pytorch":  # the same parameters, the same code: the same bits
            assert np.array_equal(out["last_hidden_state"], expected)
        else:  # ORT reads the merged model's weights prepacked, the switchable ones as they are
            assert relative(out["last_hidden_state"], expected) <= 1e-5
        assert relative(out["last_hidden_state"], adapters[name][0].merged) <= 1e-5
        if name in seen:
            assert np.array_equal(out["last_hidden_state"], seen[name])
        seen[name] = out["last_hidden_state"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_base_after_switching_against_the_untouched_artifact(backend, minilm, minilm_adapter):
    """What docs/adapters.md says: PyTorch gives the untouched artifact's outputs back bit for bit;
    ONNX Runtime reads the now overridable weights unpacked, within 1e-5 of them."""
    made = minilm_adapter("lora")
    artifact = slimgraph.compile(minilm, backend=backend)
    untouched = artifact(**made.feeds)["last_hidden_state"]
    artifact.load_adapter(made.path, "lora")
    artifact.set_adapter("lora")
    artifact.set_adapter(None)
    after = artifact(**made.feeds)["last_hidden_state"]
    if backend == "pytorch":
        assert np.array_equal(after, untouched)
    else:
        assert relative(after, untouched) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_adapter_leaves_the_active_one(backend, minilm, minilm_adapter):
    made = minilm_adapter("rslora")
    artifact = slimgraph.compile(minilm, backend=backend)
    artifact.load_adapter(made.path, "a")
    artifact.set_adapter("a")
    before = artifact(**made.feeds)["last_hidden_state"]
    with pytest.raises(SlimgraphError, match=r"no adapter named 'b' is loaded \(loaded: 'a'\); the active adapter "
                                             r"is still 'a'"):
        artifact.set_adapter("b")
    assert artifact.active_adapter == "a"
    assert np.array_equal(artifact(**made.feeds)["last_hidden_state"], before)
    with pytest.raises(SlimgraphError, match="an adapter named 'a' is already loaded"):
        artifact.load_adapter(made.path, "a")


@pytest.mark.parametrize("backend", BACKENDS)
def test_loading_while_an_adapter_is_active(backend, minilm, minilm_adapter):
    lora, shira = minilm_adapter("lora"), minilm_adapter("shira")  # both adapt the query weights
    artifact = slimgraph.compile(minilm, backend=backend)
    artifact.load_adapter(lora.path, "lora")
    base = artifact(**lora.feeds)["last_hidden_state"]
    artifact.set_adapter("lora")
    with_lora = artifact(**lora.feeds)["last_hidden_state"]
    artifact.load_adapter(shira.path, "shira")
    assert artifact.active_adapter == "lora"
    assert np.array_equal(artifact(**lora.feeds)["last_hidden_state"], with_lora)
    artifact.set_adapter("shira")
    assert relative(artifact(**lora.feeds)["last_hidden_state"], shira.merged) <= 1e-5
    artifact.set_adapter(None)
    assert np.array_equal(artifact(**lora.feeds)["last_hidden_state"], base)
    artifact.set_adapter("lora")
    assert np.array_equal(artifact(**lora.feeds)["last_hidden_state"], with_lora)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_embedding_is_untied_once_on_load(backend, gpt2_folder, gpt2_adapter):
    made = gpt2_adapter("tied")
    model = slimgraph.load(gpt2_folder)
    artifact = slimgraph.compile(model, backend=backend)
    base = artifact(**made.feeds)["logits"]
    artifact.load_adapter(made.path, "tied")
    artifact.load_adapter(gpt2_adapter("conv1d").path, "conv1d")
    assert artifact.model is not model  # the caller's model is never changed
    artifact.set_adapter("tied")
    assert relative(artifact(**made.feeds)["logits"], made.unmerged) <= 1e-5
    artifact.set_adapter("conv1d")
    assert relative(artifact(**made.feeds)["logits"], gpt2_adapter("conv1d").merged) <= 1e-5
    artifact.set_adapter(None)
    assert relative(artifact(**made.feeds)["logits"], base) <= 1e-5


def test_saved_onnx_holds_the_active_adapter(tmp_path, minilm, minilm_adapter):
    made = minilm_adapter("shira")
    artifact = slimgraph.compile(minilm)
    artifact.load_adapter(made.path, "shira")
    artifact.set_adapter("shira")
    artifact.save(tmp_path / "shira.onnx")
    artifact.set_adapter(None)
    artifact.save(tmp_path / "base.onnx")
    reference = merged(minilm, made, MergeShira)
    saved, base = slimgraph.load(tmp_path / "shira.onnx"), slimgraph.load(tmp_path / "base.onnx")
    for name, value in reference.graph.initializers.items():
        assert np.array_equal(saved.graph.initializers[name].const_value.numpy(), value.const_value.numpy())
        assert np.array_equal(base.graph.initializers[name].const_value.numpy(),
                              minilm.graph.initializers[name].const_value.numpy())
    assert [v.name for v in saved.graph.inputs] == [v.name for v in minilm.graph.inputs]
