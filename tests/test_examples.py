"""The scripts a user copies must run."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_compose_example(tmp_path):
    out = tmp_path / "minilm.onnx"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "compose.py"), str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "fold-constants" in result.stdout and "last_hidden_state (4, 12, 384)" in result.stdout
    assert out.is_file()
