"""Adapters made with the real `peft` library (PyPI) on MiniLM and a small GPT-2, trained a few steps on
real sentences (GPT-2: its random ids), each made once per session when a test first asks for it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import SENTENCES
from tests.passes.adapters.peft_adapters import Made, train


def minilm_config(kind: str):
    from peft import LoraConfig, ShiraConfig

    configs = {
        "lora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"]),
        "rslora": lambda: LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["query", "value"]),
        "dora": lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["query", "value"]),
        "dora_embedding": lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["word_embeddings"]),
        "patterns": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                       rank_pattern={"layer.1.attention.self.query": 2, r"layer\.[2-3]\..*value": 6},
                                       alpha_pattern={"value": 32}),
        "embedding": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["word_embeddings", "query"]),
        "bias": lambda: LoraConfig(r=4, lora_alpha=8, lora_bias=True, target_modules=["query", "dense"]),
        "shira": lambda: ShiraConfig(r=4, target_modules=["query", "key", "value", "dense"], random_seed=0),
        "shira_small": lambda: ShiraConfig(r=2, target_modules=["value"], random_seed=1),
    }
    return configs[kind]()


@pytest.fixture(scope="session")
def minilm_batch(minilm_path: Path) -> dict:
    pytest.importorskip("peft", reason="the dev extra installs peft")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    return dict(tokenizer(SENTENCES[:4], padding=True, return_tensors="pt"))


@pytest.fixture(scope="session")
def minilm_adapter(minilm_path: Path, minilm_batch: dict, tmp_path_factory) -> Callable[[str], Made]:
    """`minilm_adapter("dora")`: a trained adapter folder for MiniLM, and what PEFT computes with it."""
    from transformers import AutoModel

    made: dict[str, Made] = {}
    root = tmp_path_factory.mktemp("minilm-adapters")

    def make(kind: str) -> Made:
        if kind not in made:
            model = AutoModel.from_pretrained(minilm_path)
            made[kind] = train(model, minilm_config(kind), minilm_batch, root / kind)
        return made[kind]

    return make


@pytest.fixture(scope="session")
def gpt2_batch() -> dict:
    pytest.importorskip("peft", reason="the dev extra installs peft")
    import torch

    ids = torch.randint(1, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="session")
def gpt2_adapter(gpt2_folder: Path, gpt2_batch: dict, tmp_path_factory) -> Callable[[str], Made]:
    """GPT-2 (Conv1D weights: `fan_in_fan_out`) adapters: "conv1d" on c_attn/c_proj/c_fc, "tied" on the
    token embedding its LM head shares."""
    from peft import LoraConfig
    from transformers import GPT2LMHeadModel

    configs = {
        "conv1d": lambda: LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"]),
        "tied": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["wte"]),
    }
    made: dict[str, Made] = {}
    root = tmp_path_factory.mktemp("gpt2-adapters")

    def make(kind: str) -> Made:
        if kind not in made:
            model = GPT2LMHeadModel.from_pretrained(gpt2_folder)
            model.config.use_cache = False
            made[kind] = train(model, configs[kind](), gpt2_batch, root / kind, output="logits",
                               loss=lambda result: -result.logits.pow(2).mean())
        return made[kind]

    return make
