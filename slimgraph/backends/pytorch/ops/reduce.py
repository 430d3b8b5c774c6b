"""Reductions (ReduceSum …, axes as attribute or input by opset) and ArgMax/ArgMin."""

from __future__ import annotations

import torch

from slimgraph.backends.pytorch.lowering import attr, lowers

# op → (function over (x, dims, keepdim), opset where axes moved from attribute to input)
REDUCTIONS = {
    "ReduceSum": (lambda x, d, k: torch.sum(x, d, keepdim=k), 13),
    "ReduceMean": (lambda x, d, k: torch.mean(x, d, keepdim=k), 18),
    "ReduceMax": (lambda x, d, k: torch.amax(x, d, keepdim=k), 18),
    "ReduceMin": (lambda x, d, k: torch.amin(x, d, keepdim=k), 18),
    "ReduceProd": (lambda x, d, k: _prod(x, d, k), 18),
    "ReduceL1": (lambda x, d, k: torch.sum(torch.abs(x), d, keepdim=k), 18),
    "ReduceL2": (lambda x, d, k: torch.sqrt(torch.sum(x * x, d, keepdim=k)), 18),
    "ReduceLogSum": (lambda x, d, k: torch.log(torch.sum(x, d, keepdim=k)), 18),
    "ReduceLogSumExp": (lambda x, d, k: torch.logsumexp(x, d, keepdim=k), 18),
    "ReduceSumSquare": (lambda x, d, k: torch.sum(x * x, d, keepdim=k), 18),
}


def _prod(x, dims, keepdim):
    # torch.prod reduces one dim at a time; reduce from the last so earlier dims keep their index
    for d in sorted((d if d >= 0 else d + x.dim() for d in dims), reverse=True):
        x = torch.prod(x, d, keepdim=keepdim)
    return x


def _prod_runtime_axes(ctx, node, x, axes, keepdims: bool):
    """torch.prod takes one dim: reduce axis by axis (their count is static), keeping dims so that
    the remaining axes keep their index, then squeeze them if asked."""
    count = node.inputs[1].shape[0]
    rank = len(node.inputs[0].shape)
    for j in range(count):
        x = torch.prod(x, axes[j].item() % rank, keepdim=True)
    return x if keepdims else x.squeeze(tuple(((axes + rank) % rank).tolist()))


def _reduction(fn, axes_input_since):
    def lower(ctx, node, x, axes=None):
        x_tensor = ctx.tensor(x)
        keepdims = bool(attr(node, "keepdims", 1))
        opset = ctx.model.opset_imports.get("", 1)
        dims = ctx.ints(axes) if axes is not None and opset >= axes_input_since else attr(node, "axes")
        if not isinstance(dims, list):  # axes given at run time: assumed not empty
            if fn is REDUCTIONS["ReduceProd"][0]:
                return _prod_runtime_axes(ctx, node, x_tensor, ctx.tensor(axes), keepdims)
            return fn(x_tensor, dims, keepdims)
        if not dims:
            if attr(node, "noop_with_empty_axes", 0) and opset >= axes_input_since:
                return x_tensor
            rank = len(node.inputs[0].shape)
            dims = list(range(rank))
        return fn(x_tensor, tuple(int(d) for d in dims), keepdims)

    return lower


for _op, (_fn, _since) in REDUCTIONS.items():
    lowers(_op, tensors=False)(_reduction(_fn, _since))


def _arg(fn):
    def lower(ctx, node, x):
        axis, keepdims = attr(node, "axis", 0), bool(attr(node, "keepdims", 1))
        if attr(node, "select_last_index", 0):
            flipped = torch.flip(x, [axis])
            index = fn(flipped, axis, keepdim=keepdims)
            return x.size(axis) - 1 - index
        return fn(x, axis, keepdim=keepdims)

    return lower


lowers("ArgMax")(_arg(torch.argmax))
lowers("ArgMin")(_arg(torch.argmin))
