"""Elementwise ONNX ops: unary math and activations, broadcasting binary ops, comparisons, logic."""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F

from slimgraph.backends.pytorch.lowering import Dims, attr, lowers
from slimgraph.backends.pytorch.ops._common import torch_dtype

UNARY = {
    "Abs": torch.abs, "Neg": torch.neg, "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Relu": torch.relu,
    "Erf": torch.erf, "Sin": torch.sin, "Cos": torch.cos, "Tan": torch.tan, "Asin": torch.asin,
    "Acos": torch.acos, "Atan": torch.atan, "Sinh": torch.sinh, "Cosh": torch.cosh, "Asinh": torch.asinh,
    "Acosh": torch.acosh, "Atanh": torch.atanh, "Floor": torch.floor, "Ceil": torch.ceil,
    "Round": torch.round, "Sign": torch.sign, "Not": torch.logical_not, "IsNaN": torch.isnan,
    "Softsign": F.softsign, "Mish": F.mish,
}


def _unary(fn):
    return lambda ctx, node, x: fn(x)


for _op, _fn in UNARY.items():
    lowers(_op)(_unary(_fn))


@lowers("Identity")
def identity(ctx, node, x):
    return x


@lowers("Softplus")
def softplus(ctx, node, x):
    return torch.log1p(torch.exp(-torch.abs(x))) + torch.relu(x)  # stable log(1 + e^x)


@lowers("IsInf")
def isinf(ctx, node, x):
    positive, negative = attr(node, "detect_positive", 1), attr(node, "detect_negative", 1)
    if positive and negative:
        return torch.isinf(x)
    if positive:
        return torch.isposinf(x)
    if negative:
        return torch.isneginf(x)
    return torch.zeros_like(x, dtype=torch.bool)


@lowers("Elu")
def elu(ctx, node, x):
    return F.elu(x, alpha=attr(node, "alpha", 1.0))


@lowers("Celu")
def celu(ctx, node, x):
    return F.celu(x, alpha=attr(node, "alpha", 1.0))


@lowers("Selu")
def selu(ctx, node, x):
    alpha, gamma = attr(node, "alpha", 1.67326319217681884765625), attr(node, "gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@lowers("LeakyRelu")
def leaky_relu(ctx, node, x):
    return F.leaky_relu(x, attr(node, "alpha", 0.01))


@lowers("ThresholdedRelu")
def thresholded_relu(ctx, node, x):
    return torch.where(x > attr(node, "alpha", 1.0), x, torch.zeros_like(x))


@lowers("HardSigmoid")
def hard_sigmoid(ctx, node, x):
    return torch.clamp(attr(node, "alpha", 0.2) * x + attr(node, "beta", 0.5), 0, 1)


@lowers("HardSwish")
def hard_swish(ctx, node, x):
    return x * torch.clamp(x / 6 + 0.5, 0, 1)


@lowers("Gelu")
def gelu(ctx, node, x):
    return F.gelu(x, approximate=attr(node, "approximate", "none"))


@lowers("PRelu")
def prelu(ctx, node, x, slope):
    return torch.where(x < 0, x * slope, x)


@lowers("Clip", since=11)
def clip(ctx, node, x, low=None, high=None):
    if low is not None:
        x = torch.maximum(x, low.to(x.dtype))
    if high is not None:
        x = torch.minimum(x, high.to(x.dtype))
    return x


@lowers("Clip", until=10)
def clip_attributes(ctx, node, x):
    return torch.clamp(x, attr(node, "min", float("-inf")), attr(node, "max", float("inf")))


# --- binary ---------------------------------------------------------------------------------

SHAPE_ARITHMETIC = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": operator.floordiv}


def _shape_arithmetic(ctx, op, a, b):
    """Add/Sub/Mul/Div on shape values stays Python arithmetic (x.size(0) * 12)."""
    left, right = ctx.ints(a), ctx.ints(b)
    scalar = all(isinstance(v, Dims) and v.scalar or isinstance(v, np.ndarray) and v.ndim == 0 for v in (a, b))
    if len(left) == 1:
        left = left * len(right)
    if len(right) == 1:
        right = right * len(left)
    return Dims([op(x, y) for x, y in zip(left, right)], scalar=scalar)


def _is_shape_value(v) -> bool:
    return isinstance(v, Dims) or (isinstance(v, np.ndarray) and v.dtype.kind == "i" and v.size <= 8)


COMPARISONS = {"Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual"}


def _binary(op_type, fn):
    def lower(ctx, node, a, b):
        if op_type in SHAPE_ARITHMETIC and (isinstance(a, Dims) or isinstance(b, Dims)) and _is_shape_value(a) \
                and _is_shape_value(b):
            return _shape_arithmetic(ctx, SHAPE_ARITHMETIC[op_type], a, b)
        return _apply(op_type, fn, node.inputs[0].dtype, ctx.tensor(a), ctx.tensor(b))

    return lower


def _apply(op_type, fn, dtype, a, b):
    if dtype is not None and dtype.name in ("UINT16", "UINT32", "UINT64"):
        return _unsigned(op_type, fn, dtype, a, b)
    if op_type == "Div" and dtype is not None and dtype.is_integer():
        return torch.div(a, b, rounding_mode="trunc")  # ONNX integer Div truncates
    return fn(a, b)


SIGN_BIT = -(1 << 63)


def _unsigned(op_type, fn, dtype, a, b):
    """torch has few kernels for uint16/32/64, so these compute in int64. That is exact for
    uint16/32. uint64 keeps its bits in int64: wrapping arithmetic and bit ops are exact as they
    are; orderings flip the sign bit first, and Div/Mod/right shift use unsigned algorithms."""
    a, b = a.to(torch.int64), b.to(torch.int64)
    wide = dtype.name == "UINT64"
    if op_type in COMPARISONS:
        return fn(a ^ SIGN_BIT, b ^ SIGN_BIT) if wide else fn(a, b)
    if wide and op_type in ("Max", "Min"):
        result = fn(a ^ SIGN_BIT, b ^ SIGN_BIT) ^ SIGN_BIT
    elif op_type in ("Div", "Mod"):
        quotient, remainder = _divmod_uint64(a, b) if wide else (torch.div(a, b, rounding_mode="floor"), a % b)
        result = quotient if op_type == "Div" else remainder
    elif wide and fn is torch.bitwise_right_shift:  # logical, not arithmetic: shift the sign bit out first
        result = torch.where(b == 0, a, torch.bitwise_right_shift((a >> 1) & ~SIGN_BIT, b - 1))
    else:
        result = fn(a, b)
    return result.to(torch_dtype(dtype.value))


def _divmod_uint64(a, b):
    """Unsigned 64-bit a // b and a % b on int64 bits. Below 2^63 a divisor is positive: halve a
    (then positive too), divide, double, and correct once. A divisor ≥ 2^63 goes 0 or 1 times."""
    at_least = lambda x, y: (x ^ SIGN_BIT) >= (y ^ SIGN_BIT)  # noqa: E731  (unsigned x >= y)
    small = b > 0
    halved = ((a >> 1) & ~SIGN_BIT) // torch.where(small, b, 1)
    quotient = torch.where(small, halved << 1, at_least(a, b).to(torch.int64))
    remainder = a - quotient * b
    carry = small & at_least(remainder, b)
    return quotient + carry, remainder - carry * b


BINARY = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div,
    "Equal": torch.eq, "Greater": torch.gt, "Less": torch.lt, "GreaterOrEqual": torch.ge, "LessOrEqual": torch.le,
    "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
    "BitwiseAnd": torch.bitwise_and, "BitwiseOr": torch.bitwise_or, "BitwiseXor": torch.bitwise_xor,
}
for _op, _fn in BINARY.items():
    lowers(_op, tensors=False)(_binary(_op, _fn))


@lowers("Pow")
def pow_(ctx, node, base, exponent):
    return torch.pow(base, exponent).to(base.dtype)


@lowers("Mod")
def mod(ctx, node, a, b):
    if attr(node, "fmod", 0):
        return torch.fmod(a, b)
    return _apply("Mod", torch.remainder, node.inputs[0].dtype, a, b)


@lowers("BitShift")
def bit_shift(ctx, node, x, amount):
    fn = torch.bitwise_left_shift if attr(node, "direction") == "LEFT" else torch.bitwise_right_shift
    return _apply("BitShift", fn, node.inputs[0].dtype, x, amount)


@lowers("BitwiseNot")
def bitwise_not(ctx, node, x):
    return _apply("BitwiseNot", lambda a, b: torch.bitwise_not(a), node.inputs[0].dtype, x, x)


def _variadic(op_type, fn):
    def lower(ctx, node, *inputs):
        result = inputs[0]
        for other in inputs[1:]:
            result = _apply(op_type, fn, node.inputs[0].dtype, result, other)
        return result

    return lower


lowers("Max")(_variadic("Max", torch.maximum))
lowers("Min")(_variadic("Min", torch.minimum))
lowers("Sum")(_variadic("Sum", torch.add))


@lowers("Mean")
def mean(ctx, node, *inputs):
    return _variadic("Sum", torch.add)(ctx, node, *inputs) / len(inputs)


@lowers("Where")
def where(ctx, node, condition, x, y):
    return torch.where(condition, x, y)


@lowers("Shrink")
def shrink(ctx, node, x):
    bias, lambd = attr(node, "bias", 0.0), attr(node, "lambd", 0.5)
    zero = torch.zeros_like(x)
    return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, zero)).to(x.dtype)


@lowers("SwiGLU", since=28)
def swiglu(ctx, node, gate, value):
    return gate * torch.sigmoid(attr(node, "alpha", 1.0) * gate) * value
