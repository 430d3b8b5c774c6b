"""Frontend for Hugging Face model folders (config.json + safetensors, optional tokenizer).

Loaded offline with transformers: the model class is chosen from `config.architectures`;
example inputs come from the tokenizer when the folder has one, else from the config.
Batch and sequence axes are exported as dynamic. The graph computes in float32 (a bf16 or fp16
checkpoint's weights widen exactly), which is what a CPU runs. The model is built and exported without
its weights, each then read from its safetensors file when used (`slimgraph.frontend.lazy_weights`),
unless the files do not hold every parameter by name. The export is cached on disk, keyed by the
folder's content (`slimgraph.frontend.cache`), so loading the same folder again is fast.

A causal LM is exported without a KV cache (each call computes the whole sequence), or with
`kv_cache=True` with past/present keys and values (`slimgraph.ir.cache_signature`), the graph
that `slimgraph.generate` runs one token at a time.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from slimgraph.errors import SlimgraphError, first_line
from slimgraph.frontend.cache import Stage, export_once
from slimgraph.frontend.calibration import has_tokenizer, load_tokenizer
from slimgraph.frontend.kv_cache import check_kv_options
from slimgraph.ir.meta import INPUTS_READ_WEIGHTS_KEY, OUTPUT_MAPS_KEY, SOURCE_KEY, TOKENIZER_KEY
from slimgraph.measure.fidelity import OutputMap

if TYPE_CHECKING:
    from slimgraph.frontend.lazy_weights import StandIns

EXAMPLE_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Compilers turn programs into faster programs.",
    "A smaller model can answer the same question.",
    "Quantization stores weights in fewer bits.",
]
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def is_pytorch_backend_folder(path: Path) -> bool:
    """A folder the PyTorch backend wrote (model.py + model.safetensors), not a Hugging Face model."""
    return path.is_dir() and (path / "model.py").is_file() and not (path / "config.json").is_file()


def load_folder(path: Path, *, example_inputs: Any = None, dynamic_shapes: Any = None,
                kv_cache: bool = False, stage: Stage | None = None) -> ir.Model:
    config_path = path / "config.json"
    if is_pytorch_backend_folder(path):
        raise SlimgraphError(f"{path} is a PyTorch-backend folder (model.py + model.safetensors), which slimgraph "
                             "writes but does not read: give it the model it was made from, or a .pt2 "
                             "(optimize --backend pytorch -o model.pt2)")
    if not config_path.is_file():
        raise SlimgraphError(f"{path} is not a Hugging Face model folder: no config.json")
    try:
        json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SlimgraphError(f"{config_path} is not valid JSON: {exc}") from exc
    check_kv_options(kv_cache, dynamic_shapes)
    ir_model = export_once("hf-folder", path, _export_with_cache if kv_cache else _export, example_inputs,
                           dynamic_shapes, kv_cache, stage)
    ir_model.meta[SOURCE_KEY] = str(path)
    if has_tokenizer(path):
        ir_model.meta[TOKENIZER_KEY] = str(path)
    pooled = sentence_pooling(path, ir_model)
    if pooled:
        ir_model.meta[OUTPUT_MAPS_KEY] = pooled
    return ir_model


def sentence_pooling(path: Path, model: ir.Model) -> dict[str, OutputMap]:
    """A sentence-transformers folder whose Pooling module means the token states over the
    attention mask: its users read sentence embeddings, so Verify compares those (the token
    states → their pooled sentences). Other pooling modes keep the token-by-token comparison."""
    try:
        modules = json.loads((path / "modules.json").read_text())
        pooling = next(m for m in modules if m.get("type", "").endswith(".Pooling"))
        config = json.loads((path / pooling.get("path", "") / "config.json").read_text())
    except (OSError, ValueError, StopIteration, AttributeError, TypeError):
        return {}
    modes = {key for key, on in config.items() if key.startswith("pooling_mode_") and on is True}
    tokens = model.graph.outputs[0] if model.graph.outputs else None
    if modes != {"pooling_mode_mean_tokens"} or "attention_mask" not in {v.name for v in model.graph.inputs} \
            or tokens is None or tokens.shape is None or tokens.shape.rank() != 3:
        return {}
    return {tokens.name: OutputMap(pooled_by="attention_mask")}


def _export(path: Path, example_inputs: Any, dynamic_shapes: Any) -> ir.Model:
    built = build_without_weights(path)
    model = built.model if built is not None else load_transformers_model(path)
    source = "example inputs"
    if example_inputs is None:
        example_inputs, source = _example_inputs(path, model)
    if dynamic_shapes is None:
        dynamic_shapes = {name: ({0: "batch", 1: "sequence"} if name in TEXT_INPUTS else {0: "batch"})
                          for name in example_inputs}
    from slimgraph.frontend.torch_module import load_module

    return load_module(model, example_inputs=example_inputs, dynamic_shapes=dynamic_shapes, inputs_source=source,
                       bind_weights=built.bind if built is not None else None)


def _export_with_cache(path: Path, example_inputs: Any, dynamic_shapes: Any) -> ir.Model:
    built = build_without_weights(path)
    if built is None:
        return export_generation_steps(load_transformers_model(path), path, example_inputs)
    exported = export_generation_steps(built.model, path, example_inputs, bind_weights=built.bind,
                                       forward_context=built.onloaded)
    exported.meta[INPUTS_READ_WEIGHTS_KEY] = True  # its example steps' past: a new checkpoint needs new ones
    return exported


def export_generation_steps(model: Any, tokenizer_source: Path, example_inputs: Any, tokenizer: str = "tokenizer",
                            **weights: Any) -> ir.Model:
    """A transformers causal LM exported with its KV cache, the prompt (`example_inputs`, else the
    built-in sentences through the tokenizer at `tokenizer_source`) run as two generation steps.
    `weights`: `bind_weights` and `forward_context` of a model built without them (`load_module`)."""
    from slimgraph.frontend.kv_cache import check_causal_lm
    from slimgraph.frontend.torch_module import load_module

    check_causal_lm(model)  # before the prompt is made: the error names the model, not the prompt
    source = "example inputs"
    if example_inputs is None:
        example_inputs, source = prompt_inputs(tokenizer_source, model.config)
        source = source.replace("tokenizer", tokenizer, 1)
    return load_module(model, example_inputs=example_inputs, inputs_source=f"{source}, as two generation steps",
                       kv_cache=True, **weights)


def prompt_inputs(tokenizer_source: Path | None, config: Any) -> tuple[dict, str]:
    """The built-in sentences left-padded (as generation pads a batch), or random ids of 16 tokens."""
    import torch

    if tokenizer_source is not None and has_tokenizer(tokenizer_source):
        tokenizer = load_tokenizer(tokenizer_source)
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            encoded = tokenizer(EXAMPLE_SENTENCES, padding=True, return_tensors="pt")
        finally:
            tokenizer.padding_side = side
        return {k: encoded[k] for k in ("input_ids", "attention_mask")}, \
            f"tokenizer: {len(EXAMPLE_SENTENCES)} built-in sentences"
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        raise SlimgraphError("no tokenizer and no vocab_size in config.json; pass example_inputs")
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "synthesized from config"


def load_transformers_model(path: Path) -> Any:
    import torch

    config, model_class = _config_and_class(path)
    try:
        # float32, whatever the checkpoint's dtype: most decoders ship bf16, which ONNX Runtime's CPU
        # provider does not compute in; bf16 and fp16 weights widen to float32 exactly
        model = model_class.from_pretrained(path, config=config, dtype=torch.float32, local_files_only=True)
    except Exception as exc:
        raise SlimgraphError(f"transformers cannot load {path}: {first_line(exc)}") from exc
    return model.eval()


def build_without_weights(path: Path) -> StandIns | None:
    """The folder's model built with stand-in parameters, bound later to its safetensors files
    (`slimgraph.frontend.lazy_weights`); None when not every parameter is there by name and shape,
    to be loaded whole instead."""
    import torch
    import transformers

    from slimgraph.frontend import lazy_weights

    index = lazy_weights.safetensors_index(path)
    if not index:
        return None
    config, model_class = _config_and_class(path)
    if model_class is transformers.AutoModel:
        build = functools.partial(model_class.from_config, config, dtype=torch.float32)
    else:
        build = functools.partial(model_class._from_config, config, dtype=torch.float32)
    try:
        return lazy_weights.build_with_stand_ins(build, index)
    except Exception as exc:
        raise SlimgraphError(f"transformers cannot build {path}: {first_line(exc)}") from exc


def _config_and_class(path: Path) -> tuple[Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise SlimgraphError(f"transformers cannot load {path}: {first_line(exc)}") from exc
    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    config.use_cache = False
    return config, model_class or transformers.AutoModel


def _example_inputs(path: Path, model: Any) -> tuple[dict, str]:
    import torch

    if has_tokenizer(path):
        tokenizer = load_tokenizer(path)
        encoded = tokenizer(EXAMPLE_SENTENCES, padding=True, return_tensors="pt")
        accepted = forward_parameters(model)
        inputs = {k: v for k, v in encoded.items() if k in accepted}
        return inputs, f"tokenizer: {len(EXAMPLE_SENTENCES)} built-in sentences"
    config = model.config
    generator = torch.Generator().manual_seed(0)
    if "pixel_values" in forward_parameters(model):
        size = getattr(config, "image_size", 224)
        channels = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(2, channels, size, size, generator=generator)}, "synthesized from config"
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        raise SlimgraphError(f"{path}: no tokenizer and no vocab_size in config.json; pass example_inputs")
    ids = torch.randint(0, vocab, (2, 16), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "synthesized from config"


def forward_parameters(model: Any) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)
