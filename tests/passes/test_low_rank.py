"""low-rank: the factorization identities, and activation-aware beating plain SVD on MiniLM."""

from __future__ import annotations

import numpy as np
import pytest

from slimgraph.errors import SlimgraphError
from slimgraph.ir.structure import find_linears
from slimgraph.passes import PassContext, Pipeline
from slimgraph.passes.low_rank import factor
from tests.conftest import copy_model

RNG = np.random.default_rng(0)


def test_full_rank_svd_is_the_weight():
    w = RNG.standard_normal((48, 32)).astype(np.float32)
    f = factor(w, rank=32)
    assert np.abs(f.left @ f.right - w).max() < 1e-4 and f.energy == pytest.approx(1.0)


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_energy_gives_the_frobenius_error(energy):
    w = RNG.standard_normal((64, 40)) @ np.diag(np.linspace(3, 0.1, 40)) @ RNG.standard_normal((40, 40))
    f = factor(w.astype(np.float32), energy=energy)
    error = np.linalg.norm(f.left.astype(np.float64) @ f.right - w) / np.linalg.norm(w)
    assert f.energy >= energy and error == pytest.approx(np.sqrt(1 - f.energy), rel=1e-3)
    shorter = factor(w.astype(np.float32), rank=f.rank - 1)
    assert shorter.energy < energy  # the smallest rank that reaches it


def test_a_wide_weight_factors_as_lapacks_svd_does():
    """A language model's head [hidden, vocab] goes through A·Aᵀ rather than LAPACK's SVD (memory):
    the same singular values and truncations, and full rank is still the weight."""
    from slimgraph.passes.low_rank import _svd

    a = RNG.standard_normal((24, 200)) * np.linspace(3, 0.1, 200)
    u, s, vt = _svd(a)
    lapack_u, lapack_s, lapack_vt = np.linalg.svd(a, full_matrices=False)
    np.testing.assert_allclose(s, lapack_s, rtol=1e-9)
    for r in (5, 10, 24):
        np.testing.assert_allclose((u[:, :r] * s[:r]) @ vt[:r], (lapack_u[:, :r] * lapack_s[:r]) @ lapack_vt[:r],
                                   atol=1e-9)
    full = factor(a.astype(np.float32), rank=24)
    assert np.abs(full.left @ full.right - a).max() < 1e-4


def test_activation_aware_minimises_the_output_error():
    x = RNG.standard_normal((500, 48)) * np.linspace(0.1, 5, 48)  # channels of very different scale
    w = RNG.standard_normal((48, 32))
    errors = {}
    for name, given in (("svd", None), ("activation", x.T @ x)):
        f = factor(w.astype(np.float32), given, rank=8)
        errors[name] = np.linalg.norm(x @ (f.left.astype(np.float64) @ f.right - w))
    # the best rank-8 output error there is: truncate R·W, where X = Q·R
    r = np.linalg.qr(x, mode="r")
    s = np.linalg.svd(r @ w, compute_uv=False)
    optimum = np.sqrt(np.sum(s[8:] ** 2))
    assert errors["activation"] <= 1.01 * optimum < 0.9 * errors["svd"]


@pytest.mark.slow
def test_activation_beats_svd_on_minilm(minilm, sentence_eval):
    cosines = {}
    for method in ("svd", "activation"):
        model = copy_model(minilm)
        report = Pipeline.parse(f"low-rank{{ratio=0.5,method={method}}}").run(model, sentence_eval.context(),
                                                                               verify=False)
        assert report.records[0].stats["linears factored"] == "37 of 37"
        cosines[method] = sentence_eval.cosines(model).mean()
    assert cosines["activation"] > cosines["svd"] + 0.1  # measured 0.706 vs 0.437


def test_only_layers_that_save_are_factored(llama_ir):
    """Random weights have flat spectra: at energy 0.9 no rank saves 10%; a layer whose weight is
    exactly rank 2 is factored, losslessly, and the others are left alone."""
    from slimgraph.ir import edit
    from slimgraph.measure import evaluate
    from slimgraph.measure.inputs import sample_inputs

    model = copy_model(llama_ir)
    target = find_linears(model)[3]
    low = (RNG.standard_normal((target.in_features, 2)) @ RNG.standard_normal((2, target.out_features))) * 0.05
    edit.set_weight_matrix(model, target, low.astype(np.float32))
    feeds = sample_inputs(model)
    want = evaluate.run(model, feeds)["logits"]
    report = Pipeline.parse("low-rank{energy=0.9}").run(model, PassContext(), verify=False)
    assert report.records[0].stats["linears factored"] == f"1 of {len(find_linears(llama_ir))}"
    assert np.abs(evaluate.run(model, feeds)["logits"] - want).max() < 1e-4 * np.abs(want).max()
    with pytest.raises(SlimgraphError, match="no layer saves"):
        Pipeline.parse("low-rank{rank=1000}").run(copy_model(llama_ir), PassContext(), verify=False)
