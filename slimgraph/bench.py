"""`slimgraph bench`: ONNX Runtime latency, throughput, peak memory and file size.

With two models, runs alternate (A, B, B, A, …) on the same inputs so that machine noise
hits both alike; ratios are B / A. Peak memory is measured in a child process per model
(session + one run at the largest batch) minus a child that only imports onnxruntime,
because two sessions in one process cannot be told apart.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir import evaluate
from slimgraph.ir.inputs import sample_inputs


@dataclass(frozen=True)
class Latency:
    batch: int
    p50_ms: float
    p90_ms: float
    throughput: float  # samples per second at p50


@dataclass
class BenchResult:
    name: str
    file_bytes: int
    peak_rss_mb: float | None
    latency: list[Latency] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def model_file_bytes(path: Path) -> int:
    """The .onnx file plus the external data files it references."""
    total = path.stat().st_size
    model = ir.load(path)
    locations = {
        v.const_value.location for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)
    }
    return total + sum((path.parent / loc).stat().st_size for loc in locations)


# The child reports VmHWM (peak RSS of its own address space): ru_maxrss would carry the
# parent's peak across fork + exec on Linux.
_CHILD = """
import re, resource, sys, numpy as np, onnxruntime as ort
if sys.argv[1] != "-":
    options = ort.SessionOptions(); options.log_severity_level = 3
    session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
    with np.load(sys.argv[2]) as data:
        session.run(None, {k: data[k] for k in data.files})
try:
    print(int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024)
except OSError:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak_rss_mb(path: Path, feeds: dict[str, np.ndarray]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "feeds.npz"
        np.savez(npz, **feeds)
        runs = []
        for target in (str(path), "-"):
            out = subprocess.run([sys.executable, "-c", _CHILD, target, str(npz)], capture_output=True, text=True)
            if out.returncode != 0:
                raise SlimgraphError(f"measuring memory of {path.name} failed: {out.stderr.strip().splitlines()[-1]}")
            runs.append(float(out.stdout.strip()))
    return runs[0] - runs[1]


def alternating_runs(contenders: dict[Any, Callable[[], object]], runs: int, warmup: int = 1
                     ) -> dict[Any, list[float]]:
    """Seconds of each run of each contender. After `warmup` calls each, the contenders run in
    turn, the order reversed every other round, so that machine drift hits them alike."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[Any, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(runs):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    return times


def bench(
    paths: list[Path],
    *,
    batches: tuple[int, ...] = (1, 8),
    sequence: int = 128,
    runs: int = 30,
    warmup: int = 3,
    threads: int | None = None,
    memory: bool = True,
) -> list[BenchResult]:
    from slimgraph.frontend import load

    if not 1 <= len(paths) <= 2:
        raise SlimgraphError("bench takes one model, or two to compare")
    if runs < 1 or warmup < 0 or any(b < 1 for b in batches) or sequence < 1:
        raise SlimgraphError("runs, batches and --seq must be positive")
    with tempfile.TemporaryDirectory(prefix="slimgraph-bench-") as tmp:
        models, files = [], []
        for i, path in enumerate(paths):
            model = load(path)
            if path.suffix.lower() != ".onnx":  # a folder or .pt2: bench what slimgraph would write
                from slimgraph.api import save

                path = save(model, Path(tmp) / f"model{i}.onnx")
            models.append(model)
            files.append(path)
        options = evaluate.session_options(threads, spinning=False)
        sessions = [evaluate.make_session(m, options=options) for m in models]
        _check_same_inputs(models, paths)
        results = [BenchResult(name=str(p), file_bytes=model_file_bytes(f), peak_rss_mb=None) for p, f in zip(paths, files)]
        for batch in batches:
            feeds = sample_inputs(models[0], batch=batch, sequence=sequence)
            contenders = {i: (lambda s=s: evaluate.run(s, feeds)) for i, s in enumerate(sessions)}
            times = alternating_runs(contenders, runs, warmup)
            for result, samples in zip(results, times.values()):
                p50 = statistics.median(samples)
                p90 = float(np.percentile(samples, 90))
                result.latency.append(Latency(batch, p50 * 1e3, p90 * 1e3, batch / p50))
        if memory:
            feeds = sample_inputs(models[0], batch=max(batches), sequence=sequence)
            for result, path in zip(results, files):
                result.peak_rss_mb = peak_rss_mb(path, feeds)
    return results


def _check_same_inputs(models: list[ir.Model], paths: list[Path]) -> None:
    if len(models) == 2:
        names = [sorted(v.name for v in m.graph.inputs if not v.is_initializer()) for m in models]
        if names[0] != names[1]:
            raise SlimgraphError(f"{paths[0].name} and {paths[1].name} take different inputs: {names[0]} vs {names[1]}")


def ratios(results: list[BenchResult]) -> dict:
    """B / A for each measure (below 1 means B is smaller or faster, except throughput)."""
    if len(results) != 2:
        return {}
    a, b = results
    out = {"file_bytes": b.file_bytes / a.file_bytes}
    if a.peak_rss_mb and b.peak_rss_mb:
        out["peak_rss_mb"] = b.peak_rss_mb / a.peak_rss_mb
    for la, lb in zip(a.latency, b.latency):
        out[f"p50_batch{la.batch}"] = lb.p50_ms / la.p50_ms
        out[f"throughput_batch{la.batch}"] = lb.throughput / la.throughput
    return out


def to_json(results: list[BenchResult]) -> str:
    return json.dumps({"models": [r.to_json() for r in results], "ratios": ratios(results)}, indent=2)

