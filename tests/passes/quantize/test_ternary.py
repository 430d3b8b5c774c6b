"""ternarize: exact 2-bit encoding of {-α, 0, α}; on MiniLM, the loss is measured, not hidden."""

from __future__ import annotations

import numpy as np
import pytest

from slimgraph.passes import Pipeline
from slimgraph.passes.quantize.ternary import ternarize
from tests.conftest import copy_model


def test_ternary_codes_and_dead_zone():
    weight = np.array([[0.9], [-0.1], [0.25], [-1.0]], np.float32)  # α = 0.5625, dead zone |w| ≤ 0.28
    q, dead = ternarize(np.tile(weight, (4, 1)), 16, "tequila")
    alpha = np.abs(weight).mean()
    assert q.scales[0, 0] == pytest.approx(alpha)
    assert q.zero_points.tolist() == [[1]]
    np.testing.assert_array_equal(q.codes[0, :4], [2, 1, 1, 0])  # t + 1: +α, 0, 0, −α
    np.testing.assert_allclose(q.dequantize()[:4, 0], [alpha, 0, 0, -alpha], rtol=1e-6)
    np.testing.assert_allclose(dead[:4, 0], [0, -0.1, 0.25, 0])  # what the bias must stand in for


@pytest.mark.parametrize("method", ["absmean", "tequila"])
def test_ternary_minilm_loss_is_reported(minilm, sentence_eval, method):
    model = copy_model(minilm)
    report = Pipeline.parse(f"ternarize{{method={method}}}").run(model, sentence_eval.context())
    record = report.records[0]
    assert record.stats["linears ternarized"] == 37
    assert "quantization-aware training" in record.warnings[0]
    assert report.after.op_histogram["com.microsoft.MatMulNBits"] == 37
    cosine = sentence_eval.cosines(model).mean()
    # Post-training ternarization of MiniLM keeps roughly half of the embedding direction
    # (measured 0.44-0.45): far below int4, as the pass's help says it will be.
    assert 0.2 < cosine < 0.9
    assert record.fidelity.cosine < 0.9
    dead_zone_adds = [n for n in model.graph if n.name.endswith("_dead_zone")]
    assert len(dead_zone_adds) == (37 if method == "tequila" else 0)
