"""heal: training toward the teacher lowers the held-out distance, and the weights written back into the
IR compute what the trained PyTorch module computed."""

from __future__ import annotations

import numpy as np
import pytest

from slimgraph.backends.pytorch.heal import Heal, _Loss, _Student
from slimgraph.errors import SlimgraphError
from slimgraph.measure import evaluate
from slimgraph.measure.inputs import sample_inputs
from slimgraph.passes import PassContext, Pipeline
from tests.conftest import copy_model

PRUNE = "prune-width{target=ffn,ratio=0.5}"


@pytest.mark.parametrize("train, floor", [("all", 0.88), ("lora", 0.85)])
def test_heal_brings_a_lossy_model_closer_on_held_out_inputs(mlp_model, train, floor):
    """low-rank{rank=2} leaves the MLP at cosine 0.74 on held-out rows; heal trains on other rows."""
    calibration = [sample_inputs(mlp_model, batch=64, seed=seed) for seed in range(12)]
    held_out = [sample_inputs(mlp_model, batch=64, seed=99)]
    lossy = Pipeline.parse("low-rank{rank=2}").run(copy_model(mlp_model), calib=calibration, verify_inputs=held_out)
    report = Pipeline.parse(f"low-rank{{rank=2}},heal{{steps=120,lr=0.01,train={train}}}").run(
        copy_model(mlp_model), calib=calibration, verify_inputs=held_out)
    assert lossy.fidelity.cosine < 0.75
    assert report.fidelity.cosine > floor  # measured 0.905 (all) and 0.872 (lora)
    stats = report.records[1].stats
    assert stats["teacher"] == "the original model" and stats["loss"].startswith("mse: ")


def test_the_merged_ir_computes_what_the_trained_module_computes(llama_ir):
    import torch

    model = copy_model(llama_ir)
    Pipeline.parse(PRUNE).run(model, verify=False)
    feeds = [sample_inputs(model, batch=2, sequence=12, seed=seed) for seed in range(3)]
    teacher = evaluate.run_all(llama_ir, feeds)
    names = Heal().check(model)
    student = _Student(model, names, "lora", rank=4)
    optimizer = torch.optim.AdamW(student.trainable, lr=0.01)
    loss_of = _Loss("kl", {})
    for step in range(10):
        optimizer.zero_grad()
        loss_of(student.forward(feeds[step % 3]), teacher[step % 3], feeds[step % 3]).backward()
        optimizer.step()
    with torch.no_grad():
        trained = {k: v.numpy() for k, v in student.forward(feeds[0]).items()}
    student.write_back(model)
    merged = evaluate.run(model, feeds[0])
    for name, values in trained.items():
        scale = np.abs(values).max()
        assert np.abs(merged[name] - values).max() <= 1e-5 * scale, name
    assert not np.allclose(merged["logits"], evaluate.run(llama_ir, feeds[0])["logits"])


def test_the_original_as_teacher_needs_verification(llama_ir):
    with pytest.raises(SlimgraphError, match="teacher=original needs the original model"):
        Pipeline.parse("heal{steps=1}").run(copy_model(llama_ir), verify=False)
    report = Pipeline.parse("heal{steps=2,teacher=before}").run(copy_model(llama_ir), PassContext(), verify=False)
    assert report.records[0].stats["teacher"] == "the model before heal"


def test_a_model_without_the_parts_to_train_is_refused(mlp_model):
    with pytest.raises(SlimgraphError, match="train=norms found no normalization layer"):
        Pipeline.parse("heal{train=norms}").run(copy_model(mlp_model))


def test_outputs_the_teacher_does_not_have_are_named():
    import torch

    with pytest.raises(SlimgraphError, match=r"none of the model's outputs \(y\) is one of the teacher's \(logits\)"):
        _Loss("mse", {})({"y": torch.zeros(2, 3)}, {"logits": np.zeros((2, 3), np.float32)}, {})
