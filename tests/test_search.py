"""optimize --goal: candidates measured, the budget kept, the best chosen, its recipe reruns exactly."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx_ir as ir
import pytest

import slimgraph
from slimgraph.cli import main
from slimgraph.errors import SlimgraphError
from slimgraph.measure.stats import model_stats
from slimgraph.measure.target import FEATURES, Target, detect
from slimgraph.report import render_search
from slimgraph.search import search
from tests.conftest import render_text

CANDIDATES = ("cleanup", "quantize-dynamic", "quantize-weights{bits=4,group_size=16}", "prune-depth{blocks=1}")


def test_size_goal_picks_the_fewest_bytes_within_the_budget(mlp_model):
    initializers = dict(mlp_model.graph.initializers)
    result = search(mlp_model, "size", max_drop=0.5, candidates=CANDIDATES)
    statuses = {c.pipeline: c.status for c in result.candidates}
    assert statuses["prune-depth{blocks=1}"].startswith("left out: ")  # an MLP has no blocks
    kept = [c for c in result.candidates if c.status == "ok"]
    assert result.chosen is min(kept, key=lambda c: c.bytes)
    assert result.chosen.pipeline == "quantize-weights{bits=4,group_size=16}"
    assert result.chosen.bytes == model_stats(result.chosen.model).bytes < result.original_bytes
    assert dict(mlp_model.graph.initializers) == initializers  # the input model is left as it was
    assert "→" in next(line for line in render_text(render_search(result)).splitlines() if "bits=4" in line)


def test_over_budget_candidates_are_never_chosen(mlp_model):
    result = search(mlp_model, "size", max_drop=1e-6, candidates=CANDIDATES)
    assert result.chosen.pipeline == "cleanup"
    assert all(c.status.startswith("over budget: cosine") for c in result.candidates
               if c.pipeline.startswith("quantize"))
    with pytest.raises(SlimgraphError, match="no candidate stays within max_drop"):
        search(mlp_model, "size", max_drop=1e-6, candidates=CANDIDATES[1:3])


def test_latency_goal_times_every_kept_candidate_against_the_original(mlp_model):
    result = search(mlp_model, "latency", max_drop=0.5, candidates=CANDIDATES[:3], runs=3)
    for candidate in result.candidates:
        assert set(candidate.latency) == {1, 8} and all(r > 0 for r in candidate.latency.values())
    assert result.chosen is min(result.candidates, key=lambda c: (c.latency_ratio, c.bytes))


def test_candidates_are_timed_in_groups_that_fit_the_timing_memory(mlp_model, monkeypatch):
    """Each session keeps its largest run's memory: where the candidates' sessions would not fit, they
    are timed a group at a time, each against the original, and every one still gets its ratios."""
    import itertools
    import weakref

    import slimgraph.search as search_module
    from slimgraph.measure import evaluate

    alive, most = weakref.WeakSet(), []
    make_session = evaluate.make_session

    def counted(*args, **kwargs):
        session = make_session(*args, **kwargs)
        alive.add(session)
        most.append(len(alive))
        return session

    monkeypatch.setattr(evaluate, "make_session", counted)
    # a tiny model's session may not move RSS at all: here each reading is 1 MB above the last
    monkeypatch.setattr("slimgraph.measure.process.current_rss", lambda rss=itertools.count(0, 1 << 20): next(rss))
    monkeypatch.setattr(search_module, "TIMING_MEMORY", 1)  # one candidate's session at a time
    latencies = search_module._time(mlp_model, (3, None), [mlp_model.clone() for _ in range(3)])
    assert all(set(latency) == {1, 8} and all(r > 0 for r in latency.values()) for latency in latencies)
    assert max(most) == 2  # the original's and one candidate's
    monkeypatch.setattr(search_module, "TIMING_MEMORY", 1 << 40)
    most.clear()
    search_module._time(mlp_model, (3, None), [mlp_model.clone() for _ in range(3)])
    assert max(most) == 4  # side by side, where they fit


def test_latency_is_measured_only_on_this_machine(mlp_model):
    elsewhere = next(name for name in FEATURES if name != detect().name)
    with pytest.raises(SlimgraphError, match="measures latency on this machine"):
        search(mlp_model, "latency", target=Target(elsewhere, FEATURES[elsewhere]))
    with pytest.raises(SlimgraphError, match="unknown goal"):
        search(mlp_model, "speed")


def test_cli_writes_the_chosen_recipe_and_it_reruns_exactly(tmp_path, mlp_path, capsys):
    out, again = tmp_path / "out" / "small.onnx", tmp_path / "again.onnx"
    assert main(["optimize", str(mlp_path), "--goal", "size", "--max-drop", "0.2", "-o", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    recipe = tmp_path / "out" / "small.recipe.yaml"
    assert printed["search"]["recipe"] == str(recipe) and printed["search"]["chosen"] == printed["pipeline"]
    assert main(["optimize", str(mlp_path), "--recipe", str(recipe), "-o", str(again)]) == 0
    digest = [hashlib.sha256(slimgraph.save(slimgraph.load(p), tmp_path / f"{i}.onnx").read_bytes()).hexdigest()
              for i, p in enumerate((out, again))]
    assert digest[0] == digest[1]
    assert main(["optimize", str(mlp_path), "--goal", "size", "--no-verify", "-o", str(again)]) == 2
    assert "--goal" in capsys.readouterr().err


def test_candidates_the_backend_cannot_run_are_not_tried(mlp_model):
    result = search(mlp_model, "size", max_drop=0.5, candidates=("cleanup,fuse-ort", "cleanup"), backend="pytorch")
    assert [c.pipeline for c in result.candidates] == ["cleanup"]


def test_static_int8_over_budget_keeps_its_most_sensitive_block_float():
    """quantize-static's layers are grouped by block from node names as other exporters write them
    (`/block.1/conv`): keeping the most sensitive one float gains fidelity."""
    from slimgraph.search import Candidate, _run_candidate, _sensitive_layers_float, _Trying
    from slimgraph.workers import Workers
    from tests.passes.quantize.test_static import small_cnn

    model = small_cnn(seed=3)
    for i, node in enumerate(n for n in model.graph if n.op_type == "Conv"):
        node.name = f"/block.{i}/conv"
    from slimgraph.measure.target import detect

    full = _run_candidate(model, _Trying(1.0, None, detect()), "quantize-static")
    over = Candidate("quantize-static", status="over budget", cosine=full.cosine)
    budget = (1 - full.cosine) / 4
    kept = _sensitive_layers_float(model, over, "quantize-static", _Trying(budget, None, detect()), Workers())
    assert kept.cosine > full.cosine
    assert "exclude=[/block." in kept.pipeline


def _power_spectrum_model() -> ir.Model:
    """An audio front end as DNSMOS writes it (tf2onnx, no numbered blocks in its names): real and
    imaginary filters (Conv), power = re² + im², Log, then a Conv head. int8 loses the quiet bins'
    power, which the Log makes large."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "re_w"], ["re"], name="stft_real", strides=[4]),
        helper.make_node("Conv", ["x", "im_w"], ["im"], name="stft_imag", strides=[4]),
        helper.make_node("Mul", ["re", "re"], ["re2"], name="square_real"),
        helper.make_node("Mul", ["im", "im"], ["im2"], name="square_imag"),
        helper.make_node("Add", ["re2", "im2"], ["power"], name="power"),
        helper.make_node("Max", ["power", "floor"], ["floored"], name="floor"),
        helper.make_node("Log", ["floored"], ["log_power"], name="log"),
        helper.make_node("Conv", ["log_power", "head_w", "head_b"], ["h"], name="head", pads=[1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="head_relu"),
        helper.make_node("Conv", ["r", "out_w"], ["y"], name="out"),
    ]
    inits = [weight("re_w", 16, 1, 16), weight("im_w", 16, 1, 16), weight("head_w", 16, 16, 3),
             weight("head_b", 16), weight("out_w", 4, 16, 1),
             numpy_helper.from_array(np.array(1e-9, np.float32), "floor")]
    graph = helper.make_graph(nodes, "spectrum", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 61])], inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_static_int8_over_budget_without_blocks_keeps_a_sensitive_span_float():
    """Layer names without blocks (`stft_real`, `power`): the model is cut into runs of consecutive
    nodes, and the run whose float keeps the budget narrows down to the power spectrum's ops, weights
    or not."""
    from slimgraph.measure.target import detect
    from slimgraph.search import Candidate, _run_candidate, _sensitive_layers_float, _Trying
    from slimgraph.workers import Workers

    model = _power_spectrum_model()
    full = _run_candidate(model, _Trying(1.0, None, detect()), "quantize-static")
    assert full.cosine < 0.999  # the quiet bins' power is lost
    over = Candidate("quantize-static", status="over budget", cosine=full.cosine)
    budget = (1 - full.cosine) / 4
    kept = _sensitive_layers_float(model, over, "quantize-static", _Trying(budget, None, detect()), Workers())
    assert kept.status == "ok" and 1 - kept.cosine <= budget
    excluded = kept.pipeline.split("exclude=[")[1].rstrip("]}").split(",")
    assert 0 < len(excluded) < 3 and set(excluded) <= {"stft_real", "stft_imag", "square_real", "square_imag", "power"}


def test_latency_is_timed_on_a_calibration_sample_where_synthesized_shapes_do_not_run():
    """An OCR recogniser's height is fixed by its graph (a Squeeze) though its input says `height`:
    the shapes `slimgraph bench` synthesizes do not run, so batch 1 is timed on a calibration sample."""
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("Squeeze", ["x", "axis"], ["s"]), helper.make_node("MatMul", ["s", "w"], ["y"])]
    axis = numpy_helper.from_array(np.array([1], np.int64), "axis")
    graph = helper.make_graph(nodes, "line", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "height", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight, axis])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    calib = [{"x": np.random.default_rng(i).standard_normal((1, 1, 4)).astype(np.float32)} for i in range(4)]
    result = search(model, "latency", max_drop=0.5, calib=calib, candidates=("quantize-dynamic",), runs=3)
    assert set(result.chosen.latency) == {1}
