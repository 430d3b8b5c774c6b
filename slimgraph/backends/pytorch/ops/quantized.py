"""Quantized ops, with onnxruntime's semantics: com.microsoft.MatMulNBits and
GatherBlockQuantized (unpack, subtract the zero point, scale), and the standard
DynamicQuantizeLinear / MatMulInteger / ConvInteger / QLinearConv / QLinearMatMul (integer sums in
float64, which holds them exactly) and QuantizeLinear / DequantizeLinear (per tensor, per axis or blocked)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from slimgraph.backends.pytorch.lowering import attr, lowers
from slimgraph.backends.pytorch.ops.nn import conv
from slimgraph.errors import SlimgraphError

MS = "com.microsoft"


def _unpack(ctx, packed, bits: int):
    """uint8 [..., L] → codes [..., L·8/bits], low bits first."""
    shifts = ctx.constant(np.arange(0, 8, bits, dtype=np.uint8), f"unpack_shifts_{bits}bit")
    codes = torch.bitwise_and(torch.bitwise_right_shift(packed.unsqueeze(-1), shifts), (1 << bits) - 1)
    return codes.flatten(-2)


@lowers("MatMulNBits", domain=MS)
def matmul_nbits(ctx, node, a, b, scales, zero_points=None, g_idx=None, bias=None):
    k, n, bits, block = attr(node, "K"), attr(node, "N"), attr(node, "bits", 4), attr(node, "block_size")
    blocks = -(-k // block)
    codes = _unpack(ctx, b, bits).reshape(n, blocks, block).to(scales.dtype)
    if zero_points is None:
        zp = torch.full((n, blocks, 1), float(1 << (bits - 1)), dtype=scales.dtype)
    elif node.inputs[3].dtype.name == "UINT8":
        zp = _unpack(ctx, zero_points, bits)[:, :blocks].to(scales.dtype).unsqueeze(-1)
    else:
        zp = zero_points.reshape(n, blocks, 1)
    weight = ((codes - zp) * scales.reshape(n, blocks, 1)).reshape(n, blocks * block)[:, :k]
    result = torch.matmul(a, weight.t())
    return result + bias if bias is not None else result


@lowers("GatherBlockQuantized", domain=MS)
def gather_block_quantized(ctx, node, data, indices, scales, zero_points=None):
    bits, block = attr(node, "bits", 4), attr(node, "block_size", 128)
    rows, dim = node.inputs[0].shape
    if node.inputs[0].dtype == ir.DataType.UINT8:  # MatMulNBits' layout: `8 // bits` codes a byte
        dim = dim * 8 // bits
    signed = node.inputs[0].dtype == ir.DataType.INT4
    if bits == 4:
        nibbles = _unpack(ctx, data.reshape(rows, -1), 4)[:, :dim]
        codes = torch.where(nibbles >= 8, nibbles.to(torch.int16) - 16, nibbles.to(torch.int16)) if signed else nibbles
    else:
        codes = data
    if zero_points is None:  # int4 is centred on 0; unsigned codes on 2^(bits-1)
        zp = torch.zeros((), dtype=scales.dtype) if signed else torch.full((), float(1 << (bits - 1)), dtype=scales.dtype)
    else:
        zp = _unpack(ctx, zero_points.reshape(rows, -1), 4) if bits == 4 else zero_points
        zp = zp[:, : -(-dim // block)].to(scales.dtype).repeat_interleave(block, dim=1)[:, :dim]
    table = (codes.to(scales.dtype) - zp) * scales.repeat_interleave(block, dim=1)[:, :dim]
    return table[indices]


@lowers("DynamicQuantizeLinear")
def dynamic_quantize_linear(ctx, node, x):
    low = torch.clamp(torch.amin(x), max=0.0)
    high = torch.clamp(torch.amax(x), min=0.0)
    scale = (high - low) / 255.0
    zero_point = torch.clamp(torch.round(-low / scale), 0, 255)
    quantized = torch.clamp(torch.round(x / scale) + zero_point, 0, 255).to(torch.uint8)
    return quantized, scale, zero_point.to(torch.uint8)


@lowers("MatMulInteger")
def matmul_integer(ctx, node, a, b, a_zero_point=None, b_zero_point=None):
    a = a.to(torch.int32)
    b = b.to(torch.int32)
    if a_zero_point is not None:
        a = a - a_zero_point.to(torch.int32)
    if b_zero_point is not None:
        b = b - b_zero_point.to(torch.int32)
    # int32 matmul is not implemented for every device; float64 holds these sums exactly.
    return torch.matmul(a.to(torch.float64), b.to(torch.float64)).to(torch.int32)


def _per_axis(node, scale, zero_point):
    """A scale (and zero point) shaped to broadcast against the input: per tensor as it is,
    per axis (1-D) along `axis`, blocked (same rank, `block_size` elements per scale along `axis`)
    repeated over each block."""
    scale_shape = node.inputs[1].shape
    per_tensor = scale_shape is not None and (len(scale_shape) == 0 or list(scale_shape) == [1])
    if per_tensor and not attr(node, "block_size", 0):
        return scale, zero_point  # (the input's rank is not needed, nor always known: contrib ops' outputs)
    rank = len(node.inputs[0].shape)
    axis = attr(node, "axis", 1) % rank
    if attr(node, "block_size", 0):
        block, length = attr(node, "block_size"), node.inputs[0].shape[axis]

        def spread(t):
            return t.repeat_interleave(block, axis).narrow(axis, 0, length)

        return spread(scale), spread(zero_point) if zero_point is not None else None
    if scale_shape is None or len(scale_shape) != 1 or scale_shape[0] == 1:
        return scale, zero_point
    shape = [1] * rank
    shape[axis] = -1
    return scale.reshape(shape), zero_point.reshape(shape) if zero_point is not None else None


@lowers("DequantizeLinear")
def dequantize_linear(ctx, node, x, scale, zero_point=None):
    scale, zero_point = _per_axis(node, scale, zero_point)
    values = x.to(torch.float32)
    if zero_point is not None:
        values = values - zero_point.to(torch.float32)
    return (values * scale).to(scale.dtype)


QUANTIZED = {"UINT8": torch.uint8, "INT8": torch.int8, "UINT16": torch.uint16, "INT16": torch.int16}


@lowers("QuantizeLinear")
def quantize_linear(ctx, node, x, scale, zero_point=None):
    if zero_point is not None:
        kind = node.inputs[2].dtype.name
    else:
        kind = ir.DataType(attr(node, "output_dtype", ir.DataType.UINT8)).name
    if kind not in QUANTIZED:
        raise SlimgraphError(f"pytorch backend: QuantizeLinear to {kind.lower()} is not supported")
    dtype = QUANTIZED[kind]
    scale, zero_point = _per_axis(node, scale, zero_point)
    values = torch.round(x.to(torch.float32) / scale.to(torch.float32))  # half to even, as ONNX rounds
    if zero_point is not None:
        values = values + zero_point.to(torch.float32)
    return torch.clamp(values, torch.iinfo(dtype).min, torch.iinfo(dtype).max).to(dtype)


def _integer_conv(ctx, node, x, x_zero_point, w, w_zero_point, bias=None):
    """Conv of zero-point-shifted integers, accumulated exactly (float64 holds these sums)."""
    x = x.to(torch.float64)
    if x_zero_point is not None:
        x = x - x_zero_point.to(torch.float64)
    w = w.to(torch.float64)
    if w_zero_point is not None:  # per tensor, or per output channel: [M] → [M, 1, 1, ...]
        w = w - w_zero_point.to(torch.float64).reshape([-1] + [1] * (w.dim() - 1))
    return conv(ctx, node, x, w, bias.to(torch.float64) if bias is not None else None)


@lowers("ConvInteger")
def conv_integer(ctx, node, x, w, x_zero_point=None, w_zero_point=None):
    return _integer_conv(ctx, node, x, x_zero_point, w, w_zero_point).to(torch.int32)


@lowers("QLinearConv")
def qlinear_conv(ctx, node, x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, bias=None):
    accumulated = _integer_conv(ctx, node, x, x_zero_point, w, w_zero_point, bias)
    w_scale = w_scale.to(torch.float64).reshape([1, -1] + [1] * (accumulated.dim() - 2))
    scale = x_scale.to(torch.float64) * w_scale / y_scale.to(torch.float64)
    dtype = QUANTIZED[node.inputs[7].dtype.name]
    y = torch.clamp(accumulated * scale + y_zero_point.to(torch.float64), torch.iinfo(dtype).min,
                    torch.iinfo(dtype).max)
    return torch.round(y).to(dtype)


@lowers("QLinearMatMul")
def qlinear_matmul(ctx, node, a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point):
    real_a = (a.to(torch.float32) - a_zero_point.to(torch.float32)) * a_scale.to(torch.float32)
    b_scale_f, b_zero_f = b_scale.to(torch.float32), b_zero_point.to(torch.float32)
    if node.inputs[4].shape is not None and len(node.inputs[4].shape) == 1 and node.inputs[4].shape[0] != 1:
        b_scale_f, b_zero_f = b_scale_f.reshape(1, -1), b_zero_f.reshape(1, -1)  # per output column
    real_b = (b.to(torch.float32) - b_zero_f) * b_scale_f
    y = torch.round(torch.matmul(real_a, real_b) / y_scale.to(torch.float32)) + y_zero_point.to(torch.float32)
    low, high = (0, 255) if node.inputs[7].dtype == ir.DataType.UINT8 else (-128, 127)
    return torch.clamp(y, low, high).to(y_zero_point.dtype)
