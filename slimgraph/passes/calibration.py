"""Calibration activations shared by the pass families: any value as rows of tokens (padding
dropped), and the inputs of linear layers, on the pipeline's calibration feeds."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir import evaluate
from slimgraph.ir.meta import TOKENIZER_KEY
from slimgraph.ir.structure import Linear
from slimgraph.passes._infra.base import PassContext

MAX_TOKENS = 4096


def token_rows(array: np.ndarray, feeds: dict[str, np.ndarray], axis: int = -1) -> np.ndarray:
    """`array` as [tokens, channels] (channels from `axis`), without the padding tokens the feeds'
    attention_mask marks (when the rows are the feeds' tokens)."""
    rows = np.moveaxis(array, axis, -1)
    rows = rows.reshape(-1, rows.shape[-1])
    mask = feeds.get("attention_mask")
    if mask is not None and mask.size == rows.shape[0] and axis in (-1, array.ndim - 1):
        rows = rows[mask.reshape(-1) != 0]
    return rows


def linear_inputs(model: ir.Model, linears: list[Linear], ctx: PassContext, max_tokens: int = MAX_TOKENS
                  ) -> dict[str, np.ndarray]:
    """Linear name → activations [tokens, K] (float32), padding tokens dropped, at most `max_tokens`."""
    names = {lin.name: lin.node.inputs[0].name for lin in linears}
    captured = evaluate.capture(model, list(dict.fromkeys(names.values())), ctx.inputs)
    rng = np.random.default_rng(ctx.seed)
    rows: dict[str, list[np.ndarray]] = {v: [] for v in set(names.values())}
    for feeds, values in zip(ctx.inputs, captured):
        for value_name, array in values.items():
            rows[value_name].append(token_rows(array, feeds).astype(np.float32))
    stacked = {}
    for value_name, parts in rows.items():
        x = np.concatenate(parts)
        if x.shape[0] > max_tokens:
            x = x[rng.choice(x.shape[0], max_tokens, replace=False)]
        stacked[value_name] = x
    return {lin: stacked[value] for lin, value in names.items()}


def value_rows(model: ir.Model, values: Sequence[ir.Value], ctx: PassContext, max_tokens: int = MAX_TOKENS
               ) -> dict[ir.Value, np.ndarray]:
    """Each value as rows [tokens, channels] (float32, padding dropped) on the calibration feeds, the
    same tokens for all of them: one subsample of at most `max_tokens`, drawn from `ctx.seed`, so that
    the rows of an FFN's input and of its activation (or of two calls) line up."""
    captured = evaluate.capture(model, [v.name for v in values], ctx.inputs)
    rows = {v: np.concatenate([token_rows(c[v.name], feeds).astype(np.float32) for feeds, c in zip(ctx.inputs, captured)])
            for v in values}
    counts = {len(r) for r in rows.values()}
    if len(counts) > 1:
        raise SlimgraphError(f"values {', '.join(v.name for v in values)} do not have one row per token each")
    count = counts.pop() if counts else 0
    if count > max_tokens:
        keep = np.sort(np.random.default_rng(ctx.seed).choice(count, max_tokens, replace=False))
        rows = {v: r[keep] for v, r in rows.items()}
    return rows


# --- the tokenizer a model was loaded with --------------------------------------------------

TokenizerLoader = Callable[[ir.Model], Any]
_tokenizer_loader: TokenizerLoader | None = None


def set_tokenizer_loader(loader: TokenizerLoader) -> None:
    """Frontends register how to load a model's tokenizer (passes may not import frontends)."""
    global _tokenizer_loader
    _tokenizer_loader = loader


def tokenizer_of(model: ir.Model) -> Any | None:
    """The tokenizer the model was loaded with (a Hugging Face folder's, a .gguf's), or None."""
    if _tokenizer_loader is None or not model.meta.get(TOKENIZER_KEY):
        return None
    return _tokenizer_loader(model)
