"""Optimizer steps from ai.onnx.preview.training: Adagrad, Adam, Momentum (SGD and Nesterov).

Each takes the learning rate R, the step count T, then n tensors to optimize with their
gradients and optimizer states, grouped by kind (X1..Xn, G1..Gn, ...), and returns the new
tensors and states grouped the same way. The formulas are the ONNX reference's."""

from __future__ import annotations

import torch

from slimgraph.backends.pytorch.lowering import attr, lowers

TRAINING = "ai.onnx.preview.training"


def _groups(inputs: tuple, kinds: int) -> list[tuple]:
    """(X1..Xn, G1..Gn, ...) → [(X1, G1, ...), ..., (Xn, Gn, ...)]."""
    n = len(inputs) // kinds
    return [tuple(inputs[k * n + i] for k in range(kinds)) for i in range(n)]


def _regrouped(results: list[tuple]) -> tuple:
    return tuple(r[k] for k in range(len(results[0])) for r in results)


@lowers("Adagrad", domain=TRAINING)
def adagrad(ctx, node, rate, step, *tensors):
    decay, epsilon = attr(node, "decay_factor", 0.0), attr(node, "epsilon", 1e-6)
    norm = attr(node, "norm_coefficient", 0.0)
    rate = rate / (1 + step * decay)
    results = []
    for x, g, h in _groups(tensors, 3):
        g = norm * x + g
        h_new = h + g * g
        results.append(((x - rate * g / (torch.sqrt(h_new) + epsilon)).to(x.dtype), h_new.to(h.dtype)))
    return _regrouped(results)


@lowers("Adam", domain=TRAINING)
def adam(ctx, node, rate, step, *tensors):
    alpha, beta = attr(node, "alpha", 0.9), attr(node, "beta", 0.999)
    epsilon, norm = attr(node, "epsilon", 1e-6), attr(node, "norm_coefficient", 0.0)
    norm_post = attr(node, "norm_coefficient_post", 0.0)
    # bias correction from the second step on (T > 0)
    corrected = rate * torch.sqrt(1 - beta**step) / (1 - alpha**step)
    rate = torch.where(step > 0, corrected, rate)
    results = []
    for x, g, v, h in _groups(tensors, 4):
        g = norm * x + g
        v_new = alpha * v + (1 - alpha) * g
        h_new = beta * h + (1 - beta) * g * g
        x_new = x - rate * v_new / (torch.sqrt(h_new) + epsilon)
        results.append(((1 - norm_post) * x_new, v_new, h_new))
    return _regrouped(results)


@lowers("Momentum", domain=TRAINING)
def momentum(ctx, node, rate, step, *tensors):
    alpha, beta, norm = attr(node, "alpha"), attr(node, "beta"), attr(node, "norm_coefficient")
    nesterov = attr(node, "mode") == "nesterov"
    beta = torch.where(step > 0, beta, 1.0)  # the gradient's coefficient is 1 at the first step
    results = []
    for x, g, v in _groups(tensors, 3):
        g = norm * x + g
        v_new = alpha * v + beta * g
        x_new = x - rate * (g + alpha * v_new if nesterov else v_new)
        results.append((x_new, v_new))
    return _regrouped(results)
