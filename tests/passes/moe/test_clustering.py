"""Shared-expert choice, balanced clustering and routing recall, on data with a known answer."""

from __future__ import annotations

import numpy as np

from slimgraph.passes.moe import clustering
from slimgraph.passes.moe.router import centroid_router, neuron_router, recall


def planted(clusters: int = 4, size: int = 16, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows around `clusters` random directions, shuffled; returns (rows, true labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    labels = rng.permutation(np.repeat(np.arange(clusters), size))
    return centres[labels] + 0.1 * rng.standard_normal((len(labels), dim)), labels


def test_balanced_clusters_recover_planted_groups():
    rows, labels = planted()
    groups = clustering.balanced_clusters(rows, 4, seed=0)
    assert [len(g) for g in groups] == [16] * 4
    assert sorted(np.concatenate(groups).tolist()) == list(range(64))
    assert all(len(set(labels[g])) == 1 for g in groups)


def test_balanced_clusters_stay_equal_when_the_data_is_not():
    rows, _ = planted(clusters=2, size=32)
    groups = clustering.balanced_clusters(rows, 4, seed=1)  # two true groups, four experts
    assert [len(g) for g in groups] == [16] * 4


def test_random_clusters_are_a_seeded_partition():
    first = clustering.random_clusters(48, 3, seed=5)
    assert [len(g) for g in first] == [16] * 3
    assert sorted(np.concatenate(first).tolist()) == list(range(48))
    assert all(np.array_equal(a, b) for a, b in zip(first, clustering.random_clusters(48, 3, seed=5)))


def test_shared_neurons_are_the_most_often_strongest():
    rng = np.random.default_rng(0)
    magnitudes = rng.random((200, 32))
    magnitudes[:, [3, 17]] += 2.0  # always among the strongest
    magnitudes[::2, 9] += 2.0  # on half of the tokens only
    norms = np.ones(32)
    assert clustering.shared_neurons(magnitudes, 2, norms).tolist() == [3, 17]
    assert 9 in clustering.shared_neurons(magnitudes, 3, norms).tolist()
    assert clustering.shared_neurons(magnitudes, 0, norms).size == 0


def test_massive_activations_are_shared_first():
    """A neuron that fires 50× on one token in 50 is rarely among the strongest, but no token may miss it."""
    rng = np.random.default_rng(0)
    magnitudes = rng.random((200, 32))
    magnitudes[:, [3, 17]] += 2.0
    magnitudes[::50, 25] = 50.0
    assert clustering.shared_neurons(magnitudes, 2, np.ones(32)).tolist() == [3, 25]
    norms = np.ones(32)
    norms[25] = 0.01  # its output row is tiny: it matters no more than any other
    assert clustering.shared_neurons(magnitudes, 2, norms).tolist() == [3, 17]


def test_routers_pick_the_expert_whose_neurons_fire():
    """Experts listen to distinct input directions; tokens point along one of them: both routers
    choose the expert holding the activation mass (recall near its best)."""
    rng = np.random.default_rng(0)
    rows, labels = planted(clusters=4, size=8, dim=16)
    experts = [np.flatnonzero(labels == c) for c in range(4)]
    directions = np.stack([rows[e].mean(axis=0) for e in experts])
    x = directions[rng.integers(0, 4, 500)] + 0.05 * rng.standard_normal((500, 16))
    h = np.maximum(x @ rows.T, 0)  # a ReLU FFN's activations
    for router in (centroid_router(rows, experts, x), neuron_router(np.abs(h), experts)):
        result = recall(np.abs(h), experts, router.logits(x, h), top_k=1)
        assert result.best > 0.6 and result.mean > 0.95 * result.best, router.kind
    uniform = recall(np.abs(h), experts, np.zeros((500, 4)), top_k=1)  # ties: always expert 0
    assert uniform.mean < 0.5
