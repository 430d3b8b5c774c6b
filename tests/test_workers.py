"""--workers ray: models shipped through Ray's object store come back equal; mixed-precision and
--goal give the same results on a local Ray cluster as in one process; --target ray:NAME times
the candidates on that node."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import ray

from slimgraph.cli import main
from slimgraph.errors import SlimgraphError
from slimgraph.measure import evaluate
from slimgraph.measure.diff import diff_models
from slimgraph.measure.target import detect
from slimgraph.measure.target import parse as parse_target
from slimgraph.passes import PassContext, Pipeline
from slimgraph.search import search
from slimgraph.workers import RayWorkers, Workers, ship
from slimgraph.workers import parse as parse_workers
from tests.conftest import copy_model

TIMING_NODE = "timing-box"


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance of two CPUs whose one node has the resource `timing-box`."""
    ray.init(num_cpus=2, resources={TIMING_NODE: 1}, object_store_memory=400 * 2**20, include_dashboard=False,
             log_to_driver=False)
    try:
        with RayWorkers() as workers:  # joins the running instance, and leaves it running
            yield workers
    finally:
        ray.shutdown()


def test_a_shipped_model_comes_back_equal_and_the_original_is_untouched(minilm):
    initializers = {name: value.const_value for name, value in minilm.graph.initializers.items()}
    shipped = pickle.loads(pickle.dumps(ship(minilm)))
    assert len(shipped.proto) < 1_000_000  # the graph travels without its weights
    rebuilt = shipped.model()
    assert diff_models(minilm, rebuilt).identical
    assert {name: value.const_value for name, value in minilm.graph.initializers.items()} == initializers
    feeds = minilm.meta["slimgraph.example_inputs"][0]
    for a, b in zip(evaluate.run_all(minilm, [feeds])[0].values(), evaluate.run_all(rebuilt, [feeds])[0].values()):
        np.testing.assert_array_equal(a, b)


def test_mixed_precision_on_two_workers_equals_the_local_run(minilm, cluster):
    # the first block's layers, measured end to end (measure=output), one task each
    text = ("mixed-precision{budget_mb=85.4,candidates=[8,4],"
            "exclude=[*layer.1.*,*layer.2.*,*layer.3.*,*layer.4.*,*layer.5.*,pooler*]}")
    runs = {}
    for workers in (Workers(), cluster):
        model = copy_model(minilm)
        report = Pipeline.parse(text).run(model, PassContext(workers=workers))
        runs[workers.name] = model, report.records[0].stats
    (local, local_stats), (remote, remote_stats) = runs["local"], runs["ray"]
    assert remote_stats == local_stats
    assert local_stats["bits chosen"].count("int") >= 2  # the budget made it choose more than one width
    assert diff_models(local, remote, weights=True).identical


CANDIDATES = ("cleanup", "quantize-dynamic", "quantize-weights{bits=4,group_size=16}")


def test_goal_latency_times_the_candidates_on_the_named_node(mlp_model, cluster):
    target = parse_target(f"ray:{TIMING_NODE}", cluster)
    assert (target.name, target.resource) == (detect().name, TIMING_NODE)
    assert target.describe().endswith(f"on ray:{TIMING_NODE}")
    local = search(mlp_model, "latency", max_drop=0.5, candidates=CANDIDATES, runs=3)
    remote = search(mlp_model, "latency", max_drop=0.5, candidates=CANDIDATES, runs=3, target=target,
                    workers=cluster)
    for a, b in zip(local.candidates, remote.candidates, strict=True):
        assert (a.pipeline, a.status, a.cosine, a.bytes) == (b.pipeline, b.status, b.cosine, b.bytes)
        assert set(a.latency) == set(b.latency) and all(r > 0 for r in b.latency.values())
    chosen = next(c for c in local.candidates if c.pipeline == remote.chosen.pipeline)
    assert diff_models(chosen.model if chosen is local.chosen else remote.chosen.model, remote.chosen.model).identical


def test_the_cli_runs_a_pass_on_ray_workers(mlp_path, tmp_path, cluster, capsys):
    out = tmp_path / "q.onnx"
    assert main(["optimize", str(mlp_path), "-p", "cleanup,mixed-precision{budget_mb=0.001,group_size=16}",
                 "--workers", "ray", "-o", str(out)]) == 0
    assert out.exists()


def test_a_node_resource_no_node_has_is_one_clear_error(mlp_path, tmp_path, cluster, capsys):
    out = tmp_path / "q.onnx"
    assert main(["optimize", str(mlp_path), "--goal", "latency", "--workers", "ray", "--target", "ray:gpu-box",
                 "-o", str(out)]) == 2
    assert "no node of the Ray cluster has the resource 'gpu-box'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--workers", "dask"], "unknown --workers 'dask' (known: local, ray, ray://HOST:PORT)"),
    (["--target", "ray:box"], "--target ray:box names a Ray node; it needs --workers ray"),
    (["--target", "cpu-arm"], "unknown target 'cpu-arm'"),
])
def test_bad_workers_and_targets(mlp_path, tmp_path, capsys, args, message):
    out = tmp_path / "q.onnx"
    assert main(["optimize", str(mlp_path), "-p", "cleanup", "-o", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_parse_workers():
    assert parse_workers(None).name == parse_workers("local").name == "local"
    with pytest.raises(SlimgraphError, match="unknown --workers"):
        parse_workers("threads")
