"""Neural-network ops: softmax, normalizations, convolution, pooling."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from slimgraph.backends.pytorch import runtime
from slimgraph.backends.pytorch.lowering import attr, lowers
from slimgraph.backends.pytorch.ops._common import static_length, torch_pads
from slimgraph.errors import SlimgraphError


@lowers("Softmax", since=13)
def softmax(ctx, node, x):
    return torch.softmax(x, attr(node, "axis", -1))


@lowers("LogSoftmax", since=13)
def log_softmax(ctx, node, x):
    return torch.log_softmax(x, attr(node, "axis", -1))


def _flattened(fn):
    """Opset < 13: softmax over the input flattened to 2-D at `axis`."""

    def lower(ctx, node, x):
        axis = attr(node, "axis", 1)
        if axis < 0 and node.inputs[0].shape is not None:
            axis += len(node.inputs[0].shape)  # (rank unknown: x.shape[:axis] takes a negative axis as it is)
        flat = x.reshape(x.shape[:axis].numel() if axis else 1, -1)
        return fn(flat, 1).reshape(x.shape)

    return lower


lowers("Softmax", until=12)(_flattened(torch.softmax))
lowers("LogSoftmax", until=12)(_flattened(torch.log_softmax))


@lowers("LayerNormalization")
def layer_norm(ctx, node, x, scale, bias=None):
    axis = attr(node, "axis", -1)
    rank = len(node.inputs[0].shape)
    axis = axis + rank if axis < 0 else axis
    dims = tuple(range(axis, rank))
    epsilon = attr(node, "epsilon", 1e-5)
    if len(node.outputs) == 1 and all(isinstance(d, int) for d in node.inputs[0].shape[axis:]):
        return F.layer_norm(x, tuple(node.inputs[0].shape[axis:]), scale, bias, epsilon)
    mean = torch.mean(x, dims, keepdim=True)
    inv_std = torch.rsqrt(torch.var(x, dims, keepdim=True, unbiased=False) + epsilon)
    y = (x - mean) * inv_std * scale
    if bias is not None:
        y = y + bias
    return y, mean, inv_std


@lowers("BatchNormalization", tensors=False)
def batch_norm(ctx, node, x, scale, bias, mean, var):
    x, scale, bias, mean, var = ctx.tensor(x), ctx.tensor(scale), ctx.tensor(bias), ctx.statistic(mean), \
        ctx.statistic(var)
    epsilon = attr(node, "epsilon", 1e-5)
    if not attr(node, "training_mode", 0):
        return F.batch_norm(x, mean, var, scale, bias, training=False, eps=epsilon)
    # training: normalize with the batch's statistics and return the updated running ones
    dims = [0] + list(range(2, len(node.inputs[0].shape)))
    batch_mean, batch_var = torch.mean(x, dims), torch.var(x, dims, unbiased=False)
    momentum = attr(node, "momentum", 0.9)
    y = F.batch_norm(x, batch_mean, batch_var, scale, bias, training=False, eps=epsilon)
    return y, mean * momentum + batch_mean * (1 - momentum), var * momentum + batch_var * (1 - momentum)


@lowers("InstanceNormalization")
def instance_norm(ctx, node, x, scale, bias):
    return F.instance_norm(x, weight=scale, bias=bias, eps=attr(node, "epsilon", 1e-5))


def _pads(node, spatial: int, kernel: list[int] | None = None) -> list[int]:
    """Explicit pads, or those auto_pad SAME_UPPER/SAME_LOWER implies (from static shapes)."""
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", "VALID"):
        return attr(node, "pads", [0] * (2 * spatial)) if auto_pad == "NOTSET" else [0] * (2 * spatial)
    sizes = node.inputs[0].shape
    if sizes is None or not all(isinstance(d, int) for d in sizes[2:]):
        raise SlimgraphError("pytorch backend: auto_pad SAME needs static spatial sizes")
    kernel = kernel or list(_weight(node).shape[2:])
    strides = attr(node, "strides", [1] * spatial)
    dilations = attr(node, "dilations", [1] * spatial)
    begin, end = [], []
    for size, k, stride, dilation in zip(sizes[2:], kernel, strides, dilations):
        total = max((-(-size // stride) - 1) * stride + (k - 1) * dilation + 1 - size, 0)
        small = total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return begin + end


def _symmetric_or_padded(x, pads: list[int], spatial: int, value: float = 0.0, kernel: list[int] | None = None):
    """(input, symmetric padding): asymmetric ONNX pads, or pads over half the kernel (which torch's
    pooling refuses), are applied with F.pad first."""
    begin, end = pads[:spatial], pads[spatial:]
    if begin == end and (kernel is None or all(p <= k // 2 for p, k in zip(begin, kernel))):
        return x, begin
    return F.pad(x, torch_pads(begin, end), value=value), [0] * spatial


def _weight(node) -> ir.Value:
    """The convolution weight input (QLinearConv has scales and zero points before it)."""
    return node.inputs[3] if node.op_type == "QLinearConv" else node.inputs[1]


@lowers("Conv")
def conv(ctx, node, x, weight, bias=None):
    spatial = len(_weight(node).shape) - 2
    x, padding = _symmetric_or_padded(x, _pads(node, spatial), spatial)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return fn(x, weight, bias, stride=attr(node, "strides", [1] * spatial), padding=padding,
              dilation=attr(node, "dilations", [1] * spatial), groups=attr(node, "group", 1))


# com.microsoft.FusedConv's activations (ONNX Runtime's graph optimizer writes the op into the files it
# saves), with their `activation_params`
FUSED_ACTIVATIONS = {
    "Relu": lambda y, params: torch.relu(y),
    "Tanh": lambda y, params: torch.tanh(y),
    "Sigmoid": lambda y, params: torch.sigmoid(y),
    "LeakyRelu": lambda y, params: F.leaky_relu(y, params[0]),
    "Clip": lambda y, params: torch.clamp(y, params[0], params[1]),
    "HardSigmoid": lambda y, params: torch.clamp(params[0] * y + params[1], 0.0, 1.0),
}


@lowers("FusedConv", domain="com.microsoft")
def fused_conv(ctx, node, x, weight, bias=None, z=None):
    """activation(Conv(x, weight, bias) + z)."""
    activation = attr(node, "activation", "")
    if activation not in FUSED_ACTIVATIONS:
        raise SlimgraphError(f"pytorch backend: FusedConv activation {activation!r} is not supported "
                             f"(one of: {', '.join(FUSED_ACTIVATIONS)})")
    y = conv(ctx, node, x, weight, bias)
    return FUSED_ACTIVATIONS[activation](y if z is None else y + z, attr(node, "activation_params", []))


@lowers("MaxPool")
def max_pool(ctx, node, x):
    kernel = attr(node, "kernel_shape")
    spatial = len(kernel)
    pads = _pads(node, spatial, kernel)
    padded, padding = _symmetric_or_padded(x, pads, spatial, value=float("-inf"), kernel=kernel)
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
    options = dict(stride=attr(node, "strides", [1] * spatial), padding=padding,
                   dilation=attr(node, "dilations", [1] * spatial), ceil_mode=bool(attr(node, "ceil_mode", 0)))
    if len(node.outputs) < 2 or node.outputs[1] is None or not node.outputs[1].name:
        return fn(padded, kernel, **options)
    if padded is not x:
        raise SlimgraphError("pytorch backend: MaxPool indices with asymmetric padding are not supported")
    values, plane_indices = fn(x, kernel, return_indices=True, **options)
    if attr(node, "storage_order", 0):  # column-major within the plane: index w * H + h
        if spatial != 2:
            raise SlimgraphError("pytorch backend: MaxPool storage_order=1 is supported in 2-D")
        height, width = node.inputs[0].shape[2:]
        plane_indices = plane_indices % width * height + plane_indices // width
    # torch counts within each (n, c) plane; ONNX over the whole tensor
    n, c, *sizes = node.inputs[0].shape
    plane = 1
    for size in sizes:
        plane *= size
    offsets = ctx.constant(np.arange(n * c, dtype=np.int64).reshape(n, c, *([1] * spatial)) * plane)
    return values, plane_indices + offsets


@lowers("AveragePool")
def average_pool(ctx, node, x):
    kernel = attr(node, "kernel_shape")
    spatial = len(kernel)
    pads = _pads(node, spatial, kernel)
    dilations = attr(node, "dilations", [1] * spatial)
    if any(d != 1 for d in dilations) or any(p > k // 2 for p, k in zip(pads[:spatial] + pads[spatial:], kernel * 2)):
        return _average_by_convolution(ctx, node, x, kernel, pads, dilations)
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
    options = dict(stride=attr(node, "strides", [1] * spatial), ceil_mode=bool(attr(node, "ceil_mode", 0)))
    if pads[:spatial] != pads[spatial:] and not attr(node, "count_include_pad", 0):
        # Asymmetric padding that must not be counted: the mean of the padded input divided
        # by the mean of a padded mask of ones (the same divisor cancels).
        padded, _ = _symmetric_or_padded(x, pads, spatial)
        counted, _ = _symmetric_or_padded(torch.ones_like(x), pads, spatial)
        return fn(padded, kernel, padding=0, count_include_pad=True, **options) / fn(
            counted, kernel, padding=0, count_include_pad=True, **options)
    x, padding = _symmetric_or_padded(x, pads, spatial)
    return fn(x, kernel, padding=padding, count_include_pad=bool(attr(node, "count_include_pad", 0)), **options)


def _average_by_convolution(ctx, node, x, kernel, pads, dilations):
    """AveragePool as sum / count, both window sums: handles the dilations and large pads
    torch's avg_pool does not."""
    spatial = len(kernel)
    begin, end = pads[:spatial], pads[spatial:]
    summed = _window_sums(ctx, node, x, kernel, begin, end, dilations)
    if attr(node, "count_include_pad", 0):  # explicit pads count; the ceil_mode room does not
        counted = F.pad(torch.ones_like(x), torch_pads(begin, end), value=1.0)
        sizes = [i + b + e for i, b, e in zip(node.inputs[0].shape[2:], begin, end)]
        return summed / _window_sums(ctx, node, counted, kernel, [0] * spatial, [0] * spatial, dilations, sizes)
    return summed / _window_sums(ctx, node, torch.ones_like(x), kernel, begin, end, dilations)


def _window_sums(ctx, node, x, kernel, begin, end, dilations, sizes=None):
    """Sums over each pooling window of `x` zero-padded by begin/end, as a depthwise convolution
    with a kernel of ones. Output sizes come from the static shapes: ceil_mode may need room past
    the pads. `sizes`: x's spatial sizes when they are not the node input's."""
    spatial = len(kernel)
    shape_out = node.outputs[0].shape
    sizes = sizes or node.inputs[0].shape[2:]
    if not all(isinstance(d, int) for d in (*sizes, *shape_out)):
        raise SlimgraphError(f"pytorch backend: {node.op_type} with dilations or large pads needs static shapes")
    strides = attr(node, "strides", [1] * spatial)
    room = [max((o - 1) * s + (k - 1) * d + 1 - (i + b + e), 0)
            for o, s, k, d, i, b, e in zip(shape_out[2:], strides, kernel, dilations, sizes, begin, end)]
    channels = node.inputs[0].shape[1]
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    weight = ctx.constant(np.ones((channels, 1, *kernel), dtype=node.inputs[0].dtype.numpy()))
    padded = F.pad(x, torch_pads(begin, [e + r for e, r in zip(end, room)]))
    return conv(padded, weight, stride=strides, dilation=dilations, groups=channels)


@lowers("GlobalAveragePool")
def global_average_pool(ctx, node, x):
    return torch.mean(x, tuple(range(2, len(node.inputs[0].shape))), keepdim=True)


@lowers("GlobalMaxPool")
def global_max_pool(ctx, node, x):
    return torch.amax(x, tuple(range(2, len(node.inputs[0].shape))), keepdim=True)


@lowers("LRN")
def lrn(ctx, node, x):
    return F.local_response_norm(x, attr(node, "size"), alpha=attr(node, "alpha", 1e-4),
                                 beta=attr(node, "beta", 0.75), k=attr(node, "bias", 1.0))


@lowers("RMSNormalization")
def rms_norm(ctx, node, x, scale):
    axis = attr(node, "axis", -1)
    rank = len(node.inputs[0].shape)
    dims = tuple(range(axis + rank if axis < 0 else axis, rank))
    mean_square = torch.mean(x.to(torch.float32) * x.to(torch.float32), dims, keepdim=True)
    normed = (x.to(torch.float32) * torch.rsqrt(mean_square + attr(node, "epsilon", 1e-5))).to(x.dtype)
    return normed * scale


@lowers("Hardmax", since=13)
def hardmax(ctx, node, x):
    axis = attr(node, "axis", -1)
    return torch.nn.functional.one_hot(torch.argmax(x, axis), x.size(axis)).movedim(-1, axis).to(x.dtype)


@lowers("LpNormalization")
def lp_normalization(ctx, node, x):
    norm = torch.linalg.vector_norm(x, ord=attr(node, "p", 2), dim=attr(node, "axis", -1), keepdim=True)
    return torch.where(norm == 0, torch.zeros_like(x), x / norm)  # a zero vector stays zero


@lowers("ConvTranspose")
def conv_transpose(ctx, node, x, weight, bias=None):
    """Transposed convolution without padding, then ONNX's pads cropped away (F.pad with
    negative amounts crops; positive ones add the rows an output_shape may ask beyond it)."""
    spatial = len(node.inputs[1].shape) - 2
    strides = attr(node, "strides", [1] * spatial)
    dilations = attr(node, "dilations", [1] * spatial)
    output_padding = attr(node, "output_padding", [0] * spatial)
    kernel = attr(node, "kernel_shape") or list(node.inputs[1].shape[2:])
    output_shape, auto_pad = attr(node, "output_shape"), attr(node, "auto_pad", "NOTSET")
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        sizes = node.inputs[0].shape[2:]
        if not all(isinstance(d, int) for d in sizes):
            raise SlimgraphError("pytorch backend: ConvTranspose with output_shape or auto_pad needs static sizes")
        targets = output_shape[-spatial:] if output_shape is not None else [d * s for d, s in zip(sizes, strides)]
        totals = [s * (d - 1) + p + (k - 1) * dl + 1 - t
                  for s, d, p, k, dl, t in zip(strides, sizes, output_padding, kernel, dilations, targets)]
        halves = [t // 2 for t in totals]  # SAME_UPPER puts the larger half at the end
        upper = auto_pad == "SAME_UPPER"
        pads = [h if upper else t - h for t, h in zip(totals, halves)] + \
            [t - h if upper else h for t, h in zip(totals, halves)]
    else:
        pads = attr(node, "pads", [0] * (2 * spatial))
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[spatial]
    options = dict(stride=strides, output_padding=output_padding, groups=attr(node, "group", 1), dilation=dilations)
    if pads[:spatial] == pads[spatial:] and all(p >= 0 for p in pads):
        return fn(x, weight, bias, padding=pads[:spatial], **options)
    y = F.pad(fn(x, weight, None, **options), torch_pads([-p for p in pads[:spatial]], [-p for p in pads[spatial:]]))
    return y if bias is None else y + bias.reshape(-1, *([1] * spatial))


def _nll(ctx, node, log_prob, target, weight):
    """NegativeLogLikelihoodLoss on [N, C, ...] log-probabilities, with ignore_index and reduction."""
    ignore = attr(node, "ignore_index")
    target = target.to(torch.int64)
    valid = torch.ones_like(target, dtype=torch.bool) if ignore is None else target != ignore
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    picked = -torch.gather(log_prob, 1, safe_target.unsqueeze(1)).squeeze(1)
    weights = (weight[safe_target] if weight is not None else torch.ones_like(picked)) * valid.to(picked.dtype)
    losses = picked * weights
    reduction = attr(node, "reduction", "mean")
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / weights.sum()


@lowers("NegativeLogLikelihoodLoss")
def nll_loss(ctx, node, log_prob, target, weight=None):
    return _nll(ctx, node, log_prob, target, weight)


@lowers("SoftmaxCrossEntropyLoss")
def softmax_cross_entropy(ctx, node, scores, labels, weight=None):
    log_prob = torch.log_softmax(scores, 1)
    loss = _nll(ctx, node, log_prob, labels, weight)
    return (loss, log_prob) if len(node.outputs) > 1 else loss


@lowers("LpPool")
def lp_pool(ctx, node, x):
    kernel = attr(node, "kernel_shape")
    spatial = len(kernel)
    pads = _pads(node, spatial, kernel)
    p = attr(node, "p", 2)
    summed = _window_sums(ctx, node, torch.abs(x) ** p, kernel, pads[:spatial], pads[spatial:],
                          attr(node, "dilations", [1] * spatial))
    return summed ** (1.0 / p)


@lowers("GridSample")
def grid_sample(ctx, node, x, grid):
    mode = {"linear": "bilinear", "cubic": "bicubic"}.get(attr(node, "mode", "linear"), attr(node, "mode", "linear"))
    return F.grid_sample(x, grid, mode=mode, padding_mode=attr(node, "padding_mode", "zeros"),
                         align_corners=bool(attr(node, "align_corners", 0)))


@lowers("Swish")
def swish(ctx, node, x):
    return x * torch.sigmoid(attr(node, "alpha", 1.0) * x)


@lowers("CausalConvWithState", since=27)
def causal_conv_with_state(ctx, node, x, weight, bias=None, past_state=None):
    """Depthwise causal conv1d over [past_state, x]; the last k-1 positions are the new state."""
    channels, _, k = node.inputs[1].shape
    if past_state is None:
        past_state = torch.zeros_like(x[:, :, :1]).repeat(1, 1, k - 1)
    padded = torch.cat([past_state, x], 2)
    y = F.conv1d(padded, weight, bias, groups=channels)
    if attr(node, "activation", "none") in ("silu", "swish"):
        y = (y.float() * torch.sigmoid(y.float())).to(y.dtype)
    return y, padded[:, :, padded.size(2) - (k - 1):]


@lowers("GroupNormalization", since=18)
def group_norm(ctx, node, x, scale, bias):
    """Opset 21 scales per channel (F.group_norm's layout); opset 18 per group, repeated here."""
    groups = attr(node, "num_groups")
    channels = node.inputs[0].shape[1]
    if ctx.model.opset_imports.get("", 1) < 21:
        scale, bias = scale.repeat_interleave(channels // groups), bias.repeat_interleave(channels // groups)
    y = F.group_norm(x.to(torch.float32), groups, eps=attr(node, "epsilon", 1e-5)).to(x.dtype)  # stash_type float
    shape = (1, -1) + (1,) * (len(node.inputs[0].shape) - 2)
    return y * scale.reshape(shape) + bias.reshape(shape)


@lowers("MeanVarianceNormalization")
def mean_variance_normalization(ctx, node, x):
    axes = tuple(attr(node, "axes", [0, 2, 3]))
    mean = torch.mean(x, axes, keepdim=True)
    variance = torch.mean(x * x, axes, keepdim=True) - mean * mean  # as the ONNX function computes it
    return (x - mean) / (torch.sqrt(variance) + 1e-9)


@lowers("MaxUnpool")
def max_unpool(ctx, node, x, indices, output_shape=None):
    """MaxPool's indices count over its whole input: scatter the values into a tensor of that
    size, flat. A larger output_shape pads it at the end (the indices keep their meaning)."""
    kernel = attr(node, "kernel_shape")
    spatial = len(kernel)
    strides, pads = attr(node, "strides", [1] * spatial), attr(node, "pads", [0] * (2 * spatial))
    n, c, *sizes = node.inputs[0].shape
    shape = [n, c] + [(d - 1) * s - b - e + k
                      for d, s, b, e, k in zip(sizes, strides, pads[:spatial], pads[spatial:], kernel)]
    flat = torch.zeros(math.prod(shape), dtype=x.dtype)
    y = flat.scatter(0, indices.reshape(-1), x.reshape(-1)).reshape(shape)
    if output_shape is None:
        return y
    extra = output_shape[2:] - ctx.constant(np.array(shape[2:], np.int64))
    return F.pad(y, torch.stack([torch.zeros_like(extra), extra], 1).flip(0).reshape(-1).tolist())


@lowers("Col2Im", since=18, tensors=False)
def col2im(ctx, node, x, image_shape, block_shape):
    """Column blocks back into an image: F.fold for 2-D images with even pads, else runtime.col2im
    (any number of dimensions)."""
    image, block = ctx.ints(image_shape), ctx.ints(block_shape)  # traced lists when given at run time
    dims = static_length(node.inputs[1])
    dilations, strides = attr(node, "dilations", [1] * dims), attr(node, "strides", [1] * dims)
    pads = attr(node, "pads", [0] * (2 * dims))
    if dims == 2 and pads[:2] == pads[2:]:
        return F.fold(ctx.tensor(x), image, block, dilation=dilations, padding=pads[:2], stride=strides)
    return ctx.call(runtime.col2im, ctx.tensor(x), image, block, dilations, pads, strides)

@lowers("RoiAlign", since=10)
def roi_align(ctx, node, x, rois, batch_indices):
    half_pixel = attr(node, "coordinate_transformation_mode", "half_pixel") == "half_pixel"
    if ctx.model.opset_imports.get("", 1) < 16:
        half_pixel = False  # (the attribute came with opset 16; before, output_half_pixel)
    return ctx.call(runtime.roi_align, x, rois, batch_indices, attr(node, "output_height", 1),
                    attr(node, "output_width", 1), attr(node, "sampling_ratio", 0), attr(node, "spatial_scale", 1.0),
                    attr(node, "mode", "avg"), half_pixel)


@lowers("DeformConv", since=19)
def deform_conv(ctx, node, x, weight, offset, bias=None, mask=None):
    """2-D deformable convolution: each kernel tap reads the input at its place plus a learned
    offset (bilinear, zero outside: F.grid_sample), scaled by the mask, then the grouped conv's
    weights apply to those samples (one einsum)."""
    shapes = [node.inputs[i].shape for i in range(3)]
    if any(s is None or len(s) != 4 or not all(isinstance(d, int) for d in s) for s in shapes):
        raise SlimgraphError("pytorch backend: DeformConv is supported in 2-D with static shapes")
    (n, channels, height, width), (out_channels, per_group, kh, kw), (_, _, oh, ow) = shapes
    groups, offset_groups = attr(node, "group", 1), attr(node, "offset_group", 1)
    (sh, sw), (dh, dw) = attr(node, "strides", [1, 1]), attr(node, "dilations", [1, 1])
    pads = attr(node, "pads", [0, 0, 0, 0])
    rows = (np.arange(kh) * dh)[:, None, None, None] + (np.arange(oh) * sh - pads[0])[None, None, :, None]
    columns = (np.arange(kw) * dw)[None, :, None, None] + (np.arange(ow) * sw - pads[1])[None, None, None, :]
    moved = offset.reshape(n, offset_groups, kh, kw, 2, oh, ow)
    y_at = ctx.constant(rows.astype(np.float64)) + moved[:, :, :, :, 0]  # [n, og, kh, kw, oh, ow]
    x_at = ctx.constant(columns.astype(np.float64)) + moved[:, :, :, :, 1]
    # pixel p ↦ (2p + 1) / size - 1: grid_sample's coordinates without align_corners (in float64,
    # so that a sample on a pixel reads just that pixel)
    grid = torch.stack([(2 * x_at + 1) / width - 1, (2 * y_at + 1) / height - 1], -1)
    sampled = F.grid_sample(x.double().reshape(n * offset_groups, channels // offset_groups, height, width),
                            grid.reshape(n * offset_groups, kh * kw * oh, ow, 2), mode="bilinear",
                            padding_mode="zeros", align_corners=False).to(x.dtype)
    sampled = sampled.reshape(n, offset_groups, channels // offset_groups, kh, kw, oh, ow)
    if mask is not None:
        sampled = sampled * mask.reshape(n, offset_groups, 1, kh, kw, oh, ow)
    taps = sampled.reshape(n, groups, per_group, kh, kw, oh, ow)
    y = torch.einsum("ngcabhw,gocab->ngohw", taps, weight.reshape(groups, out_channels // groups, per_group, kh, kw))
    y = y.reshape(n, out_channels, oh, ow)
    return y if bias is None else y + bias.reshape(1, -1, 1, 1)
