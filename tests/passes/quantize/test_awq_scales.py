"""AWQ's input scales: applied exactly to the float model, folded into norms and linears where exact."""

from __future__ import annotations

import numpy as np
import pytest

from slimgraph.measure import evaluate
from slimgraph.measure.inputs import model_inputs
from slimgraph.passes import PassContext
from slimgraph.passes.activations import linear_inputs
from slimgraph.passes.quantize.awq_scales import apply_input_scales
from slimgraph.passes.quantize.rewrite import quantizable_linears
from tests.conftest import copy_model


def scaled(model):
    model = copy_model(model)
    linears, _ = quantizable_linears(model, ())
    ctx = PassContext()
    ctx.inputs, _ = model_inputs(model)
    scales, summary = apply_input_scales(model, linears, linear_inputs(model, linears, ctx), 4, 32, False)
    return model, ctx.inputs, str(summary)


def awq_muls(model) -> list[str]:
    return [n.name for n in model.graph
            if n.op_type == "Mul" and any(v is not None and v.name.endswith(".awq_inv_scale") for v in n.inputs)]


@pytest.mark.parametrize("which, folded, kept", [
    ("llama_ir", 10, 3),  # per layer: q/k/v and gate/up into their RMSNorm, down into up; o stays (GQA)
    ("gpt2_ir", 5, 4),  # c_attn and c_fc into their LayerNorm (through GPT-2's reshape), lm_head into ln_f
])
def test_scales_fold_into_norms_and_linears_exactly(request, which, folded, kept):
    original = request.getfixturevalue(which)
    model, feeds, summary = scaled(original)
    assert summary == f"{folded + kept} ({folded} folded into a norm or linear, {kept} as Mul)"
    assert len(awq_muls(model)) == kept
    for want, got in zip(evaluate.run_all(original, feeds), evaluate.run_all(model, feeds)):
        for name in want:  # the float model is unchanged, up to rounding
            assert np.abs(got[name] - want[name]).max() / np.abs(want[name]).max() < 1e-5


def test_a_norm_that_also_feeds_the_residual_keeps_its_mul(minilm):
    """Post-LN BERT: every LayerNorm output also feeds the next residual Add, so no fold is exact;
    the linears reading one input share a single Mul (q/k/v: one, not three)."""
    model, _, summary = scaled(minilm)
    assert summary == "25 (0 folded into a norm or linear, 25 as Mul)"
    assert len(awq_muls(model)) == 25  # 6 layers × (q/k/v, o, up, down) + pooler, instead of 37
