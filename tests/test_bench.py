"""bench's ratio intervals: what is noise and what is a difference."""

from __future__ import annotations

import numpy as np

from slimgraph.bench import ratio_interval


def test_identical_models_have_an_interval_around_one():
    rng = np.random.default_rng(3)
    a, b = 10 + rng.exponential(0.5, 30), 10 + rng.exponential(0.5, 30)  # the same latency, noisy
    low, high = ratio_interval(list(a), list(b))
    assert low <= 1 <= high and high / low < 1.1


def test_a_model_ten_percent_slower_is_not_noise():
    rng = np.random.default_rng(4)
    a = 10 + rng.exponential(0.3, 30)
    low, high = ratio_interval(list(a), list(1.1 * a + rng.normal(0, 0.05, 30)))
    assert 1.05 < low <= 1.1 <= high < 1.15


def test_the_same_runs_give_the_same_interval():
    runs = [1.0, 1.2, 0.9, 1.1, 1.05]
    assert ratio_interval(runs, runs[::-1]) == ratio_interval(runs, runs[::-1])
