"""`slimgraph bench`: ONNX Runtime latency, throughput, peak memory and file size.

With two models, runs alternate (A, B, B, A, …) on the same inputs so that machine noise
hits both alike; ratios are B / A. Peak memory is measured in a child process per model
(session + one run at the largest batch) minus a child that only imports onnxruntime,
because two sessions in one process cannot be told apart.

Only what ran is reported: a batch size a model cannot take (an input whose first axis is
fixed at another size) is listed as not run, with the reason, and gets no figures.

Decode mode (`bench_decode`, `slimgraph bench --new-tokens N`) times greedy generation of a
causal LM (`slimgraph.generate.Decoder`): a prompt (text through the model's tokenizer, or
`--seq` random token ids), then N new tokens. It reports the time to the first token (the
prompt's step) and the decode rate, new tokens per second after the first (batch × (N − 1) /
the time of those steps). A graph with a KV cache runs one token per step; one without runs the
whole sequence each time, so two models, one of each, show what the cache buys. Folders and
`.gguf` files are exported with the KV cache (`kv_cache=True`) for this mode.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.measure import evaluate
from slimgraph.measure.inputs import sample_inputs
from slimgraph.measure.stats import human_bytes

if TYPE_CHECKING:
    import onnxruntime as ort

Progress = Callable[[str, int, int], None]
# `loading(what)`: a step shown while a model loads; it yields the `stage` that `load` reports to
# (TerminalProgress.stage), or None
Loading = Callable[[str], AbstractContextManager[Callable[[str], None] | None]]


def _no_display(what: str) -> AbstractContextManager[None]:
    return nullcontext()


@dataclass(frozen=True)
class Latency:
    batch: int
    p50_ms: float
    p90_ms: float
    throughput: float  # samples per second at p50
    runs_ms: tuple[float, ...] = field(default=(), repr=False)  # every timed run, in the order they ran


@dataclass(frozen=True)
class DecodeSpeed:
    batch: int
    prompt_tokens: int
    new_tokens: int
    first_token_ms: float  # p50 of the prompt's step
    tokens_per_s: float  # p50 decode rate after the first token, all rows counted
    kv_cache: bool


@dataclass
class BenchResult:
    name: str
    file_bytes: int
    peak_rss_mb: float | None
    latency: list[Latency] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)  # batch size → why it did not run
    decode: list[DecodeSpeed] = field(default_factory=list)

    def to_json(self) -> dict:
        data = asdict(self)
        data["skipped"] = [{"batch": b, "reason": r} for b, r in self.skipped.items()]
        return data

    def __repr__(self) -> str:
        latency = ", ".join([f"batch {lat.batch}: p50 {lat.p50_ms:.2f} ms" for lat in self.latency] +
                            [f"batch {d.batch}: {d.tokens_per_s:.1f} tokens/s" for d in self.decode])
        memory = f", peak RSS {self.peak_rss_mb:.1f} MB" if self.peak_rss_mb is not None else ""
        return f"<BenchResult {Path(self.name).name}: {human_bytes(self.file_bytes)}{memory}; {latency}>"


def batch_problem(model: ir.Model, batch: int) -> str | None:
    """Why `model` cannot run `batch` samples at once (an input fixed at another batch), or None."""
    for value in model.graph.inputs:
        if value.is_initializer() or value.shape is None:
            continue
        if len(value.shape) == 0:
            return f"input '{value.name}' is a scalar (no batch axis)"
        first = value.shape[0]
        if isinstance(first, int) and first != batch:
            dims = "×".join(str(d) for d in value.shape)
            return f"input '{value.name}' is fixed at batch {first} ({dims})"
    return None


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


# Two models' latency ratio is known to within its 95% interval (`ratio_interval`); rounds are added
# until the interval is this tight or the time below is spent.
TIGHT_INTERVAL = 1.05  # high / low
MORE_ROUNDS_SECONDS = 20.0


def ratio_interval(a_runs: list[float], b_runs: list[float], *, resamples: int = 2000) -> tuple[float, float]:
    """The 95% interval of B's median latency over A's: a percentile bootstrap that resamples whole
    rounds (A's run i with B's run i, timed side by side), seeded, so the same runs give the same interval."""
    a, b = np.asarray(a_runs), np.asarray(b_runs)
    rounds = np.random.default_rng(0).integers(0, len(a), (resamples, len(a)))
    low, high = np.percentile(np.median(b[rounds], axis=1) / np.median(a[rounds], axis=1), [2.5, 97.5])
    return float(low), float(high)


SEQUENCE = 128  # tokens per sample of a text model, when timing (bench, and the --goal search)


def bench(
    paths: list[Path],
    *,
    batches: tuple[int, ...] = (1, 8),
    sequence: int = SEQUENCE,
    runs: int = 30,
    warmup: int = 3,
    threads: int | None = None,
    memory: bool = True,
    progress: Progress | None = None,
    kv_cache: bool = False,
    loading: Loading | None = None,
) -> list[BenchResult]:
    """Latency (p50, p90), throughput, file size and peak memory of one or two models under
    ONNX Runtime, per batch size; `progress(what, done, total)` hears how far it got, and
    `loading` shows the loads.
    `kv_cache`: folders and `.gguf` files are exported with past/present keys and values."""
    from slimgraph.frontend import load

    if not 1 <= len(paths) <= 2:
        raise SlimgraphError("bench takes one model, or two to compare")
    if runs < 1 or warmup < 0 or any(b < 1 for b in batches) or sequence < 1:
        raise SlimgraphError("runs, batches and --seq must be positive")
    for path in paths:
        _check_benchable(path)
    report = progress or (lambda what, done, total: None)
    with tempfile.TemporaryDirectory(prefix="slimgraph-bench-") as tmp:
        models, files, as_files = [], [], []
        for i, path in enumerate(paths):
            report(f"loading {path.name}", i, len(paths))
            with (loading or _no_display)(f"loading {path.name}") as stage:
                model = load(path, stage=stage, **({"kv_cache": True} if kv_cache else {}))
            # timed as the file lies (its external data memory-mapped): what slimgraph wrote for a folder
            # or .pt2, or a .onnx with external data; other files, as loaded (their repairs made)
            as_files.append(path.suffix.lower() != ".onnx" or evaluate.has_external_data(model))
            if path.suffix.lower() != ".onnx":  # a folder or .pt2: bench what slimgraph would write
                from slimgraph.api import save

                path = save(model, Path(tmp) / f"model{i}.onnx")
            models.append(model)
            files.append(path)
        report("building sessions", len(paths), len(paths))
        _check_same_inputs(models, paths)
        options = evaluate.session_options(threads, spinning=False)
        sessions = [evaluate.file_session(f, options) if as_file else evaluate.make_session(m, options=options)
                    for m, f, as_file in zip(models, files, as_files)]
        results = [BenchResult(name=str(p), file_bytes=model_file_bytes(f), peak_rss_mb=None) for p, f in zip(paths, files)]
        runnable = []
        for batch in batches:
            problems = [(p, batch_problem(m, batch)) for p, m in zip(paths, models)]
            problems = [f"{p.name}: {why}" for p, why in problems if why]
            if problems:  # both or neither: ratios compare like with like
                for result in results:
                    result.skipped[batch] = "; ".join(problems)
            else:
                runnable.append(batch)
        if not runnable:
            raise SlimgraphError(f"no batch size in --batch {','.join(map(str, batches))} can run: "
                                 f"{results[0].skipped[batches[0]]}")
        for batch in runnable:
            feeds = sample_inputs(models[0], batch=batch, sequence=sequence)
            contenders = {i: (lambda s=s: evaluate.run(s, feeds)) for i, s in enumerate(sessions)}
            what = f"batch {batch}: {runs} runs × {len(sessions)} model{'s' if len(sessions) > 1 else ''}"
            report(what, 0, 1)
            times = alternating_runs(contenders, runs, warmup)
            started = time.perf_counter()
            while len(times) == 2 and time.perf_counter() - started < MORE_ROUNDS_SECONDS:
                low, high = ratio_interval(*times.values())
                if high / low <= TIGHT_INTERVAL:
                    break
                for name, more in alternating_runs(contenders, runs, warmup=0).items():
                    times[name] += more
            report(what, 1, 1)
            for result, samples in zip(results, times.values()):
                p50 = statistics.median(samples)
                p90 = float(np.percentile(samples, 90))
                result.latency.append(Latency(batch, p50 * 1e3, p90 * 1e3, batch / p50,
                                              tuple(s * 1e3 for s in samples)))
        if memory:
            feeds = sample_inputs(models[0], batch=max(runnable), sequence=sequence)
            for i, (result, path) in enumerate(zip(results, files)):
                report("peak memory (a child process per model)", i, len(files))
                result.peak_rss_mb = peak_rss_mb(path, feeds)
            report("peak memory (a child process per model)", len(files), len(files))
    return results


def decoder_session(path: Path, model: ir.Model, options: ort.SessionOptions) -> ort.InferenceSession:
    """The session a decoder runs in: of the `.onnx` file itself where its weights lie in external data
    (the default for a decoder, as ONNX Runtime GenAI's builder writes one), which ONNX Runtime
    memory-maps instead of copying (SmolLM2 int4: peak RSS 526 → 279 MB, `benchmarks/decode.py`);
    otherwise of the model as loaded (a folder's or `.gguf`'s export, or a file's repairs made)."""
    if path.suffix.lower() == ".onnx" and evaluate.has_external_data(model):
        return evaluate.file_session(path, options)
    return evaluate.make_session(model, options=options)


def bench_decode(
    paths: list[Path],
    *,
    new_tokens: int,
    prompt: str | None = None,
    prompt_tokens: int = 128,
    batches: tuple[int, ...] = (1,),
    runs: int = 3,
    warmup: int = 1,
    threads: int | None = None,
    progress: Progress | None = None,
    loading: Loading | None = None,
) -> list[BenchResult]:
    """Greedy generation speed of one or two causal LMs under ONNX Runtime: the time to the first
    token and new tokens per second, per batch size (each row the same prompt)."""
    from slimgraph.frontend import load
    from slimgraph.generate import Decoder, SessionDecoder, left_pad

    if not 1 <= len(paths) <= 2:
        raise SlimgraphError("bench takes one model, or two to compare")
    if new_tokens < 2 or runs < 1 or warmup < 0 or any(b < 1 for b in batches) or prompt_tokens < 1:
        raise SlimgraphError("--new-tokens must be 2 or more; runs, batches and --seq positive")
    if prompt is not None and not prompt.strip():
        raise SlimgraphError("--prompt is empty")
    for path in paths:
        _check_benchable(path)
    report = progress or (lambda what, done, total: None)
    options = evaluate.session_options(threads, spinning=False)
    models, decoders = [], []
    for i, path in enumerate(paths):
        report(f"loading {path.name}", i, len(paths))
        with (loading or _no_display)(f"loading {path.name}") as stage:
            model = load(path, stage=stage, **({} if path.suffix.lower() == ".onnx" else {"kv_cache": True}))
        decoders.append(SessionDecoder(model, decoder_session(path, model, options)))
        models.append(model)
    ids = _prompt_ids(models, paths, prompt, prompt_tokens)
    results = [BenchResult(name=str(p), file_bytes=_source_bytes(p, m), peak_rss_mb=None) for p, m in zip(paths, models)]
    for batch in batches:
        tokens, mask = left_pad([ids] * batch, 0)
        records: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(decoders))}

        def generation(decoder: Decoder, record: list) -> None:
            start = time.perf_counter()
            logits = decoder.start(tokens, mask, capacity=tokens.shape[1] + new_tokens)
            first = time.perf_counter()
            for _ in range(new_tokens - 1):
                logits = decoder.advance(logits.argmax(axis=-1))
            record.append((first - start, time.perf_counter() - first))

        what = f"batch {batch}: {runs} generations of {new_tokens} tokens × {len(decoders)} model" + \
            ("s" if len(decoders) > 1 else "")
        report(what, 0, 1)
        alternating_runs({i: (lambda d=d, i=i: generation(d, records[i])) for i, d in enumerate(decoders)},
                         runs, warmup)
        report(what, 1, 1)
        for i, (result, decoder) in enumerate(zip(results, decoders)):
            timed = records[i][warmup:]
            first_token = statistics.median(t[0] for t in timed)
            rate = statistics.median(batch * (new_tokens - 1) / t[1] for t in timed)
            result.decode.append(DecodeSpeed(batch, len(ids), new_tokens, first_token * 1e3, rate, decoder.has_cache))
    return results


def _prompt_ids(models: list[ir.Model], paths: list[Path], prompt: str | None, length: int) -> list[int]:
    """The prompt's token ids: the text through the first tokenizer found, or `length` random ids
    below every model's vocabulary."""
    from slimgraph.ir.meta import TOKENIZER_KEY
    from slimgraph.measure.inputs import index_bound

    if prompt is not None:
        source = next((m.meta.get(TOKENIZER_KEY) for m in models if m.meta.get(TOKENIZER_KEY)), None)
        if source is None:
            raise SlimgraphError("--prompt needs a model with a tokenizer (a Hugging Face folder or a .gguf); for a "
                                 ".onnx file, give a prompt length in tokens with --seq")
        from slimgraph.frontend.calibration import load_tokenizer

        ids = list(load_tokenizer(Path(source))(prompt)["input_ids"])
        if not ids:
            raise SlimgraphError("--prompt tokenizes to no tokens")
        return ids
    bounds = []
    for model, path in zip(models, paths):
        ids_input = next(v for v in model.graph.inputs if v.name == "input_ids")
        logits = next(v for v in model.graph.outputs if v.name == "logits")
        vocab = index_bound(ids_input) or (logits.shape[-1] if logits.shape is not None else None)
        if not isinstance(vocab, int):
            raise SlimgraphError(f"{path.name}: cannot tell its vocabulary size; give a --prompt")
        bounds.append(vocab)
    return np.random.default_rng(0).integers(0, min(bounds), size=length).tolist()


def _source_bytes(path: Path, model: ir.Model) -> int:
    if path.suffix.lower() == ".onnx":
        return model_file_bytes(path)
    return evaluate.initializer_bytes(model)  # an export: what its weights take


def _check_benchable(path: Path) -> None:
    from slimgraph.frontend.hf_folder import is_pytorch_backend_folder

    if is_pytorch_backend_folder(path):
        raise SlimgraphError(
            f"{path} is a PyTorch-backend folder (model.py + model.safetensors); bench measures ONNX Runtime "
            "sessions: give it the .onnx model (or a .pt2 file, a Hugging Face folder)"
        )


def _check_same_inputs(models: list[ir.Model], paths: list[Path]) -> None:
    if len(models) == 2:
        names = [sorted(v.name for v in m.graph.inputs if not v.is_initializer()) for m in models]
        if names[0] != names[1]:
            raise SlimgraphError(f"{paths[0].name} and {paths[1].name} take different inputs: {names[0]} vs {names[1]}")


def ratios(results: list[BenchResult]) -> dict:
    """B / A for each measure that ran for both: below 1 means B is smaller, uses less memory
    or has lower latency; for throughput, above 1 means B is faster."""
    if len(results) != 2:
        return {}
    a, b = results
    out = {"file_bytes": b.file_bytes / a.file_bytes}
    for da, db in zip(a.decode, b.decode):
        out[f"first_token_batch{da.batch}"] = db.first_token_ms / da.first_token_ms
        out[f"tokens_per_s_batch{da.batch}"] = db.tokens_per_s / da.tokens_per_s
    if a.peak_rss_mb and b.peak_rss_mb:
        out["peak_rss_mb"] = b.peak_rss_mb / a.peak_rss_mb
    for la, lb in zip(a.latency, b.latency):
        out[f"p50_batch{la.batch}"] = lb.p50_ms / la.p50_ms
        out[f"throughput_batch{la.batch}"] = lb.throughput / la.throughput
    return out


def ratio_intervals(results: list[BenchResult]) -> dict[str, tuple[float, float]]:
    """The 95% interval of each latency and throughput ratio (`ratio_interval`); a ratio whose
    interval holds 1.0 is within the noise of this machine."""
    if len(results) != 2:
        return {}
    out = {}
    for la, lb in zip(*(r.latency for r in results)):
        if la.runs_ms and len(la.runs_ms) == len(lb.runs_ms):
            low, high = ratio_interval(list(la.runs_ms), list(lb.runs_ms))
            out[f"p50_batch{la.batch}"] = (low, high)
            out[f"throughput_batch{la.batch}"] = (1 / high, 1 / low)
    return out


def to_json(results: list[BenchResult]) -> str:
    return json.dumps({"models": [r.to_json() for r in results], "ratios": ratios(results),
                       "ratio_intervals": ratio_intervals(results)}, indent=2)

