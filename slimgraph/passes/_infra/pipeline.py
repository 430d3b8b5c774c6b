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

`pipeline` may also be one string in the text grammar.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir
import yaml

from slimgraph.errors import SlimgraphError, first_line
from slimgraph.ir.stats import model_stats
from slimgraph.passes._infra.base import Pass, PassContext, PassRecord, PipelineReport
from slimgraph.passes._infra.instruments import Instrument, Journal, Timing, Verify
from slimgraph.passes._infra.options import convert, option_types, split_top_level
from slimgraph.passes._infra.registry import get_pass_class

_PASS_TEXT = re.compile(r"^\s*([A-Za-z][\w-]*)\s*(?:\{(.*)\})?\s*$", re.DOTALL)
RECIPE_KEYS = {"pipeline", "max_drop", "calib"}


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


class Pipeline:
    """An ordered list of passes. Build it from pass objects, pipeline text, or a recipe."""

    def __init__(self, passes: Iterable[Pass]) -> None:
        self.passes: list[Pass] = list(passes)
        for p in self.passes:
            if not isinstance(p, Pass):
                raise TypeError(f"Pipeline takes Pass objects, got {type(p).__name__}")

    @classmethod
    def parse(cls, text: str) -> Pipeline:
        parts = [p for p in split_top_level(text.strip(), ",") if p.strip()] if text.strip() else []
        if not parts:
            raise SlimgraphError("empty pipeline")
        return cls(parse_pass(p) for p in parts)

    @classmethod
    def from_recipe(cls, path: str | Path) -> tuple[Pipeline, dict[str, Any]]:
        """A pipeline and the recipe's other settings (max_drop, calib) from a YAML or TOML file.

        A `calib` path is relative to the recipe file.
        """
        data = load_recipe(Path(path))
        spec = data["pipeline"]
        settings = {k: v for k, v in data.items() if k != "pipeline"}
        if "calib" in settings:
            settings["calib"] = str(Path(path).parent / str(settings["calib"]))
        if isinstance(spec, str):
            return cls.parse(spec), settings
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
        return cls(passes), settings

    def to_text(self) -> str:
        return ",".join(p.to_text() for p in self.passes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and self.passes == other.passes

    def __repr__(self) -> str:
        return f"Pipeline({self.to_text()!r})"

    def __len__(self) -> int:
        return len(self.passes)

    def run(
        self,
        model: ir.Model,
        ctx: PassContext | None = None,
        *,
        verify: bool = True,
        instruments: Sequence[Instrument] = (),
    ) -> PipelineReport:
        """Run every pass on `model` in place; returns the report (raises on a failed check)."""
        from slimgraph.ir.inputs import model_inputs
        from slimgraph.ir.opset import upgrade_opset

        ctx = ctx or PassContext()
        if not ctx.inputs:
            ctx.inputs, ctx.inputs_source = model_inputs(model, seed=ctx.seed)
        needed = max((p.min_opset or 0 for p in self.passes), default=0)
        if needed:
            upgrade_opset(model, needed)
        if ctx.reference is None and verify:
            # The original, for Verify; it shares tensors, but keeps the replaced ones alive.
            ctx.reference = model.clone()
        # Timing first so that the other instruments' work is not counted as the pass's.
        active: list[Instrument] = [Timing(), Journal(), *([Verify()] if verify else []), *instruments]
        before = model_stats(model)
        for instrument in active:
            instrument.before_pipeline(model, ctx)
        records = []
        for pass_ in self.passes:
            record = PassRecord(name=pass_.name, text=pass_.to_text(), exact=pass_.exact)
            for instrument in active:
                instrument.before_pass(pass_, model, ctx)
            result = pass_(model, ctx)
            record.modified, record.stats, record.warnings = result.modified, dict(result.stats), list(result.warnings)
            for instrument in active:
                instrument.after_pass(pass_, model, ctx, record)
            records.append(record)
        report = PipelineReport(
            pipeline=self.to_text(),
            before=before,
            after=model_stats(model),
            records=records,
            inputs_source=ctx.inputs_source,
            verified=verify,
        )
        for instrument in active:
            instrument.after_pipeline(model, ctx, report)
        return report


def load_recipe(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SlimgraphError(f"no such recipe file: {path}")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            raise SlimgraphError(f"recipe {path} must be .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise SlimgraphError(f"recipe {path} cannot be parsed: {first_line(exc)}") from exc
    if not isinstance(data, dict) or "pipeline" not in data:
        raise SlimgraphError(f"recipe {path} needs a 'pipeline' entry")
    unknown = set(data) - RECIPE_KEYS
    if unknown:
        raise SlimgraphError(f"recipe {path}: unknown setting '{sorted(unknown)[0]}' (known: {', '.join(sorted(RECIPE_KEYS))})")
    return data


def pass_help(cls: type[Pass]) -> list[tuple[str, str, str]]:
    """(option, type, default) rows for `slimgraph passes NAME`."""
    from slimgraph.passes._infra.options import describe_type, format_value

    types = option_types(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)"
        )
        rows.append((f.name, describe_type(types[f.name]), format_value(default)))
    return rows
