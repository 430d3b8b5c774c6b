"""Random ops (RandomUniform/Normal, their *Like forms, Bernoulli, Multinomial) and Dropout, on
torch's generator. A `seed` attribute is not honoured: ONNX leaves the stream to the runtime, so
no two runtimes draw the same numbers; the distributions are the ONNX ones."""

from __future__ import annotations

import numpy as np
import torch

from slimgraph.backends.pytorch.lowering import attr, lowers
from slimgraph.backends.pytorch.ops._common import scalar, torch_dtype


def _shape(node) -> list[int]:
    return [int(d) for d in attr(node, "shape")]


@lowers("RandomUniform")
def random_uniform(ctx, node):
    low, high = attr(node, "low", 0.0), attr(node, "high", 1.0)
    sample = ctx.call(torch.rand, _shape(node), dtype=torch_dtype(attr(node, "dtype", 1)))
    return sample * (high - low) + low


@lowers("RandomNormal")
def random_normal(ctx, node):
    sample = ctx.call(torch.randn, _shape(node), dtype=torch_dtype(attr(node, "dtype", 1)))
    return sample * attr(node, "scale", 1.0) + attr(node, "mean", 0.0)


def _like_dtype(node) -> torch.dtype:
    return torch_dtype(attr(node, "dtype", node.inputs[0].dtype))


@lowers("RandomUniformLike")
def random_uniform_like(ctx, node, x):
    low, high = attr(node, "low", 0.0), attr(node, "high", 1.0)
    return torch.rand_like(x, dtype=_like_dtype(node)) * (high - low) + low


@lowers("RandomNormalLike")
def random_normal_like(ctx, node, x):
    return torch.randn_like(x, dtype=_like_dtype(node)) * attr(node, "scale", 1.0) + attr(node, "mean", 0.0)


@lowers("Bernoulli")
def bernoulli(ctx, node, probabilities):
    return torch.bernoulli(probabilities).to(_like_dtype(node))


@lowers("Multinomial")
def multinomial(ctx, node, logits):
    """Samples per batch row from the unnormalized log-probabilities [batch, classes]."""
    draws = torch.multinomial(torch.softmax(logits, -1), attr(node, "sample_size", 1), replacement=True)
    return draws.to(torch_dtype(attr(node, "dtype", 6)))


@lowers("Dropout", since=12, tensors=False)
def dropout(ctx, node, x, ratio=None, training=None):
    """Inference (the default): y = x and a mask of ones. Training: y = x · mask / (1 − ratio),
    mask = uniform ≥ ratio."""
    x = ctx.tensor(x)
    training_known = ctx.const(training) if training is not None else np.array(False)
    if training_known is not None and not training_known:
        return x, torch.ones_like(x, dtype=torch.bool)
    rate = scalar(ratio) if ratio is not None else 0.5
    mask = torch.rand_like(x, dtype=torch.float32) >= rate
    if training_known is None:  # decided at run time
        mask = mask | ~ctx.tensor(training).to(torch.bool)
        rate = torch.where(ctx.tensor(training).to(torch.bool), rate, 0.0)
    return x * mask / (1 - rate), mask


@lowers("Dropout", until=11)
def dropout_inference(ctx, node, x):
    return x, torch.ones_like(x, dtype=torch.bool)
