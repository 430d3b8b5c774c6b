"""Calibration activations: the inputs of linear layers on the pipeline's calibration feeds."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from slimgraph.ir import evaluate
from slimgraph.ir.structure import Linear
from slimgraph.passes._infra.base import PassContext

MAX_TOKENS = 4096


def linear_inputs(model: ir.Model, linears: list[Linear], ctx: PassContext, max_tokens: int = MAX_TOKENS
                  ) -> dict[str, np.ndarray]:
    """Linear name → activations [tokens, K] (float32), padding tokens dropped, at most `max_tokens`."""
    names = {lin.name: lin.node.inputs[0].name for lin in linears}
    captured = evaluate.capture(model, list(dict.fromkeys(names.values())), ctx.inputs)
    rng = np.random.default_rng(ctx.seed)
    rows: dict[str, list[np.ndarray]] = {v: [] for v in set(names.values())}
    for feeds, values in zip(ctx.inputs, captured):
        mask = feeds.get("attention_mask")
        for value_name, array in values.items():
            flat = array.reshape(-1, array.shape[-1]).astype(np.float32)
            if mask is not None and mask.size == flat.shape[0]:
                flat = flat[mask.reshape(-1) != 0]
            rows[value_name].append(flat)
    stacked = {}
    for value_name, parts in rows.items():
        x = np.concatenate(parts)
        if x.shape[0] > max_tokens:
            x = x[rng.choice(x.shape[0], max_tokens, replace=False)]
        stacked[value_name] = x
    return {lin: stacked[value] for lin, value in names.items()}
