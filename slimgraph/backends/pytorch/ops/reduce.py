"""Reductions (ReduceSum …, axes as attribute or input by opset) and ArgMax/ArgMin."""

from __future__ import annotations

import torch

from slimgraph.backends.pytorch.lowering import attr, lowers
from slimgraph.backends.pytorch.ops._common import static_length, torch_dtype
from slimgraph.errors import SlimgraphError

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
    # torch.prod reduces one dim at a time; keep them while reducing so the others keep their index
    for d in dims:
        x = torch.prod(x, d, keepdim=True)
    return x if keepdim else x.squeeze(dims)


def _reduction(op_type, fn, axes_input_since):
    def lower(ctx, node, x, axes=None):
        x = ctx.tensor(x)
        keepdims = bool(attr(node, "keepdims", 1))
        opset = ctx.model.opset_imports.get("", 1)
        rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
        if axes is not None and opset >= axes_input_since:
            dims = ctx.ints(axes)
            if not isinstance(dims, list):  # given at run time
                if op_type != "ReduceProd" and not _static_length_known(node.inputs[1]):
                    return fn(x, dims, keepdims)  # (assumed not empty: its length is not known)
                dims = [dims[i] % rank for i in range(static_length(node.inputs[1]))]
        else:
            dims = attr(node, "axes") or []
        if not dims:
            if attr(node, "noop_with_empty_axes", 0) and opset >= axes_input_since:
                return x
            if rank is None:
                raise SlimgraphError(f"pytorch backend: {op_type} over every axis needs the rank of its input")
            dims = list(range(rank))
        # (with the rank unknown, as exporters' graphs sometimes leave it, torch takes negative axes as they are)
        dims = [d % rank if isinstance(d, int) and rank is not None else d for d in dims]
        if op_type in EMPTY_SET_IDENTITY and node.inputs[0].shape is not None and 0 in node.inputs[0].shape:
            x = _append_identity(x, dims, EMPTY_SET_IDENTITY[op_type](torch_dtype(node.inputs[0].dtype)))
        return fn(x, dims, keepdims)

    return lower


def _static_length_known(value) -> bool:
    return value.shape is not None and isinstance(value.shape[0], int)


def _append_identity(x, dims, value):
    """torch.amax/amin refuse an empty reduction; ONNX gives the identity (-inf for ReduceMax).
    Appending one identity element along each reduced axis gives that, and changes nothing else."""
    for d in dims:
        x = torch.nn.functional.pad(x.movedim(d, -1), (0, 1), value=value).movedim(-1, d)
    return x


def _lowest(dtype: torch.dtype):
    return False if dtype == torch.bool else float("-inf") if dtype.is_floating_point else torch.iinfo(dtype).min


def _highest(dtype: torch.dtype):
    return True if dtype == torch.bool else float("inf") if dtype.is_floating_point else torch.iinfo(dtype).max


EMPTY_SET_IDENTITY = {"ReduceMax": _lowest, "ReduceMin": _highest}

for _op, (_fn, _since) in REDUCTIONS.items():
    lowers(_op, tensors=False)(_reduction(_op, _fn, _since))


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
