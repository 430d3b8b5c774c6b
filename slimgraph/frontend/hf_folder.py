"""Frontend for Hugging Face model folders (config.json + safetensors, optional tokenizer).

Loaded offline with transformers: the model class is chosen from `config.architectures`;
example inputs come from the tokenizer when the folder has one, else from the config.
Batch and sequence axes are exported as dynamic.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import onnx_ir as ir

from slimgraph.errors import SlimgraphError, first_line
from slimgraph.frontend.calibration import has_tokenizer, load_tokenizer
from slimgraph.ir.meta import SOURCE_KEY

EXAMPLE_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Compilers turn programs into faster programs.",
    "A smaller model can answer the same question.",
    "Quantization stores weights in fewer bits.",
]
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def load_folder(path: Path, *, example_inputs: Any = None, dynamic_shapes: Any = None) -> ir.Model:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise SlimgraphError(f"{path} is not a Hugging Face model folder: no config.json")
    try:
        json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SlimgraphError(f"{config_path} is not valid JSON: {exc}") from exc
    model = load_transformers_model(path)
    source = "example inputs"
    if example_inputs is None:
        example_inputs, source = _example_inputs(path, model)
    if dynamic_shapes is None:
        dynamic_shapes = {name: ({0: "batch", 1: "sequence"} if name in TEXT_INPUTS else {0: "batch"})
                          for name in example_inputs}
    from slimgraph.frontend.torch_module import load_module

    ir_model = load_module(model, example_inputs=example_inputs, dynamic_shapes=dynamic_shapes, inputs_source=source)
    ir_model.meta[SOURCE_KEY] = str(path)
    return ir_model


def load_transformers_model(path: Path) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        architecture = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, architecture, None) if architecture else None
        model_class = model_class or transformers.AutoModel
        config.use_cache = False
        model = model_class.from_pretrained(path, config=config, local_files_only=True)
    except Exception as exc:
        raise SlimgraphError(f"transformers cannot load {path}: {first_line(exc)}") from exc
    return model.eval()


def _example_inputs(path: Path, model: Any) -> tuple[dict, str]:
    import torch

    if has_tokenizer(path):
        tokenizer = load_tokenizer(path)
        encoded = tokenizer(EXAMPLE_SENTENCES, padding=True, return_tensors="pt")
        accepted = _forward_parameters(model)
        inputs = {k: v for k, v in encoded.items() if k in accepted}
        return inputs, f"tokenizer: {len(EXAMPLE_SENTENCES)} built-in sentences"
    config = model.config
    generator = torch.Generator().manual_seed(0)
    if "pixel_values" in _forward_parameters(model):
        size = getattr(config, "image_size", 224)
        channels = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(2, channels, size, size, generator=generator)}, "synthesized from config"
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        raise SlimgraphError(f"{path}: no tokenizer and no vocab_size in config.json; pass example_inputs")
    ids = torch.randint(0, vocab, (2, 16), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "synthesized from config"


def _forward_parameters(model: Any) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)
