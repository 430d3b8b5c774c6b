"""mixed-precision: bits per layer under a budget, measured on the model's outputs."""

from __future__ import annotations

import pytest

from slimgraph.errors import SlimgraphError
from slimgraph.passes import Pipeline
from slimgraph.passes.quantize.mixed import Choice, choose_bits
from tests.conftest import copy_model


def test_choose_bits_prefers_the_cheapest_error_per_byte():
    options = {
        "a": [Choice(8, 100, 0.0), Choice(4, 50, 0.01), Choice(2, 25, 0.5)],
        "b": [Choice(8, 100, 0.0), Choice(4, 50, 0.2), Choice(2, 25, 0.9)],
    }
    assert {k: c.bits for k, c in choose_bits(options, 0, 200).items()} == {"a": 8, "b": 8}
    assert {k: c.bits for k, c in choose_bits(options, 0, 150).items()} == {"a": 4, "b": 8}
    assert {k: c.bits for k, c in choose_bits(options, 0, 100).items()} == {"a": 4, "b": 4}
    assert {k: c.bits for k, c in choose_bits(options, 0, 75).items()} == {"a": 2, "b": 4}


@pytest.mark.slow
def test_beats_uniform_int4_at_the_same_size(minilm, sentence_eval):
    uniform = copy_model(minilm)
    uniform_report = Pipeline.parse("quantize-weights{bits=4}").run(uniform, sentence_eval.context())
    budget = uniform_report.after.bytes / 1e6 + 0.3  # int4 everywhere, plus 0.3 MB to spend
    mixed = copy_model(minilm)
    report = Pipeline.parse(f"mixed-precision{{budget_mb={budget:.2f},candidates=[8,4]}}").run(
        mixed, sentence_eval.context())
    assert report.after.bytes <= budget * 1e6
    assert "int8" in report.records[0].stats["bits chosen"]
    assert sentence_eval.cosines(mixed).mean() > sentence_eval.cosines(uniform).mean()


@pytest.mark.slow
def test_budget_too_small(minilm):
    with pytest.raises(SlimgraphError, match="below the smallest reachable size"):
        Pipeline.parse("mixed-precision{budget_mb=10,measure=layer}").run(copy_model(minilm))


@pytest.mark.parametrize("text, message", [
    ("mixed-precision", "option budget_mb is required"),
    ("mixed-precision{budget_mb=-1}", "budget_mb must be above 0, got -1"),
    ("mixed-precision{budget_mb=50,candidates=[8,3]}", r"candidates=\[8,3\] is not a valid \[2\|4\|8\|32,...\]"),
])
def test_bad_options(text, message):
    with pytest.raises(SlimgraphError, match=message):
        Pipeline.parse(text)
