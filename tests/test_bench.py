"""bench's ratio intervals: what is noise and what is a difference."""

from __future__ import annotations

import numpy as np

import slimgraph
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


def test_a_decoder_with_external_data_runs_from_its_file(llama_kv, tmp_path):
    """`bench --new-tokens` runs a `.onnx` whose weights lie in external data from the file itself
    (ONNX Runtime memory-maps them), and an inline one as loaded: the same logits either way."""
    from slimgraph.bench import decoder_session
    from slimgraph.frontend import load
    from slimgraph.generate import SessionDecoder
    from slimgraph.measure import evaluate

    options = evaluate.session_options(1)
    logits = []
    for name, external in (("inline.onnx", False), ("apart.onnx", True)):
        path = slimgraph.save(llama_kv, tmp_path / name, external_data=external)
        model = load(path)
        session = decoder_session(path, model, options)
        assert (session._model_path == str(path)) == external  # what ORT built it from
        decoder = SessionDecoder(model, session)
        ids = np.array([[5, 17, 300, 42]])
        steps = [decoder.start(ids, np.ones_like(ids), capacity=8)]
        steps += [decoder.advance(steps[-1].argmax(-1)) for _ in range(3)]
        logits.append(np.stack(steps))
    np.testing.assert_array_equal(logits[0], logits[1])
