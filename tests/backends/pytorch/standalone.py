"""Running a saved model.py in a fresh interpreter, as a user without slimgraph would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_standalone(folder: Path, body: str) -> str:
    """Run `body` after `from model import load` in `folder`; fail if it errs or imports more
    than torch (and numpy/safetensors). Returns what it printed."""
    code = (
        "import sys, numpy as np, torch\n"
        f"sys.path.insert(0, {str(folder)!r})\n"
        "from model import load\n"
        f"{body}\n"
        "assert not {'slimgraph', 'onnx', 'onnx_ir', 'onnxruntime'} & set(sys.modules), 'imported more than torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout
