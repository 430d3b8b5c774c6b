"""ONNX Runtime GenAI backend: a model folder `onnxruntime-genai` runs as its users expect.

    out/model.onnx (+ model.onnx.data)   the decoder with the KV-cache signature (`ir/cache_signature.py`)
    out/genai_config.json                its shape, input and output names, the search defaults
    out/tokenizer files                  the model's tokenizer, saved as transformers saves it

`genai_config.json` is written as ONNX Runtime GenAI's model builder writes it; what it says
about the model comes from the graph (layers, KV heads, head size; the attention heads from
GroupQueryAttention where `fuse-ort` made it) and from the Hugging Face config the model was
loaded with (type, hidden size, special tokens, context length). `past_present_share_buffer` is
true when every layer's cache is read and written by one GroupQueryAttention, so that GenAI
keeps one buffer per layer, as `slimgraph.generate` does. In Python the artifact runs like the
onnxruntime backend's (it is one, with another `save`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx_ir as ir

from slimgraph.backends.onnxruntime import OnnxRuntimeArtifact, save_onnx
from slimgraph.backends.output import check_writable
from slimgraph.errors import SlimgraphError
from slimgraph.frontend.reader import READER
from slimgraph.ir.cache_signature import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    PRESENT,
    cache_layers,
    empty_past,
    past_name,
    shares_cache_buffers,
)

MODEL_FILE = "model.onnx"
CONFIG_FILE = "genai_config.json"


class OnnxRuntimeGenaiArtifact(OnnxRuntimeArtifact):
    """A KV-cache decoder compiled for ONNX Runtime, saved as an ONNX Runtime GenAI model folder."""

    backend = "onnxruntime-genai"

    @staticmethod
    def check_output(path: Path) -> None:
        if path.suffix:
            raise SlimgraphError(f"-o {path}: the onnxruntime-genai backend writes a folder (a name without a suffix)")
        check_writable(path, folder=True)

    def __init__(self, model: ir.Model, **options: Any) -> None:
        genai_config(model)  # refuse a model GenAI cannot run before any work is saved
        super().__init__(model, **options)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the folder (staged next to it, then moved into place)."""
        folder = Path(path)
        self.check_output(folder)
        config = genai_config(self.model)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            save_onnx(self.model, staging / MODEL_FILE, external_data=True)
            (staging / CONFIG_FILE).write_text(json.dumps(config, indent=4) + "\n")
            _save_tokenizer(self.model, staging)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder


def genai_config(model: ir.Model) -> dict[str, Any]:
    """The `genai_config.json` of `model` (module docstring); one-line errors for what GenAI cannot run."""
    layers = cache_layers(model)
    inputs = {v.name for v in model.graph.inputs if not v.is_initializer()}
    outputs = [v.name for v in model.graph.outputs]
    if not layers or ATTENTION_MASK not in inputs:
        raise SlimgraphError("the onnxruntime-genai backend needs a causal LM with a KV cache (--kv-cache) and an "
                             "attention mask")
    extra = [n for n in outputs if n != LOGITS and not PRESENT.match(n)]
    if extra or outputs[0] != LOGITS:
        raise SlimgraphError(f"ONNX Runtime GenAI reads only logits and the cache; the model also outputs "
                             f"{', '.join(extra)} (trim-vocab's token_ids: its logits cover some ids only)")
    hf = _hf_config(model)
    past = empty_past(model, 1)[past_name(0, "key")]
    heads = next((node.attributes["num_heads"].value for node in model.graph
                  if node.op_type == "GroupQueryAttention"), hf.get("num_attention_heads"))
    context = int(hf.get("max_position_embeddings") or hf.get("n_positions") or 2048)
    names = {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK,
             "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    if POSITION_IDS in inputs:
        names["position_ids"] = POSITION_IDS
    eos = hf.get("eos_token_id", 0)
    return {
        "model": {
            "bos_token_id": hf.get("bos_token_id", 0),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": int(past.shape[3]),
                "hidden_size": hf.get("hidden_size") or hf.get("n_embd"),
                "inputs": names,
                "outputs": {"logits": LOGITS, "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": heads,
                "num_hidden_layers": layers,
                "num_key_value_heads": int(past.shape[1]),
            },
            "eos_token_id": eos,
            "pad_token_id": hf.get("pad_token_id") if hf.get("pad_token_id") is not None else eos,
            "type": hf.get("model_type", "decoder"),
            "vocab_size": hf.get("vocab_size"),
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": shares_cache_buffers(model),
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def _hf_config(model: ir.Model) -> dict[str, Any]:
    config = READER.model_config(model)
    if config is not None:
        return config
    raise SlimgraphError("the onnxruntime-genai backend needs the Hugging Face config of the model (load it from "
                         "its folder or .gguf)")


def _save_tokenizer(model: ir.Model, folder: Path) -> None:
    tokenizer = READER.tokenizer(model)
    if tokenizer is not None:  # (without one GenAI runs token ids; its Tokenizer needs the files)
        tokenizer.save_pretrained(folder)
