"""ai.onnx.ml ops: Binarizer, ArrayFeatureExtractor and TreeEnsemble (the trees become index
tables, walked by runtime.tree_ensemble)."""

from __future__ import annotations

import numpy as np
import torch

from slimgraph.backends.pytorch import runtime
from slimgraph.backends.pytorch.lowering import attr, lowers
from slimgraph.errors import SlimgraphError

ML = "ai.onnx.ml"


@lowers("Binarizer", domain=ML)
def binarizer(ctx, node, x):
    return (x > attr(node, "threshold", 0.0)).to(x.dtype)


@lowers("ArrayFeatureExtractor", domain=ML)
def array_feature_extractor(ctx, node, x, indices):
    return torch.index_select(x, -1, indices.reshape(-1).to(torch.int64))


@lowers("TreeEnsemble", domain=ML, since=5)
def tree_ensemble(ctx, node, x):
    transform = attr(node, "post_transform", 0)
    if transform not in (0, 1, 2):
        raise SlimgraphError("pytorch backend: TreeEnsemble post_transform SOFTMAX_ZERO and PROBIT are not supported")
    modes = np.asarray(attr(node, "nodes_modes")).astype(np.int64)
    true_ids, false_ids = np.array(attr(node, "nodes_truenodeids")), np.array(attr(node, "nodes_falsenodeids"))
    true_leaf, false_leaf = np.array(attr(node, "nodes_trueleafs"), bool), np.array(attr(node, "nodes_falseleafs"), bool)
    roots = np.array(attr(node, "tree_roots"))
    root_is_leaf = true_leaf[roots] & false_leaf[roots] & (true_ids[roots] == false_ids[roots])
    missing = attr(node, "nodes_missing_value_tracks_true") or [0] * len(modes)
    tables = [np.array(attr(node, "nodes_featureids")), np.asarray(attr(node, "nodes_splits")), modes,
              _members(modes, attr(node, "membership_values")), true_ids, false_ids, true_leaf, false_leaf,
              np.array(missing, bool), np.asarray(attr(node, "leaf_weights")), np.array(attr(node, "leaf_targetids")),
              np.where(root_is_leaf, true_ids[roots], roots)[None], root_is_leaf[None]]
    result = ctx.call(runtime.tree_ensemble, x, *[ctx.constant(t) for t in tables],
                      _depth(roots, root_is_leaf, true_ids, false_ids, true_leaf, false_leaf), attr(node, "n_targets"),
                      attr(node, "aggregate_function", 1))
    if transform == 1:
        return torch.softmax(result, -1)
    return torch.sigmoid(result) if transform == 2 else result


def _members(modes: np.ndarray, values) -> np.ndarray:
    """[nodes, most members] of the MEMBER nodes' sets (NaN-separated in order), NaN-padded."""
    sets, current = [], []
    for value in values if values is not None else []:
        if np.isnan(value):
            sets.append(current)
            current = []
        else:
            current.append(value)
    table = np.full((len(modes), max([len(s) for s in sets], default=1)), np.nan)
    for index, members in zip(np.flatnonzero(modes == 6), sets):
        table[index, :len(members)] = members
    return table


def _depth(roots, root_is_leaf, true_ids, false_ids, true_leaf, false_leaf) -> int:
    """The most comparisons any path makes (how many steps every sample needs)."""
    deepest, pending = 0, [(int(r), 1) for r, leaf in zip(roots, root_is_leaf) if not leaf]
    while pending:
        index, depth = pending.pop()
        deepest = max(deepest, depth)
        pending += [(int(child), depth + 1) for child, leaf in ((true_ids[index], true_leaf[index]),
                                                                  (false_ids[index], false_leaf[index])) if not leaf]
    return deepest
