"""The README's Python example runs as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_readme_python_example(tmp_path):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Python\n\n```python\n(.*?)```", text, re.S).group(1)
    result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("True")  # the saved model diffs identical to the source


def test_readme_command_line_synopsis_matches_the_parser():
    """Every flag the README's synopsis shows exists on that subcommand."""
    from slimgraph.cli import build_parser

    text = (ROOT / "README.md").read_text()
    synopsis = re.search(r"## Command line\n\n```\n(.*?)```", text, re.S).group(1)
    commands = build_parser().commands
    for entry in re.split(r"\n(?=slimgraph )", synopsis.strip()):
        command = entry.split()[1]
        known = set(commands[command]._option_string_actions)
        flags = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", entry))
        assert flags and flags <= known, (command, flags - known)


def test_readme_plugin_example_runs(tmp_path):
    """The plugin command of "Writing a pass", on a model-zoo CNN."""
    from tests.conftest import LIGHT_DIR

    text = (ROOT / "README.md").read_text()
    command = re.search(r"`(slimgraph optimize m\.onnx --plugin [^`]*)`", text).group(1).split()
    command[2] = str(LIGHT_DIR / "light_squeezenet.onnx")
    command[-1] = str(tmp_path / "out.onnx")
    command[command.index("--plugin") + 1] = str(ROOT / command[command.index("--plugin") + 1])
    result = subprocess.run([str(Path(sys.executable).parent / "slimgraph"), *command[1:]], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Dropout nodes removed: 1" in result.stdout


def test_readme_pass_example_runs_exactly():
    """The pass of "Writing a pass", as written, on a Gelu: verified exact by the pipeline."""
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from slimgraph.passes import Pipeline

    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Writing a pass\n.*?```python\n(.*?)```", text, re.S).group(1)
    exec(compile(block, "README.md", "exec"), {"__name__": "readme_pass"})
    graph = helper.make_graph([helper.make_node("Gelu", ["x"], ["y"], name="gelu0")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    report = Pipeline.parse("decompose-gelu").run(model)
    assert report.records[0].stats == {"Gelu nodes decomposed": 1}
    assert "Gelu" not in [node.op_type for node in model.graph]
