"""`slimgraph diff`, `bench` and `inspect --json` from the command line."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import onnx_ir as ir
import pytest

import slimgraph
from slimgraph.cli import main
from slimgraph.report import render_diff
from tests.cli.test_cli import run_cli
from tests.conftest import LIGHT_DIR, LIGHT_MODELS, assert_golden, render_text


def schema(name: str) -> dict:
    return json.loads(resources.files("slimgraph").joinpath(f"schemas/{name}.schema.json").read_text())


@pytest.fixture
def mlp_pair(tmp_path, mlp_path):
    out = tmp_path / "mlp-cleanup.onnx"
    assert main(["optimize", str(mlp_path), "-p", "cleanup", "-o", str(out), "--json"]) == 0
    return mlp_path, out


def test_diff_exit_codes(mlp_pair, capsys):
    a, b = mlp_pair
    assert main(["diff", str(a), str(a)]) == 0
    assert "identical" in capsys.readouterr().out
    assert main(["diff", str(a), str(b)]) == 1
    assert "different" in capsys.readouterr().out


def test_diff_json_validates(mlp_pair, capsys):
    a, b = mlp_pair
    assert main(["diff", str(a), str(b), "--json", "--weights"]) == 1
    data = json.loads(capsys.readouterr().out)
    jsonschema.validate(data, schema("diff"))
    assert data["identical"] is False and data["summary"]["nodes"] == {"a": 9, "b": 6}


def test_diff_only_and_depth(mlp_pair, capsys):
    a, b = mlp_pair
    assert main(["diff", str(a), str(b), "--only", "added"]) == 1
    text = capsys.readouterr().out
    assert "removed  -" not in text and "rewired" not in text and "weights that differ" not in text
    assert main(["diff", str(a), str(b), "--depth", "0"]) == 1
    assert "op counts" not in capsys.readouterr().out


def test_diff_bad_input_exits_2(tmp_path, mlp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    result = run_cli("diff", str(mlp_path), str(bad))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    result = run_cli("diff", str(mlp_path), str(mlp_path), "--only", "moved")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_python_diff_api(minilm_onnx, mlp_path):
    result = slimgraph.diff(minilm_onnx, minilm_onnx, weights=True)
    assert result.identical and result.weights == []
    assert "slimgraph diff" in render_text(render_diff(result))
    assert json.loads(json.dumps(result.to_json()))["identical"]


def test_optimize_ends_with_the_change_view(tmp_path, mlp_path, capsys):
    assert main(["optimize", str(mlp_path), "-p", "cleanup", "-o", str(tmp_path / "o.onnx")]) == 0
    text = capsys.readouterr().out
    assert "changes made by cleanup" in text
    assert "relu_dup" in text and "removed" in text


def test_inspect_json_validates(minilm_onnx, capsys):
    for model in [minilm_onnx, *LIGHT_MODELS]:
        assert main(["inspect", str(model), "--json"]) == 0
        jsonschema.validate(json.loads(capsys.readouterr().out), schema("inspect"))


def test_inspect_golden(minilm_onnx):
    from slimgraph.report import render_summary

    assert_golden("inspect_minilm.txt", render_text(render_summary(slimgraph.inspect(minilm_onnx))))


def test_bench_two_models(tmp_path, mlp_path, capsys, monkeypatch):
    monkeypatch.setattr("slimgraph.bench.MORE_ROUNDS_SECONDS", 0)  # (microsecond timings never settle: 20 s a batch)
    copy = tmp_path / "copy.onnx"
    slimgraph.save(ir.load(mlp_path), copy)
    assert main(["bench", str(mlp_path), str(copy), "--batch", "1,2", "--runs", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [len(m["latency"]) for m in data["models"]] == [2, 2]
    first = data["models"][0]
    assert first["latency"][1]["batch"] == 2 and first["latency"][1]["p50_ms"] > 0
    assert first["peak_rss_mb"] > 0 and first["file_bytes"] == mlp_path.stat().st_size
    assert first["skipped"] == []
    assert set(data["ratios"]) >= {"file_bytes", "p50_batch1", "throughput_batch2"}
    assert main(["bench", str(mlp_path), str(copy), "--runs", "1", "--batch", "1"]) == 0
    text = capsys.readouterr().out
    assert "samples/s" in text and "latency p50, batch 1" in text and "file size" in text


def test_bench_times_a_file_with_external_data_as_it_lies(tmp_path, mlp_path, monkeypatch, capsys):
    """Its weights stay memory-mapped by ONNX Runtime: never copied into a session of our own."""
    from slimgraph.measure import evaluate

    external = tmp_path / "external.onnx"
    slimgraph.save(ir.load(mlp_path), external, external_data=True)
    assert (tmp_path / "external.onnx.data").is_file()

    def copied(*args, **kwargs):
        raise AssertionError("bench copied a model with external data")

    monkeypatch.setattr(evaluate, "make_session", copied)
    assert main(["bench", str(external), "--batch", "1", "--runs", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["models"][0]["latency"][0]["p50_ms"] > 0


def test_bench_marks_batches_a_fixed_batch_model_cannot_take(tmp_path, capsys):
    """The zoo CNNs take exactly 1×3×224×224: batch 2 must not get a (computed) figure."""
    model = LIGHT_DIR / "light_squeezenet.onnx"
    copy = tmp_path / "copy.onnx"
    slimgraph.save(ir.load(model), copy)
    assert main(["bench", str(model), str(copy), "--batch", "1,2", "--runs", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for entry in data["models"]:
        assert [lat["batch"] for lat in entry["latency"]] == [1]
        assert entry["skipped"] == [{"batch": 2, "reason": "light_squeezenet.onnx: input 'data_0' is fixed at batch 1 "
                                                          "(1×3×224×224); copy.onnx: input 'data_0' is fixed at batch 1 "
                                                          "(1×3×224×224)"}]
    assert not any("batch2" in key for key in data["ratios"])
    assert main(["bench", str(model), "--batch", "1,2", "--runs", "1"]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.split()[:1] == ["2"])
    assert row.split() == ["2", "not", "run"]  # no figure for what did not run
    assert "batch 2 not run: light_squeezenet.onnx: input 'data_0' is fixed at batch 1" in " ".join(text.split())
    result = run_cli("bench", str(model), "--batch", "4,8")
    assert result.returncode == 2 and "no batch size in --batch 4,8 can run" in result.stderr


def test_bench_bad_input():
    result = run_cli("bench", str(LIGHT_DIR / "light_squeezenet.onnx"), "--batch", "one")
    assert result.returncode == 2 and "--batch one" in result.stderr
    result = run_cli("bench", str(LIGHT_DIR / "light_squeezenet.onnx"), str(LIGHT_DIR / "light_resnet50.onnx"))
    assert result.returncode == 2 and "take different inputs" in result.stderr


@pytest.mark.slow
def test_bench_decodes_a_folder_and_benches_its_export(gpt2_folder, capsys):
    """A folder is exported first (here without a terminal: in this process, nothing drawn)."""
    assert main(["bench", str(gpt2_folder), "--new-tokens", "2", "--runs", "1", "--seq", "8", "--json"]) == 0
    [decoded] = json.loads(capsys.readouterr().out)["models"]
    assert decoded["name"] == str(gpt2_folder)
    assert main(["bench", str(gpt2_folder), "--runs", "1", "--batch", "1", "--seq", "8", "--json"]) == 0
    [timed] = json.loads(capsys.readouterr().out)["models"]
    assert timed["name"] == str(gpt2_folder) and timed["latency"][0]["p50_ms"] > 0
