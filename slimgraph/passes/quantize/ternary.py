"""ternarize: MatMul/Gemm(x, W) → MatMulNBits(x, t + 1, α, zp = 1) [+ Add(dead-zone bias)].

Weights become {-α, 0, +α} per block of `group_size` input channels, stored as 2-bit
MatMulNBits codes q = t + 1 with zero point 1:
- absmean (BitNet b1.58): α = mean|w|, t = clip(round(w / α), -1, 1);
- tequila: α = mean|w|, |w| > α/2 → t = sign(w); the dead zone (|w| ≤ α/2) is not thrown
  away: its expected contribution E[x]·W_dead over the calibration tokens becomes a bias
  (the post-training counterpart of Tequila's dead-zone bias, whose deploy form is the
  identity x·A + 1·B = x·A + rowsum(B)).

Both are post-training approximations of methods that need quantization-aware training:
without retraining a ternary model loses much of its fidelity, and the report shows how much.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from slimgraph.ir.edit import add_initializer, replace_linear, weight_matrix
from slimgraph.ir.nbits import BlockQuantized, blocks_of
from slimgraph.passes._infra.base import Pass, PassContext, PassResult
from slimgraph.passes._infra.registry import register_pass
from slimgraph.passes.activations import linear_inputs
from slimgraph.passes.quantize.rewrite import (
    input_dtype,
    matmul_nbits,
    nothing_to_quantize,
    quantizable_linears,
)
from slimgraph.passes.quantize.weights import GroupSize

QAT_NOTE = "post-training ternarization of a method that needs quantization-aware training: expect a large loss"


def ternarize(weight: np.ndarray, group_size: int, method: str) -> tuple[BlockQuantized, np.ndarray]:
    """2-bit codes (t + 1) with per-block α, and the [K, N] dead-zone weights (zeros for absmean)."""
    blocks = blocks_of(weight, group_size)  # [N, B, g]
    k = weight.shape[0]
    valid = (np.arange(blocks.shape[1] * group_size) < k).reshape(1, blocks.shape[1], group_size)
    counts = valid.sum(axis=2)
    alpha = (np.abs(blocks).sum(axis=2) / counts).astype(np.float32)  # [N, B]
    safe = np.where(alpha == 0, 1, alpha)[:, :, None]
    if method == "absmean":
        t = np.clip(np.rint(blocks / safe), -1, 1)
    else:
        t = np.where(np.abs(blocks) > safe / 2, np.sign(blocks), 0)
    t = np.where(valid, t, 0)
    dead = np.where((t == 0) & valid, blocks, 0) if method == "tequila" else np.zeros_like(blocks)
    codes = (t + 1).astype(np.uint8).reshape(blocks.shape[0], -1)
    q = BlockQuantized(codes, alpha, np.ones(alpha.shape, np.uint8), 2, group_size, k)
    dead_weight = dead.reshape(blocks.shape[0], -1)[:, :k].T
    return q, dead_weight


@register_pass
@dataclass(frozen=True, kw_only=True)
class Ternarize(Pass):
    """MatMul/Gemm(x, W) → MatMulNBits 2-bit ternary {-α, 0, α} (post-training; see the note)."""

    name: ClassVar[str] = "ternarize"
    exact: ClassVar[bool] = False
    method: Literal["absmean", "tequila"] = "tequila"
    group_size: GroupSize = 128
    exclude: tuple[str, ...] = ()

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        linears, skipped = quantizable_linears(model, self.exclude)
        if not linears:
            return nothing_to_quantize(self.name, skipped, "linears ternarized")
        means = {}
        if self.method == "tequila":
            means = {name: x.mean(axis=0) for name, x in linear_inputs(model, linears, ctx).items()}
        dead_share = []
        for linear in linears:
            weight = weight_matrix(linear)
            q, dead = ternarize(weight, self.group_size, self.method)
            dtype = input_dtype(linear)
            node = matmul_nbits(model, linear, q, dtype=dtype)
            nodes = [node]
            if self.method == "tequila":
                dead_share.append(np.abs(dead).sum() / max(np.abs(weight).sum(), 1e-30))
                bias = add_initializer(model, f"{linear.weight or linear.name}.dead_zone_bias",
                                       (means[linear.name] @ dead).astype(dtype.numpy()))
                nodes.append(ir.node("Add", [node.outputs[0], bias], name=f"{node.name}_dead_zone"))
            replace_linear(model, linear, nodes, nodes[-1].outputs[0])
        stats = {"linears ternarized": len(linears), "method": f"{self.method} g{self.group_size}"}
        if dead_share:
            stats["dead-zone weight mass"] = f"{np.mean(dead_share):.1%} (folded into biases)"
        return PassResult(True, stats, warnings=[f"{self.name}: {QAT_NOTE}"])
