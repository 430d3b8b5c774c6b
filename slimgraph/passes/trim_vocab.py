"""trim-vocab: LM head `x·W [H, V]` → `x·W[:, ids] [H, V']`, over the tokens a corpus uses (VocabTrim).

How much each token is used: the model's next-token probabilities summed over every position of the
calibration text (`source=predict`, the default: one forward pass per sample; a token the model
expects anywhere carries mass, even where it is never the best, so the head keeps what it may be
asked to answer on other text), or the count of each id in the text alone (`source=calib`), or in the
text plus the model's greedy continuations (`source=generate`, VocabTrim's advice for drafters). The
`keep` most used are kept, or the fewest that carry `coverage` of the mass, plus every special token
of the tokenizer (BOS/EOS/PAD/UNK, chat-template tokens), `keep_ids`, and with `embeddings=trim` the
ids of the calibration text.

The logits keep their meaning through a new output `token_ids` (the kept ids, sorted): position
`j` of the trimmed logits is token `token_ids[j]`; an ArgMax/TopK in the graph is remapped through
it. A tied head gets its own trimmed table and the embedding stays (`embeddings=keep`), or the
embedding is trimmed too (`embeddings=trim`): incoming ids are then remapped by a lookup table
(ids outside the kept set become UNK). The kept logits are bit-identical to the full model's at
those ids; what is lost is only the tokens the corpus never used.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir import edit
from slimgraph.ir.groups import remove_channels, vocab_group
from slimgraph.ir.meta import OUTPUT_MAPS_KEY
from slimgraph.ir.parts import Linear
from slimgraph.ir.structure import discover
from slimgraph.measure import evaluate
from slimgraph.measure.fidelity import OutputMap
from slimgraph.measure.stats import human_bytes
from slimgraph.passes._infra.base import Pass, PassContext, PassResult
from slimgraph.passes._infra.options import option
from slimgraph.passes._infra.registry import register_pass
from slimgraph.passes.activations import tokenizer_of

TOKEN_IDS = "token_ids"


@register_pass
@dataclass(frozen=True, kw_only=True)
class TrimVocab(Pass):
    """LM head [H, V] → [H, V'] over the tokens a corpus uses; a token_ids output maps each logit back to its id."""

    name: ClassVar[str] = "trim-vocab"
    exact: ClassVar[bool] = False
    keep: int = option(0, low=0)  # how many ids; 0: as many as `coverage` needs
    coverage: float = option(0.99, low=0, low_open=True, high=1)
    # predict by default: on SmolLM2 (256 pydoc paragraphs) 0.99 of the predicted probability keeps
    # 12,576 of 49,152 tokens and agrees with the full model's next token 99.1% of the time on held-out
    # text; counting the text and the best predicted tokens reached 93.5% at most (benchmarks/trim_vocab.py)
    source: Literal["predict", "calib", "generate"] = "predict"
    keep_ids: tuple[int, ...] = ()
    embeddings: Literal["keep", "trim"] = "keep"
    new_tokens: int = option(16, low=1)  # generated per calibration sample with source=generate

    def head(self, model: ir.Model) -> Linear:
        heads = discover(model).lm_heads
        if len(heads) != 1:
            found = "no" if not heads else str(len(heads))
            raise SlimgraphError(f"{self.name}: {found} LM head found (looked for a linear as wide as the input "
                                 "embedding's vocabulary)")
        return heads[0]

    def check(self, model: ir.Model) -> Linear:
        """The LM head `run` trims."""
        super().check(model)
        head = self.head(model)
        vocab = head.out_features
        bad = [i for i in self.keep_ids if not 0 <= i < vocab]
        if bad:
            raise SlimgraphError(f"{self.name}: keep_ids={bad[0]} is not a token id (vocabulary of {vocab})")
        if self.keep >= vocab:
            raise SlimgraphError(f"{self.name}: keep={self.keep} is not below the vocabulary ({vocab})")
        tokenizer = tokenizer_of(model)
        if tokenizer is None and self.source == "generate":
            raise SlimgraphError(f"{self.name}: source=generate needs the model's tokenizer: load the model from "
                                 "its Hugging Face folder or .gguf")
        if tokenizer is None and not self.keep_ids:
            raise SlimgraphError(f"{self.name}: the special tokens to keep are unknown: load the model from its "
                                 "Hugging Face folder or .gguf (which carry the tokenizer), or name them in keep_ids")
        if self.embeddings == "trim" and tokenizer is not None and tokenizer.unk_token_id is None:
            raise SlimgraphError(f"{self.name}: embeddings=trim maps removed ids to UNK, and this tokenizer has none; "
                                 "use embeddings=keep")
        return head

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        head = self.check(model)
        vocab = head.out_features
        mass, text_ids = self._mass(model, ctx, vocab)
        tokenizer = tokenizer_of(model, ctx)
        special = _special_ids(tokenizer)
        always = special | set(self.keep_ids) | (text_ids if self.embeddings == "trim" else set())
        kept = self._chosen(mass, always)
        if len(kept) == vocab:
            raise SlimgraphError(f"{self.name}: every token is kept (coverage={self.coverage}); nothing to trim")
        removed = np.setdiff1d(np.arange(vocab), kept)
        before = evaluate.initializer_bytes(model)  # (before untying the head: the file's weights)
        tables = []
        if self.embeddings == "keep":
            edit.untie(model, head)
            head = self.head(model)
        else:
            tables = [e.node.inputs[0] for e in discover(model).embeddings
                      if e.from_graph_input and e.num_embeddings == vocab]
        group = vocab_group(model, head, list(dict.fromkeys(tables)))
        if isinstance(group, str):
            raise SlimgraphError(f"{self.name}: {group}")
        logits = [v for v in group.activations if v.is_graph_output()]
        remove_channels(model, {group: removed})
        ids = edit.add_initializer(model, "vocab.token_ids", kept.astype(np.int64))
        self._remap_indices(model, group.activations, ids)
        if self.embeddings == "trim":  # removed ids become UNK (without a tokenizer: the first of keep_ids)
            unk = tokenizer.unk_token_id if tokenizer is not None else self.keep_ids[0]
            self._remap_inputs(model, kept, vocab, int(np.searchsorted(kept, unk)))
        output = ir.node("Identity", [ids], name="vocab_token_ids")
        model.graph.append(output)
        output.outputs[0].name = TOKEN_IDS
        output.outputs[0].type, output.outputs[0].shape = ids.type, ids.shape
        model.graph.outputs.append(output.outputs[0])
        maps = dict(model.meta.get(OUTPUT_MAPS_KEY) or {})
        maps.update({v.name: dataclasses.replace(maps.get(v.name, OutputMap()), columns=kept) for v in logits})
        maps[TOKEN_IDS] = OutputMap(added=True)
        model.meta[OUTPUT_MAPS_KEY] = maps
        share = mass[kept].sum() / max(mass.sum(), 1e-30)
        used = "predicted probability" if self.source == "predict" else f"{self.source} tokens"
        return PassResult(True, {
            "tokens kept": f"{vocab:,} → {len(kept):,} ({share:.2%} of the {used}; "
                           f"{len(special & set(kept.tolist()))} special)",
            "weights": f"{human_bytes(before)} → {human_bytes(evaluate.initializer_bytes(model))}",
            "embeddings": "trimmed (ids remapped, unknown → UNK)" if self.embeddings == "trim" else "kept",
            "new output": f"{TOKEN_IDS} [{len(kept)}]: the id of each logit",
        })

    def _mass(self, model: ir.Model, ctx: PassContext, vocab: int) -> tuple[np.ndarray, set[int]]:
        """(how much each token is used, per `source`; the ids of the calibration text)."""
        counts = np.zeros(vocab, dtype=np.float64)
        feeds_list = [f for f in ctx.inputs if "input_ids" in f]
        if not feeds_list:
            raise SlimgraphError(f"{self.name}: the calibration inputs have no input_ids to count")
        for feeds in feeds_list:
            ids = _real_ids(feeds)
            counts += np.bincount(ids[(ids >= 0) & (ids < vocab)], minlength=vocab)
        text_ids = set(np.flatnonzero(counts).tolist())
        if self.source == "calib":
            return counts, text_ids
        logits = self.head(model).output
        if logits not in model.graph.outputs:
            raise SlimgraphError(f"{self.name}: source={self.source} reads the LM head's logits, and "
                                 f"{logits.name!r} is not a graph output")
        session = evaluate.make_session(model)
        if self.source == "predict":
            probability = np.zeros(vocab, dtype=np.float64)
            for feeds in ctx.track(feeds_list, "next-token probabilities"):
                scores = evaluate.run(session, feeds)[logits.name]
                mask = feeds.get("attention_mask")
                real = scores[mask != 0] if mask is not None and mask.shape == scores.shape[:-1] else scores
                probability += _summed_softmax(real.reshape(-1, scores.shape[-1]))
            return probability, text_ids
        for feeds in ctx.track(feeds_list, "greedy continuations"):
            generated = _greedy(session, feeds, self.new_tokens, logits.name)
            counts += np.bincount(generated.reshape(-1), minlength=vocab)
        return counts, text_ids

    def _chosen(self, mass: np.ndarray, always: set[int]) -> np.ndarray:
        order = np.lexsort((np.arange(len(mass)), -mass))  # most used first, ties by id
        used = order[mass[order] > 0]
        if self.keep:
            chosen = used[: self.keep]
        else:
            covered = np.cumsum(mass[used]) / max(mass.sum(), 1e-30)
            chosen = used[: int(np.searchsorted(covered, self.coverage - 1e-12)) + 1]
        return np.unique(np.concatenate([chosen, list(always)]).astype(np.int64))

    @staticmethod
    def _remap_indices(model: ir.Model, logits: list[ir.Value], ids: ir.Value) -> None:
        """ArgMax/TopK over the trimmed logits give positions: make them token ids again."""
        for value in logits:
            for node, _ in list(value.uses()):
                if node.op_type not in ("ArgMax", "TopK"):
                    continue
                index = node.outputs[0] if node.op_type == "ArgMax" else node.outputs[1]
                gather = ir.node("Gather", [ids, index], name=f"{node.name}_token_ids")
                edit.insert_after(model, index, [gather], gather.outputs[0])

    @staticmethod
    def _remap_inputs(model: ir.Model, kept: np.ndarray, vocab: int, unk: int) -> None:
        """Incoming ids → their position in the trimmed vocabulary (removed ids → UNK's)."""
        lookup = np.full(vocab, unk, dtype=np.int64)
        lookup[kept] = np.arange(len(kept))
        table = edit.add_initializer(model, "vocab.remap", lookup)
        ids = next(v for v in model.graph.inputs if v.name == "input_ids")
        gather = ir.node("Gather", [table, ids], name="vocab_remap_input_ids")
        edit.insert_after(model, ids, [gather], gather.outputs[0])


def _real_ids(feeds: dict[str, np.ndarray]) -> np.ndarray:
    ids = feeds["input_ids"]
    mask = feeds.get("attention_mask")
    return ids[mask != 0] if mask is not None and mask.shape == ids.shape else ids.reshape(-1)


def _summed_softmax(logits: np.ndarray, rows: int = 256) -> np.ndarray:
    """Σ softmax over the rows of `logits` [n, V], a few rows at a time (a full [n, V] in float64
    would be GBs for a 49k vocabulary)."""
    total = np.zeros(logits.shape[-1], dtype=np.float64)
    for start in range(0, len(logits), rows):
        chunk = logits[start:start + rows].astype(np.float64)
        chunk = np.exp(chunk - chunk.max(axis=1, keepdims=True))
        total += (chunk / chunk.sum(axis=1, keepdims=True)).sum(axis=0)
    return total


def _greedy(session, feeds: dict[str, np.ndarray], steps: int, logits_name: str) -> np.ndarray:
    """The model's own greedy continuation of each row (recomputing the prefix: no KV cache)."""
    feeds = dict(feeds)
    produced = []
    for _ in range(steps):
        logits = evaluate.run(session, feeds)[logits_name]
        mask = feeds.get("attention_mask")
        width = logits.shape[1]  # the last real position, with left or right padding
        last = width - 1 - np.argmax(mask[:, ::-1] != 0, axis=1) if mask is not None else np.full(len(logits), width - 1)
        token = logits[np.arange(len(logits)), last].argmax(-1)
        produced.append(token)
        feeds["input_ids"] = _append(feeds["input_ids"], token, last)
        if mask is not None:
            feeds["attention_mask"] = _append(mask, np.ones_like(token), last)
    return np.stack(produced, axis=1)


def _append(array: np.ndarray, values: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Each row with `values[row]` written after its last real position (right padding grows by one)."""
    grown = np.concatenate([array, np.zeros((len(array), 1), array.dtype)], axis=1)
    grown[np.arange(len(array)), last + 1] = values
    return grown


def _special_ids(tokenizer) -> set[int]:
    """The special tokens and the tokens added to the vocabulary (chat-template markers such as
    SmolLM2's `<|im_start|>`, which `all_special_ids` leaves out)."""
    if tokenizer is None:
        return set()
    return set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
