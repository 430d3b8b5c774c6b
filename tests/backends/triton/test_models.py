"""Whole models through the Triton backend (kernels interpreted on CPU) against ONNX Runtime and the
PyTorch backend: a small Llama and MiniLM after quantize-weights, a Llama after moe-convert, the saved
folder run on its own, and every generated kernel compiled for an sm_90 GPU by Triton's compiler."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import slimgraph
from slimgraph.measure.inputs import sample_inputs
from slimgraph.passes import Pipeline
from tests.backends.triton.helpers import GPU_SETTINGS, assert_matches
from tests.conftest import copy_model


@pytest.mark.slow
@pytest.mark.parametrize("text", ["quantize-weights{bits=4}", "quantize-weights{bits=8,group_size=64}",
                                  "quantize-weights{bits=2,group_size=16,symmetric=true}"])
def test_llama(llama_ir, text):
    model = copy_model(llama_ir)
    Pipeline.parse(text).run(model, verify=False)
    for sequence in (1, 6):  # a decoding step (GEMV) and a prompt (GEMM)
        artifact = assert_matches(model, sample_inputs(model, batch=1, sequence=sequence))
    names = set(artifact.plan.sources)
    assert {f"model_layers_N_self_attn_q_proj_int{text[22]}", f"model_layers_N_mlp_down_proj_int{text[22]}",
            "model_layers_N_post_attention_layernorm_fused"} <= names
    epilogues = [call.spec.epilogue.ops for call in artifact.plan.calls
                 if getattr(call.spec, "epilogue", None) is not None]
    assert epilogues == ["Sigmoid → Mul → Mul"] * 3  # SiLU(gate) · up, in the up projection's kernel
    assert artifact.report.pytorch["com.microsoft::MatMulNBits"] == 0


@pytest.mark.slow
def test_llama_moe(llama_ir):
    """moe-convert's com.microsoft.MoE (routing, grouped expert GEMMs) with int4 linears around it (the
    experts kept float: quantized, they are a QMoE, which runs on the PyTorch lowering)."""
    model = copy_model(llama_ir)
    Pipeline.parse("moe-convert{experts=4,top_k=2}").run(model, verify=False)
    Pipeline.parse("quantize-weights{bits=4,exclude=[*MoE*]}").run(model, verify=False)
    artifact = assert_matches(model, sample_inputs(model, batch=1, sequence=5))
    assert artifact.report.triton["com.microsoft::MoE"] == 3


@pytest.mark.slow
def test_minilm(minilm):
    model = minilm
    Pipeline.parse("quantize-weights{bits=4,embeddings=true}").run(model, verify=False)
    feeds = {name: array[:2, :7] for name, array in model.meta["slimgraph.example_inputs"][0].items()}
    artifact = assert_matches(model, feeds)
    assert artifact.report.triton["com.microsoft::GatherBlockQuantized"] == 3
    assert artifact.report.triton["LayerNormalization"] == 13  # with the residual Add before each


@pytest.mark.slow
def test_saved_folder_runs_on_its_own(llama_ir, tmp_path):
    """model.py + kernels.py + model.safetensors need only torch, triton and safetensors."""
    model = copy_model(llama_ir)
    Pipeline.parse("quantize-weights{bits=4}").run(model, verify=False)
    artifact = slimgraph.compile(model, backend="triton", device="cpu")
    feeds = sample_inputs(model, batch=1, sequence=3)
    want = artifact(**feeds)["logits"]
    artifact.save(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["kernels.py", "model.py", "model.safetensors"]
    np.save(tmp_path / "ids.npy", feeds["input_ids"])
    code = (f"import sys, numpy as np, torch\nsys.path.insert(0, {str(tmp_path / 'out')!r})\nfrom model import load\n"
            f"ids = torch.from_numpy(np.load({str(tmp_path / 'ids.npy')!r}))\n"
            "logits = load()(ids, torch.ones_like(ids))[0]\n"
            f"np.save({str(tmp_path / 'got.npy')!r}, logits.numpy())\n"
            "assert not {'slimgraph', 'onnx', 'onnx_ir', 'onnxruntime'} & set(sys.modules), 'imported more'\n")
    env = {"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert np.abs(np.load(tmp_path / "got.npy") - want).max() <= 1e-5 * np.abs(want).max()
    source = (tmp_path / "out" / "model.py").read_text()
    assert "kernels.model_layers_N_mlp_down_proj_int4(" in source
    # structured as the PyTorch backend writes it: a class per kind of decoder layer, in a ModuleList
    assert "class LlamaDecoderLayer(nn.Module):" in source and "self.model.layers = nn.ModuleList([" in source
    assert "self.self_attn.q_proj.weight.scales" in source  # block-relative names, from the source model


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90(llama_ir):
    """Kernels as a GPU would launch them (GPU tile sizes), float16 (and float32 where tl.dot's precision
    differs), through Triton's compiler for sm_90 (H100/H200): int4 GEMV/GEMM with epilogues, the fused
    norms, ternary (both variants), quantized embeddings and MoE."""
    from tests.backends.pytorch.test_moe import EXPERTS, HIDDEN, _moe_model
    from tests.backends.triton.gpu_compile import compile_for_gpu, record_launches
    from tests.backends.triton.helpers import linear_model
    from tests.backends.triton.test_gather_moe import _embedding_model

    cases = []
    model = copy_model(llama_ir)
    Pipeline.parse("quantize-weights{bits=4}").run(model, verify=False)
    cases.append((model, {}, [sample_inputs(model, batch=1, sequence=s) for s in (1, 4)]))
    for variant in ("mixpe", "lut"):
        ternary = linear_model(64, 40)
        Pipeline.parse("ternarize{method=tequila,group_size=32}").run(ternary, verify=False)
        rows = [{"x": np.ones((r, 64), np.float32)} for r in (1, 4)]
        cases.append((ternary, {"ternary": variant}, rows))
    embedding = _embedding_model()
    Pipeline.parse("quantize-weights{bits=4,embeddings=true}").run(embedding, verify=False)
    cases.append((embedding, {}, [{"ids": np.array([[1, 2]], np.int64)}]))
    cases.append((_moe_model("swiglu", swiglu_fusion=1), {}, [
        {"x": np.ones((1, 3, HIDDEN), np.float32), "router": np.eye(3, EXPERTS, dtype=np.float32)}]))
    compiled, launched = set(), set()
    for case, options, feeds in cases:
        artifact = slimgraph.compile(case, backend="triton", device="cpu", launch=GPU_SETTINGS, **options)
        launches = record_launches(artifact.kernels)
        for feed in feeds:
            artifact(**feed)
        launched |= {name for name, _, _ in launches}
        compiled |= set(compile_for_gpu(artifact.source, launches, half=True))
        with_dots = {name for name, _, _ in launches if name.endswith(("_gemm", "_fc1", "_fc2"))}
        compile_for_gpu(artifact.source, launches, only=with_dots)  # float32: tl.dot with ieee products
    assert compiled == launched
    assert {"model_layers_N_mlp_up_proj_int4_gemv", "model_layers_N_mlp_up_proj_int4_gemm",
            "model_layers_N_post_attention_layernorm_fused_kernel"} <= compiled
    kinds = ("_ternary_lut", "_ternary_gemv", "_ternary_gemm", "_gather_kernel", "_moe_route", "_moe_fc1", "_moe_fc2")
    assert all(any(name.endswith(kind) for name in compiled) for kind in kinds), sorted(compiled)


def test_a_kernels_module_imported_before_is_not_what_the_artifact_calls():
    """model.py imports `kernels`: the artifact's own is lent to that import, and a module of that name
    the process held before (a saved folder's kernels.py) is put back after."""
    import types

    from tests.backends.triton.helpers import linear_model

    model = linear_model(64, 32)
    Pipeline.parse("quantize-weights{bits=4,group_size=32}").run(model, verify=False)
    stale = types.ModuleType("kernels")
    sys.modules["kernels"] = stale
    try:
        artifact = slimgraph.compile(model, backend="triton", device="cpu")
        assert sys.modules["kernels"] is stale
    finally:
        del sys.modules["kernels"]
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(artifact(x=x)["y"], slimgraph.compile(model, backend="pytorch")(x=x)["y"],
                               rtol=1e-4, atol=1e-4)
