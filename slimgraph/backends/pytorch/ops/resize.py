"""Resize: one interpolation matrix per resized axis, applied with a matmul along that axis.

Resize is linear in its input along each axis (every mode, coordinate transformation and
nearest mode, with or without antialias), so each axis is M [out, in] @ v (+ the constant
that tf_crop_and_resize's extrapolation value adds). `runtime.resize_matrix` builds M from the
ONNX formulas: while building when the scales are constants (M becomes a buffer), in the
generated code when they arrive at run time.
"""

from __future__ import annotations

import numpy as np
import torch

from slimgraph.backends.pytorch import runtime
from slimgraph.backends.pytorch.lowering import attr, lowers
from slimgraph.backends.pytorch.ops._common import torch_dtype
from slimgraph.errors import SlimgraphError


def _options(node) -> dict:
    return dict(mode=attr(node, "mode", "nearest"), transform=attr(node, "coordinate_transformation_mode", "half_pixel"),
                nearest_mode=attr(node, "nearest_mode", "round_prefer_floor"), cubic_a=attr(node, "cubic_coeff_a", -0.75),
                exclude_outside=attr(node, "exclude_outside", 0), antialias=attr(node, "antialias", 0),
                extrapolation=attr(node, "extrapolation_value", 0.0))


def _present(ctx, value):
    """An optional input: None when absent or empty."""
    known = ctx.const(value) if value is not None else None
    return None if value is None or (known is not None and known.size == 0) else value


@lowers("Resize", since=11, tensors=False)
def resize(ctx, node, x, roi=None, scales=None, sizes=None):
    x = ctx.tensor(x)
    shape_in = node.inputs[0].shape
    if shape_in is None:
        raise SlimgraphError("pytorch backend: Resize needs the rank of its input")
    rank = len(shape_in)
    axes = [a + rank if a < 0 else a for a in (attr(node, "axes") or range(rank))]
    roi, scales = _present(ctx, roi), _present(ctx, scales)
    if attr(node, "coordinate_transformation_mode", "half_pixel") != "tf_crop_and_resize":
        roi = None  # only tf_crop_and_resize reads it (paddle2onnx writes ones there)
    lengths = [_length(node.inputs[0], x, a) for a in axes]
    outputs = None
    if scales is None:
        scales, outputs = _scales_from_sizes(ctx, node, sizes, lengths)
    return _resize_axes(ctx, node, x, axes, scales, roi, _options(node), outputs)


def _length(value, x, axis: int):
    """An axis's length: a Python int when the graph knows it, else `x.size(axis)` (known at run time)."""
    dim = value.shape[axis] if value.shape is not None else None
    return dim if isinstance(dim, int) else x.size(axis)


def _resize_axes(ctx, node, x, axes: list[int], scales, roi, options: dict, outputs: list | None = None):
    """Apply each axis's interpolation matrix (built now when everything is constant, else in the
    generated code). `outputs`: the output lengths the sizes input asks for, when given."""
    integer = node.inputs[0].dtype.is_integer()
    for position, axis in enumerate(axes):
        scale = _element(ctx, scales, position)
        region = (_element(ctx, roi, position), _element(ctx, roi, position + len(axes))) if roi is not None \
            else (0.0, 1.0)
        length_in = _length(node.inputs[0], x, axis)
        length_out = _static_out(node, axis)
        if length_out is None:
            length_out = outputs[position] if outputs is not None else None  # None: floor(length_in · scale)
        if not isinstance(length_in, int) and outputs is None and isinstance(scale, float) and scale == 1.0 \
                and roi is None:
            continue  # a run-time length not resized (batch, channels): nothing to do
        matrix, offset = ctx.call_or_fold(runtime.resize_matrix, length_in, length_out, scale, *region, **options)
        if isinstance(matrix, np.ndarray):  # built now: a buffer (or nothing, when the axis stays as it is)
            if matrix.shape[0] == matrix.shape[1] and np.array_equal(matrix, np.eye(len(matrix))) and not offset.any():
                continue
            dtype = np.float64 if integer else node.inputs[0].dtype.numpy()
            matrix, offset = ctx.constant(matrix.astype(dtype)), ctx.constant(offset.astype(dtype))
        else:
            dtype = torch.float64 if integer else torch_dtype(node.inputs[0].dtype)
            matrix, offset = matrix.to(x.device, dtype), offset.to(x.device)
        resized = torch.matmul(x.movedim(axis, -1).to(matrix.dtype), matrix.t()) + offset.to(matrix.dtype)
        x = resized.movedim(-1, axis)
    return torch.round(x).to(torch_dtype(node.inputs[0].dtype)) if integer else x


def _static_out(node, axis: int) -> int | None:
    shape = node.outputs[0].shape
    dim = shape[axis] if shape is not None and len(shape) > axis else None
    return dim if isinstance(dim, int) else None


def _scales_from_sizes(ctx, node, sizes, lengths: list) -> tuple:
    """(scales, output lengths): size / length per axis, or (keep_aspect_ratio_policy) their min
    or max on every axis. Lengths known only at run time give traced scales."""
    requested = ctx.const(sizes)
    policy = attr(node, "keep_aspect_ratio_policy", "stretch")
    if requested is not None and all(isinstance(n, int) for n in lengths):
        ratios = requested / np.array(lengths, np.float64)
        if policy == "stretch":
            return ratios, None
        chosen = ratios.min() if policy == "not_larger" else ratios.max()
        return np.full(len(lengths), chosen), None
    wanted = ctx.tensor(sizes)
    ratios = [wanted[i].to(torch.float64) / lengths[i] for i in range(len(lengths))]
    if policy == "stretch":
        return ratios, [wanted[i] for i in range(len(lengths))]
    chosen = torch.stack(ratios).amin() if policy == "not_larger" else torch.stack(ratios).amax()
    return [chosen] * len(lengths), [torch.round(chosen * length) for length in lengths]  # (as the spec rounds)


def _element(ctx, value, index: int):
    """One element of a 1-D input: a Python float when constant, else a traced 0-D tensor."""
    if isinstance(value, list):
        return value[index]
    known = ctx.const(value)
    return float(known[index]) if known is not None else ctx.tensor(value)[index]


@lowers("Upsample", since=7, until=9, tensors=False)
def upsample(ctx, node, x, scales=None):
    """Upsample (deprecated for Resize): Resize with asymmetric coordinates, nearest rounding down."""
    shape_in, shape_out = node.inputs[0].shape, node.outputs[0].shape
    if shape_out is None or not all(isinstance(d, int) for d in (*shape_in, *shape_out)):
        raise SlimgraphError("pytorch backend: Upsample needs static input and output shapes")
    scales = scales if scales is not None else np.array(attr(node, "scales"), np.float32)
    options = dict(mode=attr(node, "mode", "nearest"), transform="asymmetric", nearest_mode="floor")
    return _resize_axes(ctx, node, ctx.tensor(x), list(range(len(shape_in))), scales, None, options)
