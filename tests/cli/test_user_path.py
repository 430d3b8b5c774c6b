"""The spine as a user meets it (issue 17): right verdicts, checks before work, output, plugins.

CLI tests run the real MiniLM (exported once per session) and the onnx model-zoo CNNs.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import slimgraph
from slimgraph.cli import main
from tests.cli.test_cli import digest, run_cli
from tests.conftest import LIGHT_DIR, copy_model

ROOT = Path(__file__).resolve().parents[2]
SQUEEZENET = LIGHT_DIR / "light_squeezenet.onnx"


def flat(text: str) -> str:
    """Rendered text as one line of words: box borders gone, so a wrapped cell reads on."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


# --- wrong verdicts -----------------------------------------------------------------------


@pytest.mark.parametrize("exact", ["cleanup", "remove-identity", "cse"])
def test_exact_pass_after_quantization_is_not_blamed(tmp_path, minilm_onnx, capsys, exact):
    out = tmp_path / "q.onnx"
    assert main(["optimize", str(minilm_onnx), "-p", f"quantize-weights{{bits=8,accuracy_level=4}},{exact}",
                 "-o", str(out), "--json"]) == 0
    quantize, after = json.loads(capsys.readouterr().out)["passes"]
    assert after["exact_check"]["max_rel_error"] <= 1e-4  # against the quantized outputs
    assert after["fidelity"]["cosine"] == pytest.approx(quantize["fidelity"]["cosine"], abs=1e-4)
    assert quantize["fidelity"]["cosine"] > 0.99 and out.is_file()


def test_diff_sees_changed_weights_without_the_flag(tmp_path, minilm_onnx, capsys):
    model = slimgraph.load(minilm_onnx)
    for name in ("encoder.layer.1.output.dense.weight", "encoder.layer.4.attention.self.key.weight"):
        value = model.graph.initializers[name]
        value.const_value = ir.tensor(value.const_value.numpy() * 1.01, name=name)
    scaled = tmp_path / "scaled.onnx"
    slimgraph.save(model, scaled)
    assert main(["diff", str(minilm_onnx), str(scaled)]) == 1
    text = flat(capsys.readouterr().out)
    assert "differ in 2 tensors (2 changed); --weights for the relative L2 of each" in text
    assert "identical" not in text
    assert main(["diff", str(minilm_onnx), str(scaled), "--weights", "--json"]) == 1
    weights = json.loads(capsys.readouterr().out)["weights"]
    assert [round(w["rel_l2"], 4) for w in weights] == [0.01, 0.01]


def test_diff_of_quantized_model_is_never_identical(tmp_path, minilm_onnx, capsys):
    out = tmp_path / "int8.onnx"
    assert main(["optimize", str(minilm_onnx), "-p", "quantize-weights{bits=8,accuracy_level=4}", "-o", str(out),
                 "--json"]) == 0
    capsys.readouterr()
    assert main(["diff", str(minilm_onnx), str(out), "--only", "changed"]) == 1
    text = flat(capsys.readouterr().out)
    assert "37 replaced" in text and "verdict different" in text
    assert main(["diff", str(minilm_onnx), str(out), "--weights"]) == 1
    text = flat(capsys.readouterr().out)
    assert "weights differ in 37 tensors (37 replaced)" in text and "equal" not in text


def test_no_verify_with_a_budget_is_refused(tmp_path, mlp_path):
    out = tmp_path / "o.onnx"
    line = one_error_line(run_cli("optimize", str(mlp_path), "-p", "cleanup", "--no-verify", "--max-drop", "0.01",
                                  "-o", str(out)))
    assert "--no-verify and --max-drop cannot go together" in line and not out.exists()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pipeline: [cleanup]\nmax_drop: 0.01\n")
    line = one_error_line(run_cli("optimize", str(mlp_path), "--recipe", str(recipe), "--no-verify", "-o", str(out)))
    assert f"--no-verify and max_drop in {recipe} cannot go together" in line


def test_low_fidelity_warns_loudly(tmp_path, minilm_onnx):
    out = tmp_path / "int2.onnx"
    result = run_cli("optimize", str(minilm_onnx), "-p", "quantize-weights{bits=2,accuracy_level=4}", "-o", str(out))
    assert result.returncode == 0 and out.is_file()
    assert "slimgraph: warning: LOW FIDELITY after 'quantize-weights{bits=2,accuracy_level=4}'" in result.stderr
    assert "below 0.9" in result.stderr


# --- checks before work -------------------------------------------------------------------


def test_output_under_a_file_is_refused(tmp_path, mlp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    line = one_error_line(run_cli("optimize", str(mlp_path), "-p", "cleanup", "-o", str(blocker / "x.onnx")))
    assert f"{blocker} is a file, not a folder" in line


def test_output_that_is_a_folder_is_refused_before_loading(tmp_path, minilm_path):
    folder = tmp_path / "dir.onnx"
    folder.mkdir()
    line = one_error_line(run_cli("optimize", str(minilm_path), "-p", "quantize-weights{method=awq}",
                                  "-o", str(folder)))
    assert f"{folder} is a folder; give a file name" in line


def test_an_output_folder_that_takes_no_files_is_refused_before_work(tmp_path, minilm_path):
    out = Path("/proc/slimgraph-test.onnx")  # a folder nobody can create files in, root included
    line = one_error_line(run_cli("optimize", str(minilm_path), "-p", "quantize-weights{method=awq}", "-o", str(out)))
    assert line.startswith("slimgraph: error: cannot write /proc/slimgraph-test.onnx: /proc takes no new files")


def test_calibration_is_checked_before_the_export(tmp_path, minilm_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    out = tmp_path / "m.onnx"
    line = one_error_line(run_cli("optimize", str(minilm_path), "-p", "cleanup", "--calib", str(empty), "-o", str(out)))
    assert f"calibration file {empty} has no samples" in line
    garbage = tmp_path / "random.npz"
    garbage.write_bytes(np.random.default_rng(0).bytes(2048))
    line = one_error_line(run_cli("optimize", str(minilm_path), "-p", "cleanup", "--calib", str(garbage),
                                  "-o", str(out)))
    assert "is not a .npz file (not a zip of arrays" in line and "allow_pickle" not in line


def test_calibration_arrays_are_checked_against_the_inputs(tmp_path, mlp_path, minilm_onnx):
    out = tmp_path / "o.onnx"
    ids = {name: np.ones((2, 7), np.float32) for name in ("input_ids", "token_type_ids", "attention_mask")}
    np.savez(tmp_path / "floats.npz", **ids)
    line = one_error_line(run_cli("optimize", str(minilm_onnx), "-p", "cleanup", "--calib", str(tmp_path / "floats.npz"),
                                  "-o", str(out)))
    assert "floats.npz: input 'input_ids' is float32; the model takes int64" in line
    cases = {
        "text.npz": ({"x": np.full((3, 8), "a")}, "text.npz: input 'x' is <U1; the model takes float32"),
        "shape.npz": ({"x": np.ones((3, 5), np.float32)}, "shape.npz: input 'x' has shape 3×5; the model takes batch×8"),
        "names.npz": ({"y": np.ones((3, 8), np.float32)}, "names.npz lacks model inputs: x (has: y)"),
    }
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / name, **arrays)
        line = one_error_line(run_cli("optimize", str(mlp_path), "-p", "cleanup", "--calib", str(tmp_path / name),
                                      "-o", str(out)))
        assert message in line, line
    text = tmp_path / "lines.txt"
    text.write_text("a sentence\n")
    line = one_error_line(run_cli("optimize", str(mlp_path), "-p", "cleanup", "--calib", str(text), "-o", str(out)))
    assert f"needs a model with a tokenizer (a Hugging Face folder or a .gguf file), and {mlp_path} has none" in line
    np.savez(tmp_path / "wide.npz", x=np.ones((3, 8), np.float64))  # float64 is cast to the input's float32
    assert run_cli("optimize", str(mlp_path), "-p", "cleanup", "--calib", str(tmp_path / "wide.npz"),
                   "-o", str(out)).returncode == 0


def test_required_option_and_unreachable_budget(tmp_path, minilm_onnx):
    out = tmp_path / "o.onnx"
    line = one_error_line(run_cli("optimize", str(minilm_onnx), "-p", "mixed-precision", "-o", str(out)))
    assert "mixed-precision: option budget_mb is required (float), e.g. mixed-precision{budget_mb=...}" in line
    result = run_cli("optimize", str(minilm_onnx), "-p", "cleanup,mixed-precision{budget_mb=40}", "-o", str(out),
                     "--json")
    line = one_error_line(result)
    assert "budget_mb=40.0 is below the smallest reachable size 51.9 MB (layers at 2 bits)" in line
    assert json.loads(result.stdout) == {"error": line.removeprefix("slimgraph: error: "), "exit_code": 2}


def test_reachable_budget_check_matches_the_pass(minilm):
    """The up-front size is what the pass itself computes after quantizing every layer."""
    from slimgraph.ir.nbits import quantize_rtn
    from slimgraph.passes.quantize.mixed import MixedPrecision, _packed_nbytes

    rng = np.random.default_rng(0)
    for k, n, bits, group in [(384, 1536, 2, 32), (100, 7, 4, 16), (1536, 384, 8, 64), (33, 5, 2, 256)]:
        weight = rng.standard_normal((k, n)).astype(np.float32)
        assert _packed_nbytes(k, n, bits, group) == quantize_rtn(weight, bits, group, symmetric=False).nbytes()
    MixedPrecision(budget_mb=52).check(minilm)  # reachable: no error
    with pytest.raises(slimgraph.SlimgraphError, match="smallest reachable size 51.9 MB"):
        MixedPrecision(budget_mb=51.5).check(minilm)


def test_exclude_matching_nothing_is_refused(tmp_path, minilm_onnx):
    out = tmp_path / "o.onnx"
    line = one_error_line(run_cli("optimize", str(minilm_onnx), "-p", "quantize-weights{exclude=[lm_head]}",
                                  "-o", str(out)))
    assert "quantize-weights: exclude=lm_head matches no linear layer or embedding" in line and not out.exists()


def test_flag_typo_is_named(tmp_path, mlp_path):
    line = one_error_line(run_cli("optimize", str(mlp_path), "--pipline", "cleanup", "-o", str(tmp_path / "o.onnx")))
    assert "unknown option --pipline; did you mean --pipeline?" in line
    line = one_error_line(run_cli("diff", str(mlp_path), str(mlp_path), "--wieghts"))
    assert "did you mean --weights?" in line
    assert run_cli("optimize", str(mlp_path), "-pcleanup", "-o", str(tmp_path / "o.onnx")).returncode == 0


def test_yaml_error_has_line_and_column(tmp_path, mlp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pipeline:\n  - cleanup\n  - quantize-weights: {bits: 4\nmax_drop: 0.01\n")
    line = one_error_line(run_cli("optimize", str(mlp_path), "--recipe", str(recipe), "-o", str(tmp_path / "o.onnx")))
    assert "cannot be parsed: line 4, column 9:" in line


def test_broken_pipe_is_quiet():
    slimgraph_bin = Path(sys.executable).parent / "slimgraph"
    result = subprocess.run(["bash", "-c", f"set -o pipefail; {slimgraph_bin} passes --json | head -c 10"],
                            capture_output=True, text=True)
    assert result.stdout == "[\n  {\n    "[:10]
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


def test_json_on_failure(tmp_path, mlp_path):
    result = run_cli("inspect", str(tmp_path / "missing.onnx"), "--json")
    assert result.returncode == 2
    assert json.loads(result.stdout) == {"error": f"no such file or folder: {tmp_path / 'missing.onnx'}",
                                         "exit_code": 2}
    result = run_cli("optimize", str(mlp_path), "--json", "-o", str(tmp_path / "o.onnx"))
    assert json.loads(result.stdout)["error"].startswith("one of the arguments -p/--pipeline --recipe --goal is required")


# --- what the reports say -----------------------------------------------------------------


def test_report_legend_worst_output_and_shared_samples(tmp_path, minilm_onnx, capsys):
    out = tmp_path / "q.onnx"
    assert main(["optimize", str(minilm_onnx), "-p", "quantize-weights{method=gptq}", "-o", str(out)]) == 0
    text = flat(capsys.readouterr().out)
    assert "cos: cosine with the original's outputs (1 = same)" in text  # the legend
    assert "worst: pooler_output" in text or "worst: last_hidden_state" in text
    assert "calibrated on synthesized" in text
    assert "verified on synthesized (other samples than the passes ran on)" in text


@pytest.mark.slow
def test_text_calibration_is_held_out_for_verification(tmp_path, minilm_path, capsys):
    from tests.conftest import SENTENCES

    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(SENTENCES[:16]) + "\n")
    out = tmp_path / "m.onnx"
    assert main(["optimize", str(minilm_path), "-p", "quantize-weights{method=awq}", "--calib", str(calib),
                 "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["inputs"] == "calib.txt: 16 samples; the first 12 of 16 samples"
    assert report["verified_on"] == "calib.txt: 16 samples; the last 4 samples, held out from calibration"
    assert report["calibration_shared_with_verification"] is False
    assert report["passes"][0]["calibrated"] is True
    assert report["passes"][0]["size"]["bytes"]["after"] < report["passes"][0]["size"]["bytes"]["before"]
    # without --calib, the tokenizer's four sentences serve both: the report says so
    assert main(["optimize", str(minilm_path), "-p", "quantize-weights{method=awq}", "-o", str(out)]) == 0
    text = flat(capsys.readouterr().out)
    assert "the samples the passes calibrated on: the fidelity is optimistic" in text


def test_json_numbers_are_numbers(tmp_path, minilm_onnx, capsys):
    out = tmp_path / "q.onnx"
    assert main(["optimize", str(minilm_onnx), "-p", "quantize-weights", "-o", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)["passes"][0]
    size = record["size"]
    assert size["bytes"]["before"] == 90_855_557 and 0 < size["bytes"]["after"] < 60_000_000
    assert size["nodes"] == {"before": 288, "after": 252}


def test_inspect_names_runtime_built_weights_and_all_op_types(capsys):
    assert main(["inspect", str(LIGHT_DIR / "light_resnet50.onnx")]) == 0
    text = flat(capsys.readouterr().out)
    assert "239 tensors (25.6M values) are built at run time by ConstantOfShape" in text
    assert "linear layers 0 (weights built by ConstantOfShape are not seen; see the note)" in text
    assert main(["inspect", str(LIGHT_DIR / "light_inception_v2.onnx")]) == 0
    text = flat(capsys.readouterr().out)
    assert "+1 more 1" in text  # 13 op types: 12 shown, the last one counted
    assert main(["inspect", str(LIGHT_DIR / "light_resnet50.onnx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stats"]["generated_values"] == 25_608_360


def test_bench_refuses_a_pytorch_folder(tmp_path, mlp_path):
    folder = tmp_path / "pt"
    assert run_cli("optimize", str(mlp_path), "-p", "cleanup", "--backend", "pytorch", "-o", str(folder)).returncode == 0
    line = one_error_line(run_cli("bench", str(folder)))
    assert "is a PyTorch-backend folder (model.py + model.safetensors); bench measures ONNX Runtime" in line
    line = one_error_line(run_cli("inspect", str(folder)))
    assert "is a PyTorch-backend folder (model.py + model.safetensors), which slimgraph writes but does not read" in line
    modes = {name: stat.S_IMODE((folder / name).stat().st_mode) for name in ("model.py", "model.safetensors")}
    umask = os.umask(0)
    os.umask(umask)
    assert modes == {"model.py": 0o666 & ~umask, "model.safetensors": 0o666 & ~umask}


def test_mixed_precision_defaults_to_the_fast_kernel(tmp_path, mlp_path, capsys):
    assert main(["passes", "mixed-precision", "--json"]) == 0
    options = {o["name"]: o for o in json.loads(capsys.readouterr().out)["options"]}
    assert options["accuracy_level"] == {"name": "accuracy_level", "type": "0|4", "default": "4"}
    out = tmp_path / "mixed.onnx"
    assert main(["optimize", str(mlp_path), "-p", "mixed-precision{budget_mb=0.0005,group_size=16,measure=layer}",
                 "-o", str(out), "--json"]) == 0
    capsys.readouterr()
    levels = {n.attributes.get_int("accuracy_level", 0) for n in ir.load(out).graph if n.op_type == "MatMulNBits"}
    assert levels == {4}


# --- the Python API -----------------------------------------------------------------------


def test_dir_shows_the_api():
    assert {"load", "save", "inspect", "diff", "compile", "Pipeline", "Recipe", "__version__"} <= set(dir(slimgraph))
    assert "importlib" not in dir(slimgraph)


def test_pipeline_run_with_budget_and_calibration(tmp_path, minilm, minilm_path):
    from tests.conftest import SENTENCES

    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(SENTENCES[:8]) + "\n")
    model = copy_model(minilm)
    report = slimgraph.Pipeline("quantize-weights{method=awq}").run(model, max_drop=0.05, calib=calib)
    assert report.records[0].calibrated and report.verify_source.endswith("held out from calibration")
    with pytest.raises(slimgraph.FidelityError, match=r"> max_drop 1e-06"):
        slimgraph.Pipeline("quantize-weights").run(copy_model(minilm), max_drop=1e-6)


def test_reprs_summarize(minilm_onnx):
    summary = slimgraph.inspect(minilm_onnx)
    assert repr(summary) == ("<ModelSummary 22.7M parameters (90.9 MB), 288 nodes, 6 blocks 'encoder.layer', "
                             "37 linear layers, 6 attention (12 heads × 32), 6 FFNs, 3 embeddings>")
    artifact = slimgraph.compile(slimgraph.load(minilm_onnx))
    assert repr(artifact) == ("<OnnxRuntimeArtifact (input_ids, token_type_ids, attention_mask) → (last_hidden_state, "
                              "pooler_output): 288 nodes, 90.9 MB of weights>")
    assert repr(slimgraph.diff(minilm_onnx, minilm_onnx)).startswith(f"<DiffResult {minilm_onnx} → {minilm_onnx}: "
                                                                       "identical;")


def test_docstrings():
    for name in ("compile", "diff", "inspect", "load"):
        assert len((getattr(slimgraph, name).__doc__ or "").strip()) > 40, name
    assert "pass{option=value" in slimgraph.Pipeline.parse.__doc__


# --- plugins ------------------------------------------------------------------------------


def test_plugin_pass_from_a_file(tmp_path, capsys):
    plugin = ROOT / "examples" / "remove_dropout.py"
    out = tmp_path / "squeezenet.onnx"
    before = digest(SQUEEZENET)
    assert main(["optimize", str(SQUEEZENET), "--plugin", str(plugin), "-p", "remove-dropout,cleanup",
                 "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passes"][0]["stats"] == {"Dropout nodes removed": 1}
    assert report["passes"][0]["exact_check"]["max_rel_error"] <= 1e-5
    assert digest(SQUEEZENET) == before
    assert not any(n.op_type == "Dropout" for n in ir.load(out).graph)
    line = one_error_line(run_cli("optimize", str(SQUEEZENET), "-p", "remove-dropout", "-o", str(out)))
    assert "unknown pass 'remove-dropout'" in line  # without --plugin it is not known


def test_plugin_pass_from_an_entry_point(tmp_path):
    package = tmp_path / "site"
    (package / "slimgraph_fake_plugin").mkdir(parents=True)
    (package / "slimgraph_fake_plugin" / "__init__.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from typing import ClassVar
        from slimgraph.passes import Pass, PassResult, register_pass

        @register_pass
        @dataclass(frozen=True, kw_only=True)
        class Nothing(Pass):
            """Changes nothing (an entry-point plugin)."""
            name: ClassVar[str] = "fake-nothing"

            def run(self, model, ctx):
                return PassResult(False)
    '''))
    dist = package / "slimgraph_fake_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: slimgraph-fake-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[slimgraph.passes]\nfake-nothing = slimgraph_fake_plugin\n")
    env = {**os.environ, "PYTHONPATH": f"{package}{os.pathsep}{ROOT}"}
    result = subprocess.run([sys.executable, "-m", "slimgraph.cli", "passes"], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "fake-nothing" in result.stdout
    result = subprocess.run([sys.executable, "-m", "slimgraph.cli", "passes", "fake-nothing"], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0 and "fake-nothing (exact): Changes nothing (an entry-point plugin)." in result.stdout
