"""The Pass base class, its result, the context passes run in, and the records a pipeline keeps.

A pass is a frozen dataclass: its fields are its options, so one definition serves the
Python API, the pipeline text, `slimgraph passes NAME` and the reproducer. Option values
given from Python are checked against the field types when the pass is built (a list is
accepted for a tuple). A pass mutates the model in place and always returns a
`PassResult`. Passes must replace tensors rather than write into them: the reference model
(`PassContext.reference`) shares tensor data with the model being optimized.

`Pass.check(model)` runs for every pass before the pipeline does any work, so that a
mistake (an `exclude` glob that matches nothing, an unreachable size budget) costs the user
seconds, not the minutes of the passes before it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir.meta import READER_KEY
from slimgraph.measure.diff import Change
from slimgraph.measure.fidelity import Fidelity
from slimgraph.measure.stats import ModelStats, human_bytes
from slimgraph.measure.target import Target
from slimgraph.passes._infra.checkpoints import Checkpoints
from slimgraph.workers import Workers

if TYPE_CHECKING:
    from slimgraph.passes.adapters.records import Adapter, BaseWeights

T = TypeVar("T")

# Progress a pass reports while it works: (what, done, total). The CLI draws it as a bar.
ProgressHook = Callable[[str, int, int], None]


@dataclass
class PassResult:
    """What a pass did: whether it changed the model, counts a person can read, and
    warnings (e.g. "nothing to quantize") that the CLI shows on stderr."""

    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class DataReader(Protocol):
    """Reads the files passes need: calibration inputs, the model's tokenizer, adapters and their base
    weights. Passes do no file I/O of their own and may not import frontends: the frontend that loaded
    a model gives its reader (`slimgraph.frontend.reader`), in `model.meta` or `PassContext.reader`."""

    def calibration(self, path: Path, model: ir.Model) -> tuple[list[dict[str, np.ndarray]], str]:
        """The feeds a calibration file (or image folder) holds for `model`, and a line naming them."""

    def tokenizer(self, model: ir.Model) -> Any | None:
        """The tokenizer the model was loaded with, or None."""

    def adapter(self, path: str | Path) -> Adapter:
        """A PEFT adapter folder, read and checked."""

    def base_weights(self, adapter: Adapter, base: str) -> tuple[BaseWeights | None, str]:
        """The weights `adapter` was trained on (`base`: a path, "auto" or "none") and where they came from."""

    def model_config(self, model: ir.Model) -> dict[str, Any] | None:
        """The Hugging Face config the model was loaded from (a folder's `config.json`, a `.gguf`'s), or None."""


def find_reader(model: ir.Model, ctx: PassContext | None = None) -> DataReader | None:
    """The reader for `model`'s files: the context's, else the one its frontend left in `model.meta`."""
    return (ctx.reader if ctx is not None else None) or model.meta.get(READER_KEY)


def reader_of(model: ir.Model, ctx: PassContext | None = None, *, needed_for: str) -> DataReader:
    """`find_reader`, for a pass that cannot work without one."""
    reader = find_reader(model, ctx)
    if reader is None:
        raise SlimgraphError(f"{needed_for} needs slimgraph's frontend to read files: load the model with "
                             "slimgraph.load, or give PassContext(reader=slimgraph.frontend.reader.READER)")
    return reader


@dataclass
class PassContext:
    """What passes may need, passed explicitly (never global).

    - `inputs`: the sample or calibration inputs (a list of feeds, name → array); the
      pipeline notes which passes read them (they calibrated on them);
    - `verify_inputs`: what `Verify` runs the models on; None: the pipeline chooses
      (see `Pipeline.run`), and says in the report whether they are held out from calibration;
    - `reference`: the unmodified model the pipeline started from (kept when verifying);
    - `max_drop`: the fidelity budget, 1 − cosine against the original;
    - `progress`: where passes report per-layer progress; call `track` rather than it;
    - `target`: where the model will run (`slimgraph.measure.target`); None: the machine running slimgraph;
    - `reader`: reads calibration files, tokenizers and adapters (`DataReader`); None: the one the model's
      frontend left in `model.meta`;
    - `spill`: called after each tracked item and after each pass to write the new weights out to
      the output's data file (`slimgraph.ir.spill`); None: they stay in memory;
    - `workers`: where a pass runs independent measurements (`slimgraph.workers`; default: here);
    - `checkpoints`: where a block-wise pass keeps its progress, to resume an interrupted run
      (`slimgraph.passes._infra.checkpoints`); None: it keeps none.
    """

    inputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    inputs_source: str = "synthesized"
    verify_inputs: list[dict[str, np.ndarray]] | None = None
    verify_source: str | None = None
    reference: ir.Model | None = None
    seed: int = 0
    max_drop: float | None = None
    progress: ProgressHook | None = field(default=None, repr=False)
    target: Target | None = None
    reader: DataReader | None = field(default=None, repr=False)
    spill: Callable[[], None] | None = field(default=None, repr=False)
    workers: Workers = field(default_factory=Workers, repr=False)
    checkpoints: Checkpoints | None = field(default=None, repr=False)

    def track(self, items: Iterable[T], what: str) -> Iterator[T]:
        """Yield `items`, reporting `what (i/n)` to the progress hook as each one is done.

            for linear in ctx.track(linears, "awq int4"):
                ...
        """
        items = list(items)
        if self.progress is not None:
            self.progress(what, 0, len(items))
        for done, item in enumerate(items, 1):
            yield item
            if self.spill is not None:
                self.spill()
            if self.progress is not None:
                self.progress(what, done, len(items))


@dataclass(frozen=True, kw_only=True)
class Pass:
    """Base of every slimgraph pass. Subclasses set `name`, `exact`, and implement `run`."""

    name: ClassVar[str]
    exact: ClassVar[bool] = True
    # The lowest default-domain opset the pass handles; older models are converted first.
    min_opset: ClassVar[int | None] = None
    # Whether the rewrite depends on the target (`PassContext.target`); the report then names it.
    reads_target: ClassVar[bool] = False
    # The backends that run what the pass writes (ops only ONNX Runtime has); None: every backend.
    backends: ClassVar[tuple[str, ...] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Option types are checked before the subclass's own __post_init__ validates values,
        # so that `bits="4"` says it got a str, not "got 4".
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None and not getattr(own, "_checks_option_types", False):
            def __post_init__(self, _own=own) -> None:
                _check_option_types(self)
                _own(self)

            __post_init__._checks_option_types = True  # type: ignore[attr-defined]
            __post_init__.__doc__ = own.__doc__
            cls.__post_init__ = __post_init__  # type: ignore[method-assign]

    def __post_init__(self) -> None:
        _check_option_types(self)

    @classmethod
    def runs_on(cls, backend: str) -> bool:
        """Whether `backend` can run what this pass writes (onnxruntime-genai runs what onnxruntime runs)."""
        runtime = "onnxruntime" if backend == "onnxruntime-genai" else backend
        return cls.backends is None or runtime in cls.backends

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError

    def check(self, model: ir.Model) -> Any:
        """Cheap checks on the input model, run before any pass: raise `SlimgraphError`
        for what would make this pass fail (or do nothing the user asked for).

        A pass whose checks find what it will work on (structures, layers) returns that plan, and
        its `run` starts with `plan = self.check(model)` (on the model as the earlier passes left
        it): the model is searched once per run.

        The default checks that each `exclude` glob matches something the pass could
        exclude. Overrides should call it, and stay conservative: earlier passes in the
        pipeline run after this check.
        """
        patterns = getattr(self, "exclude", None)
        if not patterns:
            return
        names = exclude_candidates(model)
        unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            example = f"'{names[-1]}'" if names else "none in this model"
            raise SlimgraphError(
                f"{self.name}: exclude={unmatched[0]} matches no linear layer or embedding "
                f"(globs match module paths, weight names and node names, e.g. {example})"
            )

    def __call__(self, model: ir.Model, ctx: PassContext | None = None) -> PassResult:
        result = self.run(model, ctx or PassContext())
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {self.name!r} returned {type(result).__name__}, not PassResult")
        if result.modified:
            # New nodes go before the first node they replace, but may read a value produced later
            # (a bias Constant between a MatMul and its Add, in a graph not cleaned up first).
            # onnx_ir's sort is stable: a sorted graph stays as it was.
            model.graph.sort()
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


def _check_option_types(pass_: Pass) -> None:
    from slimgraph.passes._infra.options import check_bounds, check_type, option_types

    try:
        types = option_types(type(pass_))
    except (NameError, TypeError):  # annotations we cannot resolve: leave them to the pass
        return
    for f in dataclasses.fields(pass_):
        value = getattr(pass_, f.name)
        checked = check_type(pass_.name, f.name, types[f.name], value)
        check_bounds(pass_.name, f, checked)
        if checked is not value:  # e.g. a list given for a tuple option
            object.__setattr__(pass_, f.name, checked)


def exclude_candidates(model: ir.Model) -> list[str]:
    """What an `exclude` glob of the quantization passes is matched against: each linear's
    module path, weight and node name, each embedding's path and table, and each
    com.microsoft.MoE's module path and node name."""
    from slimgraph.ir.structure import find_embeddings, find_linears

    names = []
    for linear in find_linears(model):
        names += [linear.name, linear.weight or "", linear.node.name or ""]
    for table in find_embeddings(model):
        names += [table.name, table.table]
    for node in model.graph:
        if node.op_type == "MoE" and node.domain == "com.microsoft":
            names += moe_exclude_names(node)
    return [n for n in names if n]


def moe_exclude_names(node: ir.Node) -> list[str]:
    """What an `exclude` glob is matched against for a com.microsoft.MoE: its module path and name."""
    from slimgraph.ir.graph import module_path

    return [n for n in (module_path(node), node.name) if n]


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


@dataclass(frozen=True)
class Size:
    """Weight bytes and node count of the model before and after a pass (measured, as numbers)."""

    bytes_before: int
    bytes_after: int
    nodes_before: int
    nodes_after: int

    def to_json(self) -> dict[str, Any]:
        return {"bytes": {"before": self.bytes_before, "after": self.bytes_after},
                "nodes": {"before": self.nodes_before, "after": self.nodes_after}}


@dataclass
class PassRecord:
    """What happened in one pass; filled in by the pipeline and its instruments.

    `fidelity` is measured against the original model; `exact_check`, for an exact pass, is
    what it was held to: the outputs just before it (the same thing when no lossy pass
    came first). `calibrated`: the pass read the pipeline's inputs.
    """

    name: str
    text: str
    exact: bool
    modified: bool = False
    stats: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    fidelity: Fidelity | None = None
    exact_check: Fidelity | None = None
    changes: Changes | None = None
    size: Size | None = None
    calibrated: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "text": self.text,
            "exact": self.exact,
            "modified": self.modified,
            "stats": self.stats,
            "size": self.size.to_json() if self.size else None,
            "seconds": self.seconds,
            "fidelity": self.fidelity.to_json() if self.fidelity else None,
            "exact_check": self.exact_check.to_json() if self.exact_check else None,
            "calibrated": self.calibrated,
            "changes": self.changes.to_json() if self.changes else None,
            "warnings": self.warnings,
        }

    def __repr__(self) -> str:
        fidelity = "not verified"
        if self.exact and self.exact_check is not None:
            fidelity = f"exact, max rel err {self.exact_check.max_rel_error:.1e}"
        elif self.fidelity is not None:
            fidelity = f"cosine {self.fidelity.cosine:.5f}"
        seconds = f", {self.seconds:.2f} s" if self.seconds is not None else ""
        changed = "modified" if self.modified else "unchanged"
        return f"<PassRecord {self.text}: {changed}, {fidelity}{seconds}>"


@dataclass
class PipelineReport:
    """What a pipeline run did: sizes before and after, one record per pass, and the inputs.

    `inputs_source` names the inputs passes ran and calibrated on, `verify_source` those
    the verification compared outputs on; `shared_inputs` is true when a pass calibrated
    on the very samples the fidelity was measured on (the fidelity is then optimistic).
    """

    pipeline: str
    before: ModelStats
    after: ModelStats
    records: list[PassRecord]
    inputs_source: str
    verified: bool
    verify_source: str | None = None
    shared_inputs: bool = False
    target: str | None = None  # the target, when a pass's rewrite depended on it

    @property
    def fidelity(self) -> Fidelity | None:
        """Fidelity of the final model against the original (the last verified pass)."""
        measured = [r.fidelity for r in self.records if r.fidelity is not None]
        return measured[-1] if measured else None

    @property
    def warnings(self) -> list[str]:
        return [w for r in self.records for w in r.warnings]

    def to_json(self) -> dict[str, Any]:
        fidelity = self.fidelity
        return {
            "pipeline": self.pipeline,
            "inputs": self.inputs_source,
            "verified": self.verified,
            "verified_on": self.verify_source,
            "calibration_shared_with_verification": self.shared_inputs,
            "target": self.target,
            "before": self.before.to_json(),
            "after": self.after.to_json(),
            "fidelity": fidelity.to_json() if fidelity else None,
            "passes": [r.to_json() for r in self.records],
        }

    def __repr__(self) -> str:
        fidelity = self.fidelity
        verdict = ("not verified" if not self.verified else
                   "no output changed" if fidelity is None or fidelity.unchanged else
                   f"cosine {fidelity.cosine:.5f}" + (f", top-1 {fidelity.top1:.1%}" if fidelity.top1 is not None else "")
                   + " vs the original")
        return (f"<PipelineReport {self.pipeline}: {len(self.records)} passes, "
                f"{human_bytes(self.before.bytes)} → {human_bytes(self.after.bytes)}, "
                f"{self.before.nodes} → {self.after.nodes} nodes, {verdict}>")
