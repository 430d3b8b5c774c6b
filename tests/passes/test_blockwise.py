"""Block-wise calibration: each block run alone gives what the whole model gives; block-wise GPTQ
on the trained MiniLM keeps its fidelity floor; an interrupted run resumes to the same bytes."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from slimgraph.cli import main
from slimgraph.errors import SlimgraphError
from slimgraph.passes import PassContext, Pipeline
from slimgraph.passes._infra.checkpoints import Checkpoints
from slimgraph.passes.activations import linear_inputs
from slimgraph.passes.blockwise import BlockSteps
from slimgraph.passes.quantize.rewrite import quantizable_linears
from tests.conftest import copy_model

GPTQ = "quantize-weights{method=gptq,blockwise=true}"


def test_each_block_alone_sees_what_the_whole_model_feeds_it(llama_ir):
    model = copy_model(llama_ir)
    linears, _ = quantizable_linears(model, ())
    ctx = PassContext(inputs=model.meta["slimgraph.example_inputs"])
    whole = linear_inputs(model, linears, ctx)
    steps = BlockSteps(model, linears, ctx)
    seen = []
    for step in steps:  # nothing rewritten: the blocks compute what the float model does
        for name, x in step.activations.items():
            np.testing.assert_allclose(x, whole[name], rtol=1e-5, atol=1e-5)
        seen.append([lin.name for lin in step.linears])
    assert len(seen) == len(steps.blocks) + 1 == 4  # three blocks, then the LM head
    assert all(len(names) == 7 for names in seen[:-1]) and seen[-1] == ["lm_head"]


def test_blockwise_gptq_keeps_minilms_fidelity(minilm, sentence_eval):
    model = copy_model(minilm)
    report = Pipeline.parse(GPTQ).run(model, sentence_eval.context())
    assert float(sentence_eval.cosines(model).mean()) >= 0.98
    assert report.records[0].stats["linears quantized"] == 37
    assert report.after.op_histogram["com.microsoft.MatMulNBits"] == 37


class Interrupt(KeyboardInterrupt):
    pass


def test_an_interrupted_run_resumes_to_the_same_file(minilm_path, tmp_path, monkeypatch, capsys):
    args = ["optimize", str(minilm_path), "-p", GPTQ, "--no-verify", "--json"]
    assert main([*args, "-o", str(tmp_path / "whole.onnx")]) == 0
    capsys.readouterr()

    save = Checkpoints.save

    def save_then_stop(self, step, *rest):
        save(self, step, *rest)
        if step == 2:  # three blocks done
            raise Interrupt

    out = tmp_path / "resumed.onnx"
    monkeypatch.setattr(Checkpoints, "save", save_then_stop)
    assert main([*args, "-o", str(out), "--resume"]) == 130
    assert not out.exists() and (tmp_path / "resumed.onnx.resume").is_dir()
    monkeypatch.setattr(Checkpoints, "save", save)
    capsys.readouterr()
    assert main([*args, "-o", str(out), "--resume"]) == 0
    stats = json.loads(capsys.readouterr().out)["passes"][0]["stats"]
    assert stats["resumed"].startswith("3 of 7 steps done before")
    assert out.read_bytes() == (tmp_path / "whole.onnx").read_bytes()
    assert not (tmp_path / "resumed.onnx.resume").exists()  # removed once the output is written


def test_a_checkpoint_of_other_work_is_not_resumed(minilm, tmp_path):
    model = copy_model(minilm)
    linears, _ = quantizable_linears(model, ())
    feeds = model.meta["slimgraph.example_inputs"]
    checkpoints = Checkpoints(tmp_path / "run", "input A")
    assert checkpoints.start(GPTQ, model, feeds) is None
    checkpoints.save(0, {"x": {"a": np.zeros(2)}}, [{"h": np.ones(3)} for _ in feeds], [["x"]])
    progress = Checkpoints(tmp_path / "run", "input A").start(GPTQ, model, feeds)
    assert progress.done == 1 and progress.steps == [{"x": {"a": pytest.approx(np.zeros(2))}}]
    np.testing.assert_array_equal(progress.state[0]["h"], np.ones(3))
    assert Checkpoints(tmp_path / "run", "input B").start(GPTQ, model, feeds) is None  # another input
    assert Checkpoints(tmp_path / "run", "input A").start(GPTQ, model, feeds) is None  # and so it was cleared


def test_errors(mlp_path, tmp_path, capsys):
    with pytest.raises(SlimgraphError, match="blockwise=true calibrates awq and gptq"):
        Pipeline.parse("quantize-weights{blockwise=true}")
    model = ir.load(mlp_path)
    with pytest.raises(SlimgraphError, match="block-wise calibration needs repeated blocks"):
        Pipeline.parse(GPTQ).run(model)
    out = tmp_path / "q.onnx"
    assert main(["optimize", str(mlp_path), "-p", "quantize-weights{method=gptq}", "--resume", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--resume resumes block-wise passes" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
