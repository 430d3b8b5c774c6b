"""The com.microsoft ops ONNX Runtime's quantizer writes, with ORT's CPU semantics.

- Static quantization (QOperator format): QLinearAdd, QLinearMul, QLinearSigmoid,
  QLinearLeakyRelu, QLinearConcat, QLinearGlobalAveragePool, QLinearAveragePool, QGemm. Each
  dequantizes its inputs ((q - zero point) · scale), computes in float, and quantizes the
  result to the output's scale and zero point (round half to even, saturate), as ORT does
  (its lookup tables for the unary ops hold the same values; its float arithmetic may round
  a value on a .5 boundary the other way: a difference of one code at most).
- Dynamic quantization: MatMulIntegerToFloat ((A - za)(B - zb) · sa · sb + bias; the integer
  sums in float64, which holds them exactly) and DynamicQuantizeMatMul (A quantized to uint8
  at run time, as DynamicQuantizeLinear, then the same). DynamicQuantizeLSTM is in `recurrent`.
"""

from __future__ import annotations

import torch

from slimgraph.backends.pytorch.lowering import attr, lowers
from slimgraph.backends.pytorch.ops.nn import average_pool
from slimgraph.backends.pytorch.ops.quantized import QUANTIZED, dynamic_quantize_linear

MS = "com.microsoft"


def _real(q, scale, zero_point):
    values = q.to(torch.float32)
    if zero_point is not None:
        values = values - zero_point.to(torch.float32)
    return values * scale.to(torch.float32)


def _quantize(node, index: int, values, scale, zero_point):
    """values → codes of the dtype of the node's output zero point (input `index`); uint8 without one."""
    value = node.inputs[index] if index < len(node.inputs) else None
    dtype = QUANTIZED[value.dtype.name] if value is not None and value.dtype is not None else torch.uint8
    codes = torch.round(values / scale.to(torch.float32))
    if zero_point is not None:
        codes = codes + zero_point.to(torch.float32)
    return torch.clamp(codes, torch.iinfo(dtype).min, torch.iinfo(dtype).max).to(dtype)


@lowers("QLinearAdd", domain=MS)
def qlinear_add(ctx, node, a, a_scale, a_zero_point, b, b_scale, b_zero_point, c_scale, c_zero_point=None):
    return _quantize(node, 7, _real(a, a_scale, a_zero_point) + _real(b, b_scale, b_zero_point), c_scale, c_zero_point)


@lowers("QLinearMul", domain=MS)
def qlinear_mul(ctx, node, a, a_scale, a_zero_point, b, b_scale, b_zero_point, c_scale, c_zero_point=None):
    return _quantize(node, 7, _real(a, a_scale, a_zero_point) * _real(b, b_scale, b_zero_point), c_scale, c_zero_point)


@lowers("QLinearSigmoid", domain=MS)
def qlinear_sigmoid(ctx, node, x, x_scale, x_zero_point, y_scale, y_zero_point=None):
    return _quantize(node, 4, torch.sigmoid(_real(x, x_scale, x_zero_point)), y_scale, y_zero_point)


@lowers("QLinearLeakyRelu", domain=MS)
def qlinear_leaky_relu(ctx, node, x, x_scale, x_zero_point, y_scale, y_zero_point=None):
    real = _real(x, x_scale, x_zero_point)
    return _quantize(node, 4, torch.nn.functional.leaky_relu(real, attr(node, "alpha", 0.01)), y_scale, y_zero_point)


@lowers("QLinearConcat", domain=MS)
def qlinear_concat(ctx, node, y_scale, y_zero_point, *triples):
    """Inputs: Y scale and zero point, then (X, X scale, X zero point) per input."""
    parts = [_real(triples[i], triples[i + 1], triples[i + 2]) for i in range(0, len(triples), 3)]
    return _quantize(node, 1, torch.cat(parts, attr(node, "axis")), y_scale, y_zero_point)


@lowers("QLinearGlobalAveragePool", domain=MS)
def qlinear_global_average_pool(ctx, node, x, x_scale, x_zero_point, y_scale, y_zero_point=None):
    """The mean over the spatial axes, kept as 1s; written without the rank, which shape
    inference does not know for com.microsoft ops."""
    real = _real(x, x_scale, x_zero_point)
    ones = torch.Size([1]) * (real.dim() - 2)
    if attr(node, "channels_last", 0):
        pooled = real.flatten(1, -2).mean(1).reshape(real.shape[:1] + ones + real.shape[-1:])
    else:
        pooled = real.flatten(2).mean(-1).reshape(real.shape[:2] + ones)
    return _quantize(node, 4, pooled, y_scale, y_zero_point)


@lowers("QLinearAveragePool", domain=MS)
def qlinear_average_pool(ctx, node, x, x_scale, x_zero_point, y_scale, y_zero_point=None):
    real = _real(x, x_scale, x_zero_point)
    if attr(node, "channels_last", 0):
        pooled = average_pool(ctx, node, real.movedim(-1, 1)).movedim(1, -1)
    else:
        pooled = average_pool(ctx, node, real)
    return _quantize(node, 4, pooled, y_scale, y_zero_point)


@lowers("QGemm", domain=MS)
def qgemm(ctx, node, a, a_scale, a_zero_point, b, b_scale, b_zero_point, c=None, y_scale=None, y_zero_point=None):
    """alpha · A'B' (+ C, int32 at scale a_scale · b_scale); float out, or quantized with y_scale."""
    a = a.to(torch.float64) - (a_zero_point.to(torch.float64) if a_zero_point is not None else 0.0)
    b = b.to(torch.float64)
    per_column = node.inputs[4].shape is not None and len(node.inputs[4].shape) == 1 and node.inputs[4].shape[0] != 1
    if attr(node, "transA", 0):
        a = a.t()
    if b_zero_point is not None:  # per column of B' (its rows when transposed)
        zero = b_zero_point.to(torch.float64)
        b = b - (zero.reshape(-1, 1) if attr(node, "transB", 0) and per_column else zero)
    if attr(node, "transB", 0):
        b = b.t()
    sums = a @ b
    if c is not None:
        sums = sums + c.to(torch.float64)
    scale = a_scale.to(torch.float64) * b_scale.to(torch.float64)
    real = attr(node, "alpha", 1.0) * sums * scale
    if y_scale is None:
        return real.to(torch.float32)
    return _quantize(node, 8, real.to(torch.float32), y_scale, y_zero_point)


@lowers("MatMulIntegerToFloat", domain=MS)
def matmul_integer_to_float(ctx, node, a, b, a_scale, b_scale, a_zero_point=None, b_zero_point=None, bias=None):
    a = a.to(torch.float64) - (a_zero_point.to(torch.float64) if a_zero_point is not None else 0.0)
    b = b.to(torch.float64) - (b_zero_point.to(torch.float64) if b_zero_point is not None else 0.0)
    result = (torch.matmul(a, b) * (a_scale.to(torch.float64) * b_scale.to(torch.float64))).to(a_scale.dtype)
    return result + bias if bias is not None else result


@lowers("DynamicQuantizeMatMul", domain=MS)
def dynamic_quantize_matmul(ctx, node, a, b, b_scale, b_zero_point=None, bias=None):
    codes, a_scale, a_zero_point = dynamic_quantize_linear(ctx, node, a)
    return matmul_integer_to_float(ctx, node, codes, b, a_scale, b_scale, a_zero_point, b_zero_point, bias)
