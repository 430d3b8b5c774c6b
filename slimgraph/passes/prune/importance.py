"""How much each channel of a dependency group matters: magnitude, Wanda or activation.

- magnitude: the L2 norm of everything the channel owns (its producer and consumer weights);
- wanda (Sun et al.): |W|·‖x‖ summed over the consumer weights that read the channel, where ‖x‖ is
  the L2 norm of that input feature over the calibration tokens;
- activation: the mean |x| of the channel where it is read.

Activations are the inputs of the consumer nodes (the down projection's input for FFN channels,
the o projection's for heads, the next convs' for conv channels), captured on the pipeline's
calibration feeds in one run, padding tokens left out, and kept as running moments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir import edit
from slimgraph.ir.groups import Group, Slice
from slimgraph.passes._infra.base import PassContext
from slimgraph.passes.activations import Moments, moments

METHODS = ("magnitude", "wanda", "activation")


@dataclass(frozen=True)
class Read:
    """A consumer slice and the activation its node reads the channels from."""

    slice: Slice
    activation: ir.Value
    axis: int  # the channel axis in the activation


def reads(group: Group) -> list[Read]:
    """The consumer slices of a group, with the activation each one's node reads."""
    reads = []
    for s in group.slices:
        if s.role != "consumer":
            continue
        for node, index in s.value.uses():
            if index != 1 or node.op_type not in ("MatMul", "Gemm", "Conv"):
                continue
            reads.append(Read(s, node.inputs[0], 1 if node.op_type == "Conv" else -1))
    return reads


def consumer_moments(model: ir.Model, groups: Sequence[Group], ctx: PassContext, *, gram: bool = False
                     ) -> dict[ir.Value, Moments]:
    """The moments of each activation a consumer of the groups reads (see `calibration.moments`)."""
    return moments(model, {read.activation: read.axis for group in groups for read in reads(group)}, ctx, gram=gram)


def channel_scores(group: Group, method: str, activations: dict[ir.Value, Moments] | None) -> np.ndarray:
    """One score per channel of the group: higher matters more."""
    if method == "magnitude":
        total = np.zeros(group.size)
        for s in group.slices:
            if s.role == "carried":
                continue
            weights = np.moveaxis(edit.constant_array(s.value).astype(np.float64), s.axis, 0)
            squares = (weights.reshape(weights.shape[0], -1) ** 2).sum(axis=1)
            total += squares[s.indices].sum(axis=1)
        return np.sqrt(total)
    consumers = reads(group)
    if not consumers:
        raise SlimgraphError(f"{group.name}: no layer reads these {group.unit}, so {method} cannot score them")
    total = np.zeros(group.size)
    for read in consumers:
        x = activations[read.activation]
        if method == "activation":
            total += x.abs_mean[read.slice.indices].mean(axis=1)
            continue
        l2 = np.sqrt(x.square_sum)
        weights = np.moveaxis(np.abs(edit.constant_array(read.slice.value).astype(np.float64)), read.slice.axis, 0)
        row_sums = weights.reshape(weights.shape[0], -1).sum(axis=1)
        total += (row_sums * l2)[read.slice.indices].sum(axis=1)
    return total
