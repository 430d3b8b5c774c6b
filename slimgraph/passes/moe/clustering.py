"""Which neurons go where: the shared expert and the equal-size routed experts.

- shared: for each calibration token, the `count` neurons of largest |h|; the `count` neurons that
  are there most often (ties: the larger mean |h|) are always active. Neurons with massive
  activations come first: those whose largest contribution to the output on the calibration tokens
  (max |h| · ‖down row‖) is over `OUTLIER` times the median neuron's. They fire on few tokens (the
  first of a sequence), so they are rarely frequent, yet a token that misses them is lost: on
  SmolLM2's layer 2 two such neurons carry outputs 40× the median token's, and routing them left
  the largest outputs 96% wrong (kmeans experts; 1% with the guard);
- kmeans: balanced spherical k-means on the neurons' normalised input rows (gate rows for a gated
  FFN, up rows otherwise): neurons that respond to the same input directions share an expert;
- coactivation: the same clustering on each neuron's activation pattern over the calibration
  tokens (|h| down a column, normalised): neurons that fire on the same tokens share an expert,
  MoEfication's criterion;
- random: a seeded random partition, the baseline the other two must beat.

Balanced: every expert gets exactly `size` neurons. The assignment step is greedy — the most
similar (neuron, expert) pair first, while the expert has room. An optimal assignment (scipy's
linear_sum_assignment on the n × n problem with each centroid repeated `size` times) takes seconds
per iteration at n = 1344; greedy balanced k-means is the usual substitute.
"""

from __future__ import annotations

import numpy as np

ITERATIONS = 30
OUTLIER = 10.0  # a neuron's peak contribution over the median neuron's: 10 caught SmolLM2's (20 missed layer 10's)


def shared_neurons(magnitudes: np.ndarray, count: int, output_norms: np.ndarray) -> np.ndarray:
    """The shared expert's `count` neurons (sorted ids): massive-activation neurons first, then those
    most often among each token's `count` largest |h|. `magnitudes`: |h| [tokens, neurons];
    `output_norms`: each neuron's down-projection row norm."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    peaks = magnitudes.max(axis=0) * output_norms
    outliers = np.flatnonzero(peaks > OUTLIER * np.median(peaks))
    outliers = outliers[np.argsort(-peaks[outliers], kind="stable")]
    top = np.argpartition(-magnitudes, count - 1, axis=1)[:, :count]
    frequency = np.bincount(top.reshape(-1), minlength=magnitudes.shape[1])
    frequent = np.lexsort((-magnitudes.mean(axis=0), -frequency))  # the last key sorts first
    ranked = np.concatenate([outliers, frequent[~np.isin(frequent, outliers)]])
    return np.sort(ranked[:count])


def normalised(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


def balanced_clusters(features: np.ndarray, clusters: int, seed: int) -> list[np.ndarray]:
    """Split the rows of `features` into `clusters` groups of equal size by balanced spherical
    k-means; returns each group's row ids, sorted, groups ordered by their smallest id."""
    points = normalised(np.asarray(features, dtype=np.float64))
    size = len(points) // clusters
    rng = np.random.default_rng(seed)
    centroids = _plus_plus(points, clusters, rng)
    labels = np.full(len(points), -1)
    for _ in range(ITERATIONS):
        new = _assign(points @ centroids.T, size)
        if np.array_equal(new, labels):
            break
        labels = new
        centroids = normalised(np.stack([points[labels == c].mean(axis=0) for c in range(clusters)]))
    return _groups(labels, clusters)


def random_clusters(count: int, clusters: int, seed: int) -> list[np.ndarray]:
    """A seeded random partition of `count` ids into `clusters` equal groups."""
    labels = np.random.default_rng(seed).permutation(np.arange(count) % clusters)
    return _groups(labels, clusters)


def _groups(labels: np.ndarray, clusters: int) -> list[np.ndarray]:
    groups = [np.flatnonzero(labels == c) for c in range(clusters)]
    return sorted(groups, key=lambda g: g[0])


def _plus_plus(points: np.ndarray, clusters: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding with cosine distance."""
    chosen = [int(rng.integers(len(points)))]
    distance = 1 - points @ points[chosen[0]]
    for _ in range(1, clusters):
        weights = np.maximum(distance, 0) ** 2
        total = weights.sum()
        pick = int(rng.choice(len(points), p=weights / total)) if total > 0 else int(rng.integers(len(points)))
        chosen.append(pick)
        distance = np.minimum(distance, 1 - points @ points[pick])
    return points[chosen]


def _assign(similarity: np.ndarray, size: int) -> np.ndarray:
    """Greedy balanced assignment: pairs by decreasing similarity, each cluster up to `size`."""
    points, clusters = similarity.shape
    labels = np.full(points, -1)
    room = np.full(clusters, size)
    left = points
    for flat in np.argsort(-similarity, axis=None, kind="stable"):
        point, cluster = divmod(int(flat), clusters)
        if labels[point] < 0 and room[cluster]:
            labels[point] = cluster
            room[cluster] -= 1
            left -= 1
            if not left:
                break
    return labels
