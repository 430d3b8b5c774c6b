"""Fidelity of a model's outputs against the original's: cosine, relative L2, max abs, top-1.

`Fidelity.drop` (1 − worst cosine) is what `--max-drop` budgets.
`Fidelity.max_rel_error` (max |y − y_ref| / max |y_ref|) is what exact passes are held to.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

EXACT_RTOL = 1e-4  # fp32 relative tolerance for passes declared exact


@dataclass(frozen=True)
class OutputFidelity:
    name: str
    cosine: float
    rel_l2: float
    max_abs: float
    max_rel_error: float
    top1: float | None  # share of rows whose argmax agrees; only for logits-like outputs


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

    def worst_output(self) -> OutputFidelity:
        return max(self.outputs, key=lambda o: o.max_rel_error)

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


def compare(reference: Sequence[dict[str, np.ndarray]], candidate: Sequence[dict[str, np.ndarray]]) -> Fidelity:
    """Compare outputs batch by batch; outputs are matched by name, then by position."""
    per_output: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for ref_batch, new_batch in zip(reference, candidate, strict=True):
        ref_items, new_items = list(ref_batch.items()), list(new_batch.items())
        if len(ref_items) != len(new_items):
            raise ValueError(f"the model has {len(new_items)} outputs, the original {len(ref_items)}")
        for (name, ref), (new_name, new) in zip(ref_items, new_items):
            per_output.setdefault(name, []).append((ref, new_batch.get(name, new)))
    outputs = []
    for name, pairs in per_output.items():
        ref = np.concatenate([p[0].ravel() for p in pairs]) if len(pairs) > 1 else pairs[0][0]
        new = np.concatenate([p[1].ravel() for p in pairs]) if len(pairs) > 1 else pairs[0][1]
        if len(pairs) > 1 and is_logits_like(name, pairs[0][0]):
            # keep the last axis so that top-1 stays meaningful across batches
            last = pairs[0][0].shape[-1]
            ref, new = ref.reshape(-1, last), new.reshape(-1, last)
        outputs.append(compare_output(name, ref, new))
    return Fidelity(tuple(outputs))


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
