"""Tensor and shape ops: constants, casts, reshapes, slicing, gathers, concatenation, matmul, padding.

Shape arithmetic (Shape, Gather/Slice/Concat/Unsqueeze on its result) stays as Python
values (`Dims`) so the generated code reads `x.reshape(x.size(0), -1, 12, 32)`.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import torch

from slimgraph.backends.pytorch.lowering import Dims, attr, lowers
from slimgraph.backends.pytorch.ops._common import axis_of, scalar, torch_dtype, torch_pads
from slimgraph.errors import SlimgraphError

# --- constants ------------------------------------------------------------------------------


@lowers("Constant", tensors=False)
def constant(ctx, node):
    for name in ("value", "sparse_value"):
        value = attr(node, name)
        if value is not None:
            return np.asarray(value)
    for name, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                        ("value_ints", np.int64)):
        value = attr(node, name)
        if value is not None:
            return np.asarray(value, dtype=dtype)
    raise SlimgraphError("pytorch backend: Constant with string values is not supported")


@lowers("ConstantOfShape", tensors=False)
def constant_of_shape(ctx, node, shape):
    value = attr(node, "value")
    fill = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    dims = ctx.ints(shape)
    known = ctx.const(shape)
    if known is not None:
        return np.full(tuple(int(d) for d in known), fill[0], dtype=fill.dtype)
    return torch.full(dims, fill[0].item(), dtype=torch.from_numpy(np.array(fill)).dtype)  # (a writable copy)


@lowers("Shape", tensors=False)
def shape(ctx, node, x):
    if not isinstance(x, np.ndarray) and node.inputs[0].shape is None:  # rank unknown: a tensor at run time
        return ctx.call(torch.tensor, ctx.tensor(x).shape)[attr(node, "start", 0):attr(node, "end")]
    rank = _rank(ctx, node.inputs[0], x)
    start, end = attr(node, "start", 0), attr(node, "end", rank)
    start, end = max(0, axis_of(start, rank)), min(rank, axis_of(end, rank))
    return Dims([_size(ctx, node.inputs[0], x, i) for i in range(start, end)])


@lowers("Size", tensors=False)
def size(ctx, node, x):
    if isinstance(x, np.ndarray):
        return np.array(x.size, np.int64)
    return Dims([ctx.tensor(x).numel()], scalar=True)  # numel() is a Python int at run time


def _rank(ctx, value, x) -> int:
    if isinstance(x, np.ndarray):
        return x.ndim
    if value.shape is not None:
        return len(value.shape)
    return ctx.tensor(x).dim()  # traced: only fine when the rank is known at build time


def _size(ctx, value, x, i):
    if isinstance(x, np.ndarray):
        return int(x.shape[i])
    if value.shape is not None and isinstance(value.shape[i], int):
        return value.shape[i]
    return ctx.tensor(x).size(i)


# --- casts ------------------------------------------------------------------------------------


@lowers("Cast", tensors=False)
def cast(ctx, node, x):
    to = attr(node, "to")
    if isinstance(x, Dims) and ir.DataType(to) == ir.DataType.INT64:
        return x
    if isinstance(x, np.ndarray):
        return x.astype(ir.DataType(to).numpy())
    return ctx.tensor(x).to(torch_dtype(to))


@lowers("CastLike")
def cast_like(ctx, node, x, like):
    return x.to(like.dtype)


# --- shapes -----------------------------------------------------------------------------------


@lowers("Reshape", since=5, tensors=False)
def reshape(ctx, node, x, shape):
    dims = ctx.ints(shape)
    x = ctx.tensor(x)
    if attr(node, "allowzero", 0):
        return x.reshape(dims)
    if isinstance(dims, list):
        return x.reshape([x.size(i) if isinstance(d, int) and d == 0 else d for i, d in enumerate(dims)])
    # shape known only at run time: a 0 still copies the input's size there
    target = ctx.tensor(shape)
    length = target.numel()
    sizes = torch.nn.functional.pad(ctx.call(torch.tensor, x.shape), (0, length))[:length]
    return x.reshape(torch.where(target == 0, sizes, target).tolist())


@lowers("Flatten")
def flatten(ctx, node, x):
    axis = attr(node, "axis", 1)
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else x.dim()
    axis = axis_of(axis, rank)
    return x.reshape(1, -1) if axis == 0 else torch.flatten(torch.flatten(x, axis), 0, axis - 1)


@lowers("Transpose")
def transpose(ctx, node, x):
    perm = attr(node, "perm")
    return x.permute(perm) if perm is not None else x.permute(*reversed(range(len(node.inputs[0].shape))))


def _axes(ctx, node, axes_input):
    """Axes from the input (opset 13+) or the attribute; a traced list when only known at run time."""
    if axes_input is not None:
        axes = ctx.ints(axes_input)
        return [int(a) for a in axes] if isinstance(axes, list) else axes
    return attr(node, "axes")


@lowers("Squeeze", tensors=False)
def squeeze(ctx, node, x, axes=None):
    axes = _axes(ctx, node, axes)
    if isinstance(x, Dims):
        return Dims(x.items, scalar=True) if len(x.items) == 1 else x
    x = ctx.tensor(x)
    if axes is None:
        return torch.squeeze(x)
    if not isinstance(axes, list):  # axes given at run time
        return x.reshape(ctx.dims(node.outputs[0], x))
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    if rank is not None:
        axes = [axis_of(a, rank) for a in axes]
    return torch.squeeze(x, tuple(axes))


@lowers("Unsqueeze", tensors=False)
def unsqueeze(ctx, node, x, axes=None):
    axes = _axes(ctx, node, axes)
    if isinstance(x, Dims) and x.scalar and axes in ([0], [-1]):
        return Dims(x.items)
    x = ctx.tensor(x)
    if not isinstance(axes, list):  # axes given at run time: the output shape says where the 1s go
        return x.reshape(ctx.dims(node.outputs[0], x))
    rank = len(node.inputs[0].shape) + len(axes) if node.inputs[0].shape is not None else None
    for a in sorted(axis_of(a, rank) if rank is not None else a for a in axes):
        x = x.unsqueeze(a)
    return x


@lowers("Expand", tensors=False)
def expand(ctx, node, x, shape):
    x = ctx.tensor(x)
    # ONNX Expand broadcasts both ways: a 1 in `shape` keeps the input's size.
    return x.expand(ctx.call(torch.broadcast_shapes, x.shape, ctx.ints(shape)))


@lowers("Tile", tensors=False)
def tile(ctx, node, x, repeats):
    return ctx.tensor(x).repeat(ctx.ints(repeats))


@lowers("Concat", tensors=False)
def concat(ctx, node, *inputs):
    axis = attr(node, "axis")
    present = [v for v in inputs if v is not None]
    if all(isinstance(v, np.ndarray) for v in present):
        return np.concatenate(present, axis=axis)
    if all(isinstance(v, Dims) or (isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype.kind == "i") for v in present):
        return Dims([item for v in present for item in ctx.ints(v)])
    return torch.cat([ctx.tensor(v) for v in inputs if v is not None], dim=axis)


@lowers("Split", tensors=False)
def split(ctx, node, x, sizes=None):
    x = ctx.tensor(x)
    axis = attr(node, "axis", 0)
    if sizes is not None:
        parts = ctx.ints(sizes)  # a traced list when given at run time
    elif attr(node, "split") is not None:
        parts = attr(node, "split")
    else:  # equal parts of ceil(length / count), the last one smaller (or empty) when uneven
        count = attr(node, "num_outputs", len(node.outputs))
        length = node.inputs[0].shape[axis] if node.inputs[0].shape is not None else None
        if not isinstance(length, int):  # known at run time: torch.chunk's rule (the same but for empty parts)
            pieces = torch.chunk(x, count, dim=axis)
            return tuple(pieces[i] for i in range(len(node.outputs)))
        chunk = -(-length // count)
        parts = [max(min(chunk, length - i * chunk), 0) for i in range(count)]
    pieces = torch.split(x, parts, dim=axis)
    return tuple(pieces[i] for i in range(len(node.outputs)))


@lowers("Slice", since=10, tensors=False)
def slice_(ctx, node, x, starts, ends, axes=None, steps=None):
    starts, ends = ctx.ints(starts), ctx.ints(ends)
    axes = ctx.ints(axes) if axes is not None else None
    steps = ctx.ints(steps) if steps is not None else None
    count = _slice_count(node, starts, ends, axes, steps)
    axes = axes if axes is not None else list(range(count))
    steps = steps if steps is not None else [1] * count
    if isinstance(x, Dims) and axes in ([0], [-1]) and all(isinstance(v, int) for v in (*starts, *ends, *steps)):
        return Dims(x.items[slice(*_clamp(starts[0], ends[0], steps[0], len(x.items)))])
    x = ctx.tensor(x)
    shape = node.inputs[0].shape
    known = all(isinstance(v, list) for v in (starts, ends, axes, steps)) and shape is not None
    for i in range(count):
        axis = axes[i]
        if known and all(isinstance(v, int) for v in (starts[i], ends[i], steps[i], shape[axis])):
            axis = axis_of(axis, len(shape))
            start, end, step = _clamp(starts[i], ends[i], steps[i], shape[axis])
            if step == 1:
                x = x.narrow(axis, start, max(end - start, 0))
            elif step > 0:
                x = x[(slice(None),) * axis + (slice(start, end, step),)]
            else:
                x = x.index_select(axis, torch.tensor(list(range(start, end if end >= 0 else -1, step))))
        elif isinstance(axis, int) and isinstance(steps[i], int) and steps[i] > 0:
            # bounds known at run time: tensor slicing clamps them as ONNX does (x[:, 0:n])
            where = (slice(None),) * axis if axis >= 0 else (Ellipsis,)
            x = x[where + (slice(starts[i], ends[i], steps[i]),) + ((slice(None),) * (-axis - 1) if axis < 0 else ())]
        else:
            # a step or axis known only at run time: Python's range slicing clamps exactly as
            # ONNX Slice does, negative steps included (which tensor slicing lacks)
            picked = ctx.call(range, x.size(axis))[ctx.call(slice, starts[i], ends[i], steps[i])]
            x = torch.index_select(x, axis, ctx.call(torch.tensor, picked, dtype=torch.int64))
    return x


@lowers("Slice", since=1, until=9, tensors=False)
def slice_with_attributes(ctx, node, x):
    """Slice before opset 10: starts, ends and axes are attributes (no steps)."""
    axes = attr(node, "axes")
    return slice_(ctx, node, x, np.array(attr(node, "starts"), np.int64), np.array(attr(node, "ends"), np.int64),
                  np.array(axes, np.int64) if axes is not None else None)


def _slice_count(node, *bounds) -> int:
    """How many axes a Slice slices: from whichever of starts/ends/axes/steps is known."""
    for bound in bounds:
        if isinstance(bound, list):
            return len(bound)
    for value in node.inputs[1:]:
        if value is not None and value.shape is not None and isinstance(value.shape[0], int):
            return value.shape[0]
    raise SlimgraphError("pytorch backend: Slice needs to know how many axes it slices")


def _clamp(start: int, end: int, step: int, length: int) -> tuple[int, int, int]:
    """ONNX Slice bounds, clamped as the spec says, for a dimension of `length`."""
    if start < 0:
        start += length
    if end < 0:
        end += length
    if step > 0:
        start, end = min(max(start, 0), length), min(max(end, 0), length)
    else:
        start, end = min(max(start, -1), length - 1), min(max(end, -1), length - 1)
    return start, end, step


@lowers("Gather", tensors=False)
def gather(ctx, node, data, indices):
    axis = attr(node, "axis", 0)
    index = ctx.const(indices)
    if isinstance(data, Dims) and index is not None:
        picked = [data.items[int(i)] for i in np.asarray(index).reshape(-1)]
        return Dims(picked, scalar=np.asarray(index).ndim == 0)
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    data = ctx.tensor(data)
    if index is not None and np.ndim(index) == 0 and rank is not None:  # one index: x[:, i] (ONNX allows i < 0)
        return torch.select(data, axis_of(axis, rank), int(index))
    indices = ctx.tensor(indices)
    if index is None or (np.asarray(index) < 0).any():  # ONNX allows negative indices
        indices = torch.where(indices < 0, indices + data.size(axis), indices)
    if rank is not None and axis_of(axis, rank) == 0:
        return data[indices]
    return torch.index_select(data, axis, indices.reshape(-1)).reshape(
        data.shape[:axis_of(axis, rank)] + indices.shape + data.shape[axis_of(axis, rank) + 1:])


@lowers("GatherElements")
def gather_elements(ctx, node, data, indices):
    axis = attr(node, "axis", 0)
    indices = torch.where(indices < 0, indices + data.size(axis), indices)
    return torch.gather(data, axis, indices)


@lowers("ScatterElements")
def scatter_elements(ctx, node, data, indices, updates):
    axis = attr(node, "axis", 0)
    indices = torch.where(indices < 0, indices + data.size(axis), indices)
    reduction = attr(node, "reduction", "none")
    if reduction == "none":
        return torch.scatter(data, axis, indices, updates)
    return torch.scatter_reduce(data, axis, indices, updates, {"add": "sum", "mul": "prod", "max": "amax",
                                                               "min": "amin"}[reduction])


@lowers("Range", tensors=False)
def range_(ctx, node, start, limit, delta):
    bounds = [scalar(v) for v in (start, limit, delta)]
    dtype = node.outputs[0].dtype or node.inputs[0].dtype
    return ctx.call(torch.arange, *bounds, dtype=torch_dtype(dtype) if dtype is not None else None)


@lowers("Trilu")
def trilu(ctx, node, x, k=None):
    offset = k if k is not None else 0
    return torch.triu(x, offset) if attr(node, "upper", 1) else torch.tril(x, offset)


def _cumulative(ctx, node, x, axis, accumulate, identity: int):
    """CumSum/CumProd: `reverse` flips around the scan; `exclusive` shifts the identity in."""
    x = ctx.tensor(x)
    axis = scalar(axis)
    reverse = attr(node, "reverse", 0)
    if reverse:
        x = torch.flip(x, [axis])
    result = accumulate(x, axis).to(x.dtype)
    if attr(node, "exclusive", 0):
        first = torch.full_like(x.narrow(axis, 0, 1), identity)
        result = torch.cat([first, result.narrow(axis, 0, x.size(axis) - 1)], axis)
    return torch.flip(result, [axis]) if reverse else result


@lowers("CumSum", tensors=False)
def cumsum(ctx, node, x, axis):
    return _cumulative(ctx, node, x, axis, torch.cumsum, 0)


@lowers("Einsum")
def einsum(ctx, node, *inputs):
    return torch.einsum(attr(node, "equation"), *inputs)


@lowers("DepthToSpace")
def depth_to_space(ctx, node, x):
    b = attr(node, "blocksize")
    n, c, h, w = node.inputs[0].shape
    if attr(node, "mode", "DCR") == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


@lowers("SpaceToDepth")
def space_to_depth(ctx, node, x):
    b = attr(node, "blocksize")
    n, c, h, w = node.inputs[0].shape
    y = x.reshape(n, c, h // b, b, w // b, b)
    y = y.permute(0, 1, 3, 5, 2, 4) if attr(node, "mode", "DCR") == "CRD" else y.permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


# --- linear algebra ---------------------------------------------------------------------------


@lowers("MatMul")
def matmul(ctx, node, a, b):
    return torch.matmul(a, b)


@lowers("Gemm")
def gemm(ctx, node, a, b, c=None):
    if attr(node, "transA", 0):
        a = a.t()
    if attr(node, "transB", 0):
        b = b.t()
    result = attr(node, "alpha", 1.0) * torch.matmul(a, b)
    if c is not None:
        result = result + attr(node, "beta", 1.0) * c
    return result


@lowers("GatherND")
def gather_nd(ctx, node, data, indices):
    batch = attr(node, "batch_dims", 0)
    data_dims, index_dims = ctx.dims(node.inputs[0], data), ctx.dims(node.inputs[1], indices)
    depth = index_dims[-1]  # how many data dims each index tuple addresses (static in ONNX)
    flat_data = data.reshape([-1] + data_dims[batch:])  # [B, ...]
    flat_indices = indices.reshape(flat_data.size(0), -1, depth)  # [B, M, depth]
    rows = torch.arange(flat_data.size(0)).unsqueeze(1).expand(-1, flat_indices.size(1))
    columns = [flat_indices[..., j] for j in range(depth)]
    picks = [torch.where(column < 0, column + flat_data.size(1 + j), column) for j, column in enumerate(columns)]
    gathered = flat_data[(rows, *picks)]  # [B, M, rest...]
    return gathered.reshape(index_dims[:-1] + data_dims[batch + depth:])


@lowers("Pad", since=11, tensors=False)
def pad(ctx, node, x, pads, value=None, axes=None):
    x = ctx.tensor(x)
    rank = len(node.inputs[0].shape)
    amounts = ctx.ints(pads)
    chosen = ctx.ints(axes) if axes is not None else list(range(rank))
    if isinstance(amounts, list) and isinstance(chosen, list):
        chosen = [axis_of(a, rank) for a in chosen]
        by_axis = dict(zip(chosen, zip(amounts[: len(chosen)], amounts[len(chosen):])))
        begin, end = [by_axis.get(a, (0, 0))[0] for a in range(rank)], [by_axis.get(a, (0, 0))[1] for a in range(rank)]
    else:  # pads or axes known only at run time: scatter them into [2, rank] then read them back
        named = ctx.tensor(axes) % rank if axes is not None else ctx.call(torch.arange, rank)
        full = ctx.call(torch.zeros, 2, rank, dtype=torch.int64).index_copy(1, named, ctx.tensor(pads).reshape(2, -1))
        listed = full.tolist()
        begin, end = [listed[0][a] for a in range(rank)], [listed[1][a] for a in range(rank)]
    mode = attr(node, "mode", "constant")
    if mode == "constant":
        fill = scalar(value) if value is not None else 0
        return torch.nn.functional.pad(x, torch_pads(begin, end), mode="constant", value=fill)
    # edge/reflect/wrap on any axis and dtype (F.pad's modes cover the last three, floats only):
    # each padded axis reads its source positions
    for axis, (b, e) in enumerate(zip(begin, end)):
        if isinstance(b, int) and isinstance(e, int) and b == e == 0:
            continue
        length = x.size(axis)
        positions = ctx.call(torch.arange, -b, length + e)
        if mode == "edge":
            source = positions.clamp(0, length - 1)
        elif mode == "wrap":
            source = positions % length
        else:  # reflect, without repeating the edge element
            source = torch.where(positions < 0, -positions, torch.where(positions >= length,
                                                                        2 * (length - 1) - positions, positions))
        x = torch.index_select(x, axis, source)
    return x


@lowers("TopK", tensors=False)
def top_k(ctx, node, x, k):
    x = ctx.tensor(x)
    unsigned = node.inputs[0].dtype is not None and node.inputs[0].dtype.name in ("UINT16", "UINT32", "UINT64")
    axis, k = attr(node, "axis", -1), scalar(k)
    # a stable sort keeps the lower index first among equal values, as ONNX requires
    values, indices = torch.sort(x.to(torch.int64) if unsigned else x, dim=axis,
                                 descending=bool(attr(node, "largest", 1)), stable=True)
    values, indices = values.narrow(axis, 0, k), indices.narrow(axis, 0, k)
    return (values.to(x.dtype) if unsigned else values), indices


@lowers("OneHot", tensors=False)
def one_hot(ctx, node, indices, depth, values):
    indices, values = ctx.tensor(indices), ctx.tensor(values)
    depth = int(scalar(depth)) if not isinstance(depth, torch.fx.Proxy) else depth.to(torch.int64).item()
    indices = torch.where(indices < 0, indices + depth, indices).to(torch.int64)
    hot = torch.nn.functional.one_hot(torch.clamp(indices, 0, depth - 1), depth) * (indices >= 0).unsqueeze(-1) \
        * (indices < depth).unsqueeze(-1)
    axis = attr(node, "axis", -1)
    if axis != -1:
        rank = len(node.inputs[0].shape) + 1
        hot = torch.movedim(hot, -1, axis_of(axis, rank))
    return torch.where(hot.to(torch.bool), values[1], values[0])


@lowers("CumProd", tensors=False)
def cumprod(ctx, node, x, axis):
    return _cumulative(ctx, node, x, axis, torch.cumprod, 1)


@lowers("ScatterND")
def scatter_nd(ctx, node, data, indices, updates):
    depth = node.inputs[1].shape[-1]
    index = tuple(indices[..., j] for j in range(depth))
    reduction = attr(node, "reduction", "none")
    if reduction == "none":
        return data.index_put(index, updates)
    if reduction == "add":
        return data.index_put(index, updates, accumulate=True)
    # mul/max/min must combine repeated indices too: reduce over rows of data flattened to
    # [positions addressed by an index tuple, rest...]
    sizes = ctx.dims(node.inputs[0], data)
    rows = sum(index[j] * math.prod(sizes[j + 1:depth]) for j in range(depth))
    flat = data.reshape([-1] + sizes[depth:])
    combined = flat.index_reduce(0, rows.reshape(-1), updates.reshape([-1] + sizes[depth:]),
                                 {"mul": "prod", "max": "amax", "min": "amin"}[reduction])
    return combined.reshape(data.shape)


@lowers("BitCast")
def bit_cast(ctx, node, x):
    return x.view(torch_dtype(attr(node, "to")))  # same bit width: same shape, bits reinterpreted


@lowers("Compress", tensors=False)
def compress(ctx, node, x, condition):
    x, condition = ctx.tensor(x), ctx.tensor(condition).to(torch.bool)
    axis = attr(node, "axis")
    if axis is None:
        x = x.reshape(-1)
        axis = 0
    length = x.size(axis)
    keep = torch.nonzero(condition[:length]).reshape(-1)  # a shorter condition keeps only its length
    return torch.index_select(x, axis, keep)


@lowers("CenterCropPad", tensors=False)
def center_crop_pad(ctx, node, x, shape):
    x = ctx.tensor(x)
    rank = len(node.inputs[0].shape)
    axes = [axis_of(a, rank) for a in (attr(node, "axes") or range(rank))]
    sizes = ctx.ints(shape)
    if not isinstance(sizes, list):  # given at run time: the output shape says it
        sizes = [node.outputs[0].shape[a] for a in axes]
    for axis, target in zip(axes, sizes):
        current = node.inputs[0].shape[axis]
        if current > target:  # crop: the extra goes to the end when odd
            x = x.narrow(axis, (current - target) // 2, target)
        elif current < target:  # pad: the extra goes to the end when odd
            begin = (target - current) // 2
            pads = [0, 0] * (rank - 1 - axis) + [begin, target - current - begin]
            x = torch.nn.functional.pad(x, pads)
    return x


@lowers("AffineGrid", tensors=False)
def affine_grid(ctx, node, theta, size):
    theta = ctx.tensor(theta)
    sizes = ctx.ints(size)
    if not isinstance(sizes, list):  # given at run time: [N, H, (W,) 2] output → [N, C, H, (W)]
        out = node.outputs[0].shape
        sizes = [out[0], 1, *out[1:-1]]  # C only shapes the call; the grid does not depend on it
    sizes = [int(s) for s in sizes]
    return torch.nn.functional.affine_grid(theta, sizes, align_corners=bool(attr(node, "align_corners", 0)))


@lowers("EyeLike")
def eye_like(ctx, node, x):
    dtype = attr(node, "dtype")
    rows, columns = ctx.dims(node.inputs[0], x)
    ones = ctx.call(torch.ones, rows, columns, dtype=torch.bool)
    k = attr(node, "k", 0)
    return (torch.triu(ones, k) & torch.tril(ones, k)).to(torch_dtype(dtype) if dtype is not None else x.dtype)


@lowers("Scatter", since=9, until=10)
def scatter(ctx, node, data, indices, updates):
    return scatter_elements(ctx, node, data, indices, updates)  # renamed ScatterElements in opset 11


@lowers("ReverseSequence")
def reverse_sequence(ctx, node, x, lengths):
    """Reverse the first lengths[b] steps of each batch entry: step t reads step lengths[b] - 1 - t."""
    batch_axis, time_axis = attr(node, "batch_axis", 1), attr(node, "time_axis", 0)
    steps = torch.arange(x.size(time_axis)).reshape(-1, 1)  # [T, 1]
    source = torch.where(steps < lengths, lengths - 1 - steps, steps)  # [T, B]
    if batch_axis < time_axis:
        source = source.t()
    rank = len(node.inputs[0].shape)
    source = source.reshape(source.shape + (1,) * (rank - 2)).expand(x.shape)
    return torch.gather(x, time_axis, source)


@lowers("TensorScatter", since=24)
def tensor_scatter(ctx, node, cache, update, write_indices=None):
    """Write `update` into `cache` along `axis` from each batch entry's write index (modulo
    the cache length when circular)."""
    rank = len(node.inputs[0].shape)
    axis = axis_of(attr(node, "axis", -2), rank)
    steps = torch.arange(update.size(axis))
    start = write_indices if write_indices is not None else torch.zeros(cache.size(0), dtype=torch.int64)
    positions = start.reshape(-1, 1) + steps  # [B, S]
    if attr(node, "mode", "linear") == "circular":
        positions = positions % cache.size(axis)
    index = positions.reshape([positions.size(0)] + [1] * (axis - 1) + [update.size(axis)]
                              + [1] * (rank - axis - 1)).expand(update.shape)
    return torch.scatter(cache, axis, index, update)


@lowers("Det")
def det(ctx, node, x):
    return torch.linalg.det(x)


@lowers("OptionalHasElement", since=15, tensors=False)
def optional_has_element(ctx, node, x=None):
    """On tensors (optional types are not lowered): whether the input is given."""
    return np.array(x is not None)


@lowers("OptionalGetElement", since=15)
def optional_get_element(ctx, node, x):
    return x
