"""The same pipeline twice on the same model gives byte-identical files: ONNX for every pass, and the
PyTorch backend's model.py + model.safetensors. (merge-lora and merge-shira: tests/passes/adapters.)"""

from __future__ import annotations

from pathlib import Path

import pytest

import slimgraph
from slimgraph.passes import Pipeline
from slimgraph.passes._infra.registry import builtin_passes
from tests.conftest import copy_model

# pipeline → the fixture of the model it runs on
PIPELINES = {
    "cleanup": "mlp_model",
    "fold-constants,remove-identity,cse,remove-dead-nodes,remove-unused-initializers": "mlp_model",
    "remove-nan-guards": "minilm",
    "quantize-weights{bits=4,group_size=16,method=awq}": "mlp_model",
    "quantize-weights{bits=4,group_size=16,method=gptq}": "mlp_model",
    "quantize-dynamic": "mlp_model",
    "quantize-static{method=mse}": "mlp_model",
    "ternarize{method=tequila,group_size=16}": "mlp_model",
    "mixed-precision{budget_mb=0.001,candidates=[8,4],group_size=16}": "mlp_model",
    "low-rank{rank=2,method=activation}": "mlp_model",
    "low-rank{rank=2},heal{steps=10,lr=0.01}": "mlp_model",
    "prune-width{target=all,ratio=0.5}": "llama_ir",
    "prune-depth{blocks=1}": "llama_ir",
    "moe-convert{experts=4,top_k=2,method=kmeans}": "llama_ir",
    "trim-vocab{keep=100,keep_ids=[0]}": "llama_ir",
    "dct-tokens{at=1,keep=0.5}": "minilm",
    "cleanup,fuse-ort": "minilm",
}
ELSEWHERE = {"merge-lora", "merge-shira"}


def written(model, text: str, path: Path) -> bytes:
    model = copy_model(model)
    Pipeline.parse(text).run(model, verify="heal" in text)  # heal's teacher is the original Verify keeps
    return slimgraph.save(model, path).read_bytes()


def test_every_pass_is_covered():
    covered = {p.name for text in PIPELINES for p in Pipeline.parse(text).passes}
    assert covered | ELSEWHERE == set(builtin_passes())


@pytest.mark.parametrize("text", list(PIPELINES))
def test_onnx_output_is_byte_identical(request, tmp_path, text):
    model = request.getfixturevalue(PIPELINES[text])
    first, second = (written(model, text, tmp_path / f"{i}.onnx") for i in range(2))
    assert first == second


@pytest.mark.parametrize("text, fixture", [("quantize-weights{bits=4}", "minilm"), ("prune-width", "llama_ir")])
def test_pytorch_output_is_byte_identical(request, tmp_path, text, fixture):
    model = request.getfixturevalue(fixture)
    files = []
    for i in range(2):
        copy = copy_model(model)
        Pipeline.parse(text).run(copy, verify=False)
        folder = slimgraph.compile(copy, backend="pytorch").save(tmp_path / str(i))
        files.append({name: (folder / name).read_bytes() for name in ("model.py", "model.safetensors")})
    assert files[0] == files[1]
