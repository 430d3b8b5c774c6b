"""Fidelity of a model's outputs against the original's: cosine, relative L2, max abs, top-1.

`Fidelity.drop` (1 − worst cosine) is what `--max-drop` budgets.
`Fidelity.max_rel_error` (max |y − y_ref| / max |y_ref|) is what exact passes are held to.
`LEGEND` says the same in one line for the reports.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

EXACT_RTOL = 1e-4  # fp32 relative tolerance for passes declared exact
# Below this cosine against the original, a lossy pass gets a warning even without a budget:
# outputs this far off are rarely usable (MiniLM int4 keeps 0.98, int2 falls to about 0.5).
COSINE_FLOOR = 0.9
LEGEND = (
    "cos: cosine with the original's outputs (1 = same) · rel L2: ‖y − y₀‖ / ‖y₀‖ · top-1: rows whose "
    "argmax agrees · exact: max |y − y₀| / max |y₀| against the outputs before the pass (at most 1e-4) · "
    "each figure is the worst output's"
)


@dataclass(frozen=True)
class OutputFidelity:
    name: str
    cosine: float
    rel_l2: float
    max_abs: float
    max_rel_error: float
    top1: float | None  # share of rows whose argmax agrees; only for logits-like outputs
    view: str | None = None  # how it was compared when not value by value (an OutputMap's)


@dataclass(frozen=True)
class Fidelity:
    outputs: tuple[OutputFidelity, ...]

    @property
    def cosine(self) -> float:
        return min(o.cosine for o in self.outputs)

    @property
    def rel_l2(self) -> float:
        return max(o.rel_l2 for o in self.outputs)

    @property
    def max_abs(self) -> float:
        return max(o.max_abs for o in self.outputs)

    @property
    def max_rel_error(self) -> float:
        return max(o.max_rel_error for o in self.outputs)

    @property
    def top1(self) -> float | None:
        values = [o.top1 for o in self.outputs if o.top1 is not None]
        return min(values) if values else None

    @property
    def drop(self) -> float:
        return max(0.0, 1.0 - self.cosine)

    @property
    def unchanged(self) -> bool:
        """Every output equals the original's, value for value: none differs, none was compared
        through a view (fewer columns or tokens), and every argmax agrees."""
        return self.max_rel_error == 0 and all(o.view is None and o.top1 in (None, 1.0) for o in self.outputs)

    def worst_output(self) -> OutputFidelity:
        """The output with the largest relative error (what an exact pass is held to)."""
        return max(self.outputs, key=lambda o: o.max_rel_error)

    def worst_cosine_output(self) -> OutputFidelity:
        """The output with the lowest cosine (what `max_drop` budgets)."""
        return min(self.outputs, key=lambda o: o.cosine)

    def __repr__(self) -> str:
        worst = self.worst_cosine_output()
        top1 = f", top-1 {self.top1:.1%}" if self.top1 is not None else ""
        return (f"<Fidelity cosine {self.cosine:.5f} (worst: {worst.name}), rel L2 {self.rel_l2:.2e}, "
                f"max rel err {self.max_rel_error:.2e}{top1}; {len(self.outputs)} outputs>")

    def to_json(self) -> dict:
        return {
            "cosine": self.cosine,
            "rel_l2": self.rel_l2,
            "max_abs": self.max_abs,
            "max_rel_error": self.max_rel_error,
            "top1": self.top1,
            "outputs": [asdict(o) for o in self.outputs],
        }


LOGITS_NAMES = re.compile(r"logit|prob|softmax|score|class", re.IGNORECASE)


def is_logits_like(name: str, array: np.ndarray) -> bool:
    """Classifier or LM outputs (by name: logits, probabilities, …), where top-1 agreement means something."""
    return array.ndim >= 2 and array.shape[-1] > 1 and bool(LOGITS_NAMES.search(name))


def compare_output(name: str, ref: np.ndarray, new: np.ndarray) -> OutputFidelity:
    if ref.shape != new.shape:
        raise ValueError(f"output {name!r} changed shape: {ref.shape} → {new.shape}")
    r = ref.astype(np.float64).ravel()
    n = new.astype(np.float64).ravel()
    diff = n - r
    ref_norm, new_norm = np.linalg.norm(r), np.linalg.norm(n)
    if ref_norm == 0 and new_norm == 0:
        cosine = 1.0
    elif ref_norm == 0 or new_norm == 0:
        cosine = 0.0
    else:
        cosine = float(np.dot(r, n) / (ref_norm * new_norm))
    max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
    scale = float(np.max(np.abs(r))) if r.size else 0.0
    top1 = None
    if ref.dtype.kind == "f" and is_logits_like(name, ref):
        top1 = float(np.mean(ref.argmax(-1) == new.argmax(-1)))
    return OutputFidelity(
        name=name,
        cosine=cosine,
        rel_l2=float(np.linalg.norm(diff) / ref_norm) if ref_norm else float(np.linalg.norm(diff) > 0),
        max_abs=max_abs,
        max_rel_error=max_abs / scale if scale else (0.0 if max_abs == 0 else float("inf")),
        top1=top1,
    )


@dataclass(frozen=True)
class OutputMap:
    """How an output relates to the original's when it is not compared value by value: `columns`
    are the original's last-axis positions it keeps (a trimmed vocabulary: the logits at those
    ids); `added` marks a new output with no counterpart (the kept `token_ids`); `token_mean`:
    fewer tokens on axis 1 (compressed), compared by the mean token; `replaced_tokens`
    (start, n, m): the original's tokens [start, start + n) on axis 1 became m others (a VLM's
    compressed image tokens), compared at the tokens around them (its text); `pooled_by`: token
    states [B, S, D] a sentence encoder mean-pools over the real tokens of this input (its
    attention mask), compared as those sentence embeddings — what the model's users read;
    `real_tokens` (input, axis): compared only at the positions of `axis` that this mask keeps
    (right-aligned: an output of length L reads the mask's last L columns) — a KV-cache
    decoder's logits and cache at padding are never read, and fused attention leaves them
    undefined."""

    columns: np.ndarray | None = None
    added: bool = False
    token_mean: bool = False
    replaced_tokens: tuple[int, int, int] | None = None
    pooled_by: str | None = None
    real_tokens: tuple[str, int] | None = None

    @property
    def view(self) -> str | None:
        if self.token_mean:
            return "as its mean token"
        if self.replaced_tokens:
            return "at the tokens around the compressed ones"
        if self.pooled_by:
            return "as mean-pooled sentences"
        return None


def compare(reference: Sequence[dict[str, np.ndarray]], candidate: Sequence[dict[str, np.ndarray]],
            maps: Mapping[str, OutputMap] | None = None,
            inputs: Sequence[dict[str, np.ndarray]] | None = None) -> Fidelity:
    """Compare outputs batch by batch; outputs are matched by name, then by position. `maps` says
    how outputs line up with the original's when not value by value; `inputs` are the batches'
    feeds (a `pooled_by` map reads its mask there)."""
    maps = maps or {}
    per_output: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for i, (ref_batch, new_batch) in enumerate(zip(reference, candidate, strict=True)):
        new_batch = {k: v for k, v in new_batch.items() if not (k in maps and maps[k].added)}
        ref_items, new_items = list(ref_batch.items()), list(new_batch.items())
        if len(ref_items) != len(new_items):
            raise ValueError(f"the model has {len(new_items)} outputs, the original {len(ref_items)}")
        for (name, ref), (new_name, new) in zip(ref_items, new_items):
            new = new_batch.get(name, new)
            if name in maps and maps[name].token_mean:
                ref, new = ref.mean(axis=1), new.mean(axis=1)
            elif name in maps and maps[name].replaced_tokens:
                start, n, m = maps[name].replaced_tokens
                ref, new = _without_tokens(ref, start, n), _without_tokens(new, start, m)
            elif name in maps and maps[name].pooled_by:
                mask = _feed(inputs, i, maps[name].pooled_by)
                ref, new = mean_pooled(ref, mask), mean_pooled(new, mask)
            if name in maps and maps[name].real_tokens:
                mask_name, axis = maps[name].real_tokens
                mask = _feed(inputs, i, mask_name)
                ref, new = at_real_tokens(ref, mask, axis), at_real_tokens(new, mask, axis)
            per_output.setdefault(name, []).append((ref, new))
    outputs = []
    for name, pairs in per_output.items():
        columns = maps[name].columns if name in maps else None
        if columns is not None:
            outputs.append(_compare_columns(name, pairs, columns))
            continue
        ref = np.concatenate([p[0].ravel() for p in pairs]) if len(pairs) > 1 else pairs[0][0]
        new = np.concatenate([p[1].ravel() for p in pairs]) if len(pairs) > 1 else pairs[0][1]
        if len(pairs) > 1 and is_logits_like(name, pairs[0][0]):
            # keep the last axis so that top-1 stays meaningful across batches
            last = pairs[0][0].shape[-1]
            ref, new = ref.reshape(-1, last), new.reshape(-1, last)
        result = compare_output(name, ref, new)
        outputs.append(dataclasses.replace(result, view=maps[name].view) if name in maps else result)
    return Fidelity(tuple(outputs))


def _without_tokens(output: np.ndarray, start: int, count: int) -> np.ndarray:
    """The output without its tokens [start, start + count) on axis 1."""
    return np.concatenate([output[:, :start], output[:, start + count:]], axis=1)


def at_real_tokens(output: np.ndarray, mask: np.ndarray, axis: int) -> np.ndarray:
    """The rows of `output` [B, …] at the positions of `axis` the mask [B, T] keeps, as [kept, …]
    (the other axes in order)."""
    keep = np.asarray(mask)[:, mask.shape[1] - output.shape[axis]:] != 0
    return np.moveaxis(output, axis, 1)[keep]


def _feed(inputs: Sequence[dict[str, np.ndarray]] | None, batch: int, name: str) -> np.ndarray:
    if inputs is None or name not in inputs[batch]:
        raise ValueError(f"comparing at real tokens needs the input {name!r} that marks them")
    return inputs[batch][name]


def _compare_columns(name: str, pairs: list[tuple[np.ndarray, np.ndarray]], columns: np.ndarray) -> OutputFidelity:
    """An output that keeps some columns of the original's last axis: the values are compared at
    those columns, and top-1 agreement against the original's full argmax (a best column that
    was dropped is a miss)."""
    ref = np.concatenate([p[0].reshape(-1, p[0].shape[-1]) for p in pairs])
    new = np.concatenate([p[1].reshape(-1, p[1].shape[-1]) for p in pairs])
    result = compare_output(name, ref[:, columns], new)
    agreement = float(np.mean(ref.argmax(-1) == columns[new.argmax(-1)]))
    return dataclasses.replace(result, top1=agreement, view=f"at the {len(columns):,} kept of {ref.shape[-1]:,} columns")


def mean_pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings: the mean of token states [B, S, D] over real tokens (mask [B, S])."""
    weights = mask.astype(np.float64)[..., None]
    return (hidden.astype(np.float64) * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)


def sentence_cosines(reference: list[np.ndarray], candidate: list[np.ndarray], masks: list[np.ndarray]) -> np.ndarray:
    """Per-sentence cosine of mean-pooled embeddings, over batches of hidden states."""
    cosines = []
    for ref, new, mask in zip(reference, candidate, masks, strict=True):
        a, b = mean_pooled(ref, mask), mean_pooled(new, mask)
        cosines.append((a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    return np.concatenate(cosines)


def perplexity(
    logits: np.ndarray | Sequence[np.ndarray],
    input_ids: np.ndarray | Sequence[np.ndarray],
    attention_mask: np.ndarray | Sequence[np.ndarray] | None = None,
) -> float:
    """exp(mean negative log-likelihood) of each next token, over real tokens only, in float64.

    `logits` [B, S, V] at position t predict `input_ids` [B, S] at t + 1; a prediction counts
    when both positions are real tokens in `attention_mask` [B, S] (left or right padding alike).
    Each argument may also be a list of such batches (e.g. padded to different lengths); the
    mean is then over all their tokens.
    """
    if isinstance(logits, np.ndarray):
        logits, input_ids = [logits], [input_ids]
        attention_mask = None if attention_mask is None else [attention_mask]
    masks = attention_mask if attention_mask is not None else [np.ones(np.shape(i), np.int64) for i in input_ids]
    total_nll, count = 0.0, 0
    for batch_logits, ids, mask in zip(logits, input_ids, masks, strict=True):
        if batch_logits.ndim != 3 or batch_logits.shape[:2] != ids.shape or ids.shape != mask.shape:
            raise ValueError(f"perplexity needs logits [B, S, V] with ids and mask [B, S]; got {batch_logits.shape}, "
                             f"{ids.shape}, {mask.shape}")
        counted = (mask[:, :-1] != 0) & (mask[:, 1:] != 0)
        for row in range(ids.shape[0]):  # one sequence at a time: float64 logits of a whole batch can be GBs
            positions = np.flatnonzero(counted[row])
            if positions.size == 0:
                continue
            scores = batch_logits[row, positions].astype(np.float64)
            peak = scores.max(axis=-1)
            log_norm = peak + np.log(np.exp(scores - peak[:, None]).sum(axis=-1))
            target = scores[np.arange(positions.size), ids[row, positions + 1]]
            total_nll += float((log_norm - target).sum())
            count += positions.size
    if count == 0:
        raise ValueError("perplexity needs at least one sequence with two real tokens")
    return float(np.exp(total_nll / count))
