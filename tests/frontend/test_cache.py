"""The export cache: a second load of the same HF folder comes from disk, equal to a fresh export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from slimgraph.frontend import cache, hf_folder, load
from slimgraph.ir.meta import EXAMPLE_INPUTS_KEY, EXAMPLE_INPUTS_SOURCE_KEY, NAME_SCOPES_KEY, SOURCE_KEY
from slimgraph.measure import evaluate


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("SLIMGRAPH_CACHE", str(folder))
    monkeypatch.delenv("SLIMGRAPH_NO_CACHE", raising=False)
    return folder


@pytest.fixture
def exports(monkeypatch) -> list[Path]:
    """The folders actually exported (cache misses), in order."""
    calls: list[Path] = []
    real_export = hf_folder._export

    def counting_export(path, example_inputs, dynamic_shapes):
        calls.append(path)
        return real_export(path, example_inputs, dynamic_shapes)

    monkeypatch.setattr(hf_folder, "_export", counting_export)
    return calls


@pytest.fixture
def llama_copy(llama_folder, tmp_path) -> Path:
    return Path(shutil.copytree(llama_folder, tmp_path / "llama"))


def entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in (cache_dir / "exports").iterdir())


def proto_bytes(model: ir.Model) -> bytes:
    """The serialized model with every weight in memory (external tensors read in)."""
    clone = model.clone()
    ir.external_data.load_to_model(clone)
    return ir.serde.serialize_model(clone).SerializeToString()


@pytest.mark.slow
def test_second_load_comes_from_the_cache_and_equals_the_export(cache_dir, exports, llama_copy):
    fresh = load(llama_copy)  # no display: exported in this process (tests/frontend/test_export_worker.py: with one)
    assert exports == [llama_copy]
    [entry] = entries(cache_dir)
    assert sorted(p.name for p in entry.iterdir()) == ["entry.json", "inputs.npz", "model.onnx", "model.onnx.data"]

    said = []
    cached = load(llama_copy, stage=said.append)
    assert exports == [llama_copy]  # not exported again
    assert said == ["looking in the export cache", "reading the export from the cache"]
    weights = [v.const_value for v in cached.graph.initializers.values()]
    assert weights and all(isinstance(w, ir.LazyTensor) for w in weights if w.nbytes > 256)  # read when used
    assert proto_bytes(cached) == proto_bytes(fresh)
    # the exporter's module paths on nodes survive (structure discovery and diff rely on them)
    scoped = [n for n in cached.graph if NAME_SCOPES_KEY in n.metadata_props]
    assert len(scoped) > len(cached.graph) / 2
    assert [n.metadata_props.get(NAME_SCOPES_KEY) for n in cached.graph] == \
        [n.metadata_props.get(NAME_SCOPES_KEY) for n in fresh.graph]
    assert cached.meta[EXAMPLE_INPUTS_SOURCE_KEY] == fresh.meta[EXAMPLE_INPUTS_SOURCE_KEY] == "synthesized from config"
    assert cached.meta[SOURCE_KEY] == str(llama_copy)
    [want], [got] = fresh.meta[EXAMPLE_INPUTS_KEY], cached.meta[EXAMPLE_INPUTS_KEY]
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) and got[k].dtype == want[k].dtype
                                             for k in want)
    feeds = got
    np.testing.assert_array_equal(evaluate.run(cached, feeds)["logits"], evaluate.run(fresh, feeds)["logits"])


@pytest.mark.slow
def test_a_copy_elsewhere_hits_and_a_changed_file_misses(cache_dir, exports, llama_copy, tmp_path):
    load(llama_copy)
    moved = Path(shutil.copytree(llama_copy, tmp_path / "elsewhere"))
    assert load(moved).meta[SOURCE_KEY] == str(moved)  # same content: from the cache, with its own source
    assert exports == [llama_copy]

    config = json.loads((moved / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (moved / "config.json").write_text(json.dumps(config))
    load(moved)
    assert exports == [llama_copy, moved]
    assert len(entries(cache_dir)) == 2

    (moved / "README.md").write_text("a new file is new content too")
    load(moved)
    assert exports == [llama_copy, moved, moved]


DAMAGES = {
    # (the weights are not in the entry: it says where in the folder's safetensors files they lie)
    "a flipped byte of the graph": lambda e: _flip_byte(e / "model.onnx"),
    "a truncated graph": lambda e: (e / "model.onnx").write_bytes((e / "model.onnx").read_bytes()[:1000]),
    "a broken entry.json": lambda e: (e / "entry.json").write_text("{"),
    "missing inputs": lambda e: (e / "inputs.npz").unlink(),
}


def _flip_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    path.write_bytes(bytes(blob))


@pytest.mark.slow
def test_a_damaged_entry_is_rebuilt_not_trusted(cache_dir, exports, llama_copy):
    fresh = load(llama_copy)
    for count, (damage, apply) in enumerate(DAMAGES.items(), start=2):
        [entry] = entries(cache_dir)
        apply(entry)
        rebuilt = load(llama_copy)
        assert len(exports) == count, damage
        assert proto_bytes(rebuilt) == proto_bytes(fresh), damage
    load(llama_copy)  # the last rewritten entry is whole: no export
    assert len(exports) == len(DAMAGES) + 1


@pytest.mark.slow
def test_a_cached_model_saves_self_contained_and_optimizes(cache_dir, llama_copy, tmp_path):
    """Weights read from the cache's data file must not be saved as references to it."""
    import onnx

    from slimgraph.api import diff, save
    from slimgraph.passes import Pipeline

    fresh = load(llama_copy)  # exported, and written to the cache
    feeds = fresh.meta[EXAMPLE_INPUTS_KEY][0]
    want = evaluate.run(fresh, feeds)["logits"]
    assert diff(llama_copy, llama_copy).identical  # both sides from the cache

    model = load(llama_copy)
    Pipeline.parse("cleanup").run(model)  # verified against the cached original as it runs
    out = save(model, tmp_path / "out" / "llama.onnx")
    assert sorted(p.name for p in out.parent.iterdir()) == ["llama.onnx"]
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in onnx.load(out).graph.initializer)
    shutil.rmtree(cache_dir)  # the saved file stands alone, and the model in memory keeps its mapped weights
    np.testing.assert_allclose(evaluate.run(load(out), feeds)["logits"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(evaluate.run(model, feeds)["logits"], want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_no_cache_switch(cache_dir, exports, llama_copy, monkeypatch):
    monkeypatch.setenv("SLIMGRAPH_NO_CACHE", "1")
    load(llama_copy)
    load(llama_copy)
    assert exports == [llama_copy, llama_copy]
    assert not (cache_dir / "exports").exists()


@pytest.mark.slow
def test_inputs_given_by_the_caller_bypass_the_cache(cache_dir, exports, llama_copy):
    ids = np.arange(12, dtype=np.int64).reshape(2, 6)
    import torch

    inputs = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.ones(2, 6, dtype=torch.int64)}
    model = load(llama_copy, example_inputs=inputs)
    assert np.array_equal(model.meta[EXAMPLE_INPUTS_KEY][0]["input_ids"], ids)
    assert exports == [llama_copy] and not (cache_dir / "exports").exists()


def test_key_covers_content_and_exporter(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text("{}")
    key = cache.entry_key("hf-folder", tmp_path / "a")
    assert cache.entry_key("hf-folder", tmp_path / "a") == key
    assert cache.entry_key("gguf", tmp_path / "a") != key
    (tmp_path / "a" / ".editor-swap").write_text("not the model")  # hidden files are not content
    assert cache.entry_key("hf-folder", tmp_path / "a") == key
    (tmp_path / "a" / "config.json").write_text("{ }")
    assert cache.entry_key("hf-folder", tmp_path / "a") != key
    monkeypatch.setattr(cache, "exporter_versions", lambda: {"torch": "0.0"})
    assert cache.entry_key("hf-folder", tmp_path / "a") != key


def test_writes_are_staged_and_old_entries_pruned(cache_dir, monkeypatch, mlp_model):
    monkeypatch.setenv("SLIMGRAPH_CACHE_MAX_GB", "0")  # keep only the entry just written
    mlp_model.meta[EXAMPLE_INPUTS_KEY] = [{"x": np.ones((2, 8), np.float32)}]
    mlp_model.meta[EXAMPLE_INPUTS_SOURCE_KEY] = "test"
    sources = []
    for name in ("a.bin", "b.bin"):
        sources.append(cache_dir.parent / name)
        sources[-1].write_bytes(name.encode())
        cache.cached_export("test", sources[-1], lambda: mlp_model)
    [entry] = entries(cache_dir)
    assert entry.name == cache.entry_key("test", sources[-1])
    assert not [p for p in (cache_dir / "exports").iterdir() if p.name.startswith(".")]
    again = cache.cached_export("test", sources[-1], lambda: pytest.fail("should come from the cache"))
    assert proto_bytes(again) == proto_bytes(mlp_model)
    assert np.array_equal(again.meta[EXAMPLE_INPUTS_KEY][0]["x"], np.ones((2, 8), np.float32))


def test_an_unwritable_cache_does_not_fail_the_load(tmp_path, monkeypatch, mlp_model):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("SLIMGRAPH_CACHE", str(blocker))
    source = tmp_path / "m.bin"
    source.write_bytes(b"m")
    assert cache.cached_export("test", source, lambda: mlp_model) is mlp_model
