"""Frontend for `.gguf` files (llama.cpp's format): dequantized to float32 through transformers.

transformers reads a GGUF's config, tokenizer and (quantized) tensors and builds the matching
PyTorch model in float32 (`from_pretrained(folder, gguf_file=name)`, which needs the `gguf`
package). From there the path is the Hugging Face folder's: the ONNX exporter with
`use_cache=False` (or, with `kv_cache=True`, past/present keys and values: `slimgraph.ir.cache_signature`)
and dynamic batch and sequence axes, example inputs from the file's own tokenizer. `model.meta[TOKENIZER_KEY]` is the `.gguf` path, so text calibration tokenizes with it.

Only what transformers can map is supported: a causal LM of an architecture in its GGUF table
(llama, mistral, qwen2/3, phi3, gemma2/3, gpt2, …). Anything else, and files that are not GGUF
or are cut short, are one-line errors.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

import onnx_ir as ir

from slimgraph.errors import SlimgraphError, first_line
from slimgraph.frontend.cache import Stage, export_once
from slimgraph.frontend.calibration import load_tokenizer
from slimgraph.frontend.hf_folder import EXAMPLE_SENTENCES, export_generation_steps, forward_parameters
from slimgraph.frontend.kv_cache import check_kv_options
from slimgraph.ir.meta import SOURCE_KEY, TOKENIZER_KEY

MAGIC = b"GGUF"


def load_gguf(path: Path, *, example_inputs: Any = None, dynamic_shapes: Any = None,
              kv_cache: bool = False, stage: Stage | None = None) -> ir.Model:
    _check_magic(path)
    check_kv_options(kv_cache, dynamic_shapes)
    # The full check (parsing the metadata, some seconds) runs only before an export: a file
    # found in the export cache has the content of one that was read whole before.
    model = export_once("gguf", path, _export_with_cache if kv_cache else _export, example_inputs, dynamic_shapes,
                        kv_cache, stage)
    model.meta[SOURCE_KEY] = str(path)
    model.meta[TOKENIZER_KEY] = str(path)
    return model


def check_gguf(path: Path) -> Any:
    """The transformers config of the GGUF; one-line errors for a file that is not a whole GGUF
    of an architecture transformers maps."""
    _check_magic(path)
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise SlimgraphError(f"reading {path.name} needs the gguf package (pip install gguf)") from exc
    try:
        # Parses the header, the metadata and the tensor table, and maps every tensor's bytes:
        # a file cut short fails here.
        reader = GGUFReader(path)
        architecture = reader.fields["general.architecture"].contents()
    except Exception as exc:  # struct.error, ValueError, KeyError, IndexError: all mean a damaged file
        raise SlimgraphError(f"{path} is truncated or damaged: {first_line(exc, limit=200)}") from exc
    return _read_config(path, architecture)


def _check_magic(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(len(MAGIC))
    if head != MAGIC:
        raise SlimgraphError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")


def load_gguf_transformers_model(path: Path, config: Any = None) -> Any:
    """The float32 PyTorch model transformers builds from the GGUF (with `config`, from `check_gguf`,
    when already read), in eval mode, with `use_cache` off by default."""
    import torch
    import transformers

    config = config if config is not None else check_gguf(path)
    config.use_cache = False
    options = {}
    if hasattr(transformers, "GgufConfig"):
        # transformers 5 keeps the weights in GGUF blocks when the `kernels` package has a matmul for them;
        # the exporter needs plain float32 weights.
        options["quantization_config"] = transformers.GgufConfig(dequantize=True)
    try:
        # transformers shows a tqdm bar while dequantizing, whatever its own progress-bar setting
        with contextlib.redirect_stderr(io.StringIO()):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, config=config, dtype=torch.float32, local_files_only=True, **options)
    except Exception as exc:
        raise SlimgraphError(f"transformers cannot build a model from {path}: {first_line(exc, limit=300)}") from exc
    return model.eval()


def _read_config(path: Path, architecture: str = "") -> Any:
    _quiet_transformers()
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except Exception as exc:  # "GGUF model with architecture … is not supported yet", and the like
        what = f"a GGUF of architecture '{architecture}'" if architecture else "this GGUF"
        raise SlimgraphError(f"transformers cannot read {path} ({what}): {first_line(exc, limit=300)}") from exc


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Converting and de-quantizing GGUF tensors" bars


def _export(path: Path, example_inputs: Any, dynamic_shapes: Any) -> ir.Model:
    from slimgraph.frontend.torch_module import load_module

    model = load_gguf_transformers_model(path, check_gguf(path))
    source = "example inputs"
    if example_inputs is None:
        tokenizer = load_tokenizer(path)
        encoded = tokenizer(EXAMPLE_SENTENCES, padding=True, return_tensors="pt")
        accepted = forward_parameters(model)
        example_inputs = {k: v for k, v in encoded.items() if k in accepted}
        source = f"tokenizer (from the .gguf): {len(EXAMPLE_SENTENCES)} built-in sentences"
    if dynamic_shapes is None:
        dynamic_shapes = {name: {0: "batch", 1: "sequence"} for name in example_inputs}
    return load_module(model, example_inputs=example_inputs, dynamic_shapes=dynamic_shapes, inputs_source=source)


def _export_with_cache(path: Path, example_inputs: Any, dynamic_shapes: Any) -> ir.Model:
    model = load_gguf_transformers_model(path, check_gguf(path))
    return export_generation_steps(model, path, example_inputs, tokenizer="tokenizer (from the .gguf)")
