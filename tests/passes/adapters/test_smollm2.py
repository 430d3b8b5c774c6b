"""SmolLM2-135M, a real trained decoder: LoRA and SHiRA adapters trained with `peft` for a few steps on
English prose, merged from the Hugging Face folder and from a renamed ONNX export, and switched in place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import slimgraph
from slimgraph.measure import evaluate
from slimgraph.passes.adapters.merge import MergeLora, MergeShira
from tests.conftest import copy_model
from tests.passes.adapters.peft_adapters import Made, anonymize, relative, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_adapters(smollm2_folder: Path, tmp_path_factory) -> dict[str, Made]:
    pytest.importorskip("peft", reason="the dev extra installs peft")
    from peft import LoraConfig, ShiraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimgraph.zoo import text

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    batch = dict(tokenizer(text.calibration_texts(2), return_tensors="pt", truncation=True, max_length=16))
    root = tmp_path_factory.mktemp("smollm2-adapters")
    configs = {"lora": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
               "shira": ShiraConfig(r=8, target_modules=["q_proj", "v_proj"], random_seed=0)}
    made = {}
    for kind, config in configs.items():
        model = AutoModelForCausalLM.from_pretrained(smollm2_folder)
        model.config.use_cache = False
        made[kind] = train(model, config, batch, root / kind, lr=1e-3, output="logits",
                           loss=lambda result: next_token_loss(result.logits, batch["input_ids"]))
    return made


def next_token_loss(logits, ids):
    import torch

    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.fixture(scope="module")
def smollm2_hf_ir(smollm2_folder: Path):
    return slimgraph.load(smollm2_folder)


def logits(model, made: Made) -> np.ndarray:
    return evaluate.run(evaluate.make_session(model), made.feeds)["logits"]


@pytest.mark.parametrize("kind, merge_pass", [("lora", MergeLora), ("shira", MergeShira)])
def test_merge_equals_peft_from_folder_and_renamed_onnx(kind, merge_pass, smollm2_adapters, smollm2_hf_ir, tmp_path):
    made = smollm2_adapters[kind]
    assert relative(made.merged, made.base) > 1e-3
    from_folder = copy_model(smollm2_hf_ir)
    stats = merge_pass(adapter=(str(made.path),))(from_folder).stats
    assert stats["modules fused"] == "60 (60 by module path)"
    assert relative(logits(from_folder, made), made.merged) <= 1e-5
    path = tmp_path / "renamed.onnx"
    slimgraph.save(anonymize(smollm2_hf_ir), path, external_data=True)
    renamed = slimgraph.load(path)
    assert merge_pass(adapter=(str(made.path),))(renamed).stats["modules fused"] == "60 (60 by fingerprint)"
    assert relative(logits(renamed, made), made.merged) <= 1e-5


def test_switching_on_smollm2(smollm2_adapters, smollm2_hf_ir):
    lora, shira = smollm2_adapters["lora"], smollm2_adapters["shira"]
    artifact = slimgraph.compile(smollm2_hf_ir)
    artifact.load_adapter(lora.path, "lora")
    artifact.load_adapter(shira.path, "shira")
    base = artifact(**lora.feeds)["logits"]
    for name in ["shira", "lora", "shira", None]:
        artifact.set_adapter(name)
        out = artifact(**lora.feeds)["logits"]
        if name is None:
            assert np.array_equal(out, base)
        else:
            assert relative(out, smollm2_adapters[name].merged) <= 1e-5
