"""New weights go to the output's data file as passes make them; the saved model equals one held in memory."""

from __future__ import annotations

import functools
import json

import numpy as np
import onnx_ir as ir
import pytest

import slimgraph
from slimgraph.backends import onnxruntime
from slimgraph.cli import main
from slimgraph.ir import spill as spill_module
from slimgraph.ir.meta import EXAMPLE_INPUTS_KEY
from slimgraph.ir.spill import WeightSpill, spill_of
from slimgraph.measure import evaluate
from slimgraph.measure.inputs import sample_inputs
from slimgraph.passes import PassContext, Pipeline
from tests.conftest import copy_model


def test_spilled_weights_read_back_and_publish_as_the_output(tmp_path, mlp_model, monkeypatch):
    monkeypatch.setattr(spill_module, "MIN_BYTES", 64)  # the MLP's weights count as large
    feeds = sample_inputs(mlp_model)
    want = evaluate.run(mlp_model, feeds)["y"]
    model = copy_model(mlp_model)
    target = tmp_path / "out" / "mlp.onnx"
    spill = WeightSpill.beside(target)
    assert spill.folder.parent == tmp_path  # the output's folder does not exist yet: nothing is made there
    spill(model)
    spilled = [v for v in model.graph.initializers.values() if spill.holds(v.const_value)]
    assert spilled and spill_of(model) is spill
    assert all(v.const_value.offset % spill_module.ALIGNMENT == 0 for v in spilled)
    np.testing.assert_array_equal(evaluate.run(model, feeds)["y"], want)  # read back from the file

    onnxruntime.save_onnx(model, target, external_data=True)
    spill.close()
    assert sorted(p.name for p in target.parent.iterdir()) == ["mlp.onnx", "mlp.onnx.data"]
    assert not any(p.name.startswith(".slimgraph") for p in tmp_path.iterdir())
    np.testing.assert_array_equal(evaluate.run(ir.load(target), feeds)["y"], want)
    np.testing.assert_array_equal(evaluate.run(model, feeds)["y"], want)  # the model in memory reads the moved file


def test_weights_replaced_after_they_were_spilled_leave_the_published_file(tmp_path, mlp_model, monkeypatch):
    """`fuse-ort` spills fused fp32 weights that the next pass quantizes: the output's data file holds
    only what the saved graph reads."""
    monkeypatch.setattr(spill_module, "MIN_BYTES", 64)
    feeds = sample_inputs(mlp_model)
    model = copy_model(mlp_model)
    target = tmp_path / "mlp.onnx"
    spill = WeightSpill.beside(target)
    spill(model)
    written = spill.written
    for value in model.graph.initializers.values():  # a pass replaces every weight with a new one
        if spill.holds(value.const_value):
            value.const_value = ir.tensor(value.const_value.numpy() * 2, name=value.name)
    spill(model)
    assert spill.written > 2 * written - spill_module.ALIGNMENT
    want = evaluate.run(model, feeds)["y"]
    onnxruntime.save_onnx(model, target, external_data=True)
    spill.close()
    assert (tmp_path / "mlp.onnx.data").stat().st_size <= written
    np.testing.assert_array_equal(evaluate.run(ir.load(target), feeds)["y"], want)
    np.testing.assert_array_equal(evaluate.run(model, feeds)["y"], want)


def test_a_pipeline_writes_each_quantized_weight_as_it_is_made(tmp_path, llama_ir, monkeypatch):
    monkeypatch.setattr(spill_module, "MIN_BYTES", 1024)
    feeds = llama_ir.meta[EXAMPLE_INPUTS_KEY][0]
    in_memory = copy_model(llama_ir)
    Pipeline.parse("quantize-weights{bits=4}").run(in_memory, verify=False)

    model = copy_model(llama_ir)
    spill = WeightSpill.beside(tmp_path / "llama.onnx")
    sizes = []
    spilling = functools.partial(spill, model)
    ctx = PassContext(spill=lambda: (spilling(), sizes.append(spill.written)))
    Pipeline.parse("quantize-weights{bits=4}").run(model, ctx, verify=False)
    assert len(sizes) > 20 and sizes == sorted(sizes) and sizes[0] < sizes[-1]  # after each linear, not at the end
    nbits = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert nbits and all(spill.holds(n.inputs[1].const_value) for n in nbits)
    onnxruntime.save_onnx(model, tmp_path / "llama.onnx", external_data=True)
    spill.close()
    np.testing.assert_array_equal(evaluate.run(ir.load(tmp_path / "llama.onnx"), feeds)["logits"],
                                  evaluate.run(in_memory, feeds)["logits"])


@pytest.mark.slow
def test_the_cli_spills_a_large_model_and_leaves_no_staging_behind(tmp_path, llama_folder, monkeypatch, capsys):
    monkeypatch.setattr(onnxruntime, "EXTERNAL_DATA_BYTES", 1000)  # the small Llama counts as large
    monkeypatch.setattr(spill_module, "MIN_BYTES", 1024)
    out = tmp_path / "out" / "llama.onnx"
    assert main(["optimize", str(llama_folder), "-p", "quantize-weights{bits=4}", "-o", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["passes"][0]["fidelity"]["cosine"] > 0.9
    assert sorted(p.name for p in out.parent.iterdir()) == ["llama.onnx", "llama.onnx.data"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    model = slimgraph.load(llama_folder)
    Pipeline.parse("quantize-weights{bits=4}").run(model, verify=False)
    feeds = model.meta[EXAMPLE_INPUTS_KEY][0]
    np.testing.assert_array_equal(evaluate.run(ir.load(out), feeds)["logits"], evaluate.run(model, feeds)["logits"])

    failing = tmp_path / "failing" / "llama.onnx"
    assert main(["optimize", str(llama_folder), "-p", "quantize-weights{bits=2}", "--max-drop", "0.0001", "-o",
                 str(failing)]) == 1  # over the fidelity budget: nothing written, nothing left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
