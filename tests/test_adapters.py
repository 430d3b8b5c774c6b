"""`slimgraph.adapters` and the command line with PEFT adapters: merge a real adapter into MiniLM's ONNX
file with `slimgraph optimize`, and bad adapters refused with one line, exit 2 and nothing written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import slimgraph
import slimgraph.adapters
from slimgraph.cli import main
from slimgraph.errors import SlimgraphError
from tests.conftest import SENTENCES, copy_model
from tests.passes.adapters.peft_adapters import Made, relative, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapters(minilm_path, tmp_path_factory) -> dict[str, Made]:
    pytest.importorskip("peft", reason="the dev extra installs peft")
    from peft import LoraConfig, ShiraConfig
    from transformers import AutoModel, AutoTokenizer

    batch = dict(AutoTokenizer.from_pretrained(minilm_path)(SENTENCES[4:8], padding=True, return_tensors="pt"))
    root = tmp_path_factory.mktemp("adapters")
    configs = {"lora": LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]),
               "shira": ShiraConfig(r=2, target_modules=["key"], random_seed=0)}
    return {kind: train(AutoModel.from_pretrained(minilm_path), config, batch, root / kind)
            for kind, config in configs.items()}


def test_optimize_merges_an_adapter_folder(tmp_path, minilm_onnx, adapters, capsys):
    made = adapters["lora"]
    before = minilm_onnx.read_bytes()
    out = tmp_path / "merged.onnx"
    code = main(["optimize", str(minilm_onnx), "-p", f"merge-lora{{adapter={made.path}}}", "-o", str(out), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    stats = report["passes"][0]["stats"]
    assert stats["modules fused"] == "12 (12 by module path)"
    assert stats["fused into"] == "encoder.layer.0–5.attention.self.query ×6, encoder.layer.0–5.attention.self.value ×6"
    assert minilm_onnx.read_bytes() == before
    merged = slimgraph.compile(slimgraph.load(out))(**made.feeds)["last_hidden_state"]
    assert relative(merged, made.merged) <= 1e-5 and relative(made.merged, made.base) > 1e-3


@pytest.mark.parametrize("case, message", [
    ("no config", "has no adapter_config.json"),
    ("unsupported", "peft_type 'PREFIX_TUNING' is not supported (supported: LORA, SHIRA)"),
    ("truncated", "adapter_model.safetensors is truncated"),
    ("rank", "rank mismatch: adapter_config.json gives r=16"),
    ("kind", "is a SHIRA adapter: merge it with merge-shira, not merge-lora"),
])
def test_bad_adapters_exit_2_and_write_nothing(tmp_path, minilm_onnx, adapters, capsys, case, message):
    folder = tmp_path / "adapter"
    shutil.copytree(adapters["shira" if case == "kind" else "lora"].path, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = folder / "adapter_model.safetensors"
    if case == "no config":
        (folder / "adapter_config.json").unlink()
    elif case == "unsupported":
        (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "PREFIX_TUNING"}))
    elif case == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif case == "rank":
        (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(minilm_onnx), "-p", f"merge-lora{{adapter={folder}}}", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".slimgraph-*"))


def test_adapter_for_another_model_exits_2(tmp_path, mlp_path, adapters, capsys):
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(mlp_path), "-p", f"merge-shira{{adapter={adapters['shira'].path}}}",
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "module 'encoder.layer.0.attention.self.key' matches no linear of this model" in err
    assert not out.exists()


def test_passes_lists_the_options(capsys):
    assert main(["passes", "merge-lora"]) == 0
    printed = capsys.readouterr().out
    assert "W += s·B·A" in printed and "adapter" in printed and "weights" in printed and "base" in printed


def test_python_api(minilm, adapters):
    lora, shira = adapters["lora"], adapters["shira"]
    assert repr(slimgraph.adapters.read(lora.path).describe()) == "'LoRA r=4 on 12 modules'"
    matches = slimgraph.adapters.match(minilm, shira.path)
    assert [t.name for t in matches.targets] == [f"encoder.layer.{i}.attention.self.key" for i in range(6)]
    assert matches.checked == 6
    record = slimgraph.adapters.merge(copy_model(minilm), shira.path)
    assert record.name == "merge-shira" and record.fidelity.max_rel_error > 1e-3
    artifact = slimgraph.adapters.compile_with_adapters(minilm, {"lora": lora.path, "shira": shira.path},
                                                        backend="pytorch", active="lora")
    assert artifact.active_adapter == "lora"
    assert relative(artifact(**lora.feeds)["last_hidden_state"], lora.merged) <= 1e-5
    artifact.set_adapter("shira")
    assert relative(artifact(**shira.feeds)["last_hidden_state"], shira.merged) <= 1e-5
    with pytest.raises(SlimgraphError, match="no adapter named 'dora' is loaded"):
        artifact.set_adapter("dora")
    assert np.isfinite(artifact(**lora.feeds)["last_hidden_state"]).all()
