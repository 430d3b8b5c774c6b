"""merge-lora / merge-shira against the real `peft` library: slimgraph's merged model equals PEFT's
`merge_and_unload()` (outputs and weights within 1e-5 relative), from a Hugging Face folder and
from an ONNX export whose names are gone."""

from __future__ import annotations

import numpy as np
import pytest

import slimgraph
from slimgraph.errors import SlimgraphError
from slimgraph.frontend.peft_files import read_adapter
from slimgraph.measure import evaluate
from slimgraph.passes.adapters.merge import MergeLora, MergeShira
from tests.conftest import copy_model
from tests.passes.adapters.peft_adapters import Made, anonymize, ir_weight, relative

pytestmark = pytest.mark.slow


def outputs(model, made: Made) -> np.ndarray:
    return evaluate.run(evaluate.make_session(model), made.feeds)[made.output]


def assert_equals_peft(model, made: Made, *, against: str = "merged") -> None:
    expected = getattr(made, against)
    assert relative(expected, made.base) > 1e-3, "the adapter should change the model"
    assert relative(outputs(model, made), expected) <= 1e-5
    if against == "merged":
        adapter = read_adapter(made.path)
        for module in adapter.modules:
            weight = made.merged_weights[module]  # GPT-2's Conv1D stores [in, out]
            assert relative(ir_weight(model, module), weight.T if adapter.fan_in_fan_out else weight) <= 1e-5, module


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora", "dora_embedding", "patterns", "embedding", "bias"])
def test_merge_lora_equals_peft(kind, minilm, minilm_adapter):
    made = minilm_adapter(kind)
    result = MergeLora(adapter=(str(made.path),))(minilm)
    assert_equals_peft(minilm, made)
    adapter = read_adapter(made.path)
    assert result.stats["modules fused"].startswith(f"{len(adapter.modules)} ({len(adapter.modules)} by module path")
    assert f"{len(adapter.modules)} of {len(adapter.modules)} checked against" in result.stats["base weights"]


def test_rank_pattern_is_read_per_module(minilm_adapter):
    modules = read_adapter(minilm_adapter("patterns").path).modules
    assert modules["encoder.layer.1.attention.self.query"].rank == 2
    assert modules["encoder.layer.0.attention.self.query"].rank == 4
    assert modules["encoder.layer.2.attention.self.value"].rank == 6
    assert modules["encoder.layer.2.attention.self.value"].scaling == pytest.approx(32 / 6)
    assert modules["encoder.layer.0.attention.self.value"].scaling == pytest.approx(32 / 4)


def test_merge_shira_equals_peft(minilm, minilm_adapter):
    made = minilm_adapter("shira")
    result = MergeShira(adapter=(str(made.path),))(minilm)
    assert_equals_peft(minilm, made)
    changed = sum(int((ir_weight(minilm, m) != made.merged_weights[m]).sum()) for m in read_adapter(made.path).modules)
    assert changed == 0
    assert "SHiRA on 37 modules" in result.stats["adapters"]


def test_merge_into_a_renamed_onnx_export_by_fingerprint(minilm, minilm_adapter, tmp_path):
    made = minilm_adapter("dora")
    path = tmp_path / "renamed.onnx"
    slimgraph.save(anonymize(minilm), path)
    model = slimgraph.load(path)
    result = MergeLora(adapter=(str(made.path),))(model)
    assert result.stats["modules fused"] == "12 (12 by fingerprint)"
    assert "encoder.layer.0–5.attention.self.query → onnx::MatMul_" in result.stats["fused into"]  # folded ×6
    assert relative(outputs(model, made), made.merged) <= 1e-5
    MergeLora(adapter=(str(made.path),))(minilm)  # from the folder: the same weights, bit for bit
    assert np.array_equal(outputs(model, made), outputs(minilm, made))


def test_merge_shira_into_a_renamed_onnx_export(minilm, minilm_adapter, tmp_path):
    made = minilm_adapter("shira_small")
    path = tmp_path / "renamed.onnx"
    slimgraph.save(anonymize(minilm), path)
    model = slimgraph.load(path)
    assert MergeShira(adapter=(str(made.path),))(model).stats["modules fused"] == "6 (6 by fingerprint)"
    assert relative(outputs(model, made), made.merged) <= 1e-5


def test_weighted_lora_adapters_equal_peft_cat_combination(minilm, minilm_path, minilm_adapter, minilm_batch):
    import torch
    from peft import PeftModel
    from transformers import AutoModel

    a, b = minilm_adapter("lora"), minilm_adapter("rslora")
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(minilm_path), a.path, adapter_name="a")
    peft_model.load_adapter(b.path, adapter_name="b")
    peft_model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "ab", combination_type="cat")
    peft_model.set_adapter("ab")
    with torch.no_grad():
        expected = peft_model.eval()(**minilm_batch).last_hidden_state.numpy()
    result = MergeLora(adapter=(str(a.path), str(b.path)), weights=(0.7, 0.3))(minilm)
    assert relative(outputs(minilm, a), expected) <= 1e-5
    assert relative(expected, a.merged) > 1e-3 and relative(expected, b.merged) > 1e-3
    assert "×0.7" in result.stats["adapters"] and "×0.3" in result.stats["adapters"]


def test_scale_multiplies_the_delta(minilm, minilm_adapter):
    made = minilm_adapter("rslora")
    twice = copy_model(minilm)
    MergeLora(adapter=(str(made.path),), scale=0.5)(minilm)
    MergeLora(adapter=(str(made.path), str(made.path)), weights=(0.25, 0.25))(twice)
    assert relative(outputs(minilm, made), outputs(twice, made)) <= 1e-6
    assert relative(outputs(minilm, made), made.merged) > 1e-3


def test_gpt2_conv1d_fan_in_fan_out(gpt2_folder, gpt2_adapter):
    made = gpt2_adapter("conv1d")
    assert read_adapter(made.path).fan_in_fan_out
    model = slimgraph.load(gpt2_folder)
    MergeLora(adapter=(str(made.path),))(model)
    assert_equals_peft(model, made)


def test_tied_embedding_lora_keeps_the_lm_head(gpt2_folder, gpt2_adapter):
    """PEFT's merge_and_unload() adds the delta to the table the LM head shares; its forward with the
    adapter active (and slimgraph's merge) changes the embedding only."""
    made = gpt2_adapter("tied")
    assert relative(made.merged, made.unmerged) > 1e-3
    model = slimgraph.load(gpt2_folder)
    MergeLora(adapter=(str(made.path),))(model)
    assert_equals_peft(model, made, against="unmerged")


def test_dora_is_fused_alone(minilm, minilm_adapter):
    dora, lora = minilm_adapter("dora"), minilm_adapter("lora")
    with pytest.raises(SlimgraphError, match="a DoRA adapter is fused alone"):
        MergeLora(adapter=(str(dora.path), str(lora.path)))(minilm)


def test_adapter_for_another_base_model(tmp_path, gpt2_adapter):
    import torch
    import transformers

    from tests.conftest import SMALL_CONFIGS

    torch.manual_seed(1)  # the same architecture, other weights
    config = transformers.GPT2Config(**SMALL_CONFIGS["gpt2"]["kwargs"])
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "other")
    other = slimgraph.load(tmp_path / "other")
    made = gpt2_adapter("conv1d")
    with pytest.raises(SlimgraphError, match="was trained on another base model: the weight of 'transformer.h.0"):
        MergeLora(adapter=(str(made.path),))(other)
    before = {name: v.const_value for name, v in other.graph.initializers.items()}
    assert all(other.graph.initializers[n].const_value is t for n, t in before.items())  # nothing was written


def test_unmatched_module_is_named(gpt2_ir, minilm_adapter):
    made = minilm_adapter("rslora")
    with pytest.raises(SlimgraphError, match="module 'encoder.layer.0.attention.self.query' matches no linear"):
        MergeLora(adapter=(str(made.path),))(copy_model(gpt2_ir))


@pytest.mark.parametrize("pass_, kind", [(MergeLora, "lora"), (MergeShira, "shira")])
def test_merge_is_deterministic(minilm, minilm_adapter, tmp_path, pass_, kind):
    """(the other passes: tests/test_determinism.py)"""
    files = []
    for i in range(2):
        model = copy_model(minilm)
        pass_(adapter=(str(minilm_adapter(kind).path),))(model)
        files.append(slimgraph.save(model, tmp_path / f"{i}.onnx").read_bytes())
    assert files[0] == files[1]
