"""nn.Module and .pt2 capture: dynamic axes, readable names, export failures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimgraph.errors import SlimgraphError
from slimgraph.frontend import load
from slimgraph.ir.graph import module_path
from slimgraph.measure import evaluate


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.encoder(x)).softmax(-1)


def test_module_with_dynamic_batch():
    torch.manual_seed(0)
    net = TinyNet().eval()
    model = load(net, example_inputs=(torch.randn(2, 8),), dynamic_shapes={"x": {0: "batch"}})
    assert str(model.graph.inputs[0].shape) == "[batch,8]"
    assert "encoder.0.weight" in model.graph.initializers and "head.weight" in model.graph.initializers
    scopes = {module_path(n) for n in model.graph}
    assert {"encoder.0", "head"} <= scopes
    for batch in (1, 5):
        x = torch.randn(batch, 8)
        got = evaluate.run(model, {"x": x.numpy()})
        np.testing.assert_allclose(next(iter(got.values())), net(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    feeds = model.meta["slimgraph.example_inputs"][0]
    assert feeds["x"].shape == (2, 8)


def test_pt2_round_trip(tmp_path):
    torch.manual_seed(0)
    net = TinyNet().eval()
    x = torch.randn(4, 8)
    program = torch.export.export(net, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    path = tmp_path / "tiny.pt2"
    torch.export.save(program, str(path))
    model = load(path)
    got = evaluate.run(model, {model.graph.inputs[0].name: x.numpy()})
    np.testing.assert_allclose(next(iter(got.values())), net(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    assert model.meta["slimgraph.example_inputs"]


def test_corrupt_pt2(tmp_path):
    path = tmp_path / "bad.pt2"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(SlimgraphError, match="not a valid .pt2 file"):
        load(path)


class Eigen(torch.nn.Module):
    def forward(self, x):
        return torch.linalg.eigvalsh(x)


class DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_export_failure_names_the_op():
    with pytest.raises(SlimgraphError, match=r"could not export Eigen: unsupported op aten\._linalg_eigh"):
        load(Eigen(), example_inputs=(torch.eye(3),))


def test_export_failure_names_the_code():
    with pytest.raises(SlimgraphError, match=r"could not export DataDependent: .*data-dependent.*in forward"):
        load(DataDependent(), example_inputs=(torch.randn(3),))


def test_module_needs_example_inputs():
    with pytest.raises(SlimgraphError, match="needs example_inputs"):
        load(TinyNet())


def test_cache_output_gets_a_hint(llama_folder):
    from slimgraph.frontend.hf_folder import load_transformers_model

    model = load_transformers_model(llama_folder)
    model.config.use_cache = True
    ids = torch.randint(0, 1000, (2, 4))
    with pytest.raises(SlimgraphError, match=r"set model.config.use_cache = False"):
        load(model, example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
