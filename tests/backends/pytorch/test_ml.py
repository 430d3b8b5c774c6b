"""ai.onnx.ml TreeEnsemble through the PyTorch backend against ONNX Runtime, on random forests."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import slimgraph
from slimgraph.measure import evaluate


def _random_forest(rng: np.random.Generator, trees: int, features: int, targets: int, aggregate: int) -> ir.Model:
    """Binary trees of random depth: random features, splits, comparison modes (<=, <, >=, >, ==, !=)
    and whether a missing value (NaN) goes the true way."""
    nodes = {"featureids": [], "splits": [], "modes": [], "truenodeids": [], "falsenodeids": [], "trueleafs": [],
             "falseleafs": [], "missing_value_tracks_true": []}
    leaf_weights, leaf_targets, roots = [], [], []

    def grow(depth: int) -> int:
        index = len(nodes["splits"])
        for key, value in (("featureids", int(rng.integers(features))), ("splits", float(rng.normal())),
                           ("modes", int(rng.integers(6))), ("truenodeids", 0), ("falsenodeids", 0),
                           ("trueleafs", 0), ("falseleafs", 0), ("missing_value_tracks_true", int(rng.integers(2)))):
            nodes[key].append(value)
        for side in ("true", "false"):
            if depth == 1 or rng.random() < 0.3:
                nodes[f"{side}leafs"][index] = 1
                nodes[f"{side}nodeids"][index] = len(leaf_weights)
                leaf_weights.append(float(rng.normal()))
                leaf_targets.append(int(rng.integers(targets)))
            else:
                nodes[f"{side}nodeids"][index] = grow(depth - 1)
        return index

    for _ in range(trees):
        roots.append(grow(int(rng.integers(1, 5))))
    node = helper.make_node(
        "TreeEnsemble", ["x"], ["y"], domain="ai.onnx.ml", aggregate_function=aggregate, n_targets=targets,
        tree_roots=roots, leaf_targetids=leaf_targets,
        leaf_weights=numpy_helper.from_array(np.array(leaf_weights, np.float32)),
        nodes_splits=numpy_helper.from_array(np.array(nodes["splits"], np.float32)),
        nodes_modes=numpy_helper.from_array(np.array(nodes["modes"], np.uint8)),
        **{f"nodes_{key}": nodes[key] for key in ("featureids", "truenodeids", "falsenodeids", "trueleafs",
                                                   "falseleafs", "missing_value_tracks_true")})
    graph = helper.make_graph([node], "forest", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, features])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("ai.onnx.ml", 5)]
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=opsets))


@pytest.mark.parametrize("aggregate", [0, 1, 2, 3])  # average, sum, min, max
def test_tree_ensemble_matches_onnxruntime(aggregate):
    rng = np.random.default_rng(aggregate)
    model = _random_forest(rng, trees=5, features=4, targets=3, aggregate=aggregate)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = np.nan
    feeds = {"x": x}
    got = slimgraph.compile(model, backend="pytorch")(**feeds)["y"]
    np.testing.assert_allclose(got, evaluate.run(model, feeds)["y"], rtol=1e-5, atol=1e-6)
