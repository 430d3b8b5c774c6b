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
    make_pass,
    register_pass,
)
from slimgraph.passes.cleanup import Cleanup, FoldConstants, RemoveDeadNodes


@register_pass
@dataclass(frozen=True, kw_only=True)
class _ToyOptions(Pass):
    """A pass with every option type, for grammar tests. Changes nothing."""

    name: ClassVar[str] = "test-toy-options"
    bits: Literal[2, 4, 8] = 4
    ratio: float = 0.5
    method: Literal["rtn", "awq"] = "rtn"
    enabled: bool = True
    exclude: tuple[str, ...] = ()
    label: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise SlimgraphError(f"test-toy-options: ratio must be in (0, 1], got {self.ratio}")

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
    pipeline, settings_ = Pipeline.from_recipe(path)
    assert pipeline.to_text() == "cleanup,test-toy-options{bits=8,exclude=[lm_head]}"
    assert settings_ == {"max_drop": 0.02}


@pytest.mark.parametrize(
    "text, message",
    [
        ("steps: [cleanup]\n", "needs a 'pipeline' entry"),
        ("pipeline: [cleanup]\nbudget: 3\n", "unknown setting 'budget'"),
        ("pipeline: [cleanup\n", "cannot be parsed"),
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
    with pytest.raises(FidelityError, match=r"fidelity budget exceeded after pass 'test-noise'.*--max-drop 1e-06"):
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
