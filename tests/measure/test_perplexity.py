"""perplexity(): next-token likelihood over real tokens, checked against torch's cross-entropy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimgraph.measure.fidelity import perplexity


def torch_perplexity(batches) -> float:
    """exp(mean cross-entropy) of logits[t] against ids[t + 1] where both positions are real."""
    losses = []
    for logits, ids, mask in batches:
        for row in range(ids.shape[0]):
            real = np.flatnonzero(mask[row])
            keep = real[:-1][np.diff(real) == 1]  # positions whose next position is real too
            losses.append(torch.nn.functional.cross_entropy(
                torch.from_numpy(logits[row, keep]).double(), torch.from_numpy(ids[row, keep + 1]), reduction="none"))
    return float(torch.exp(torch.cat(losses).mean()))


def random_batch(rng, batch, seq, vocab, *, left_pad=False):
    logits = (rng.standard_normal((batch, seq, vocab)) * 3).astype(np.float32)
    ids = rng.integers(0, vocab, (batch, seq))
    lengths = rng.integers(2, seq + 1, batch)
    mask = np.zeros((batch, seq), np.int64)
    for row, length in enumerate(lengths):
        if left_pad:
            mask[row, seq - length:] = 1
        else:
            mask[row, :length] = 1
    return logits, ids, mask


@pytest.mark.parametrize("left_pad", [False, True])
def test_matches_torch_cross_entropy_with_padding(left_pad):
    rng = np.random.default_rng(0)
    logits, ids, mask = random_batch(rng, 4, 9, 50, left_pad=left_pad)
    assert perplexity(logits, ids, mask) == pytest.approx(torch_perplexity([(logits, ids, mask)]), rel=1e-12)


def test_padding_is_ignored_whatever_its_logits():
    rng = np.random.default_rng(1)
    logits, ids, mask = random_batch(rng, 3, 7, 20)
    scrambled = logits.copy()
    scrambled[mask == 0] = 1e4  # garbage where there is no token
    ids2 = ids.copy()
    ids2[mask == 0] = 0
    assert perplexity(scrambled, ids2, mask) == perplexity(logits, ids, mask)


def test_lists_of_batches_pool_their_tokens():
    rng = np.random.default_rng(2)
    a, b = random_batch(rng, 2, 5, 30), random_batch(rng, 3, 11, 30)
    pooled = perplexity([a[0], b[0]], [a[1], b[1]], [a[2], b[2]])
    assert pooled == pytest.approx(torch_perplexity([a, b]), rel=1e-12)
    assert min(perplexity(*a), perplexity(*b)) < pooled < max(perplexity(*a), perplexity(*b))


def test_known_values_and_float64():
    vocab = 1000
    ids = np.array([[3, 1, 4, 1, 5]])
    assert perplexity(np.zeros((1, 5, vocab), np.float32), ids) == pytest.approx(vocab, rel=1e-12)  # uniform
    sure = np.full((1, 5, vocab), -1e4, np.float32)
    sure[0, np.arange(4), ids[0, 1:]] = 1e4  # float32 softmax would overflow without the max shift
    assert perplexity(sure, ids) == 1.0


def test_bad_shapes_and_nothing_to_score():
    with pytest.raises(ValueError, match=r"logits \[B, S, V\]"):
        perplexity(np.zeros((2, 5)), np.zeros((2, 5), np.int64))
    with pytest.raises(ValueError, match="at least one sequence with two real tokens"):
        perplexity(np.zeros((1, 3, 4)), np.zeros((1, 3), np.int64), np.array([[1, 0, 0]]))
