"""quantize-weights on mixtures of experts: com.microsoft.MoE(x, router, fc1, fc1_bias, fc2, fc2_bias)
→ com.microsoft.QMoE(x, router, q1, scales1, fc1_bias, q2, scales2, fc2_bias, -, -, -, zp1, zp2).

Each expert's [out, in] weight is quantized as a linear's is (`slimgraph.ir.nbits.quantize_rtn`: blocks
of `block_size` along `in`, codes low bits first, scales and packed zero points per output row), the
layout ONNX Runtime's CPU QMoE kernel reads; symmetric weights carry no zero points (its implicit
2^(bits-1)). Experts whose size is not a whole number of groups get zero neurons (`_padded`). At 4
bits the op computes what MoE computes on the dequantized weights (to 1e-7,
`tests/passes/quantize/test_experts.py`); at 8 bits, and with `accuracy_level=4`, ONNX Runtime
quantizes the activations too (about 1% of the output, as MatMulNBits at accuracy level 4), which
Verify measures like any loss. Experts are quantized round-to-nearest whatever the pass's method:
awq and gptq calibrate per linear, and an expert sees only the tokens routed to it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from slimgraph.ir.edit import add_initializer, replace_region
from slimgraph.ir.graph import constant_tensor
from slimgraph.ir.nbits import quantize_rtn
from slimgraph.passes._infra.base import moe_exclude_names
from slimgraph.passes.quantize.rewrite import MS_DOMAIN

# MoE's inputs and QMoE's: the weights and biases move, the scales and zero points are new.
MOE_INPUTS = ("input", "router", "fc1", "fc1_bias", "fc2", "fc2_bias", "fc3", "fc3_bias")


def quantizable_experts(model: ir.Model, exclude: Sequence[str], block_size: int) -> tuple[list[ir.Node], list[str]]:
    """The MoE nodes quantize-weights can rewrite, and why others were skipped (`name: reason`)."""
    chosen, skipped = [], []
    for node in model.graph:
        if node.op_type != "MoE" or node.domain != MS_DOMAIN:
            continue
        name = node.name or "MoE"
        weights = [constant_tensor(node.inputs[i]) if i < len(node.inputs) else None for i in (2, 4)]
        if any(fnmatch.fnmatchcase(n, pattern) for pattern in exclude for n in moe_exclude_names(node)):
            skipped.append(f"{name}: excluded")
        elif len(node.inputs) > 6 and any(v is not None for v in node.inputs[6:]):
            skipped.append(f"{name}: MoE with fc3 weights")
        elif any(t is None or t.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16) or len(t.shape) != 3
                 for t in weights):
            skipped.append(f"{name}: expert weights not constant float [experts, out, in]")
        elif weights[0].shape[2] % block_size:
            skipped.append(f"{name}: hidden size {weights[0].shape[2]} is not a multiple of group_size {block_size}")
        elif weights[1].shape[2] % block_size and _gated_layout(node) is None:
            skipped.append(f"{name}: expert size {weights[1].shape[2]} is not a multiple of group_size {block_size}, "
                           "and its SwiGLU layout cannot be padded")
        else:
            chosen.append(node)
    return chosen, skipped


def _gated_layout(node: ir.Node) -> int | None:
    """How many fc1 rows one expert neuron has: 2 for SwiGLU interleaved (gate, up), 1 ungated; None
    for a layout the padding does not know (SwiGLU concatenated)."""
    if node.attributes.get_string("activation_type", "relu") != "swiglu":
        return 1
    return 2 if node.attributes.get_int("swiglu_fusion", 0) == 1 else None


def _padded(node: ir.Node, fc1: np.ndarray, fc2: np.ndarray, fc1_bias: np.ndarray | None, block_size: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """fc1, fc2 and fc1's bias with each expert grown by zero neurons to a whole number of groups
    (QMoE's `block_size` holds for both weights: moe-convert's experts of 168 neurons quantize at
    group 32 as 192). A zero neuron adds nothing: its fc2 column is zero, whatever its activation gives."""
    missing = -fc2.shape[2] % block_size
    if not missing:
        return fc1, fc2, fc1_bias
    rows = missing * _gated_layout(node)  # a gated neuron is two rows, interleaved: appended as pairs
    fc1 = np.concatenate([fc1, np.zeros((fc1.shape[0], rows, fc1.shape[2]), np.float32)], axis=1)
    fc2 = np.concatenate([fc2, np.zeros((*fc2.shape[:2], missing), np.float32)], axis=2)
    if fc1_bias is not None:
        fc1_bias = np.concatenate([fc1_bias, np.zeros((fc1_bias.shape[0], rows), fc1_bias.dtype)], axis=1)
    return fc1, fc2, fc1_bias


def quantize_experts(model: ir.Model, node: ir.Node, bits: int, block_size: int, symmetric: bool,
                     accuracy_level: int) -> ir.Node:
    """Replace the MoE node by a QMoE node reading the experts' quantized weights; returns it."""
    dtype = node.inputs[0].dtype or ir.DataType.FLOAT
    base = node.name or "MoE"

    def quantized(weights: np.ndarray, which: str) -> tuple[ir.Value, ir.Value, ir.Value | None]:
        per_expert = [quantize_rtn(np.ascontiguousarray(w.T), bits, block_size, symmetric) for w in weights]
        codes = np.stack([q.packed_b().reshape(q.n, -1) for q in per_expert])  # [E, out, in·bits/8]
        scales = np.stack([q.scales for q in per_expert]).astype(dtype.numpy())  # [E, out, in/block]
        zero_points = None if symmetric else np.stack([q.packed_zero_points() for q in per_expert])
        return (add_initializer(model, f"{base}.{which}.q{bits}", codes),
                add_initializer(model, f"{base}.{which}.scales", scales),
                None if zero_points is None else add_initializer(model, f"{base}.{which}.zero_points", zero_points))

    given = dict(zip(MOE_INPUTS, node.inputs))
    fc1_bias = given.get("fc1_bias")
    bias_array = constant_tensor(fc1_bias).numpy() if fc1_bias is not None else None
    fc1, fc2 = (constant_tensor(given[w]).numpy().astype(np.float32) for w in ("fc1", "fc2"))
    fc1, fc2, padded_bias = _padded(node, fc1, fc2, bias_array, block_size)
    if padded_bias is not bias_array:
        fc1_bias = add_initializer(model, f"{base}.fc1.bias", padded_bias)
    q1, s1, z1 = quantized(fc1, "fc1")
    q2, s2, z2 = quantized(fc2, "fc2")
    inputs = [given["input"], given["router"], q1, s1, fc1_bias, q2, s2, given.get("fc2_bias"), None, None, None, z1, z2]
    while inputs[-1] is None:
        inputs.pop()
    attributes = {**node.attributes, "expert_weight_bits": bits, "block_size": block_size}
    if accuracy_level:
        attributes["accuracy_level"] = accuracy_level
    qmoe = ir.node("QMoE", inputs, attributes=attributes, domain=MS_DOMAIN, name=f"{base}_Q{bits}")
    replace_region(model, [node], [qmoe], {node.outputs[0]: qmoe.outputs[0]})
    return qmoe

