"""The Pass base class, its result, the context passes run in, and the records a pipeline keeps.

A pass is a frozen dataclass: its fields are its options, so one definition serves the
Python API, the pipeline text, `slimgraph passes NAME` and the reproducer. A pass mutates
the model in place and always returns a `PassResult`. Passes must replace tensors rather
than write into them: the reference model (`PassContext.reference`) shares tensor data
with the model being optimized.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from slimgraph.ir.diff import Change
from slimgraph.ir.fidelity import Fidelity
from slimgraph.ir.stats import ModelStats


@dataclass
class PassResult:
    """What a pass did: whether it changed the model, counts a person can read, and
    warnings (e.g. "nothing to quantize") that the CLI shows on stderr."""

    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class PassContext:
    """What passes may need, passed explicitly (never global).

    `inputs` are the sample or calibration inputs (a list of feeds, name → array);
    `reference` is the unmodified model the pipeline started from (kept when verifying).
    """

    inputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    inputs_source: str = "synthesized"
    reference: ir.Model | None = None
    seed: int = 0
    max_drop: float | None = None


@dataclass(frozen=True, kw_only=True)
class Pass:
    """Base of every slimgraph pass. Subclasses set `name`, `exact`, and implement `run`."""

    name: ClassVar[str]
    exact: ClassVar[bool] = True
    # The lowest default-domain opset the pass handles; older models are converted first.
    min_opset: ClassVar[int | None] = None

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, model: ir.Model, ctx: PassContext | None = None) -> PassResult:
        result = self.run(model, ctx or PassContext())
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {self.name!r} returned {type(result).__name__}, not PassResult")
        return result

    @classmethod
    def summary(cls) -> str:
        """The first line of the docstring: the rewrite the pass performs."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def changed_options(self) -> dict[str, Any]:
        """Options whose value differs from the default, in declaration order."""
        changed = {}
        for f in dataclasses.fields(self):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING
            )
            value = getattr(self, f.name)
            if default is dataclasses.MISSING or value != default:
                changed[f.name] = value
        return changed

    def to_text(self) -> str:
        from slimgraph.passes._infra.options import format_value

        opts = self.changed_options()
        if not opts:
            return self.name
        body = ",".join(f"{k}={format_value(v)}" for k, v in opts.items())
        return f"{self.name}{{{body}}}"


# --- what a pipeline records -------------------------------------------------------------


@dataclass
class Changes:
    """What one pass touched: node changes by module path, and initializer names."""

    nodes: list[Change] = field(default_factory=list)
    added_initializers: list[str] = field(default_factory=list)
    removed_initializers: list[str] = field(default_factory=list)
    changed_initializers: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": [asdict(c) for c in self.nodes],
            "added_initializers": self.added_initializers,
            "removed_initializers": self.removed_initializers,
            "changed_initializers": self.changed_initializers,
        }


@dataclass
class PassRecord:
    """What happened in one pass; filled in by the pipeline and its instruments."""

    name: str
    text: str
    exact: bool
    modified: bool = False
    stats: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    fidelity: Fidelity | None = None
    changes: Changes | None = None
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "text": self.text,
            "exact": self.exact,
            "modified": self.modified,
            "stats": self.stats,
            "seconds": self.seconds,
            "fidelity": self.fidelity.to_json() if self.fidelity else None,
            "changes": self.changes.to_json() if self.changes else None,
            "warnings": self.warnings,
        }


@dataclass
class PipelineReport:
    pipeline: str
    before: ModelStats
    after: ModelStats
    records: list[PassRecord]
    inputs_source: str
    verified: bool

    @property
    def fidelity(self) -> Fidelity | None:
        """Fidelity of the final model against the original (the last verified pass)."""
        measured = [r.fidelity for r in self.records if r.fidelity is not None]
        return measured[-1] if measured else None

    def to_json(self) -> dict[str, Any]:
        fidelity = self.fidelity
        return {
            "pipeline": self.pipeline,
            "inputs": self.inputs_source,
            "verified": self.verified,
            "before": self.before.to_json(),
            "after": self.after.to_json(),
            "fidelity": fidelity.to_json() if fidelity else None,
            "passes": [r.to_json() for r in self.records],
        }
