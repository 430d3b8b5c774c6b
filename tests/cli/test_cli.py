"""The `slimgraph` command: optimize, inspect, passes; exit codes and clean errors."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import slimgraph
from slimgraph.cli import main
from slimgraph.measure.inputs import sample_inputs
from tests.conftest import LIGHT_MODELS


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "slimgraph.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def test_target_chooses_the_int8_format_and_the_report_names_it(tmp_path, mlp_path, capsys):
    out = tmp_path / "quantized.onnx"
    assert main(["optimize", str(mlp_path), "-p", "quantize-dynamic", "--target", "cpu-avx2", "-o", str(out),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["target"] == "cpu-avx2 (avx2)" and report["passes"][0]["stats"]["weights"] == "s8-reduced per channel"
    codes = [v.const_value.numpy() for v in slimgraph.load(out).graph.initializers.values() if v.name.endswith(".int8")]
    assert codes and max(int(abs(c).max()) for c in codes) == 63
    assert main(["optimize", str(mlp_path), "-p", "cleanup", "-o", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["target"] is None  # no pass read it
    assert main(["optimize", str(mlp_path), "-p", "cleanup", "--target", "tpu", "-o", str(out)]) == 2
    assert "--target" in capsys.readouterr().err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_optimize_mlp(tmp_path, mlp_path, capsys):
    before = digest(mlp_path)
    out = tmp_path / "out" / "mlp.onnx"
    assert main(["optimize", str(mlp_path), "-p", "cleanup", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "slimgraph optimize" in printed and "cleanup" in printed and "exact" in printed
    assert digest(mlp_path) == before
    original, optimized = slimgraph.load(mlp_path), slimgraph.load(out)
    assert len(optimized.graph) < len(original.graph)
    feeds = sample_inputs(original)
    np.testing.assert_allclose(slimgraph.compile(optimized)(**feeds)["y"], slimgraph.compile(original)(**feeds)["y"],
                               rtol=1e-5, atol=1e-6)


def test_optimize_json(tmp_path, mlp_path, capsys):
    out = tmp_path / "optimized.onnx"
    assert main(["optimize", str(mlp_path), "-p", "cleanup,remove-dead-nodes", "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pipeline"] == "cleanup,remove-dead-nodes"
    assert report["output"] == str(out)
    assert report["after"]["nodes"] < report["before"]["nodes"]
    assert [p["name"] for p in report["passes"]] == ["cleanup", "remove-dead-nodes"]
    assert report["passes"][0]["fidelity"]["max_rel_error"] <= 1e-5
    assert any(c["kind"] == "removed" for c in report["passes"][0]["changes"]["nodes"])
    assert report["process"]["peak_rss_bytes"] > 10_000_000  # (python and onnxruntime alone take more)
    assert report["process"]["written_bytes"] >= out.stat().st_size
    assert main(["optimize", str(mlp_path), "-p", "cleanup", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"peak memory +[\d.]+ [KMG]?B RSS", text) and re.search(r"disk I/O +[\d.]+ [KMG]?B read", text)


def test_optimize_minilm_cleanup(tmp_path, minilm_onnx, capsys):
    before = digest(minilm_onnx)
    out = tmp_path / "minilm.onnx"
    assert main(["optimize", str(minilm_onnx), "-p", "cleanup", "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passes"][0]["fidelity"]["max_rel_error"] <= 1e-5
    assert report["after"]["nodes"] <= report["before"]["nodes"]
    assert digest(minilm_onnx) == before


def test_recipe_and_budget(tmp_path, mlp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pipeline:\n  - cleanup\nmax_drop: 0.0\n")
    assert main(["optimize", str(mlp_path), "--recipe", str(recipe), "-o", str(tmp_path / "a.onnx")]) == 0


def test_npz_calibration(tmp_path, mlp_path, capsys):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.ones((3, 8), np.float32))
    assert main(["optimize", str(mlp_path), "-p", "cleanup", "-o", str(tmp_path / "a.onnx"), "--calib", str(calib),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"] == "calib.npz (npz)"


@pytest.mark.slow
def test_text_calibration_with_tokenizer(tmp_path, minilm_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("first sentence\nsecond one, a little longer\n\nthird\n")
    assert main(["optimize", str(minilm_path), "-p", "cleanup", "-o", str(tmp_path / "m.onnx"), "--calib", str(calib),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"] == "calib.txt: 3 samples"


def bad_files(tmp_path: Path, mlp_path: Path) -> dict[str, Path]:
    data = mlp_path.read_bytes()
    files = {
        "truncated": (tmp_path / "truncated.onnx", data[: len(data) // 2]),
        "random": (tmp_path / "random.onnx", np.random.default_rng(0).bytes(4096)),
        "empty": (tmp_path / "empty.onnx", b""),
    }
    for path, content in files.values():
        path.write_bytes(content)
    (tmp_path / "no_config").mkdir()
    return {k: v[0] for k, v in files.items()} | {"folder": tmp_path / "no_config"}


@pytest.mark.parametrize(
    "case, args, message",
    [
        ("truncated", ["-p", "cleanup"], "not a valid ONNX model"),
        ("random", ["-p", "cleanup"], "not a valid ONNX model"),
        ("empty", ["-p", "cleanup"], "is empty"),
        ("folder", ["-p", "cleanup"], "no config.json"),
        ("mlp", ["-p", "clenaup"], "did you mean 'cleanup'"),
        ("mlp", ["-p", "cleanup{max_rounds=zero}"], "max_rounds=zero is not a valid int"),
        ("mlp", ["-p", "cleanup{max_rounds=0}"], "max_rounds must be >= 1"),
        ("mlp", ["-p", "cleanup", "--max-drop", "lots"], "invalid float value"),
        ("mlp", ["-p", "cleanup", "--backend", "tvm"], "invalid choice"),
        ("mlp", [], "one of the arguments -p/--pipeline --recipe --goal is required"),
        ("mlp", ["-p", "cleanup", "--calib", "missing.npz"], "no such calibration file"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, mlp_path, case, args, message):
    model = mlp_path if case == "mlp" else bad_files(tmp_path, mlp_path)[case]
    before = digest(model) if model.is_file() else None
    out = tmp_path / "out.onnx"
    result = run_cli("optimize", str(model), *args, "-o", str(out))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0] and "Traceback" not in result.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".slimgraph")] == []
    if before:
        assert digest(model) == before


def test_debug_shows_the_traceback(tmp_path, mlp_path):
    bad = bad_files(tmp_path, mlp_path)["random"]
    result = run_cli("optimize", str(bad), "-p", "cleanup", "-o", str(tmp_path / "o.onnx"), "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_refuses_to_overwrite_the_input(mlp_path):
    before = digest(mlp_path)
    result = run_cli("optimize", str(mlp_path), "-p", "cleanup", "-o", str(mlp_path))
    assert result.returncode == 2 and "overwrite the input" in result.stderr
    assert digest(mlp_path) == before


def test_budget_exceeded_exits_1_without_output(tmp_path, mlp_path):
    code = (
        "import sys, onnx_ir as ir\n"
        "from tests.passes.test_pipeline import _Noise\n"
        "from slimgraph.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "o.onnx"
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code, "optimize", str(mlp_path), "-p", "test-noise{scale=0.2}",
                             "--max-drop", "0.0001", "-o", str(out)], capture_output=True, text=True, cwd=root)
    assert result.returncode == 1, result.stderr
    assert "fidelity budget exceeded after pass 'test-noise'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_inspect_minilm(minilm_onnx, capsys):
    assert main(["inspect", str(minilm_onnx)]) == 0
    text = capsys.readouterr().out
    assert "6 'encoder.layer' (from name scopes)" in text
    assert "6 × 12 heads × 32" in text
    assert "6 × 384→1536→384 gelu" in text
    assert "embeddings.word_embeddings: 30522 × 384" in text


def test_inspect_json(minilm_onnx, capsys):
    assert main(["inspect", str(minilm_onnx), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    blocks = data["structures"]["blocks"]
    assert {k: blocks[k] for k in ("prefix", "count", "source")} == {
        "prefix": "encoder.layer", "count": 6, "source": "name scopes"}
    assert [b["name"] for b in blocks["boundaries"]] == [f"encoder.layer.{i}" for i in range(6)]
    assert data["structures"]["vocab_size"] == 30522
    groups = data["structures"]["groups"]
    assert [(g["kind"], g["size"]) for g in groups] == [("ffn", 1536)] * 6 + [("heads", 12)] * 6
    assert {t["role"] for t in groups[0]["tensors"]} == {"producer", "consumer"}
    assert data["largest_tensors"][0]["name"] == "embeddings.word_embeddings.weight"


@pytest.mark.parametrize("model", LIGHT_MODELS, ids=lambda p: p.stem)
def test_inspect_model_zoo(model, capsys):
    assert main(["inspect", str(model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stats"]["nodes"] > 0


def test_passes_list_and_detail(capsys):
    assert main(["passes"]) == 0
    listing = capsys.readouterr().out
    for name in ("cleanup", "fold-constants", "remove-dead-nodes", "remove-identity", "cse",
                 "remove-unused-initializers"):
        assert name in listing
    assert main(["passes", "cleanup"]) == 0
    detail = capsys.readouterr().out
    assert "cleanup (exact)" in detail and "max_rounds: int = 4" in detail
    assert main(["passes", "cleanup", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["options"][1] == {"name": "max_rounds", "type": "int", "default": "4"}


def test_ternarize_help_says_it_needs_qat(capsys):
    assert main(["passes", "ternarize"]) == 0
    text = capsys.readouterr().out
    assert "post-training approximations of methods that need quantization-aware training" in " ".join(text.split())


def test_unknown_pass_detail():
    result = run_cli("passes", "fold-constant")
    assert result.returncode == 2 and "did you mean 'fold-constants'" in result.stderr


def test_import_and_help_do_not_import_torch():
    code = (
        "import sys, slimgraph\n"
        "from slimgraph import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'triton') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_console_script_help():
    result = subprocess.run([str(Path(sys.executable).parent / "slimgraph"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "optimize" in result.stdout


def test_quantize_cli_warning_and_bad_bits(tmp_path):
    from onnx import TensorProto, helper, save

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "relu.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    out = tmp_path / "out.onnx"
    result = run_cli("optimize", str(path), "-p", "quantize-weights", "-o", str(out))
    assert result.returncode == 0
    assert "slimgraph: warning: quantize-weights: nothing to quantize" in result.stderr
    assert out.is_file()
    result = run_cli("optimize", str(path), "-p", "quantize-weights{bits=3}", "-o", str(tmp_path / "o2.onnx"))
    assert result.returncode == 2 and "bits=3 is not a valid 2|4|8" in result.stderr


@pytest.mark.slow
def test_recipe_with_calibration_file(tmp_path, minilm_path, capsys):
    (tmp_path / "calib.txt").write_text("one sentence\nand another one\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pipeline: [cleanup]\ncalib: calib.txt\n")
    assert main(["optimize", str(minilm_path), "--recipe", str(recipe), "-o", str(tmp_path / "m.onnx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"] == "calib.txt: 2 samples"


def test_cache_shows_what_it_holds_and_clears(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLIMGRAPH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "exports" / "abc").mkdir(parents=True)
    (tmp_path / "cache" / "exports" / "abc" / "model.onnx").write_bytes(b"x" * 3000)
    assert main(["cache", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["folders"] == {"exports": {"entries": 1, "bytes": 3000}}
    assert main(["cache", "clear"]) == 0
    assert "3.0 KB freed" in capsys.readouterr().out
    assert main(["cache"]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'cache'}: 0 B")
