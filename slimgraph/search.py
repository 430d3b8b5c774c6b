"""`optimize --goal latency|size|balanced`: candidate pipelines measured on this machine, the best
one within the fidelity budget kept.

Each candidate is a pipeline of the passes that exist (`CANDIDATES`), run with Verify on its own
copy of the model (tensors shared: passes replace them, never write into them). Those within the
budget (1 − cosine of every output against the original ≤ `max_drop`, on the verification inputs;
a sentence encoder's token states compared as its mean-pooled sentences, `fidelity.OutputMap`) are
timed together with the original in ONNX Runtime, runs alternating (`slimgraph.bench.alternating_runs`),
at batch 1 and 8 where the model takes them (text: 128 tokens, as `slimgraph bench`). The goal picks:
`latency` the least latency (geometric mean of the ratios to the original over the batches),
`size` the fewest bytes, `balanced` the least latency ratio × size ratio. A candidate a model
cannot take (nothing to quantize, no FFN) is listed with the reason and left out.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import onnx_ir as ir

from slimgraph.errors import FidelityError, SlimgraphError
from slimgraph.measure.stats import human_bytes, weight_bytes
from slimgraph.measure.target import Target
from slimgraph.passes import Pass, PassContext, Pipeline, PipelineReport, get_pass_class
from slimgraph.passes._infra.pipeline import Calibration, read_calibration
from slimgraph.workers import Workers

Goal = Literal["latency", "size", "balanced"]
GOALS: tuple[str, ...] = ("latency", "size", "balanced")
DEFAULT_MAX_DROP = 0.01

# Pipelines worth trying on a CPU, from the fastest kinds to the smallest. int8 weights with
# int8 activations are what speeds a compute-bound model up, more so after ONNX Runtime's fused
# attention/LayerNorm/GELU ops (MiniLM: about 1.3x alone, 2x with W8A8); static int8 (QDQ) is what
# speeds a CNN up, where the weights sit in Conv; int4 weights only save bytes.
CANDIDATES: dict[str, tuple[str, ...]] = {
    "latency": (
        "cleanup,fuse-ort,quantize-dynamic",
        "cleanup,quantize-dynamic",
        "cleanup,quantize-dynamic{weights=u8}",
        "cleanup,quantize-dynamic{embeddings=false}",
        "cleanup,quantize-static",  # convolutions: int8 QDQ, activation ranges from --calib
        "cleanup,fuse-ort,quantize-static",  # other exporters' HardSwish and Conv affines folded first
        "cleanup,prune-width{target=channels,ratio=0.25},quantize-static",  # where a lossy budget allows
        "cleanup,prune-width{target=ffn,ratio=0.25},quantize-dynamic",
        "cleanup,quantize-weights{bits=8,accuracy_level=4}",
        "cleanup,fuse-ort",
        "cleanup",  # the original's speed: where every rewrite is slower, the search keeps the model as it is
    ),
    "size": (
        "cleanup,quantize-dynamic",
        "cleanup,quantize-static",
        "cleanup,quantize-weights{bits=4,method=awq,embeddings=true,accuracy_level=4}",
        "cleanup,quantize-weights{bits=4,group_size=64,method=awq,embeddings=true,accuracy_level=4}",
        "cleanup,quantize-weights{bits=4,method=gptq,embeddings=true,accuracy_level=4}",
        "cleanup,quantize-weights{bits=8,embeddings=true,accuracy_level=4}",
    ),
}
CANDIDATES["balanced"] = tuple(dict.fromkeys(CANDIDATES["latency"] + CANDIDATES["size"]))
BATCHES = (1, 8)
SENSITIVE_PASSES = ("quantize-dynamic", "quantize-static")  # those whose layers --goal may keep float
SENSITIVE_ROUNDS = 3
TIMING_MEMORY = 2 << 30  # bytes the candidates' sessions may hold at once while they are timed
SEGMENTS = 4  # the runs of consecutive layers a model without blocks is cut into, each round


@dataclass
class Candidate:
    pipeline: str
    status: str = "ok"  # "ok", or why it was left out
    cosine: float | None = None
    bytes: int | None = None
    latency: dict[int, float] = field(default_factory=dict)  # batch → ratio to the original's p50
    model: ir.Model | None = None
    report: PipelineReport | None = None

    @property
    def latency_ratio(self) -> float | None:
        """Geometric mean over the batches timed."""
        if not self.latency:
            return None
        return math.exp(statistics.fmean(math.log(r) for r in self.latency.values()))


@dataclass
class SearchResult:
    goal: str
    max_drop: float
    original_bytes: int
    candidates: list[Candidate]
    chosen: Candidate

    def to_json(self) -> dict[str, Any]:
        return {
            "goal": self.goal, "max_drop": self.max_drop, "chosen": self.chosen.pipeline,
            "candidates": [{"pipeline": c.pipeline, "status": c.status, "cosine": c.cosine, "bytes": c.bytes,
                            "latency_ratio": {str(b): r for b, r in c.latency.items()}} for c in self.candidates],
        }


def search(
    model: ir.Model,
    goal: str,
    *,
    max_drop: float | None = None,
    calib: str | os.PathLike | None = None,
    target: Target | None = None,
    backend: str = "onnxruntime",
    runs: int = 10,
    candidates: Sequence[str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    workers: Workers | None = None,
) -> SearchResult:
    """Run each candidate pipeline on a copy of `model`, time those within `max_drop`, and return
    them all with the best for `goal`; `model` itself is left as it was. Candidates with a pass
    whose ops `backend` cannot run (`fuse-ort` for the PyTorch backend) are not tried.

    `workers` (`slimgraph.workers`): where the candidates are built and verified, one task each;
    the timing runs in one task, all candidates side by side, on the node `target.resource`
    names (`--target ray:NAME`), or here."""
    from slimgraph.measure.target import detect

    target = target or detect()
    workers = workers or Workers()
    check_goal(goal, target)
    max_drop = DEFAULT_MAX_DROP if max_drop is None else max_drop
    texts = [text for text in candidates or CANDIDATES[goal]
             if all(p.runs_on(backend) for p in Pipeline.parse(text).passes)]
    report = progress or (lambda what, done, total: None)
    shared = _Trying(max_drop, None if calib is None else Calibration(*read_calibration(calib, model)), target)
    report(f"{len(texts)} candidates" + (f" on {workers.name} workers" if workers.name != "local" else ""),
           0, len(texts))
    tried = workers.map(_run_candidate, model, shared, _tracked(texts, report))
    # int8 activations are the fastest kind: when no form of a pass is within budget, keep its
    # most sensitive layers float
    for quantize in SENSITIVE_PASSES:
        over = next((c for c in tried if c.status.startswith("over budget") and quantize in c.pipeline), None)
        if over is not None and candidates is None and not any(c.status == "ok" and quantize in c.pipeline
                                                               for c in tried):
            report(f"{quantize}: keeping the most sensitive layers float", len(texts), len(texts))
            tried.append(_sensitive_layers_float(model, over, quantize, shared, workers))
    kept = [c for c in tried if c.status == "ok"]
    if not kept:
        raise SlimgraphError(f"--goal {goal}: no candidate stays within max_drop {max_drop}: "
                             + "; ".join(f"{c.pipeline}: {c.status}" for c in tried))
    if goal != "size":
        where = f" on ray:{target.resource}" if target.resource else ""
        report(f"timing the candidates against the original{where}", len(texts), len(texts))
        latencies = workers.call(_time, model, (runs, shared.calibration), [c.model for c in kept],
                                 resource=target.resource)
        for candidate, latency in zip(kept, latencies):
            candidate.latency = latency
    chosen = min(kept, key=_score(goal))
    for candidate in kept:
        if candidate is not chosen:
            candidate.model = None  # (each held a copy of the model's replaced tensors)
    return SearchResult(goal, max_drop, weight_bytes(model), tried, chosen)


def _tracked(texts: list[str], report: Callable[[str, int, int], None]) -> Iterator[str]:
    for i, text in enumerate(texts):
        report(f"candidate {i + 1}/{len(texts)}: {text}", i, len(texts))
        yield text


def check_goal(goal: str, target: Target) -> None:
    """A goal the search can measure: latency only on the machine it runs on."""
    from slimgraph.measure.target import detect

    if goal not in GOALS:
        raise SlimgraphError(f"unknown goal '{goal}' (known: {', '.join(GOALS)})")
    if goal != "size" and target.resource is None and target.name != detect().name:
        raise SlimgraphError(f"--goal {goal} measures latency on this machine ({detect().name}), not on "
                             f"--target {target.name}; run the search there, or use --goal size")


@dataclass(frozen=True)
class _Trying:
    """What every candidate run shares."""

    max_drop: float
    calibration: Calibration | None
    target: Target


def _run_candidate(model: ir.Model, shared: _Trying, text: str) -> Candidate:
    candidate = Candidate(text)
    copy = model.clone()
    copy.meta.update(model.meta)
    try:
        result = Pipeline.parse(text).run(copy, PassContext(target=shared.target), calib=shared.calibration)
    except FidelityError as exc:
        candidate.status = f"failed: {exc}"
        return candidate
    except SlimgraphError as exc:  # the model does not have what the pass needs
        candidate.status = f"left out: {exc}"
        return candidate
    fidelity = result.fidelity
    candidate.cosine = 1.0 if fidelity is None else fidelity.cosine
    if 1 - candidate.cosine > shared.max_drop:
        candidate.status = f"over budget: cosine {candidate.cosine:.4f}"
        return candidate
    candidate.bytes, candidate.model, candidate.report = result.after.bytes, copy, result  # (the run's own stats)
    return candidate


def _sensitive_layers_float(model: ir.Model, over: Candidate, quantize: str, shared: _Trying,
                            workers: Workers) -> Candidate:
    """`over`'s pipeline with the most sensitive layers of its `quantize` pass left in float: the
    layers are grouped by block (`encoder.layer.3.*`, `/model.22/*`) and by role across blocks
    (`*.output.dense`); each round keeps float the group that gains the most cosine per weight it
    keeps float, until the budget holds (at most `SENSITIVE_ROUNDS` rounds)."""
    layers = get_pass_class(quantize)().layer_sizes(model)
    cost = {name: size for name, size in layers.items() if size}  # the layers with weights
    blocks: dict[str, set[str]] = {}  # "encoder.layer.3.*" → its layers
    roles: dict[str, set[str]] = {}  # "encoder.layer.#.output.dense" → that layer in every block
    for name in cost:
        match = re.search(r"[./]\d+[./]", name)
        if match:
            blocks.setdefault(name[:match.end()] + "*", set()).add(name)
            roles.setdefault(name[:match.start()] + ".#." + name[match.end():], set()).add(name)
    if not blocks:
        return _sensitive_span_float(model, over, quantize, shared, workers, list(layers))
    # exclude patterns (a block's glob, or a role's names) → the layers they keep float
    groups = {(pattern,): members for pattern, members in blocks.items()} | {
        tuple(sorted(members)): members for members in roles.values()}
    total = sum(cost.values())
    passes = Pipeline.parse(over.pipeline).passes
    kept_globs: list[str] = []
    kept_float: set[str] = set()
    best = over
    for _ in range(SENSITIVE_ROUNDS):
        tried = [(patterns, members - kept_float) for patterns, members in groups.items()
                 if members - kept_float and sum(cost[n] for n in kept_float | members) <= total / 2]
        runs = workers.map(_run_candidate, model, shared,
                           [_with_exclude(passes, quantize, kept_globs + list(patterns)) for patterns, _ in tried])
        trials = [((trial.cosine - best.cosine) / sum(cost[n] for n in added), trial, patterns, added)
                  for (patterns, added), trial in zip(tried, runs) if trial.cosine is not None]
        if not trials:
            break
        _, best, patterns, added = max(trials, key=lambda t: t[0])
        kept_globs += patterns
        kept_float |= added
        if best.status == "ok":
            return best
    return best


def _sensitive_span_float(model: ir.Model, over: Candidate, quantize: str, shared: _Trying, workers: Workers,
                          layers: list[str]) -> Candidate:
    """`over`'s pipeline with one run of consecutive layers (graph order) kept float, for models whose
    layer names have no blocks to group by: of `SEGMENTS` runs, the one whose float keeps the budget at
    the best cosine; then of its own `SEGMENTS` runs, … while one of them alone keeps the budget (at most
    `SENSITIVE_ROUNDS` rounds). Layers without weights count: an audio model's power spectrum (Mul, Add)
    before a Log is where int8 loses most."""
    passes = Pipeline.parse(over.pipeline).passes
    best, span = over, layers
    for _ in range(SENSITIVE_ROUNDS):
        if len(span) < 2:
            break
        size = math.ceil(len(span) / SEGMENTS)
        pieces = [span[i:i + size] for i in range(0, len(span), size)]
        trials = workers.map(_run_candidate, model, shared,
                             [_with_exclude(passes, quantize, [glob.escape(n) for n in piece]) for piece in pieces])
        within = [(trial, piece) for trial, piece in zip(trials, pieces) if trial.status == "ok"]
        if not within:
            if best is over:  # no run alone keeps the budget: the closest, to show how far it stays
                return max((t for t in trials if t.cosine is not None), key=lambda t: t.cosine, default=over)
            break
        best, span = max(within, key=lambda pair: pair[0].cosine)
    return best


def _with_exclude(passes: list[Pass], quantize: str, globs: list[str]) -> str:
    """The pipeline text of `passes` with `exclude=[globs]` on its `quantize` pass."""
    return Pipeline([dataclasses.replace(p, exclude=tuple(globs)) if p.name == quantize else p
                     for p in passes]).to_text()


def _time(model: ir.Model, settings: tuple[int, Calibration | None], candidates: list[ir.Model]) -> list[dict[int, float]]:
    """Each candidate's latency at each batch, as a ratio to `model`'s p50, timed side by side with it.

    Each session keeps the memory of its largest run (ONNX Runtime's arena: 1.1 GB at batch 8 for
    DNSMOS's 1.2 MB of weights, where the candidates side by side took 8.5 GB), so they are timed in
    groups whose sessions fit in `TIMING_MEMORY` (or half the available memory), each group
    alternating with the original."""
    from slimgraph.bench import SEQUENCE, alternating_runs, batch_problem
    from slimgraph.measure import evaluate
    from slimgraph.measure.inputs import model_inputs, sample_inputs
    from slimgraph.measure.process import current_rss

    runs, calibration = settings
    options = evaluate.session_options(None, spinning=False)
    before = current_rss()
    original = evaluate.make_session(model, options=options)
    latencies: list[dict[int, float]] = [{} for _ in candidates]
    for batch in (b for b in BATCHES if batch_problem(model, b) is None):
        feeds = sample_inputs(model, batch=batch, sequence=SEQUENCE)  # the shapes `slimgraph bench` times
        try:
            evaluate.run(original, feeds)
        except SlimgraphError:  # shapes the graph does not take (an OCR line's fixed height, read as symbolic)
            if batch != 1:
                continue
            # batch 1 at the model's own size: a sample the pipelines verified on, which runs
            feeds = (calibration.feeds if calibration is not None else model_inputs(model)[0])[0]
            evaluate.run(original, feeds)
        footprint = current_rss() - before if before is not None else 0  # one session, at this batch
        budget = min(evaluate.available_memory() // 2, TIMING_MEMORY)
        together = max(1, budget // footprint if footprint > 0 else len(candidates))
        for start in range(0, len(candidates), together):
            group = {start + i: evaluate.make_session(c, options=options)
                     for i, c in enumerate(candidates[start:start + together])}
            times = alternating_runs({i: (lambda s=s: evaluate.run(s, feeds)) for i, s in
                                      {-1: original, **group}.items()}, runs, warmup=2)
            reference = statistics.median(times[-1])
            for i in group:
                latencies[i][batch] = statistics.median(times[i]) / reference
            del group  # (their arenas, before the next group's)
    return latencies


def _score(goal: str) -> Callable[[Candidate], tuple]:
    if goal == "latency":
        return lambda c: (c.latency_ratio, c.bytes)
    if goal == "size":
        return lambda c: (c.bytes, -c.cosine)
    return lambda c: (c.latency_ratio * c.bytes, -c.cosine)


def write_recipe(result: SearchResult, path: Path, calib: str | os.PathLike | None, target: Target) -> Path:
    """The chosen pipeline as a recipe beside the output (`out/model.recipe.yaml`), so that
    `optimize --recipe` reruns it exactly."""
    from slimgraph.backends.output import publish

    recipe = path.with_name(path.name.removesuffix(path.suffix) + ".recipe.yaml") if path.suffix else \
        path.with_name(path.name + ".recipe.yaml")
    chosen = result.chosen
    lines = [f"# chosen by slimgraph optimize --goal {result.goal} --max-drop {result.max_drop} on "
             f"{target.describe()}:",
             f"# cosine {chosen.cosine:.4f}, {human_bytes(chosen.bytes)}"
             + (f", latency {chosen.latency_ratio:.2f}x the original" if chosen.latency else ""),
             "pipeline:"]
    lines += [f"  - \"{p.to_text()}\"" for p in Pipeline.parse(chosen.pipeline).passes]
    if calib is not None:
        lines.append(f"calib: {os.path.relpath(Path(calib).resolve(), recipe.parent.resolve())}")
    lines.append(f"max_drop: {result.max_drop}")
    recipe.parent.mkdir(parents=True, exist_ok=True)
    staged = recipe.with_name(f".{recipe.name}.tmp")
    staged.write_text("\n".join(lines) + "\n")
    publish(staged, recipe)
    return recipe
