"""What the layers that read pruned channels do about it, before the channels go.

For a linear consumer `y = x W + b` (the down projection of an FFN, the o projection of heads)
losing input rows P and keeping rows Q, on calibration activations X:

- bias (FLAP's compensation): `b += mean(x_P) · W_P`, the removed channels' mean contribution;
- refit: `W_Q, b` re-fitted by ridge least squares so that `x_Q W_Q' + b'` reproduces `x W + b`
  on the calibration tokens, pulled towards the weights as they were: with x̃ = [x_Q, 1], solve
  `(x̃ᵀx̃ + λI) [W_Q'; δb] = x̃ᵀ x W + λ [W_Q; 0]`. It includes the bias compensation and is the
  default.

Conv consumers are left as they are (their inputs overlap spatially; compensation would be a
different algorithm).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from slimgraph.ir import edit
from slimgraph.ir.groups import Group
from slimgraph.ir.parts import Linear
from slimgraph.ir.structure import find_linear
from slimgraph.passes.activations import Moments
from slimgraph.passes.prune.importance import reads

# The ridge, relative to the mean diagonal of x̃ᵀx̃: calibration tokens are few next to the unknowns,
# so the refit is pulled firmly towards the weights as they were (on MiniLM, FFN 25%: sentence
# cosine 0.926 without compensation, 0.960 with the bias, 0.964 at 0.01, 0.971 at 1, 0.966 at 10).
DAMPING = 1.0


def compensate(model: ir.Model, group: Group, removed: Sequence[int], activations: dict[ir.Value, Moments],
               method: str) -> int:
    """Adjust the group's linear consumers for losing `removed`; returns how many were adjusted."""
    adjusted = 0
    for read in reads(group):
        node = next((n for n, i in read.slice.value.uses() if i == 1 and n.inputs[0] is read.activation), None)
        linear = find_linear(node) if node is not None and node.op_type in ("MatMul", "Gemm") else None
        if linear is None:
            continue
        x = activations[read.activation]
        gone = read.slice.indices[np.asarray(removed)].reshape(-1)
        kept = np.setdiff1d(np.arange(len(x.sum)), gone)
        w = edit.weight_matrix(linear).astype(np.float64)
        if method == "bias":
            new_w, delta = w, x.mean[gone] @ w[gone]
        else:
            new_w, delta = _refit(x.augmented_gram(), w, kept)
        edit.set_weight_matrix(model, linear, new_w.astype(np.float32))
        _add_to_bias(model, linear, delta.astype(np.float32))
        adjusted += 1
    return adjusted


def _refit(augmented: np.ndarray, w: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ridge least squares for the kept rows and a bias change, pulled towards the weights as they
    were (calibration tokens are few next to the unknowns); removed rows are left as they were.
    Only x̃ᵀx̃ is needed (`augmented`, x̃ = [x, 1]): the design [x_Q, 1] is a selection of x̃, and
    x̃_Qᵀ x W is that selection's rows of x̃ᵀx̃ times W."""
    design = np.append(kept, len(w))  # x̃'s columns: the kept channels and the ones
    gram = augmented[np.ix_(design, design)]
    ridge = DAMPING * np.mean(np.diag(gram))
    prior = np.concatenate([w[kept], np.zeros((1, w.shape[1]))])
    solution = np.linalg.solve(gram + ridge * np.eye(len(gram)), augmented[design, : len(w)] @ w + ridge * prior)
    new_w = w.copy()
    new_w[kept] = solution[:-1]
    return new_w, solution[-1]


def _add_to_bias(model: ir.Model, linear: Linear, delta: np.ndarray) -> None:
    """b += delta; a linear without a bias gets one (an Add after it, in its module)."""
    if not np.any(delta):
        return
    bias = edit.bias_value(linear)
    if bias is not None and len(bias.uses()) == 1:
        current = edit.constant_array(bias)
        edit.replace_constant(bias, (current + delta).astype(current.dtype))
        return
    if bias is not None:  # shared with another layer: this one gets its own
        delta = delta + edit.constant_array(bias)
    value = edit.add_initializer(model, f"{linear.name}.bias", delta)
    if bias is not None:
        add = linear.node.outputs[0].uses()[0][0] if linear.node.op_type == "MatMul" else linear.node
        add.replace_input_with(list(add.inputs).index(bias), value)
        return
    output = linear.node.outputs[0]
    add = ir.node("Add", [output, value], name=f"{linear.node.name or linear.name}_bias")
    edit.insert_after(model, output, [add], add.outputs[0])
