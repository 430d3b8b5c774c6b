"""Pipelines of passes: text grammar, recipe files, and running with instruments.

Text grammar (MLIR/xDSL style): `cleanup,quantize-weights{bits=4,group_size=32}`; list
values are written `[a,b]`. `Pipeline.parse(text).to_text()` gives the canonical text
(options at their default are left out), which parses back to an equal pipeline.

Recipe files (YAML or TOML) hold the same thing, with comments:

    # recipes/minilm.yaml
    pipeline:
      - cleanup
      - quantize-weights: {bits: 4, group_size: 32}
    max_drop: 0.02
    calib: minilm-calibration.txt   # relative to the recipe

`pipeline` may also be one string in the text grammar. `Pipeline.from_recipe(path)` gives
a `Recipe`: the pipeline and its settings, runnable as one.

Running: `Pipeline.run` checks every pass against the model first (`Pass.check`), then runs
the passes in order with the instruments. Verification inputs are chosen so that the
fidelity is not measured on the samples a pass calibrated on, where that is free:
synthesized inputs get other synthesized samples, a calibration file (`calib=`) gives up
its last quarter (at least 4 samples needed); otherwise the report says they are shared.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError, first_line
from slimgraph.ir.graph import forget_removed_values
from slimgraph.measure.stats import model_stats
from slimgraph.passes._infra.base import Pass, PassContext, PassRecord, PipelineReport, ProgressHook, reader_of
from slimgraph.passes._infra.instruments import Instrument, Journal, Timing, Verify
from slimgraph.passes._infra.options import convert, describe_type, option_types, split_top_level
from slimgraph.passes._infra.registry import get_pass_class

_PASS_TEXT = re.compile(r"^\s*([A-Za-z][\w-]*)\s*(?:\{(.*)\})?\s*$", re.DOTALL)
RECIPE_KEYS = {"pipeline", "max_drop", "calib"}
HELD_OUT_MIN_SAMPLES = 4  # below this, calibration and verification share the samples

Feeds = dict[str, np.ndarray]
def make_pass(name: str, options: Mapping[str, Any] | None = None) -> Pass:
    """Build a registered pass from its name and raw option values (text or YAML/TOML scalars)."""
    cls = get_pass_class(name)
    types = option_types(cls)
    converted = {}
    for key, raw in (options or {}).items():
        if key not in types:
            close = difflib.get_close_matches(key, list(types), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            allowed = ", ".join(types) or "none"
            raise SlimgraphError(f"{name}: unknown option '{key}'{hint} (options: {allowed})")
        converted[key] = convert(name, key, types[key], raw)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in converted and _required(f)]
    if missing:
        example = ",".join(f"{m}=..." for m in missing)
        raise SlimgraphError(f"{name}: option {missing[0]} is required ({describe_type(types[missing[0]])}), "
                             f"e.g. {name}{{{example}}}")
    try:
        return cls(**converted)
    except SlimgraphError:
        raise
    except (TypeError, ValueError) as exc:
        raise SlimgraphError(f"{name}: {exc}") from exc


def parse_pass(text: str) -> Pass:
    match = _PASS_TEXT.match(text)
    if not match:
        raise SlimgraphError(f"cannot parse pass {text.strip()!r}: expected name or name{{key=value,...}}")
    name, body = match.group(1), match.group(2)
    options: dict[str, str] = {}
    if body and body.strip():
        for item in split_top_level(body, ","):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise SlimgraphError(f"{name}: cannot parse option {item.strip()!r}: expected key=value")
            options[key.strip()] = value.strip()
    return make_pass(name, options)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


class Pipeline:
    """An ordered list of passes, run and verified one after another.

        Pipeline([FoldConstants(), RemoveDeadNodes()])
        Pipeline("cleanup,quantize-weights{bits=4}")      # the same as Pipeline.parse(...)
        Pipeline.from_recipe("recipes/minilm.yaml")        # a Recipe: pipeline + max_drop + calib
    """

    def __init__(self, passes: Iterable[Pass] | str) -> None:
        if isinstance(passes, str):
            passes = Pipeline.parse(passes).passes
        self.passes: list[Pass] = list(passes)
        for p in self.passes:
            if not isinstance(p, Pass):
                hint = " (for pipeline text, give one string or use Pipeline.parse)" if isinstance(p, str) else ""
                raise TypeError(f"Pipeline takes Pass objects, got {type(p).__name__}{hint}")

    @classmethod
    def parse(cls, text: str) -> Pipeline:
        """Build a pipeline from text: `pass,pass{option=value,list=[a,b]}`.

        Unknown passes and options raise `SlimgraphError` with a suggestion; option values
        are converted to the option's type. `Pipeline.parse(p.to_text()) == p`.
        """
        parts = [p for p in split_top_level(text.strip(), ",") if p.strip()] if text.strip() else []
        if not parts:
            raise SlimgraphError("empty pipeline")
        return cls(parse_pass(p) for p in parts)

    @classmethod
    def from_recipe(cls, path: str | os.PathLike) -> Recipe:
        """The recipe in a YAML or TOML file: its pipeline, `max_drop` and `calib` (a path
        relative to the recipe file). `recipe.run(model)` runs it with those settings."""
        path = Path(path)
        data = load_recipe(path)
        spec = data["pipeline"]
        calib = path.parent / str(data["calib"]) if data.get("calib") is not None else None
        max_drop = data.get("max_drop")
        if max_drop is not None:
            check_max_drop(max_drop, f"{path}: max_drop")
        if isinstance(spec, str):
            return Recipe(cls.parse(spec), max_drop, calib, path)
        if not isinstance(spec, Sequence):
            raise SlimgraphError(f"{path}: 'pipeline' must be a list of passes or a pipeline string")
        passes = []
        for item in spec:
            if isinstance(item, str):
                passes.append(parse_pass(item))
            elif isinstance(item, Mapping) and len(item) == 1:
                ((name, options),) = item.items()
                if options is not None and not isinstance(options, Mapping):
                    raise SlimgraphError(f"{path}: options of '{name}' must be a mapping")
                passes.append(make_pass(name, options or {}))
            else:
                raise SlimgraphError(f"{path}: each pipeline entry is a pass name or {{name: {{options}}}}")
        if not passes:
            raise SlimgraphError(f"{path}: empty pipeline")
        return Recipe(cls(passes), max_drop, calib, path)

    def to_text(self) -> str:
        return ",".join(p.to_text() for p in self.passes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and self.passes == other.passes

    def __repr__(self) -> str:
        return f"Pipeline({self.to_text()!r})"

    def __len__(self) -> int:
        return len(self.passes)

    def check(self, model: ir.Model) -> None:
        """Every pass's `check` on the input model: what would fail, found before any work."""
        for pass_ in self.passes:
            pass_.check(model)

    def run(
        self,
        model: ir.Model,
        ctx: PassContext | None = None,
        *,
        verify: bool = True,
        max_drop: float | None = None,
        calib: str | os.PathLike | Calibration | Sequence[Feeds] | Feeds | None = None,
        verify_inputs: Sequence[Mapping[str, np.ndarray]] | None = None,
        progress: ProgressHook | None = None,
        instruments: Sequence[Instrument] = (),
    ) -> PipelineReport:
        """Run every pass on `model` in place and return the report; raises `FidelityError`
        when an exact pass changed the outputs or the budget is exceeded.

        - `max_drop`: fail once 1 − cosine of any output against the original exceeds it;
        - `calib`: calibration inputs: a `.npz` or text file (one sample a line, tokenized
          with the model folder's tokenizer), a list of feeds or one feed (name → array);
          its last quarter is held out for verification when it has 4 samples or more;
        - `verify_inputs`: feeds to verify on instead (nothing is held out then);
        - `ctx`: a `PassContext` for anything else (seed, a reference model, ...);
        - `progress`: called as `progress(what, done, total)` while passes work.
        """
        from slimgraph.ir.opset import upgrade_opset

        ctx = ctx or PassContext()
        if max_drop is not None:
            ctx.max_drop = check_max_drop(max_drop, "max_drop")
        if ctx.max_drop is not None and not verify:
            raise SlimgraphError(f"max_drop={ctx.max_drop} needs verification: it cannot be kept without verifying "
                                 "(drop --no-verify / verify=False, or the budget)")
        if progress is not None:
            ctx.progress = progress
        if ctx.target is None:
            from slimgraph.measure.target import detect

            ctx.target = detect()
        self.check(model)
        held_out = None
        if calib is not None:
            ctx.inputs, ctx.inputs_source = read_calibration(calib, model, ctx)
            held_out = split_held_out(ctx.inputs, ctx.inputs_source)
        if verify_inputs is not None:
            ctx.verify_inputs = [dict(feeds) for feeds in verify_inputs]
            ctx.verify_source = ctx.verify_source or f"the given verification inputs ({_samples(ctx.verify_inputs)})"
        elif verify and ctx.verify_inputs is None and held_out is not None:
            ctx.inputs, ctx.inputs_source, ctx.verify_inputs, ctx.verify_source = held_out
        synthesized = not ctx.inputs
        if synthesized:
            from slimgraph.measure.inputs import model_inputs

            ctx.inputs, ctx.inputs_source = model_inputs(model, seed=ctx.seed)
            synthesized = ctx.inputs_source == "synthesized"
        if verify and ctx.verify_inputs is None:
            if synthesized:  # free to draw others: verify on samples no pass has seen
                from slimgraph.measure.inputs import model_inputs

                ctx.verify_inputs = model_inputs(model, seed=ctx.seed + len(ctx.inputs))[0]
                ctx.verify_source = "synthesized (other samples than the passes ran on)"
            else:
                ctx.verify_inputs, ctx.verify_source = ctx.inputs, ctx.inputs_source
        needed = max((p.min_opset or 0 for p in self.passes), default=0)
        if needed:
            upgrade_opset(model, needed)
        if ctx.reference is None and verify:
            # The original, for Verify; it shares tensors, but keeps the replaced ones alive.
            ctx.reference = model.clone()
        # Timing first so that the other instruments' work is not counted as the pass's.
        active: list[Instrument] = [Timing(), Journal(), *([Verify()] if verify else []), *instruments]
        before = model_stats(model)
        pass_inputs = ctx.inputs
        watched = ctx.inputs = _WatchedInputs(pass_inputs)
        try:
            for instrument in active:
                instrument.before_pipeline(model, ctx)
            records = []
            for pass_ in self.passes:
                record = PassRecord(name=pass_.name, text=pass_.to_text(), exact=pass_.exact)
                for instrument in active:
                    instrument.before_pass(pass_, model, ctx)
                watched.read = False
                result = pass_(model, ctx)
                forget_removed_values(model.graph)
                if ctx.spill is not None:
                    ctx.spill()
                record.calibrated = watched.read
                record.modified, record.stats = result.modified, dict(result.stats)
                record.warnings = list(result.warnings)
                for instrument in active:
                    instrument.after_pass(pass_, model, ctx, record)
                records.append(record)
        finally:
            ctx.inputs = pass_inputs
        report = PipelineReport(
            pipeline=self.to_text(),
            before=before,
            after=model_stats(model),
            records=records,
            inputs_source=ctx.inputs_source,
            verified=verify,
            verify_source=ctx.verify_source if verify else None,
            shared_inputs=verify and ctx.verify_inputs is pass_inputs and any(r.calibrated for r in records),
            target=ctx.target.describe() if any(p.reads_target for p in self.passes) else None,
        )
        for instrument in active:
            instrument.after_pipeline(model, ctx, report)
        return report


class _WatchedInputs(list):
    """The pipeline's inputs as passes see them; `read` turns true when a pass iterates or
    indexes them, which is how the report knows which passes calibrated on them."""

    read = False

    def __iter__(self):
        self.read = True
        return super().__iter__()

    def __getitem__(self, index):
        self.read = True
        return super().__getitem__(index)


@dataclass
class Recipe:
    """A pipeline with its settings, from a recipe file (`Pipeline.from_recipe`)."""

    pipeline: Pipeline
    max_drop: float | None = None
    calib: Path | None = None
    path: Path | None = None

    def run(self, model: ir.Model, ctx: PassContext | None = None, **options: Any) -> PipelineReport:
        """`pipeline.run` with the recipe's max_drop and calib (keyword arguments override them)."""
        options.setdefault("max_drop", self.max_drop)
        options.setdefault("calib", self.calib)
        return self.pipeline.run(model, ctx, **options)

    def __repr__(self) -> str:
        settings = "".join(f", {k}={v}" for k, v in (("max_drop", self.max_drop), ("calib", self.calib)) if v is not None)
        return f"Recipe({self.pipeline.to_text()!r}{settings})"


def check_max_drop(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2:
        raise SlimgraphError(f"{what} must be a number between 0 and 2 (1 - cosine), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Calibration:
    """Calibration inputs already read, and the line that names them: what `--goal` sends the
    candidates it runs as Ray tasks, which may not see the calibration file or tokenizer."""

    feeds: list[Feeds]
    source: str


def read_calibration(calib: Any, model: ir.Model, ctx: PassContext | None = None) -> tuple[list[Feeds], str]:
    """Calibration feeds from a file (through the frontend's reader), a `Calibration`, a list of
    feeds or one feed."""
    if isinstance(calib, Calibration):
        return calib.feeds, calib.source
    if isinstance(calib, (str, os.PathLike)):
        return reader_of(model, ctx, needed_for=f"calibration file {calib}").calibration(Path(calib), model)
    if isinstance(calib, Mapping):
        calib = [calib]
    if not isinstance(calib, Sequence) or not calib or not all(isinstance(f, Mapping) for f in calib):
        raise SlimgraphError("calib must be a file path, one feed (name → array) or a non-empty list of feeds")
    feeds = [{k: np.asarray(v) for k, v in f.items()} for f in calib]
    return feeds, f"calibration inputs ({_samples(feeds)})"


def _rows(feeds: Mapping[str, np.ndarray]) -> int | None:
    """The number of samples in one feed: the common length of axis 0, or None."""
    lengths = {np.shape(a)[0] if np.ndim(a) else None for a in feeds.values()}
    return lengths.pop() if len(lengths) == 1 else None


def _samples(feeds: list[Feeds]) -> str:
    rows = [_rows(f) for f in feeds]
    return f"{len(feeds)} feeds" if any(r is None for r in rows) else f"{sum(rows)} samples"


def split_held_out(feeds: list[Feeds], source: str) -> tuple[list[Feeds], str, list[Feeds], str] | None:
    """(calibration feeds, their source, held-out feeds, their source): the last quarter of the
    samples held out (whole feeds from the end, then rows of the next one); None when there
    are fewer than 4 samples or a feed cannot be split by rows."""
    rows = [_rows(f) for f in feeds]
    if any(r is None for r in rows) or sum(rows) < HELD_OUT_MIN_SAMPLES:
        return None
    total = sum(rows)
    wanted = max(1, total // 4)
    head, tail, taken = list(feeds), [], 0
    while rows[len(head) - 1] <= wanted - taken:  # never empties `head`: wanted < total
        taken += rows[len(head) - 1]
        tail.insert(0, head.pop())
    if taken < wanted:
        last = head.pop()
        keep = rows[len(head)] - (wanted - taken)
        head.append({k: v[:keep] for k, v in last.items()})
        tail.insert(0, {k: v[keep:] for k, v in last.items()})
    return (head, f"{source}; the first {total - wanted} of {total} samples", tail,
            f"{source}; the last {wanted} samples, held out from calibration")


def load_recipe(path: Path) -> dict[str, Any]:
    import yaml  # only recipes need it; every command imports this module

    if not path.is_file():
        raise SlimgraphError(f"no such recipe file: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SlimgraphError(f"recipe {path} cannot be read: {exc}") from exc
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            raise SlimgraphError(f"recipe {path} must be .yaml, .yml or .toml")
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SlimgraphError(f"recipe {path} cannot be parsed: {where}{exc.problem or exc.context}") from exc
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:  # TOML's message ends "(at line L, column C)"
        raise SlimgraphError(f"recipe {path} cannot be parsed: {first_line(exc)}") from exc
    if not isinstance(data, dict) or "pipeline" not in data:
        raise SlimgraphError(f"recipe {path} needs a 'pipeline' entry")
    unknown = set(data) - RECIPE_KEYS
    if unknown:
        raise SlimgraphError(f"recipe {path}: unknown setting '{sorted(unknown)[0]}' (known: {', '.join(sorted(RECIPE_KEYS))})")
    return data


def pass_help(cls: type[Pass]) -> list[tuple[str, str, str]]:
    """(option, type, default) rows for `slimgraph passes NAME`."""
    from slimgraph.passes._infra.options import BOUNDS_KEY, describe_type, format_value

    types = option_types(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)"
        )
        bounds = f.metadata.get(BOUNDS_KEY)
        kind = describe_type(types[f.name]) + (f" {bounds.describe()}" if bounds else "")
        rows.append((f.name, kind, format_value(default)))
    return rows
