"""Passes register themselves by being in the passes package: adding one is one new file."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import textwrap

import numpy as np
import onnx_ir as ir
import pytest

import slimgraph.backends
import slimgraph.passes
from slimgraph.errors import SlimgraphError
from slimgraph.measure import evaluate
from slimgraph.passes import Pipeline
from slimgraph.passes._infra import registry
from tests.conftest import make_mlp

NEW_PASS = '''
"""scale-outputs: y → y · factor (a pass that exists only in this test's temporary package)."""

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir

from slimgraph.passes import Pass, PassContext, PassResult, register_pass
from slimgraph.passes._infra.options import option


@register_pass
@dataclass(frozen=True, kw_only=True)
class ScaleOutputs(Pass):
    """y → Mul(y, factor) on every graph output."""

    name: ClassVar[str] = "scale-outputs"
    exact: ClassVar[bool] = False
    factor: float = option(2.0, low=0, low_open=True)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        for index, output in enumerate(list(model.graph.outputs)):
            factor = ir.Value(name=f"{output.name}_factor", const_value=ir.tensor(self.factor, dtype=output.dtype))
            model.graph.register_initializer(factor)
            scaled = ir.node("Mul", [output, factor], name=f"scale_{output.name}")
            scaled.outputs[0].name, scaled.outputs[0].shape, scaled.outputs[0].type = (
                f"{output.name}_scaled", output.shape, output.type)
            model.graph.append(scaled)
            model.graph.outputs[index] = scaled.outputs[0]
        return PassResult(True, {"outputs scaled": len(model.graph.outputs)})
'''


def test_the_built_in_passes_are_the_registered_classes_of_the_package():
    """Reading the source finds exactly the passes that importing every module registers (the passes
    package's, and heal beside the PyTorch backend it trains through)."""
    for package in (slimgraph.passes, slimgraph.backends):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if "triton" not in module.name:  # (imports triton, which a CPU machine may lack)
                importlib.import_module(module.name)
    registered = {name: cls.__module__ for name, cls in registry._REGISTRY.items()
                  if cls.__module__.startswith(("slimgraph.passes.", "slimgraph.backends."))}
    assert registry.builtin_passes() == registered
    assert registered["heal"] == "slimgraph.backends.pytorch.heal"


def test_a_new_file_in_the_passes_package_is_a_pass(tmp_path, monkeypatch):
    package = tmp_path / "more_passes"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scale_outputs.py").write_text(textwrap.dedent(NEW_PASS))
    monkeypatch.syspath_prepend(str(tmp_path))
    found = registry.builtin_pass_modules(package, "more_passes")
    assert found == {"scale-outputs": "more_passes.scale_outputs"}
    assert "more_passes.scale_outputs" not in sys.modules  # found without importing it

    monkeypatch.setattr(registry, "builtin_passes", lambda: {**registry.builtin_pass_modules(), **found})
    monkeypatch.delitem(registry._REGISTRY, "scale-outputs", raising=False)
    assert "scale-outputs" in registry.known_pass_names()
    with pytest.raises(SlimgraphError, match=r"scale-outputs: factor must be above 0, got -1"):
        Pipeline.parse("scale-outputs{factor=-1}")

    model = ir.serde.deserialize_model(make_mlp())
    x = np.ones((2, 8), np.float32)
    before = evaluate.run(model, {"x": x})
    Pipeline.parse("scale-outputs{factor=3}").run(model, verify_inputs=[{"x": x}])
    after = evaluate.run(model, {"x": x})
    np.testing.assert_allclose(list(after.values())[0], 3 * list(before.values())[0], rtol=1e-6)
    monkeypatch.delitem(registry._REGISTRY, "scale-outputs")


def test_one_name_in_two_files_is_refused(tmp_path):
    package = tmp_path / "twice"
    package.mkdir()
    for stem in ("a", "b"):
        (package / f"{stem}.py").write_text(textwrap.dedent(NEW_PASS))
    with pytest.raises(ValueError, match="'scale-outputs' is defined in both twice.a and twice.b"):
        registry.builtin_pass_modules(package, "twice")
