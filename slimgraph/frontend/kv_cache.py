"""Export a transformers causal LM with a KV cache (the signature: `ir/cache_signature.py`).

How it is captured: the model's `forward` is replaced, on the instance and for the export only,
by one that takes the cache as plain tensors, builds transformers' `DynamicCache` from them and
returns its layers as tensors. torch.export then sees tensors only at the boundary (no pytree
registration of the cache class), and the nodes keep the model's own module paths (a wrapper
module would prefix every path). Only full-attention caches are supported: a sliding-window
layer keeps a window rather than `past + sequence`, which this signature cannot describe.

Example inputs (kept with the model to verify and calibrate on) are two real generation steps,
computed with the PyTorch model: the prompt without its last token (empty past), then that token
with the past the prompt left.
"""

from __future__ import annotations

import contextlib
import re
import types
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir.cache_signature import (
    ATTENTION_MASK,
    BATCH,
    INPUT_IDS,
    LOGITS,
    PAST_SEQUENCE,
    POSITION_IDS,
    PRESENT,
    SEQUENCE,
    TOTAL_SEQUENCE,
    cache_layers,
    past_name,
    position_ids,
    present_name,
)

# --- export -----------------------------------------------------------------------------------


def check_causal_lm(model: Any) -> None:
    """A one-line error unless `model` is a transformers causal LM whose cache is plain full attention."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    config = getattr(model, "config", None)
    name = type(model).__name__
    can_generate = getattr(model, "can_generate", None)
    if config is None or not callable(can_generate) or not can_generate() or getattr(config, "is_encoder_decoder", False):
        raise SlimgraphError(f"kv_cache needs a transformers causal language model (…ForCausalLM); {name} is not one")
    layers = DynamicCache(config=config).layers
    other = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if other:
        raise SlimgraphError(f"kv_cache: {name} uses {', '.join(other)} cache layers (sliding-window or linear "
                             "attention); only full-attention caches (past + new tokens) are supported")


def check_kv_options(kv_cache: Any, dynamic_shapes: Any) -> None:
    if not isinstance(kv_cache, bool):
        raise SlimgraphError(f"kv_cache={kv_cache!r}: expected True or False")
    if kv_cache and dynamic_shapes is not None:
        raise SlimgraphError("kv_cache=True chooses the dynamic axes itself (batch, sequence, past_sequence); "
                             "leave dynamic_shapes out")


def export_causal_lm(model: Any, prompt: Mapping[str, Any], *, inputs_source: str,
                     export: Callable[..., ir.Model],
                     forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                     ) -> ir.Model:
    """Export a transformers causal LM with the KV-cache signature of the module docstring.

    `prompt` holds `input_ids` (and `attention_mask`) of at least 4 tokens, left-padded if a
    batch; it supplies the export's example and the two example steps kept in `model.meta`.
    `export` is the frontend's `load_module` (passed in: this module sits below the frontends);
    the prompt runs inside `forward_context` (where a model built without its weights has them).
    """
    import inspect

    import torch

    check_causal_lm(model)
    model.eval()
    ids = torch.as_tensor(prompt[INPUT_IDS], dtype=torch.int64)
    mask = torch.as_tensor(prompt.get(ATTENTION_MASK, torch.ones_like(ids)), dtype=torch.int64)
    if ids.ndim != 2 or ids.shape[1] < 4:
        raise SlimgraphError(f"kv_cache: the example prompt needs at least 4 tokens (got shape {tuple(ids.shape)})")
    accepted = set(inspect.signature(model.forward).parameters)
    cache_argument = "cache" if "cache" in accepted else "past_key_values"
    takes_positions = POSITION_IDS in accepted
    positions = torch.from_numpy(position_ids(mask.numpy()))
    with torch.no_grad(), forward_context():  # the whole prompt's keys and values: a prefix's past is their first positions
        full = _run(model, cache_argument, ids, mask, positions if takes_positions else None, [])
    cache = full[1:]
    layers = len(cache) // 2
    length = ids.shape[1]
    split = length // 2  # the export's example: a past and new tokens both longer than 1 (0 and 1 specialize)

    def step(start: int, stop: int) -> dict[str, Any]:
        inputs = {INPUT_IDS: ids[:, start:stop], ATTENTION_MASK: mask[:, :stop]}
        if takes_positions:
            inputs[POSITION_IDS] = positions[:, start:stop]
        inputs["past_key_values"] = [t[:, :, :start] for t in cache]
        return inputs

    def flat(inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        feeds = {k: v.numpy() for k, v in inputs.items() if k != "past_key_values"}
        for i, tensor in enumerate(inputs["past_key_values"]):
            feeds[past_name(i // 2, ("key", "value")[i % 2])] = tensor.contiguous().numpy()
        return feeds

    # In the order of the forward's parameters: the exporter pairs them with the inputs by position.
    dims = {INPUT_IDS: {0: BATCH, 1: SEQUENCE}, ATTENTION_MASK: {0: BATCH, 1: "total_sequence"}}
    if takes_positions:
        dims[POSITION_IDS] = {0: BATCH, 1: SEQUENCE}
    dims["past_key_values"] = [{0: BATCH, 2: PAST_SEQUENCE} for _ in cache]
    outputs = [LOGITS] + [present_name(i, kind) for i in range(layers) for kind in ("key", "value")]
    model.forward = types.MethodType(_forward_with_cache(type(model).forward, cache_argument, takes_positions), model)
    try:
        exported = export(model, example_inputs=step(split, length), dynamic_shapes=dims,
                               output_names=outputs, inputs_source=inputs_source)
    finally:
        del model.forward  # the instance's own forward again
    _name_cache(exported, layers)
    from slimgraph.ir.meta import EXAMPLE_INPUTS_KEY

    exported.meta[EXAMPLE_INPUTS_KEY] = [flat(step(0, length - 1)), flat(step(length - 1, length))]
    return exported


def output_maps(model: ir.Model) -> dict[str, Any]:
    """For a graph with the KV-cache signature, its outputs compared at real tokens only
    (`fidelity.OutputMap.real_tokens`): the logits on their sequence axis, the cache on its own.
    What a decoder computes at padding is never read, and fused attention leaves it undefined."""
    from slimgraph.measure.fidelity import OutputMap

    try:
        layers = cache_layers(model)
    except SlimgraphError:  # names like a cache but not the whole signature: compared value by value
        return {}
    if not layers or ATTENTION_MASK not in {v.name for v in model.graph.inputs}:
        return {}
    maps = {LOGITS: OutputMap(real_tokens=(ATTENTION_MASK, 1))}
    maps.update({present_name(i, kind): OutputMap(real_tokens=(ATTENTION_MASK, 2))
                 for i in range(layers) for kind in ("key", "value")})
    return maps


def _forward_with_cache(forward: Any, cache_argument: str, takes_positions: bool) -> Any:
    """`forward(input_ids, attention_mask, [position_ids,] past_key_values)` → (logits, k0, v0, k1, …)."""

    def forward_with_cache(self, input_ids, attention_mask, position_ids=None, past_key_values=()):
        return tuple(_run(self, cache_argument, input_ids, attention_mask, position_ids, past_key_values,
                          forward=forward))

    if not takes_positions:
        def forward_without_positions(self, input_ids, attention_mask, past_key_values=()):
            return forward_with_cache(self, input_ids, attention_mask, None, past_key_values)

        return forward_without_positions
    return forward_with_cache


def _run(model: Any, cache_argument: str, input_ids, attention_mask, position_ids, past: Any, forward: Any = None
         ) -> list:
    """logits, then each layer's key and value after this step."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i in range(0, len(past), 2):
        cache.update(past[i], past[i + 1], i // 2)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, cache_argument: cache, "use_cache": True}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    out = (forward or type(model).forward)(model, **kwargs)
    result = out.cache if hasattr(out, "cache") else out.past_key_values
    flat = [out.logits]
    for layer in result.layers:
        flat += [layer.keys, layer.values]
    return flat


def _name_cache(model: ir.Model, layers: int) -> None:
    """The exporter flattens the past list as `past_key_values_0, _1, …`: name them per layer and
    kind. The mask and the presents get one name for their length, `past_sequence + sequence` (the
    exporter writes the presents' as either sum, the mask's as a name of its own)."""
    for value in model.graph.inputs:
        match = re.fullmatch(r"past_key_values_(\d+)", value.name or "")
        if match:
            index = int(match.group(1))
            value.name = past_name(index // 2, ("key", "value")[index % 2])
        elif value.name == ATTENTION_MASK and value.shape is not None:
            value.shape = ir.Shape([value.shape[0], ir.SymbolicDim(TOTAL_SEQUENCE)])
    for value in model.graph.outputs:
        shape = value.shape
        if PRESENT.match(value.name or "") and shape is not None and len(shape) == 4 and "+" in str(shape[2]):
            value.shape = ir.Shape([shape[0], shape[1], ir.SymbolicDim(TOTAL_SEQUENCE), shape[3]])
    if cache_layers(model) != layers:
        raise SlimgraphError(f"kv_cache: the exported graph does not take {layers} layers of past keys and values")
