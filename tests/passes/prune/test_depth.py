"""prune-depth: block influence, explicit drops, sub-blocks, and what it refuses."""

from __future__ import annotations

import numpy as np
import pytest

from slimgraph.errors import SlimgraphError
from slimgraph.ir.structure import discover
from slimgraph.measure import evaluate
from slimgraph.measure.inputs import model_inputs
from slimgraph.passes import PassContext, Pipeline
from slimgraph.passes.prune.depth import PruneDepth, block_influence
from tests.conftest import copy_model


def run(model, text: str, ctx: PassContext | None = None):
    model = copy_model(model)
    report = Pipeline.parse(text).run(model, ctx or PassContext(), verify=False)
    return model, report.records[0].stats


def test_block_influence_picks_the_least_changing_blocks(llama_ir):
    ctx = PassContext()
    ctx.inputs, _ = model_inputs(llama_ir)
    scores = block_influence(llama_ir, PruneDepth().spans(llama_ir), ctx)
    assert scores.shape == (3,) and np.all((scores > 0) & (scores < 2))
    model, stats = run(llama_ir, "prune-depth{blocks=1}")
    lowest = int(np.argmin(scores[:-1]))  # never the last block
    assert stats["dropped"] == f"model.layers.{lowest}" and discover(model).blocks.count == 2


def test_explicit_drop_equals_bypass_of_that_block(llama_ir):
    model, stats = run(llama_ir, "prune-depth{drop=[2]}")  # named: even the last one goes
    assert stats == {"dropped": "model.layers.2", "blocks": "3 → 2"}
    assert [b.name for b in discover(model).blocks.blocks] == ["model.layers.0", "model.layers.1"]


@pytest.mark.parametrize("part", ["attention", "mlp"])
def test_sub_blocks(llama_ir, part):
    model, stats = run(llama_ir, f"prune-depth{{drop=[0,1],part={part}}}")
    assert stats["dropped"] == f"model.layers.0.{part}, model.layers.1.{part}"
    found = discover(model)
    kept = len(found.attention) if part == "attention" else len(found.ffns)
    assert kept == 1
    feeds = model_inputs(model)[0][0]
    assert np.isfinite(evaluate.run(model, feeds)["logits"]).all()


@pytest.mark.slow
def test_minilm_one_block_fidelity_floor(minilm, sentence_eval):
    model, stats = run(minilm, "prune-depth{blocks=1}", sentence_eval.context())
    assert len(stats["block influence"].split()) == 6
    assert sentence_eval.cosines(model).mean() >= 0.94  # measured 0.950


@pytest.mark.parametrize("text, message", [
    ("prune-depth{drop=[7]}", "drop=7 does not exist"),
    ("prune-depth{drop=[0,1,2]}", "dropping all 3 blocks"),
    ("prune-depth{ratio=1.0}", r"ratio must be in \[0, 1\)"),
    ("prune-depth{importance=explicit}", "needs drop="),
    ("prune-depth{blocks=10}", "blocks=10, but the model has 3 blocks"),
])
def test_bad_input(llama_ir, text, message):
    with pytest.raises(SlimgraphError, match=message):
        run(llama_ir, text)


def test_a_model_without_blocks_says_what_was_looked_for(mlp_model):
    with pytest.raises(SlimgraphError, match="no repeated blocks found"):
        run(mlp_model, "prune-depth{blocks=1}")
