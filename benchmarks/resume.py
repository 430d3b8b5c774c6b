"""An interrupted block-wise GPTQ resumes and writes the same file: SmolLM2-135M through the CLI.

    slimgraph optimize SMOLLM2.gguf -p 'quantize-weights{method=gptq,blockwise=true}' -o whole.onnx
    slimgraph optimize SMOLLM2.gguf -p ... -o resumed.onnx --resume    # SIGINT once --at blocks are done
    slimgraph optimize SMOLLM2.gguf -p ... -o resumed.onnx --resume    # goes on from the checkpoint

Printed: each run's wall time and exit code, the steps the checkpoint held when the run was
interrupted, the resumed run's `resumed` line, whether the two files are byte-identical, and the
fidelity (logit cosine on the verification inputs) of block-wise GPTQ against GPTQ on the float
model's activations (`--compare`).

    .venv/bin/python benchmarks/resume.py [--at 6] [--compare] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PIPELINE = "quantize-weights{method=gptq,blockwise=true}"


def optimize(model: str, pipeline: str, output: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "slimgraph", "optimize", model, "-p", pipeline, "-o", str(output),
                             "--json", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def finish(process: subprocess.Popen, started: float) -> tuple[int, float, dict]:
    out, err = process.communicate()
    report = json.loads(out) if out.strip().startswith("{") else {"error": err.strip()}
    return process.returncode, time.perf_counter() - started, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--at", type=int, default=6, help="interrupt once this many steps are checkpointed")
    parser.add_argument("--compare", action="store_true", help="also run GPTQ without blockwise=true")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    from slimgraph.zoo import smollm2

    model = str(smollm2.gguf_file())
    work = args.work or Path(tempfile.mkdtemp(prefix="slimgraph-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    whole, resumed = work / "whole.onnx", work / "resumed.onnx"

    started = time.perf_counter()
    code, seconds, report = finish(optimize(model, PIPELINE, whole), started)
    print(f"uninterrupted: exit {code}, {seconds:.0f} s, cosine {report['fidelity']['cosine']:.4f}")

    started = time.perf_counter()
    process = optimize(model, PIPELINE, resumed, "--resume")
    progress = None
    while process.poll() is None:
        found = list(work.glob("resumed.onnx.resume/*/progress.json"))
        try:
            progress = json.loads(found[0].read_text()) if found else None
        except ValueError:  # (being replaced)
            progress = None
        if progress and progress["done"] >= args.at:
            process.send_signal(signal.SIGINT)
            break
        time.sleep(0.2)
    code, seconds, _ = finish(process, started)
    print(f"interrupted:   exit {code}, {seconds:.0f} s, {progress['done'] if progress else 0} steps checkpointed")

    started = time.perf_counter()
    code, seconds, report = finish(optimize(model, PIPELINE, resumed, "--resume"), started)
    print(f"resumed:       exit {code}, {seconds:.0f} s, resumed: {report['passes'][0]['stats'].get('resumed')}")
    same = whole.read_bytes() == resumed.read_bytes()
    print(f"byte-identical: {same}; checkpoint left: {any(work.glob('resumed.onnx.resume'))}")
    if args.compare:
        started = time.perf_counter()
        code, seconds, report = finish(optimize(model, "quantize-weights{method=gptq}", work / "float-acts.onnx"),
                                       started)
        print(f"gptq on the float model's activations: exit {code}, {seconds:.0f} s, "
              f"cosine {report['fidelity']['cosine']:.4f}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
