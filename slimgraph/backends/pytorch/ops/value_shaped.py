"""Ops whose output shape depends on the input values (NonZero, Unique, NonMaxSuppression), and
TfIdfVectorizer (n-gram counting, a loop over the pool of n-grams).
They run eagerly and under torch.compile with graph breaks, not with fullgraph=True."""

from __future__ import annotations

import numpy as np
import torch

from slimgraph.backends.pytorch import runtime
from slimgraph.backends.pytorch.lowering import attr, lowers
from slimgraph.backends.pytorch.ops._common import axis_of, scalar
from slimgraph.errors import SlimgraphError


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


@lowers("TfIdfVectorizer", since=9)
def tf_idf_vectorizer(ctx, node, x):
    """n-gram counts over integer tokens (runtime.ngram_counts), weighted as the mode says."""
    if attr(node, "pool_strings") is not None:
        raise SlimgraphError("pytorch backend: TfIdfVectorizer over strings is not supported (torch has no strings)")
    pool, starts, columns = attr(node, "pool_int64s"), attr(node, "ngram_counts"), attr(node, "ngram_indexes")
    grams = []
    for size, (begin, end) in enumerate(zip(starts, starts[1:] + [len(pool)]), start=1):
        grams += [pool[i:i + size] for i in range(begin, end, size)]
    width = max(columns) + 1
    counts = ctx.call(runtime.ngram_counts, x, grams, columns[:len(grams)], width, attr(node, "min_gram_length"),
                      attr(node, "max_gram_length"), attr(node, "max_skip_count"))
    mode, weights = attr(node, "mode"), attr(node, "weights")
    scale = ctx.constant(np.asarray(weights, np.float32)) if weights else None
    if mode == "TF":
        return counts
    if mode == "IDF":
        present = (counts > 0).to(torch.float32)
        return present * scale if scale is not None else present
    return counts * scale if scale is not None else counts  # TFIDF
