"""Pipeline text grammar, recipes, options, and the instruments (Verify, Journal, Timing)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimgraph.errors import FidelityError, SlimgraphError
from slimgraph.passes import (
    Pass,
    PassContext,
    PassResult,
    Pipeline,
    PrintAfterChange,
    Recipe,
    make_pass,
    register_pass,
)
from slimgraph.passes._infra.options import option
from slimgraph.passes.cleanup import Cleanup, FoldConstants, RemoveDeadNodes


@register_pass
@dataclass(frozen=True, kw_only=True)
class _ToyOptions(Pass):
    """A pass with every option type, for grammar tests. Changes nothing."""

    name: ClassVar[str] = "test-toy-options"
    bits: Literal[2, 4, 8] = 4
    ratio: float = option(0.5, low=0, low_open=True, high=1)
    method: Literal["rtn", "awq"] = "rtn"
    enabled: bool = True
    exclude: tuple[str, ...] = ()
    label: str | None = None

    def run(self, model, ctx):
        return PassResult(False)


@register_pass
@dataclass(frozen=True, kw_only=True)
class _WronglyExact(Pass):
    """Claims to be exact but scales the first weight by 1.01."""

    name: ClassVar[str] = "test-wrongly-exact"

    def run(self, model, ctx):
        value = next(iter(model.graph.initializers.values()))
        value.const_value = ir.tensor(value.const_value.numpy() * 1.01, name=value.name)
        return PassResult(True, {"weights scaled": 1})


@register_pass
@dataclass(frozen=True, kw_only=True)
class _Noise(Pass):
    """A lossy pass: adds relative noise to every weight."""

    name: ClassVar[str] = "test-noise"
    exact: ClassVar[bool] = False
    scale: float = 0.01

    def run(self, model, ctx):
        rng = np.random.default_rng(ctx.seed)
        for value in model.graph.initializers.values():
            w = value.const_value.numpy()
            if w.dtype == np.float32 and w.ndim == 2:
                noise = rng.standard_normal(w.shape).astype(np.float32) * self.scale * np.abs(w).mean()
                value.const_value = ir.tensor(w + noise, name=value.name)
        return PassResult(True)


def test_parse_and_round_trip():
    text = "cleanup,test-toy-options{bits=8,exclude=[lm_head,*.proj]},remove-dead-nodes"
    pipeline = Pipeline.parse(text)
    assert [p.name for p in pipeline.passes] == ["cleanup", "test-toy-options", "remove-dead-nodes"]
    toy = pipeline.passes[1]
    assert toy.bits == 8 and toy.exclude == ("lm_head", "*.proj") and toy.method == "rtn"
    assert pipeline.to_text() == text
    assert Pipeline.parse(pipeline.to_text()) == pipeline


def test_defaults_are_left_out_of_the_canonical_text():
    assert Pipeline.parse("test-toy-options{bits=4, ratio=0.5}").to_text() == "test-toy-options"


def test_python_objects_and_text_are_the_same_pipeline():
    assert Pipeline([FoldConstants(), RemoveDeadNodes()]) == Pipeline.parse("fold-constants,remove-dead-nodes")


options = st.fixed_dictionaries(
    {},
    optional={
        "bits": st.sampled_from([2, 4, 8]),
        "ratio": st.floats(0.01, 1.0, allow_nan=False).map(lambda x: round(x, 3)),
        "method": st.sampled_from(["rtn", "awq"]),
        "enabled": st.booleans(),
        "exclude": st.lists(st.from_regex(r"[a-z][a-z0-9_.*]{0,8}", fullmatch=True), max_size=3),
        "label": st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True),
    },
)


@settings(max_examples=200, deadline=None)
@given(st.lists(options, min_size=1, max_size=4))
def test_round_trip_property(option_sets):
    pipeline = Pipeline([_ToyOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()})
                         for opts in option_sets])
    text = pipeline.to_text()
    again = Pipeline.parse(text)
    assert again == pipeline
    assert again.to_text() == text


@pytest.mark.parametrize(
    "text, message",
    [
        ("clenaup", "unknown pass 'clenaup'; did you mean 'cleanup'?"),
        ("test-toy-options{bitz=4}", "unknown option 'bitz'; did you mean 'bits'?"),
        ("test-toy-options{bits=3}", "option bits=3 is not a valid 2|4|8"),
        ("test-toy-options{ratio=lots}", "option ratio=lots is not a valid float"),
        ("test-toy-options{ratio=2}", "ratio must be in (0, 1]"),
        ("test-toy-options{enabled=maybe}", "enabled=maybe is not a valid bool"),
        ("test-toy-options{bits}", "cannot parse option 'bits'"),
        ("test-toy-options{bits=4", "unbalanced"),
        ("", "empty pipeline"),
        ("{bits=4}", "cannot parse pass"),
    ],
)
def test_bad_pipeline_text(text, message):
    with pytest.raises(SlimgraphError) as error:
        Pipeline.parse(text)
    assert message in str(error.value)


def test_stray_commas_are_tolerated():
    assert Pipeline.parse(" cleanup ,, ").to_text() == "cleanup"


def test_make_pass_converts_yaml_scalars():
    toy = make_pass("test-toy-options", {"bits": 2, "exclude": ["a", "b"], "enabled": False})
    assert (toy.bits, toy.exclude, toy.enabled) == (2, ("a", "b"), False)


@pytest.mark.parametrize(
    "name, text",
    [
        ("recipe.yaml", "# a comment\npipeline:\n  - cleanup\n  - test-toy-options: {bits: 8, exclude: [lm_head]}\nmax_drop: 0.02\n"),
        ("recipe.toml", '# a comment\npipeline = ["cleanup", {test-toy-options = {bits = 8, exclude = ["lm_head"]}}]\nmax_drop = 0.02\n'),
        ("recipe.yml", 'pipeline: "cleanup,test-toy-options{bits=8,exclude=[lm_head]}"\nmax_drop: 0.02\n'),
    ],
)
def test_recipes(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    recipe = Pipeline.from_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.pipeline.to_text() == "cleanup,test-toy-options{bits=8,exclude=[lm_head]}"
    assert (recipe.max_drop, recipe.calib, recipe.path) == (0.02, None, path)
    assert repr(recipe) == "Recipe('cleanup,test-toy-options{bits=8,exclude=[lm_head]}', max_drop=0.02)"


@pytest.mark.parametrize(
    "text, message",
    [
        ("steps: [cleanup]\n", "needs a 'pipeline' entry"),
        ("pipeline: [cleanup]\nbudget: 3\n", "unknown setting 'budget'"),
        ("pipeline: [cleanup\n", "cannot be parsed: line 2, column 1: expected ',' or ']'"),
        ("pipeline: [cleanup]\nmax_drop: lots\n", "max_drop must be a number between 0 and 2"),
        ("pipeline: []\n", "empty pipeline"),
        ("pipeline: [{cleanup: 3}]\n", "options of 'cleanup' must be a mapping"),
    ],
)
def test_bad_recipes(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(SlimgraphError, match=message.replace("[", r"\[").replace("(", r"\(")):
        Pipeline.from_recipe(path)


def test_verify_stops_a_wrongly_exact_pass_and_names_it(mlp_model):
    with pytest.raises(FidelityError, match="pass 'test-wrongly-exact' is declared exact but changed output 'y'"):
        Pipeline.parse("cleanup,test-wrongly-exact").run(mlp_model)


def test_without_verify_the_wrong_pass_is_not_caught(mlp_model):
    report = Pipeline.parse("test-wrongly-exact").run(mlp_model, verify=False)
    assert report.records[0].modified and report.records[0].fidelity is None


def test_lossy_pass_records_fidelity_and_budget(mlp_model):
    report = Pipeline.parse("test-noise{scale=0.05}").run(mlp_model.clone())
    fidelity = report.records[0].fidelity
    assert 0.9 < fidelity.cosine < 1.0
    assert fidelity.rel_l2 > 1e-3 and fidelity.max_abs > 0
    assert report.fidelity is fidelity
    with pytest.raises(FidelityError, match=r"fidelity budget exceeded after pass 'test-noise'.*\(output 'y'\) "
                                            r"> max_drop 1e-06"):
        Pipeline.parse("test-noise{scale=0.05}").run(mlp_model, PassContext(max_drop=1e-6))


def test_journal_and_timing(mlp_model):
    report = Pipeline.parse("cleanup").run(mlp_model)
    record = report.records[0]
    assert record.seconds is not None and record.seconds >= 0
    removed = [c for c in record.changes.nodes if c.kind == "removed"]
    assert {(c.module, c.before) for c in removed} >= {("relu_dup", "Relu"), ("identity", "Identity")}
    assert any(c.module == "half" and c.before == "Add [4 f32]" for c in removed)  # the folded constant Add
    rewired = {c.module for c in record.changes.nodes if c.kind == "changed" and c.detail == "inputs rewired"}
    assert "fc2" in rewired  # it now reads the Relu directly, not the Identity
    assert record.changes.removed_initializers == ["half", "unused"]
    assert report.before.nodes > report.after.nodes


def test_print_after_change(mlp_model):
    stream = io.StringIO()
    Pipeline.parse("remove-identity,remove-identity").run(mlp_model, instruments=[PrintAfterChange(stream)])
    text = stream.getvalue()
    assert text.count("// after remove-identity") == 1  # the second run changed nothing
    assert "MatMul" in text


def test_pass_must_return_a_result(mlp_model):
    @dataclass(frozen=True, kw_only=True)
    class Broken(Pass):
        name: ClassVar[str] = "broken"

        def run(self, model, ctx):
            return None

    with pytest.raises(TypeError, match="returned NoneType, not PassResult"):
        Pipeline([Broken()]).run(mlp_model)


def test_pipeline_rejects_non_passes():
    with pytest.raises(TypeError):
        Pipeline([Cleanup(), "cleanup"])


# --- verdicts: exact passes are held to the outputs before them ----------------------------


@register_pass
@dataclass(frozen=True, kw_only=True)
class _Calibrating(Pass):
    """A pass that reads the calibration inputs (and changes nothing)."""

    name: ClassVar[str] = "test-calibrating"

    def run(self, model, ctx):
        samples = sum(feeds["x"].shape[0] for feeds in ctx.inputs)
        return PassResult(False, {"samples": samples})


@register_pass
@dataclass(frozen=True, kw_only=True)
class _Tracked(Pass):
    """Reports progress over three items."""

    name: ClassVar[str] = "test-tracked"

    def run(self, model, ctx):
        for _ in ctx.track(["a", "b", "c"], "items"):
            pass
        return PassResult(False)


def test_exact_pass_after_a_lossy_one_is_held_to_the_outputs_before_it(mlp_model):
    report = Pipeline.parse("test-noise{scale=0.05},cleanup").run(mlp_model)
    noise, cleanup = report.records
    assert cleanup.modified  # cleanup really rewrote the noisy model
    assert cleanup.exact_check.max_rel_error <= 1e-5  # against the noisy outputs: exact
    assert cleanup.fidelity.max_rel_error > 1e-3  # against the original: the noise is still there
    assert cleanup.fidelity.cosine == pytest.approx(noise.fidelity.cosine, abs=1e-6)
    assert noise.exact_check is None


def test_a_wrongly_exact_pass_after_a_lossy_one_is_still_caught(mlp_model):
    with pytest.raises(FidelityError, match="'test-wrongly-exact' is declared exact but changed output 'y' from "
                                            "the outputs before it"):
        Pipeline.parse("test-noise{scale=0.05},test-wrongly-exact").run(mlp_model)


def test_low_fidelity_warns_without_a_budget(mlp_model):
    report = Pipeline.parse("test-noise{scale=3.0}").run(mlp_model.clone())
    assert report.records[0].fidelity.cosine < 0.9
    assert len(report.warnings) == 1 and report.warnings[0].startswith("LOW FIDELITY after 'test-noise{scale=3.0}'")
    assert "output 'y' has cosine" in report.warnings[0]
    assert Pipeline.parse("test-noise{scale=0.01}").run(mlp_model).warnings == []


def test_a_budget_needs_verification(mlp_model):
    with pytest.raises(SlimgraphError, match="max_drop=0.01 needs verification"):
        Pipeline.parse("cleanup").run(mlp_model, verify=False, max_drop=0.01)
    with pytest.raises(SlimgraphError, match="max_drop must be a number between 0 and 2"):
        Pipeline.parse("cleanup").run(mlp_model, max_drop=-1)


def test_run_takes_the_budget_directly(mlp_model):
    with pytest.raises(FidelityError, match="fidelity budget exceeded after pass 'test-noise'"):
        Pipeline.parse("test-noise{scale=0.05}").run(mlp_model, max_drop=1e-6)


# --- inputs: calibration, verification, and which passes read them --------------------------


def _feeds(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((rows, 8)).astype(np.float32)}


def test_calibration_holds_out_a_quarter_for_verification(mlp_model):
    report = Pipeline.parse("test-calibrating").run(mlp_model, calib=_feeds(8))
    assert report.records[0].stats == {"samples": 6} and report.records[0].calibrated
    assert report.inputs_source == "calibration inputs (8 samples); the first 6 of 8 samples"
    assert report.verify_source == "calibration inputs (8 samples); the last 2 samples, held out from calibration"
    assert not report.shared_inputs


def test_held_out_split_takes_whole_feeds_then_rows():
    from slimgraph.passes._infra.pipeline import split_held_out

    feeds = [_feeds(8, 0), _feeds(8, 1), _feeds(3, 2), _feeds(1, 3)]  # 20 samples: hold out 5
    head, head_source, tail, tail_source = split_held_out(feeds, "f")
    assert [f["x"].shape[0] for f in head] == [8, 7] and [f["x"].shape[0] for f in tail] == [1, 3, 1]
    assert np.array_equal(np.concatenate([f["x"] for f in head + tail]), np.concatenate([f["x"] for f in feeds]))
    assert (head_source, tail_source) == ("f; the first 15 of 20 samples", "f; the last 5 samples, held out from "
                                                                           "calibration")
    assert split_held_out([_feeds(3)], "f") is None
    assert split_held_out([{"x": np.ones((4, 8)), "y": np.ones((5,))}], "f") is None  # no common batch axis


def test_few_calibration_samples_are_shared_and_the_report_says_so(mlp_model):
    report = Pipeline.parse("test-calibrating").run(mlp_model, calib=[_feeds(2), _feeds(1, 1)])
    assert report.records[0].stats == {"samples": 3}
    assert report.shared_inputs and report.to_json()["calibration_shared_with_verification"] is True


def test_passes_that_do_not_read_inputs_are_not_marked_calibrated(mlp_model):
    report = Pipeline.parse("cleanup").run(mlp_model, PassContext(inputs=[_feeds(2)], inputs_source="mine"))
    assert not report.records[0].calibrated and not report.shared_inputs
    assert report.verify_source == "mine"


def test_synthesized_inputs_are_verified_on_other_samples(mlp_model):
    ctx = PassContext()
    report = Pipeline.parse("test-calibrating").run(mlp_model, ctx)
    assert report.inputs_source == "synthesized" and report.verify_source.startswith("synthesized (other samples")
    assert not report.shared_inputs
    assert not any(np.array_equal(a["x"], b["x"]) for a, b in zip(ctx.inputs, ctx.verify_inputs))


def test_explicit_verification_inputs(mlp_model):
    report = Pipeline.parse("test-calibrating").run(mlp_model, calib=_feeds(8), verify_inputs=[_feeds(3, 5)])
    assert report.records[0].stats == {"samples": 8}  # nothing held out
    assert report.verify_source == "the given verification inputs (3 samples)"


def test_bad_calibration_argument(mlp_model):
    with pytest.raises(SlimgraphError, match="calib must be a file path, one feed"):
        Pipeline.parse("cleanup").run(mlp_model, calib=[1, 2])


def test_progress_hook(mlp_model):
    seen = []
    Pipeline.parse("test-tracked").run(mlp_model, progress=lambda what, done, total: seen.append((what, done, total)))
    assert seen == [("items", 0, 3), ("items", 1, 3), ("items", 2, 3), ("items", 3, 3)]


# --- checks before work, options, the Python surface --------------------------------------


def test_pipeline_accepts_text():
    assert Pipeline("cleanup,remove-dead-nodes") == Pipeline.parse("cleanup,remove-dead-nodes")
    with pytest.raises(TypeError, match="give one string or use Pipeline.parse"):
        Pipeline(["cleanup"])


def test_required_option_is_named():
    with pytest.raises(SlimgraphError, match=r"mixed-precision: option budget_mb is required \(float\), "
                                             r"e.g. mixed-precision\{budget_mb=...\}"):
        Pipeline.parse("mixed-precision")


def test_python_option_types_are_checked():
    from slimgraph.passes.quantize.weights import QuantizeWeights

    with pytest.raises(SlimgraphError, match=r"quantize-weights: option bits='4' is a str; expected 2\|4\|8"):
        QuantizeWeights(bits="4")
    with pytest.raises(SlimgraphError, match=r"option ratio='0.5' is a str; expected float"):
        _ToyOptions(ratio="0.5")
    with pytest.raises(SlimgraphError, match=r"option exclude='lm_head' is a str; expected \[str,...\]"):
        _ToyOptions(exclude="lm_head")
    with pytest.raises(SlimgraphError, match=r"option method=1 is an int; expected rtn\|awq"):
        _ToyOptions(method=1)
    with pytest.raises(SlimgraphError, match=r"bits must be one of 2\|4\|8, got 3"):
        QuantizeWeights(bits=3)  # the right type, not one of the choices
    assert _ToyOptions(exclude=["a", "b"]).exclude == ("a", "b")  # a list is taken for a tuple
    assert _ToyOptions(ratio=1).ratio == 1


def test_exclude_that_matches_nothing_is_refused_before_any_pass(mlp_model):
    before = [n.op_type for n in mlp_model.graph]
    with pytest.raises(SlimgraphError, match=r"quantize-weights: exclude=lm_head matches no linear layer or "
                                             r"embedding .*e.g. 'fc2'"):
        Pipeline.parse("cleanup,quantize-weights{exclude=[lm_head]}").run(mlp_model)
    assert [n.op_type for n in mlp_model.graph] == before  # cleanup did not run
    report = Pipeline.parse("quantize-weights{exclude=[fc1],group_size=16}").run(mlp_model)
    assert report.records[0].stats["linears quantized"] == 1


def test_reprs_summarize(mlp_model):
    report = Pipeline.parse("cleanup").run(mlp_model)
    assert repr(report).startswith("<PipelineReport cleanup: 1 passes, 860 B → 848 B, 9 → 6 nodes, ")
    assert repr(report.records[0]).startswith("<PassRecord cleanup: modified, exact, max rel err")
    assert repr(report.records[0].fidelity).startswith("<Fidelity cosine 1.00000 (worst: y)")
    assert repr(report.before) == "<ModelStats 215 parameters, 860 B, 9 nodes, 384 FLOPs>"
    assert len(repr(report)) < 200
    assert report.records[0].size.to_json() == {"bytes": {"before": 860, "after": 848}, "nodes": {"before": 9, "after": 6}}
