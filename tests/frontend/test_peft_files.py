"""Reading PEFT adapter folders and safetensors files, and refusing what cannot be merged, with one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from slimgraph.errors import SlimgraphError
from slimgraph.frontend.peft_files import read_adapter
from slimgraph.frontend.safetensors_file import read_safetensors

safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="the torch extra installs safetensors")
MODULE = "base_model.model.encoder.layer.0.attention.self.query"


def write_adapter(folder: Path, config: dict, tensors: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    safetensors_numpy.save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def lora_config(**changes) -> dict:
    return {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query"], **changes}


def lora_tensors(rank: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"{MODULE}.lora_A.weight": rng.standard_normal((rank, 384), np.float32),
            f"{MODULE}.lora_B.weight": rng.standard_normal((384, rank), np.float32)}


def test_reader_matches_the_safetensors_package(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"f32": rng.standard_normal((3, 5), np.float32), "f16": rng.standard_normal(7).astype(np.float16),
               "i32": rng.integers(-9, 9, (2, 2, 2), dtype=np.int32), "i64": np.arange(4, dtype=np.int64),
               "u8": np.arange(6, dtype=np.uint8), "flag": np.array([True, False]), "scalar": np.array(2.5, np.float32),
               "empty": np.zeros((0, 3), np.float32)}
    safetensors_numpy.save_file(tensors, tmp_path / "t.safetensors")
    expected = safetensors_numpy.load_file(tmp_path / "t.safetensors")
    read = read_safetensors(tmp_path / "t.safetensors")
    assert read.keys() == expected.keys()
    for name, array in expected.items():
        assert read[name].dtype == array.dtype and np.array_equal(read[name], array), name


def test_bfloat16_is_read(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    values = torch.randn(4, 6, dtype=torch.bfloat16)
    save_file({"w": values}, tmp_path / "bf16.safetensors")
    read = read_safetensors(tmp_path / "bf16.safetensors")["w"]
    assert read.dtype == ml_dtypes.bfloat16
    assert np.array_equal(read.astype(np.float32), values.float().numpy())


def test_adapter_is_read_as_float32(tmp_path):
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in lora_tensors().items()}
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(lora_config(use_rslora=True)))
    pytest.importorskip("torch")
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.from_numpy(v.view(np.uint16)).view(torch.bfloat16) for k, v in tensors.items()},
              folder / "adapter_model.safetensors")
    module = read_adapter(folder).modules["encoder.layer.0.attention.self.query"]
    assert module.a.dtype == np.float32 and module.rank == 4 and module.shape == (384, 384)
    assert np.array_equal(module.a, tensors[f"{MODULE}.lora_A.weight"].astype(np.float32))
    assert module.scaling == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(r)


@pytest.mark.parametrize("case, message", [
    ("no config", "has no adapter_config.json"),
    ("not json", "adapter_config.json is not valid JSON"),
    ("unsupported type", "peft_type 'IA3' is not supported (supported: LORA, SHIRA)"),
    ("pickle only", "has no adapter_model.safetensors (it holds adapter_model.bin, a pickle: save with "
                    "safe_serialization=True)"),
    ("truncated", "adapter_model.safetensors is truncated: tensor"),
    ("garbage", "is truncated or not a safetensors file"),
    ("rank mismatch", "rank mismatch: adapter_config.json gives r=8 (r / rank_pattern) but lora_A has 4 rows"),
    ("A/B mismatch", "rank mismatch: lora_A has 4 rows, lora_B 3 columns"),
    ("missing B", "has lora_A but no lora_B"),
    ("unknown key", "1 tensor slimgraph cannot merge, e.g. 'base_model.model.classifier.weight'"),
    ("dora flag", "use_dora=True but lora_magnitude_vector is missing"),
    ("pissa", "init_lora_weights='pissa' changed the base weights"),
    ("variant", "use_bdlora=True (block-diagonal LoRA) is not supported"),
    ("trained biases", "bias='all' saves trained base-model biases"),
    ("conv", "is 4-D: LoRA on convolutions is not supported"),
    ("nan", "holds NaN or infinite values"),
    ("shira shapes", "shira_indices must be [2, n] and shira_weight [n]"),
    ("missing folder", "no adapter at"),
])
def test_bad_adapter_folders(tmp_path, case, message):
    folder = tmp_path / "adapter"
    config, tensors = lora_config(), lora_tensors()
    if case == "rank mismatch":
        config["r"] = 8
    elif case == "A/B mismatch":
        tensors[f"{MODULE}.lora_B.weight"] = tensors[f"{MODULE}.lora_B.weight"][:, :3]
    elif case == "missing B":
        del tensors[f"{MODULE}.lora_B.weight"]
    elif case == "unknown key":
        tensors["base_model.model.classifier.weight"] = np.zeros((2, 384), np.float32)
    elif case == "dora flag":
        config["use_dora"] = True
    elif case == "pissa":
        config["init_lora_weights"] = "pissa"
    elif case == "variant":
        config["use_bdlora"] = True
    elif case == "trained biases":
        config["bias"] = "all"
    elif case == "conv":
        tensors[f"{MODULE}.lora_A.weight"] = np.zeros((4, 3, 3, 3), np.float32)
    elif case == "nan":
        tensors[f"{MODULE}.lora_B.weight"][0, 0] = np.nan
    elif case == "unsupported type":
        config["peft_type"] = "IA3"
    elif case == "shira shapes":
        config = {"peft_type": "SHIRA", "r": 2}
        tensors = {f"{MODULE}.shira_weight": np.zeros(5, np.float32),
                   f"{MODULE}.shira_indices": np.zeros((2, 4), np.int32)}
    if case != "missing folder":
        write_adapter(folder, config, tensors)
    weights = folder / "adapter_model.safetensors"
    if case == "no config":
        (folder / "adapter_config.json").unlink()
    elif case == "not json":
        (folder / "adapter_config.json").write_text("{r: 8")
    elif case == "pickle only":
        weights.rename(folder / "adapter_model.bin")
    elif case == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif case == "garbage":
        weights.write_bytes(b"\xff" * 64)
    with pytest.raises(SlimgraphError) as caught:
        read_adapter(folder)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_shira_repeats_are_summed(tmp_path):
    tensors = {f"{MODULE}.shira_weight": np.array([1.0, 2.0, 4.0], np.float32),
               f"{MODULE}.shira_indices": np.array([[0, 5, 0], [3, 1, 3]], np.int32)}
    module = read_adapter(write_adapter(tmp_path / "s", {"peft_type": "SHIRA", "r": 1}, tensors)).modules[
        "encoder.layer.0.attention.self.query"]
    assert sorted(zip(module.rows.tolist(), module.cols.tolist(), module.values.tolist())) == [(0, 3, 5.0),
                                                                                             (5, 1, 2.0)]
