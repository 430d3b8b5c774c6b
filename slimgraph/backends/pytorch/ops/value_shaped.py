"""Ops whose output shape depends on the input values: NonZero, Unique, NonMaxSuppression.
They run eagerly and under torch.compile with graph breaks, not with fullgraph=True."""

from __future__ import annotations

import torch

from slimgraph.backends.pytorch import runtime
from slimgraph.backends.pytorch.lowering import attr, lowers
from slimgraph.backends.pytorch.ops.tensor import axis_of, scalar


@lowers("NonZero")
def non_zero(ctx, node, x):
    return torch.nonzero(x).t()


@lowers("Unique")
def unique(ctx, node, x):
    """torch.unique gives the sorted values, inverse indices and counts; the first occurrences
    come from the inverse, and sorted=0 reorders everything by first occurrence."""
    axis = attr(node, "axis")
    if axis is None:
        x, axis = x.reshape(-1), 0
    else:
        axis = axis_of(axis, len(node.inputs[0].shape))
    values, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True, dim=axis)
    positions = torch.arange(x.size(axis))
    first = torch.full_like(counts, x.size(axis)).scatter_reduce(0, inverse, positions, "amin")
    if not attr(node, "sorted", 1):
        order = torch.argsort(first)
        values, counts, first = torch.index_select(values, axis, order), counts[order], first[order]
        inverse = torch.argsort(order)[inverse]
    return values, first, inverse, counts


@lowers("NonMaxSuppression", tensors=False)
def non_max_suppression(ctx, node, boxes, scores, max_per_class=None, iou_threshold=None, score_threshold=None):
    return ctx.call(runtime.non_max_suppression, ctx.tensor(boxes), ctx.tensor(scores),
                    scalar(max_per_class) if max_per_class is not None else 0,
                    scalar(iou_threshold) if iou_threshold is not None else 0.0,
                    scalar(score_threshold) if score_threshold is not None else None,
                    attr(node, "center_point_box", 0))
