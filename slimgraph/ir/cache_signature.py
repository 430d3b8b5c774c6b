"""The KV-cache signature of a causal LM graph, named as Optimum and ONNX Runtime GenAI name it, and its feeds.

The graph (N: the layer; the attention mask covers the past and the new tokens):

    inputs   input_ids                    int64 [batch, sequence]
             attention_mask               int64 [batch, past_sequence + sequence]   1: attend, 0: padding
             position_ids                 int64 [batch, sequence]
             past_key_values.N.key/value        [batch, kv_heads, past_sequence, head_dim]
    outputs  logits                             [batch, sequence, vocab]
             present.N.key/value                [batch, kv_heads, past_sequence + sequence, head_dim]

A generation step feeds the presents back as the next step's past; the prompt goes in with a past
of length 0. Position ids count the tokens the mask keeps (`cumsum(mask) - 1`, as transformers
computes them), so a left-padded batch gets the positions it would have unpadded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError

INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")
# Axis names: the mask's and the presents' length is written as the sum the exporter writes for the presents.
BATCH, SEQUENCE, PAST_SEQUENCE = "batch", "sequence", "past_sequence"
TOTAL_SEQUENCE = f"{PAST_SEQUENCE} + {SEQUENCE}"


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


def cache_layers(model: ir.Model) -> int:
    """How many layers' keys and values the graph takes as a past (0: the graph has no KV cache).

    A graph with some but not all of the inputs and outputs of the signature is an error."""
    inputs = {v.name for v in model.graph.inputs}
    outputs = {v.name for v in model.graph.outputs}
    layers = {int(m.group(1)) for name in inputs if (m := PAST.match(name or ""))}
    if not layers:
        return 0
    count = max(layers) + 1
    expected_in = {past_name(i, k) for i in range(count) for k in ("key", "value")} | {INPUT_IDS}
    expected_out = {present_name(i, k) for i in range(count) for k in ("key", "value")} | {LOGITS}
    missing = sorted(expected_in - inputs) + sorted(expected_out - outputs)
    if missing:
        raise SlimgraphError(f"the model takes a KV cache (past_key_values.N.key/value) but lacks "
                             f"{', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}")
    return count


def position_ids(mask: np.ndarray) -> np.ndarray:
    """Positions of the kept tokens (`cumsum(mask) - 1`; 1 under padding, as transformers fills it)."""
    positions = np.cumsum(mask, axis=-1, dtype=np.int64) - 1
    return np.where(mask == 0, 1, positions).astype(np.int64)


def empty_past(model: ir.Model, batch: int) -> dict[str, np.ndarray]:
    """Past inputs of length 0 (the prompt's step), shaped from the graph's fixed head count and size."""
    past = {}
    for value in model.graph.inputs:
        if PAST.match(value.name or ""):
            shape = value.shape
            if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])):
                raise SlimgraphError(f"input {value.name!r} is not [batch, kv_heads, past_sequence, head_dim] "
                                     f"with a fixed head count and size (shape {shape})")
            dtype = value.dtype.numpy() if value.dtype is not None else np.float32
            past[value.name] = np.zeros((batch, shape[1], 0, shape[3]), dtype=dtype)
    return past


def prompt_feeds(model: ir.Model, encoded: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A prompt's step for a KV-cache graph: the tokenizer's ids and mask, positions from the mask,
    an empty past (text calibration of a model with a KV cache)."""
    ids = np.asarray(encoded[INPUT_IDS], dtype=np.int64)
    mask = np.asarray(encoded.get(ATTENTION_MASK, np.ones_like(ids)), dtype=np.int64)
    names = {v.name for v in model.graph.inputs}
    feeds = {INPUT_IDS: ids}
    if ATTENTION_MASK in names:
        feeds[ATTENTION_MASK] = mask
    if POSITION_IDS in names:
        feeds[POSITION_IDS] = position_ids(mask)
    return feeds | empty_past(model, ids.shape[0])


def shares_cache_buffers(model: ir.Model) -> bool:
    """Whether every layer's past is read only by a GroupQueryAttention whose present is that
    layer's: then past and present can be one buffer, written in place."""
    readers = {}
    for node in model.graph:
        for index, value in enumerate(node.inputs):
            if value is not None and PAST.match(value.name or "") and value.is_graph_input():
                readers.setdefault(value.name, []).append((node, index))
    outputs = {v.name: v for v in model.graph.outputs}
    for name, users in readers.items():
        if len(users) != 1:
            return False
        (node, index), = users
        layer, kind = PAST.match(name).groups()
        present = outputs.get(present_name(int(layer), kind))
        if node.op_type != "GroupQueryAttention" or index not in (3, 4) or present is None \
                or node.outputs[index - 2] is not present:
            return False
    return bool(readers)
