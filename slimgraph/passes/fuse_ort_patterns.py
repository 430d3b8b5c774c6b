"""fuse-ort's rules for exporters other than torch's dynamo (paddle2onnx's, tf2onnx's forms): the
patterns ONNX Runtime leaves unfused when a session loads the model (its optimized graph keeps them).

    x · Clip(x + 3, 0, 6) / 6            → HardSwish(x) (opset ≥ 14), else x · HardSigmoid(x, 1/6, 1/2)
    Conv(x, W, B) · s (+ c)              → Conv(x, W·s, B·s + c)       s, c: one value or one per channel
    Conv(x · s (+ c), W, B), no padding  → Conv(x, W·s, B + c·ΣW)      s, c: one value
    Conv(x · s + c, W, B), padded        → Conv(x + c/s, W·s, B)       (the border must read zeros)

paddle2onnx writes hard_swish as Add, Clip, Mul, Div (`· 1/6` in tf2onnx): four passes over the
feature map, where ONNX Runtime runs HardSwish, or HardSigmoid · x, inside the NCHWc Conv before it
(`activation=HardSwish`). It writes PP-LCNetV3's learnable affine blocks (PP-OCRv4's backbones) as a
Mul and an Add of [1]-shaped constants before and after every activation, the constant first;
ONNX Runtime's ConvMulFusion and ConvAddFusion take neither, and the Mul and Add between the Conv
and its activation also keep the NCHWc Conv from fusing the activation. Folded, the Convs absorb
them (exact up to float rounding: the folded weights are float32 products).

Measured with `slimgraph optimize MODEL -p cleanup,fuse-ort` then `slimgraph bench` (ORT 1.32, 2
threads, batch 1, fixed input sizes; 2 shared cores, each figure twice): PP-OCRv4 rec [1,3,48,320]
0.64-0.66x latency, PP-OCRv4 det [1,3,640,640] 0.76-0.81x, PP-OCRv2 cls [1,3,48,192] 0.70-0.71x
(HardSwish only), layout-cdla [1,3,800,608] 0.56-0.58x (HardSwish only). On rec, each rule: HardSwish
alone 0.89-0.92x, Conv · s + c alone 0.90-0.91x, both 0.74x (the Conv then fuses the HardSwish),
the affine before a 1×1 Conv 0.89x more, before a padded one 0.96-0.97x more (A/A 1.00-1.01x).

Left to ONNX Runtime, which fuses them itself: paddle2onnx's LayerNorm (ReduceMean, Sub, Pow, Sqrt,
Div → LayerNormalization), x · Sigmoid(x) (→ QuickGelu), Conv + BatchNormalization. Tried and not
kept: GELU's tanh form as jax2tf/tf2onnx write it (magika) → com.microsoft.FastGelu, no faster
(ORT's FastGelu kernel took 12.6% of magika's time, the Mul/Add/Tanh chain 11%). Not fusable
exactly: magika's LayerNorm (E[x²] − E[x]² over axis 1 of [N, 512, 256], not the last axes).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter._ir_utils import get_numpy_value


def _channel_vector(value: ir.Value, channels: int, rank: int) -> np.ndarray | None:
    """A constant that broadcasts over a [N, C, ...] tensor of `rank` one value per channel (or one
    value), as a [C] vector; None where it is not constant or would broadcast otherwise."""
    array = get_numpy_value(value)
    if array is None or array.ndim > rank or array.dtype.kind != "f":
        return None
    shape = (1,) * (rank - array.ndim) + array.shape
    if any(d != 1 for axis, d in enumerate(shape) if axis != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(array.reshape(-1), (channels,))


def _conv_parts(conv_out: ir.Value) -> tuple[ir.Node, np.ndarray, np.ndarray] | None:
    """The Conv, its constant weight and bias (zeros where it has none); None where not constant."""
    conv = conv_out.producer()
    weight = get_numpy_value(conv.inputs[1])
    bias = get_numpy_value(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2] is not None else None
    if weight is None or weight.dtype.kind != "f" or (len(conv.inputs) > 2 and conv.inputs[2] is not None and bias is None):
        return None
    return conv, weight, bias if bias is not None else np.zeros(weight.shape[0], weight.dtype)


def _folded_conv(op, x: ir.Value, conv: ir.Node, weight: np.ndarray, bias: np.ndarray, name: str) -> ir.Value:
    w = op.initializer(ir.tensor(weight), f"{name}_weight_folded")
    b = op.initializer(ir.tensor(bias.astype(weight.dtype, copy=False)), f"{name}_bias_folded")
    return op.Conv(x, w, b, **conv.attributes)


class ConvAffine(pattern.RewriteRuleClassBase):
    """Conv(x, W, B) · s (+ c) → Conv(x, W·s, B·s + c): an affine after a Conv, per tensor or per
    output channel, folded into its weight and bias."""

    def __init__(self, *, bias: bool, offset: bool):
        super().__init__(f"conv_affine{'_bias' if bias else ''}{'_offset' if offset else ''}")
        self._bias, self._offset = bias, offset

    def pattern(self, op, x, w, b, scale, offset):
        conv = op.Conv(x, w, *([b] if self._bias else []), _allow_other_attributes=True, _outputs=["conv_out"])
        out = op.Mul(conv, scale)
        return op.Add(out, offset) if self._offset else out

    def check(self, context, conv_out, scale, offset=None, **_) -> MatchResult:
        result = MatchResult()
        parts = _conv_parts(conv_out)
        if parts is None:
            return result.fail("Conv's weight or bias is not constant", conv_out)
        _, weight, _ = parts
        for value in (scale, offset) if self._offset else (scale,):
            if _channel_vector(value, weight.shape[0], weight.ndim) is None:
                return result.fail("not a constant of one value or one per output channel", value)
        return result

    def rewrite(self, op, x, conv_out, scale, offset=None, **_):
        conv, weight, bias = _conv_parts(conv_out)
        channels = weight.shape[0]
        s = _channel_vector(scale, channels, weight.ndim).astype(weight.dtype)
        c = _channel_vector(offset, channels, weight.ndim).astype(weight.dtype) if self._offset else 0
        weight = weight * s.reshape((channels,) + (1,) * (weight.ndim - 1))
        return _folded_conv(op, x, conv, weight, bias * s + c, conv_out.name or "conv")


class AffineConv(pattern.RewriteRuleClassBase):
    """Conv(x · s (+ c), W, B) → Conv(x, W·s, B + c·ΣW): one value s and c, folded into the Conv after
    them where it pads nothing. `padded`: a Conv that pads (its border would not see c) keeps the
    offset, divided: Conv(x · s + c, W, B) → Conv(x + c/s, W·s, B), one pass over x instead of two."""

    def __init__(self, *, bias: bool, offset: bool, padded: bool = False):
        super().__init__(f"affine_conv{'_bias' if bias else ''}{'_offset' if offset else ''}{'_padded' if padded else ''}")
        self._bias, self._offset, self._padded = bias, offset, padded

    def pattern(self, op, x, scale, offset, w, b):
        scaled = op.Mul(x, scale)
        return op.Conv(op.Add(scaled, offset) if self._offset else scaled, w, *([b] if self._bias else []),
                       _allow_other_attributes=True, _outputs=["conv_out"])

    def check(self, context, x, conv_out, scale, offset=None, **_) -> MatchResult:
        result = MatchResult()
        parts = _conv_parts(conv_out)
        if parts is None:
            return result.fail("Conv's weight or bias is not constant", conv_out)
        conv, weight, _ = parts
        if self._offset:
            pads = (any(conv.attributes.get_ints("pads", ()))
                    or conv.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"))
            if pads != self._padded:
                return result.fail("the Conv pads its input" if pads else "the Conv pads nothing", conv_out)
        for value in (scale, offset) if self._offset else (scale,):
            array = get_numpy_value(value)
            if array is None or array.size != 1 or array.ndim > weight.ndim or array.dtype.kind != "f":
                return result.fail("not a constant of one value", value)
        if self._padded and get_numpy_value(scale).item() == 0:
            return result.fail("a scale of 0", scale)
        return result

    def rewrite(self, op, x, conv_out, scale, offset=None, **_):
        conv, weight, bias = _conv_parts(conv_out)
        s = get_numpy_value(scale).reshape(()).astype(weight.dtype)
        c = get_numpy_value(offset).reshape(()).astype(weight.dtype) if self._offset else 0
        name = conv_out.name or "conv"
        if self._padded:
            shape = get_numpy_value(offset).shape
            shift = op.initializer(ir.tensor(np.asarray(c / s, weight.dtype).reshape(shape)), f"{name}_shift")
            return _folded_conv(op, op.Add(x, shift), conv, weight * s, bias, name)
        bias = bias + c * weight.reshape(weight.shape[0], -1).sum(axis=1, dtype=np.float64).astype(weight.dtype)
        return _folded_conv(op, x, conv, weight * s, bias, name)


def _is(value: ir.Value, expected: float) -> bool:
    array = get_numpy_value(value)
    return array is not None and array.size == 1 and array.dtype.kind == "f" and bool(np.isclose(array.item(), expected, rtol=1e-6, atol=0))


class HardSwish(pattern.RewriteRuleClassBase):
    """x · Clip(x + 3, 0, 6) / 6 (paddle2onnx's hard_swish; `/ 6` or `· (1/6)`, before or after
    the product) → HardSwish(x), or x · HardSigmoid(x, 1/6, 1/2) below opset 14."""

    def __init__(self, *, form: str, opset: int):
        super().__init__(f"hardswish_{form}")
        self._form, self._opset = form, opset

    def pattern(self, op, x, three, low, high, six):
        clipped = op.Clip(op.Add(x, three), low, high)
        if self._form == "div":
            return op.Div(op.Mul(x, clipped), six)
        if self._form == "mul":
            return op.Mul(op.Mul(x, clipped), six)
        return op.Mul(x, op.Div(clipped, six))  # "clip_div": x · (Clip(x + 3, 0, 6) / 6)

    def check(self, context, three, low, high, six, **_) -> MatchResult:
        result = MatchResult()
        if not (_is(three, 3.0) and _is(low, 0.0) and _is(high, 6.0)):
            return result.fail("not Clip(x + 3, 0, 6)")
        if not _is(six, 1 / 6 if self._form == "mul" else 6.0):
            return result.fail("not divided by 6")
        return result

    def rewrite(self, op, x, **_):
        if self._opset >= 14:
            return op.HardSwish(x)
        return op.Mul(x, op.HardSigmoid(x, alpha=1 / 6, beta=0.5))


def exporter_rules(model: ir.Model) -> list[tuple[str, pattern.RewriteRuleSet]]:
    """The rule sets, with the name fuse-ort counts them under, in the order they run: the longer
    patterns apply first, in a pass of their own (a rule set tries its rules node by node, and the
    Mul that ends `Conv · s` comes before the Add that ends `Conv · s + c`)."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    return [  # HardSwish first: its `· 1/6` (tf2onnx) would otherwise fold into the Conv after it
        ("hardswish", pattern.RewriteRuleSet([HardSwish.rule(form=form, opset=opset) for form in ("div", "mul", "clip_div")],
                                             commute=True)),
        *((name, pattern.RewriteRuleSet([rule.rule(bias=bias, offset=offset) for bias in (True, False)], commute=True))
          for offset in (True, False) for name, rule in (("conv_affine", ConvAffine), ("affine_conv", AffineConv))),
        ("affine_conv", pattern.RewriteRuleSet([AffineConv.rule(bias=bias, offset=True, padded=True) for bias in (True, False)],
                                               commute=True)),
    ]


def fuse_exporter_patterns(model: ir.Model) -> dict[str, int]:
    """Applies `exporter_rules` to the model; returns how many each kind rewrote."""
    counts: dict[str, int] = {}
    for name, rules in exporter_rules(model):
        counts[name] = counts.get(name, 0) + rules.apply_to_model(model)
    return counts
