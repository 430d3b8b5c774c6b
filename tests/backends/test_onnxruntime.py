"""ONNX Runtime backend: call, save (atomic, external data), reload."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import slimgraph
from slimgraph.errors import SlimgraphError
from slimgraph.measure.inputs import sample_inputs


def test_compile_call_and_save(tmp_path, mlp_model):
    artifact = slimgraph.compile(mlp_model, backend="onnxruntime")
    feeds = sample_inputs(mlp_model)
    by_name = artifact(**feeds)["y"]
    by_position = artifact(feeds["x"])["y"]
    np.testing.assert_array_equal(by_name, by_position)
    path = artifact.save(tmp_path / "sub" / "mlp.onnx")
    assert path.is_file() and not (tmp_path / "sub" / "mlp.onnx.data").exists()
    assert [p.name for p in path.parent.iterdir()] == ["mlp.onnx"]  # no temporary files left
    reloaded = slimgraph.compile(slimgraph.load(path))
    np.testing.assert_array_equal(reloaded(**feeds)["y"], by_name)


def test_accepts_torch_tensors(mlp_model):
    torch = pytest.importorskip("torch")
    artifact = slimgraph.compile(mlp_model)
    x = torch.randn(3, 8)
    np.testing.assert_allclose(artifact(x)["y"], artifact(x.numpy())["y"])


def test_external_data_when_asked(tmp_path, minilm):
    path = slimgraph.compile(minilm, external_data=True).save(tmp_path / "minilm.onnx")
    data = tmp_path / "minilm.onnx.data"
    assert data.stat().st_size > 80_000_000 > path.stat().st_size
    feeds = minilm.meta["slimgraph.example_inputs"][0]
    got = slimgraph.compile(slimgraph.load(path))(**feeds)
    want = slimgraph.compile(minilm)(**feeds)
    np.testing.assert_array_equal(got["last_hidden_state"], want["last_hidden_state"])


def test_failed_save_leaves_nothing(tmp_path, mlp_model, monkeypatch):
    import onnx_ir as ir

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", broken_save)
    with pytest.raises(SlimgraphError, match="cannot write .*disk full"):
        slimgraph.compile(mlp_model).save(tmp_path / "mlp.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, message", [
    ("model.bin", "writes a .onnx file"),
    ("afile/model.onnx", "afile is a file, not a folder"),
    ("adir.onnx", "is a folder; give a file name"),
])
def test_bad_output_path(tmp_path, mlp_model, name, message):
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "adir.onnx").mkdir()
    with pytest.raises(SlimgraphError, match=message):
        slimgraph.compile(mlp_model).save(tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.onnx", "afile"]


def test_unknown_backend(mlp_model):
    with pytest.raises(SlimgraphError, match="unknown backend 'tvm'"):
        slimgraph.compile(mlp_model, backend="tvm")


def test_large_weights_go_to_external_data(tmp_path, mlp_model, monkeypatch):
    """From EXTERNAL_DATA_BYTES of weights (256 MB) they go to `.data`: a later load maps them."""
    from slimgraph.backends import onnxruntime

    monkeypatch.setattr(onnxruntime, "EXTERNAL_DATA_BYTES", 100)  # pretend the 860-byte MLP is large
    path = slimgraph.compile(mlp_model).save(tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").is_file()
    feeds = sample_inputs(mlp_model)
    np.testing.assert_array_equal(slimgraph.compile(slimgraph.load(path))(**feeds)["y"],
                                  slimgraph.compile(mlp_model)(**feeds)["y"])


def test_a_decoder_with_a_kv_cache_goes_to_external_data(tmp_path, llama_kv, llama_ir):
    """As GenAI's builder writes one: a session built from the file maps its weights (bench.decoder_session)."""
    slimgraph.save(llama_kv, tmp_path / "decoder.onnx")
    slimgraph.save(llama_ir, tmp_path / "plain.onnx")
    assert (tmp_path / "decoder.onnx.data").is_file() and not (tmp_path / "plain.onnx.data").exists()


def test_weights_from_another_files_external_data_are_written_in(tmp_path, mlp_model):
    """A model whose weights live in the input's .data file saves as one self-contained file."""
    source = tmp_path / "in" / "mlp.onnx"
    slimgraph.compile(mlp_model, external_data=True).save(source)
    loaded = ir.load(source)
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in loaded.graph.initializers.values())
    out = slimgraph.compile(loaded).save(tmp_path / "out" / "mlp.onnx")
    assert sorted(p.name for p in out.parent.iterdir()) == ["mlp.onnx"]
    (tmp_path / "in" / "mlp.onnx.data").unlink()  # the output must not need it
    feeds = {"x": np.ones((2, 8), np.float32)}
    np.testing.assert_array_equal(slimgraph.compile(ir.load(out))(**feeds)["y"], slimgraph.compile(mlp_model)(**feeds)["y"])
