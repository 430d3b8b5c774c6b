"""Greedy text generation with a compiled causal LM: `slimgraph.generate(artifact, tokenizer, prompt, max_new_tokens)`.

Any backend's artifact (onnxruntime, pytorch) of a decoder graph runs:

- with a KV cache (`load(..., kv_cache=True)`; the signature is in `slimgraph.ir.cache_signature`):
  the prompt runs once with an empty past, then one token per step, the presents fed back as
  the past;
- without one: the whole sequence runs at every step (what a graph without a cache has to do).

A batch of prompts is left-padded, as transformers pads for generation; position ids count the
tokens the mask keeps (`cumsum(mask) - 1`). The next token is the argmax of the last position's
logits, as transformers' `generate(do_sample=False)` picks it; a row that has produced the
end-of-sequence token gets the pad token from then on, and generation stops when every row has
ended or after `max_new_tokens`.

`Decoder` runs the steps (`start`, then `advance`) through any `run(feeds) → outputs`;
`SessionDecoder` runs them in an ONNX Runtime session with the cache bound to it: the presents
stay ONNX Runtime values fed back as they are (no numpy copy of the cache per step), and where
`fuse-ort` made the attention GroupQueryAttention, past and present are one buffer per layer,
preallocated for the whole generation, which it writes in place. `slimgraph bench --new-tokens`
times them.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError, first_line
from slimgraph.ir.cache_signature import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    PRESENT,
    cache_layers,
    empty_past,
    past_name,
    position_ids,
    present_name,
    shares_cache_buffers,
)
from slimgraph.ir.meta import TOKENIZER_KEY
from slimgraph.passes.trim_vocab import TOKEN_IDS

Run = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
OPTIONAL_INPUTS = (ATTENTION_MASK, POSITION_IDS, "token_type_ids")


@dataclass(frozen=True)
class Generation:
    """What `generate` produced, per prompt: the prompt's token ids, the new ids (up to and with
    the end-of-sequence token) and their text."""

    prompt_ids: list[list[int]]
    token_ids: list[list[int]]
    texts: list[str]

    @property
    def text(self) -> str:
        """The text of the only prompt's continuation."""
        if len(self.texts) != 1:
            raise SlimgraphError(f"{len(self.texts)} prompts were generated for: read .texts")
        return self.texts[0]

    def __repr__(self) -> str:
        shown = self.texts[0] if len(self.texts) == 1 else f"{len(self.texts)} continuations"
        new = sum(len(t) for t in self.token_ids)
        return f"<Generation {new} new tokens: {shown!r}>"


class Decoder:
    """A causal LM graph run step by step through `run(feeds) → outputs`: `start(ids, mask)` runs
    the prompt, `advance(tokens)` one more token per row; both return the last position's logits."""

    def __init__(self, model: ir.Model, run: Run) -> None:
        self.run = run
        self.layers = cache_layers(model)
        self.model = model
        inputs = [v.name for v in model.graph.inputs if not v.is_initializer()]
        outputs = [v.name for v in model.graph.outputs]
        if INPUT_IDS not in inputs or LOGITS not in outputs:
            raise SlimgraphError(f"not a causal language model graph: generation needs an input '{INPUT_IDS}' and "
                                 f"an output '{LOGITS}' (inputs: {', '.join(inputs)}; outputs: {', '.join(outputs)})")
        cache = {past_name(i, k) for i in range(self.layers) for k in ("key", "value")}
        unknown = [n for n in inputs if n != INPUT_IDS and n not in OPTIONAL_INPUTS and n not in cache]
        if unknown:
            raise SlimgraphError(f"generation does not know what to feed input(s) {', '.join(unknown)}")
        self.inputs = set(inputs)
        self.dtypes = {v.name: v.dtype.numpy() for v in model.graph.inputs if v.dtype is not None}
        self._ids = self._mask = None
        self._past: dict[str, np.ndarray] = {}

    @property
    def has_cache(self) -> bool:
        return self.layers > 0

    def start(self, ids: np.ndarray, mask: np.ndarray, capacity: int | None = None) -> np.ndarray:
        """Run the prompt (`ids`, `mask`: [batch, length], left-padded); the logits of its last position.
        `capacity`: how long the sequence may grow (a hint for decoders that preallocate the cache)."""
        self._ids, self._mask = np.asarray(ids, np.int64), np.asarray(mask, np.int64)
        self._past = empty_past(self.model, self._ids.shape[0]) if self.has_cache else {}
        return self._step(self._ids)

    def advance(self, tokens: np.ndarray) -> np.ndarray:
        """Append one token per row (`tokens`: [batch]); the logits of the new position."""
        if self._ids is None:
            raise SlimgraphError("Decoder.advance before start")
        tokens = np.asarray(tokens, np.int64).reshape(-1, 1)
        self._ids = np.concatenate([self._ids, tokens], axis=1)
        self._mask = np.concatenate([self._mask, np.ones_like(tokens)], axis=1)
        return self._step(tokens if self.has_cache else self._ids)

    def _step(self, new_ids: np.ndarray) -> np.ndarray:
        outputs = self.run({**self._token_feeds(new_ids), **self._past})
        if self.has_cache:
            self._past = {past_name(i, k): outputs[present_name(i, k)] for i in range(self.layers)
                          for k in ("key", "value")}
        return last_logits(outputs)

    def _token_feeds(self, new_ids: np.ndarray) -> dict[str, np.ndarray]:
        """The inputs other than the past: the new ids, the mask, their positions."""
        length = new_ids.shape[1]
        feeds = {INPUT_IDS: new_ids}
        if ATTENTION_MASK in self.inputs:
            feeds[ATTENTION_MASK] = self._mask
        if POSITION_IDS in self.inputs:
            feeds[POSITION_IDS] = position_ids(self._mask)[:, -length:]
        if "token_type_ids" in self.inputs:
            feeds["token_type_ids"] = np.zeros_like(new_ids)
        return {k: v.astype(self.dtypes[k], copy=False) if k in self.dtypes else v for k, v in feeds.items()}


class SessionDecoder(Decoder):
    """A Decoder over an ONNX Runtime session whose cache stays bound to the session (module docstring)."""

    def __init__(self, model: ir.Model, session: Any) -> None:
        names = [o.name for o in session.get_outputs()]
        super().__init__(model, lambda feeds: dict(zip(names, session.run(names, feeds))))
        self.session = session
        self.in_place = self.has_cache and shares_cache_buffers(model)
        self._binding = session.io_binding()
        self._cache_names = [(past_name(i, k), present_name(i, k)) for i in range(self.layers) for k in ("key", "value")]
        self._step_outputs = [name for name in names if not PRESENT.match(name)]  # logits (and token_ids)
        presents = [present for _, present in self._cache_names]
        # the order ONNX Runtime returns bound outputs in: the order first bound (in place: the presents, at start)
        self._returned = [*presents, *self._step_outputs] if self.in_place else [*self._step_outputs, *presents]
        self._buffers: dict[str, np.ndarray] = {}  # in place: past name → the array its OrtValue shares
        self._capacity = 0

    def start(self, ids: np.ndarray, mask: np.ndarray, capacity: int | None = None) -> np.ndarray:
        import onnxruntime as ort

        self._ids, self._mask = np.asarray(ids, np.int64), np.asarray(mask, np.int64)
        self._binding.clear_binding_inputs()
        self._binding.clear_binding_outputs()
        self._buffers = {}
        if self.in_place:
            self._allocate(max(capacity or 0, self._ids.shape[1] + 1))
        elif self.has_cache:
            for name, array in empty_past(self.model, self._ids.shape[0]).items():
                self._binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
        return self._step(self._ids)

    def _allocate(self, capacity: int) -> None:
        """One buffer per past input, [batch, kv_heads, capacity, head_dim], bound as the past and as
        its present (what was written so far copied over when it grows)."""
        import onnxruntime as ort

        empty = empty_past(self.model, self._ids.shape[0])
        for past, present in self._cache_names:
            batch, heads, _, size = empty[past].shape
            array = np.zeros((batch, heads, capacity, size), empty[past].dtype)
            if past in self._buffers:
                old = self._buffers[past]
                array[:, :, : old.shape[2]] = old
            self._buffers[past] = array
            value = ort.OrtValue.ortvalue_from_numpy(array)  # shares the array's memory
            self._binding.bind_ortvalue_input(past, value)
            self._binding.bind_ortvalue_output(present, value)
        self._capacity = capacity

    def _step(self, new_ids: np.ndarray) -> np.ndarray:
        if self.in_place and self._mask.shape[1] > self._capacity:
            self._allocate(max(2 * self._capacity, self._mask.shape[1]))
        for name, array in self._token_feeds(new_ids).items():
            self._binding.bind_cpu_input(name, array)
        for name in self._step_outputs:  # allocated by ONNX Runtime: the logits' length changes after the prompt
            self._binding.bind_output(name)
        if self.has_cache and not self.in_place:
            for _, present in self._cache_names:
                self._binding.bind_output(present)
        try:
            self.session.run_with_iobinding(self._binding)
        except Exception as exc:  # ONNX Runtime raises its own exception types
            raise SlimgraphError(f"ONNX Runtime failed to run the model: {first_line(exc)}") from exc
        outputs = dict(zip(self._returned, self._binding.get_outputs()))
        if self.has_cache and not self.in_place:  # the presents, as ONNX Runtime values, are the next past
            for past, present in self._cache_names:
                self._binding.bind_ortvalue_input(past, outputs[present])
        return last_logits({name: outputs[name].numpy() for name in self._step_outputs})


def last_logits(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """The last position's logits [batch, vocabulary]; a trimmed vocabulary's (`trim-vocab`: logits
    over the kept ids, listed in its `token_ids` output) scattered back to their ids (the others −∞)."""
    logits = np.asarray(outputs[LOGITS])[:, -1, :]
    if TOKEN_IDS not in outputs:
        return logits
    ids = np.asarray(outputs[TOKEN_IDS])
    full = np.full((logits.shape[0], int(ids.max()) + 1), -np.inf, logits.dtype)
    full[:, ids] = logits
    return full


def generate(artifact: Any, tokenizer: Any, prompt: str | Sequence[str], max_new_tokens: int = 32, *,
             stop_at_eos: bool = True) -> Generation:
    """Greedy continuation of `prompt` (a string, or several, batched) by a compiled causal LM.

    `artifact` is what `slimgraph.compile(model, backend=...)` returns; `tokenizer` a transformers
    tokenizer, a path to load one from (a Hugging Face folder or a `.gguf`), or None for the one
    the model was loaded with.
    """
    model = getattr(artifact, "model", None)
    if not isinstance(model, ir.Model) or not callable(artifact):
        raise SlimgraphError("generate takes a compiled model: slimgraph.compile(model, backend=...)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise SlimgraphError(f"max_new_tokens={max_new_tokens!r}: expected a positive integer")
    tokenizer = _tokenizer(tokenizer, model)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise SlimgraphError("prompt: expected a string or a list of strings")
    prompt_ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    if any(not ids for ids in prompt_ids):
        raise SlimgraphError("a prompt tokenizes to no tokens")
    eos = tokenizer.eos_token_id
    pad = next((t for t in (tokenizer.pad_token_id, eos, 0) if t is not None))
    ids, mask = left_pad(prompt_ids, pad)
    decoder = _decoder(artifact, model)
    logits = decoder.start(ids, mask, capacity=ids.shape[1] + max_new_tokens)
    new = np.zeros((len(prompts), 0), np.int64)
    ended = np.zeros(len(prompts), bool)
    for step in range(max_new_tokens):
        tokens = np.where(ended, pad, logits.argmax(axis=-1))
        new = np.concatenate([new, tokens[:, None]], axis=1)
        if stop_at_eos and eos is not None:
            ended |= tokens == eos
        if ended.all() or step == max_new_tokens - 1:
            break
        logits = decoder.advance(tokens)
    token_ids = [_until_end(row, eos if stop_at_eos else None) for row in new.tolist()]
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in token_ids]
    return Generation(prompt_ids, token_ids, texts)


def _decoder(artifact: Any, model: ir.Model) -> Decoder:
    from slimgraph.backends.onnxruntime import OnnxRuntimeArtifact

    if isinstance(artifact, OnnxRuntimeArtifact):
        return SessionDecoder(model, artifact.session)
    return Decoder(model, lambda feeds: artifact(**feeds))


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Token id rows as one left-padded [batch, longest] array, and its attention mask."""
    longest = max(len(r) for r in rows)
    ids = np.full((len(rows), longest), pad, np.int64)
    mask = np.zeros((len(rows), longest), np.int64)
    for i, row in enumerate(rows):
        if row:
            ids[i, longest - len(row):] = row
            mask[i, longest - len(row):] = 1
    return ids, mask


def _until_end(row: list[int], eos: int | None) -> list[int]:
    if eos is not None and eos in row:
        return row[: row.index(eos) + 1]
    return row


def _tokenizer(tokenizer: Any, model: ir.Model) -> Any:
    from slimgraph.frontend.calibration import has_tokenizer, load_tokenizer

    if tokenizer is None:
        source = model.meta.get(TOKENIZER_KEY)
        if source is None:
            raise SlimgraphError("this model was not loaded with a tokenizer: pass one (a transformers tokenizer, or "
                                 "the Hugging Face folder or .gguf to load it from)")
        tokenizer = source
    if isinstance(tokenizer, (str, os.PathLike)):
        path = Path(tokenizer)
        if not has_tokenizer(path):
            raise SlimgraphError(f"{path} has no tokenizer (a Hugging Face folder with tokenizer files, or a .gguf)")
        return load_tokenizer(path)
    if not callable(tokenizer) or not hasattr(tokenizer, "decode"):
        raise SlimgraphError(f"tokenizer: expected a transformers tokenizer or a path, got {type(tokenizer).__name__}")
    return tokenizer


class _CallableModule(types.ModuleType):
    """Python binds an imported submodule on its package, so once anything has imported this
    module, `slimgraph.generate` is the module rather than the function `slimgraph.__init__` exports.
    Calling the module calls the function, so `slimgraph.generate(...)` works either way."""

    def __call__(self, *args: Any, **kwargs: Any) -> Generation:
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
