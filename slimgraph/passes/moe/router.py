"""Routers without training, the weight of the routed experts, and routing recall.

- centroid: expert e scores `x · c_e`, where `c_e` is the mean of its neurons' normalised input rows
  (gate rows for a gated FFN, up rows otherwise): how far x points where the expert's neurons listen;
- neuron: expert e scores `|h_r(x)|`, the activation of its most representative neuron r, the one
  whose |h| follows the expert's total |h| most closely (cosine) on the calibration tokens.

Scores become router logits divided by a temperature, set on the calibration tokens so that a
token's logits spread by `SPREAD` (their standard deviation across experts, averaged over tokens);
the MoE then takes the softmax, the top k and, if asked, renormalises the k weights.

A dense FFN counts every neuron once; an expert weighted by a softmax probability counts less. So
the routed sum is multiplied by `routing_scale`: k with renormalised weights, the number of experts
without. A router with no preference then gives each chosen expert weight 1, and with every expert
chosen the conversion is exact (the test of the split).

Routing recall: the share of a token's activation mass Σ|h| over the routed neurons that the chosen
experts hold, averaged over the calibration tokens; `best` is what the k experts of largest mass
would hold, the most any router could reach with these experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from slimgraph.passes.moe.clustering import normalised

# The spread of a token's logits across experts: small enough that the chosen experts' weights
# stay near 1 after `routing_scale` (sharper weights cost fidelity, measured in benchmarks/moe.py).
SPREAD = 0.01


@dataclass(frozen=True)
class Router:
    """Logits = x @ matrix (centroid) or |h[:, neurons]| · scale (neuron); the temperature is folded in."""

    kind: Literal["centroid", "neuron"]
    matrix: np.ndarray | None = None  # centroid: [hidden, experts]
    neurons: np.ndarray | None = None  # neuron: [experts] neuron ids
    scale: float = 1.0  # neuron: 1 / temperature

    def logits(self, x: np.ndarray, h: np.ndarray) -> np.ndarray:
        """The router's logits for calibration rows x [tokens, hidden] and their activations h."""
        if self.kind == "centroid":
            return x @ self.matrix
        return np.abs(h[:, self.neurons]) * self.scale

    @property
    def parameters(self) -> int:
        return self.matrix.size if self.kind == "centroid" else 0  # neuron: counted with its neurons


def centroid_router(rows: np.ndarray, experts: list[np.ndarray], x: np.ndarray) -> Router:
    """`rows`: each neuron's input weights [neurons, hidden]; `x`: calibration inputs for the temperature."""
    unit = normalised(rows.astype(np.float64))
    matrix = np.stack([unit[e].mean(axis=0) for e in experts], axis=1)  # [hidden, experts]
    return Router("centroid", matrix=(matrix / temperature(x @ matrix)).astype(np.float32))


def neuron_router(magnitudes: np.ndarray, experts: list[np.ndarray]) -> Router:
    """`magnitudes`: |h| on the calibration tokens [tokens, neurons]."""
    columns = normalised(magnitudes.T.astype(np.float64))
    chosen = []
    for expert in experts:
        total = normalised(magnitudes[:, expert].sum(axis=1)[None])[0]
        chosen.append(expert[int(np.argmax(columns[expert] @ total))])
    neurons = np.array(chosen, dtype=np.int64)
    return Router("neuron", neurons=neurons, scale=1 / temperature(magnitudes[:, neurons]))


def temperature(logits: np.ndarray) -> float:
    """Divide logits by this for a per-token spread of `SPREAD` across experts."""
    spread = float(logits.std(axis=1).mean())
    return spread / SPREAD if spread > 0 else 1.0


def routing_scale(top_k: int, experts: int, normalize: bool) -> float:
    return float(top_k if normalize else experts)


@dataclass(frozen=True)
class Recall:
    mean: float  # the chosen experts' share of each token's routed |h| mass, averaged over tokens
    best: float  # the same for the k experts of largest mass


def recall(magnitudes: np.ndarray, experts: list[np.ndarray], logits: np.ndarray, top_k: int) -> Recall:
    """Routing recall on calibration tokens: `magnitudes` |h| [tokens, neurons], `logits` [tokens, experts]."""
    mass = np.stack([magnitudes[:, e].sum(axis=1) for e in experts], axis=1).astype(np.float64)
    total = np.maximum(mass.sum(axis=1), 1e-30)
    chosen = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
    best = -np.sort(-mass, axis=1)[:, :top_k].sum(axis=1)
    covered = np.take_along_axis(mass, chosen, axis=1).sum(axis=1)
    return Recall(float((covered / total).mean()), float((best / total).mean()))
