"""Calibration activations shared by the pass families, on the pipeline's calibration feeds: any
value as rows of tokens (padding dropped), the inputs of linear layers, and running moments of
a value's channels (sums and the Gram matrix, for passes that need no more than those)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir.graph import static_dim
from slimgraph.ir.meta import TOKENIZER_KEY
from slimgraph.ir.parts import Linear
from slimgraph.measure import evaluate
from slimgraph.passes._infra.base import PassContext, reader_of

MAX_TOKENS = 4096
Feeds = dict[str, np.ndarray]


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
    stacked = stack_token_rows(captured, ctx.inputs, ctx.seed, max_tokens)
    return {lin: stacked[value] for lin, value in names.items()}


def stack_token_rows(captured: Iterable[dict[str, np.ndarray]], feeds_list: Sequence[Feeds], seed: int,
                     max_tokens: int = MAX_TOKENS) -> dict[str, np.ndarray]:
    """Each captured value's rows over every feed (`token_rows`), float32, at most `max_tokens` of
    them drawn from `seed`."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list[np.ndarray]] = {}
    for feeds, values in zip(feeds_list, captured):
        for value_name, array in values.items():
            rows.setdefault(value_name, []).append(token_rows(array, feeds).astype(np.float32))
    stacked = {}
    for value_name, parts in rows.items():
        x = np.concatenate(parts)
        if x.shape[0] > max_tokens:
            x = x[rng.choice(x.shape[0], max_tokens, replace=False)]
        stacked[value_name] = x
    return stacked


def value_rows(model: ir.Model, values: Sequence[ir.Value], ctx: PassContext, max_tokens: int = MAX_TOKENS
               ) -> dict[ir.Value, np.ndarray]:
    """Each value as rows [tokens, channels] (float32, padding dropped) on the calibration feeds, the
    same tokens for all of them: one subsample of at most `max_tokens`, drawn from `ctx.seed`, so that
    the rows of an FFN's input and of its activation (or of two calls) line up."""
    parts: dict[ir.Value, list[np.ndarray]] = {v: [] for v in values}
    for feeds, captured in zip(ctx.inputs, evaluate.capture(model, [v.name for v in values], ctx.inputs)):
        for v in values:
            parts[v].append(token_rows(captured[v.name], feeds).astype(np.float32))
    rows = {v: np.concatenate(p) for v, p in parts.items()}
    counts = {len(r) for r in rows.values()}
    if len(counts) > 1:
        raise SlimgraphError(f"values {', '.join(v.name for v in values)} do not have one row per token each")
    count = counts.pop() if counts else 0
    if count > max_tokens:
        keep = np.sort(np.random.default_rng(ctx.seed).choice(count, max_tokens, replace=False))
        rows = {v: r[keep] for v, r in rows.items()}
    return rows


@dataclass
class Moments:
    """A value's channels over the calibration tokens: their count, Σx, Σ|x|, Σx², and where
    asked for, the Gram matrix XᵀX (float32: a deep model's Grams together are as large as a
    good part of its weights; the calibration tokens are few enough for float32 sums)."""

    count: int
    sum: np.ndarray
    abs_sum: np.ndarray
    square_sum: np.ndarray
    gram: np.ndarray | None = None

    def add(self, rows: np.ndarray) -> None:
        self.count += rows.shape[0]
        self.sum += rows.sum(axis=0, dtype=np.float64)
        self.abs_sum += np.abs(rows).sum(axis=0, dtype=np.float64)
        self.square_sum += np.square(rows, dtype=np.float64).sum(axis=0)
        if self.gram is not None:
            self.gram += rows.T @ rows

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    @property
    def abs_mean(self) -> np.ndarray:
        return self.abs_sum / max(self.count, 1)

    def augmented_gram(self) -> np.ndarray:
        """x̃ᵀx̃ for x̃ = [x, 1] (float64), the normal matrix of a least-squares fit with a bias."""
        k = len(self.sum)
        gram = np.empty((k + 1, k + 1))
        gram[:k, :k] = self.gram
        gram[:k, k] = gram[k, :k] = self.sum
        gram[k, k] = self.count
        return gram


def moments(model: ir.Model, values: Mapping[ir.Value, int], ctx: PassContext, *, gram: bool = False
            ) -> dict[ir.Value, Moments]:
    """Moments of each value's channels (value → its channel axis) over every calibration token,
    padding dropped, accumulated one feed at a time: memory is the moments', not the rows'."""
    if not ctx.inputs:
        raise SlimgraphError("no calibration inputs reach the model")
    found: dict[ir.Value, Moments] = {}
    for chunk in capture_chunks(values):
        for feeds, captured in zip(ctx.inputs, evaluate.capture(model, [v.name for v in chunk], ctx.inputs)):
            for value, axis in chunk.items():
                rows = np.asarray(token_rows(captured[value.name], feeds, axis), dtype=np.float32)
                if value not in found:
                    k = rows.shape[1]
                    found[value] = Moments(0, np.zeros(k), np.zeros(k), np.zeros(k),
                                           np.zeros((k, k), np.float32) if gram else None)
                found[value].add(rows)
    return found


# Channels captured together in one sweep of the calibration feeds, summed over the values: a
# deep model's activations (SmolLM2's linear inputs are 98K floats a token) are never all held.
CAPTURE_CHANNELS = 16384


def capture_chunks(values: Mapping[ir.Value, int]) -> list[dict[ir.Value, int]]:
    """The values (value → channel axis) in groups of at most `CAPTURE_CHANNELS` channels, in order."""
    chunks: list[dict[ir.Value, int]] = [{}]
    width = 0
    for value, axis in values.items():
        channels = static_dim(value, axis) or CAPTURE_CHANNELS
        if chunks[-1] and width + channels > CAPTURE_CHANNELS:
            chunks.append({})
            width = 0
        chunks[-1][value] = axis
        width += channels
    return chunks


# --- the tokenizer a model was loaded with --------------------------------------------------


def tokenizer_of(model: ir.Model, ctx: PassContext | None = None) -> Any | None:
    """The tokenizer the model was loaded with (a Hugging Face folder's, a .gguf's), or None."""
    if not model.meta.get(TOKENIZER_KEY):
        return None
    return reader_of(model, ctx, needed_for="the model's tokenizer").tokenizer(model)
