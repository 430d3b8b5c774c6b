"""PEFT adapter folders (`adapter_config.json` + `adapter_model.safetensors`) read into numpy.

What PEFT saves (keys carry the wrapper's prefix `base_model.model.`, then the module path in the
base model, e.g. `model.layers.0.self_attn.q_proj`):

- LoRA (`peft_type: LORA`), per adapted module: `lora_A.weight` [r, in], `lora_B.weight` [out, r],
  `lora_B.bias` [out] (`lora_bias`), `lora_magnitude_vector` [out] (DoRA). An embedding has
  `lora_embedding_A` [r, num_embeddings] and `lora_embedding_B` [dim, r]: it acts as a linear
  from one-hot ids (in = num_embeddings, out = dim), so the same arithmetic serves both.
  The scale is `alpha / r` (`use_rslora`: `alpha / √r`), with r and alpha per module from
  `rank_pattern` / `alpha_pattern` (regex keys matched against the end of the module path, the
  first that matches wins: PEFT's `get_pattern_key`).
- SHiRA (`peft_type: SHIRA`), per module: `shira_weight` [n] and `shira_indices` [2, n] (row, col
  in PyTorch's [out, in] layout); PEFT's scale is 1.

Everything is read as float32, bf16 adapters included. What this module does not understand is an
error that names it, never skipped: a key it does not know, a LoRA variant other than plain LoRA
and DoRA, an initialization that changed the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA:
such factors only make sense on the changed base), trained biases or whole modules saved beside
the adapter.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from slimgraph.errors import SlimgraphError
from slimgraph.frontend.safetensors_file import read_safetensors
from slimgraph.passes.adapters.records import SUPPORTED, Adapter, LoraModule, ShiraModule

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

LORA_KEYS = {
    "lora_A.weight": "a", "lora_B.weight": "b", "lora_B.bias": "bias",
    "lora_magnitude_vector": "magnitude", "lora_magnitude_vector.weight": "magnitude",  # (older PEFT)
    "lora_embedding_A": "embedding_a", "lora_embedding_B": "embedding_b",
}
SHIRA_KEYS = {"shira_weight": "values", "shira_indices": "indices"}

# LoRA settings under which the saved factors are not plain LoRA / DoRA factors.
UNSUPPORTED_LORA_SETTINGS = {
    "use_bdlora": "block-diagonal LoRA", "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "arrow_config": "Arrow routing", "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA", "use_qalora": "QA-LoRA", "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters (target_parameters)", "trainable_token_indices": "trainable tokens",
    "modules_to_save": "whole trained modules (modules_to_save)",
}
# Initializations that change the base weights: the saved factors belong to that changed base.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def read_adapter(path: str | Path) -> Adapter:
    """Read and check a PEFT adapter folder (or its `adapter_config.json`)."""
    folder = Path(path)
    if folder.name == CONFIG_FILE and folder.is_file():
        folder = folder.parent
    if not folder.exists():
        raise SlimgraphError(f"no adapter at {folder}")
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file():
        raise SlimgraphError(f"{folder} has no {CONFIG_FILE} (a PEFT adapter folder holds {CONFIG_FILE} and "
                             f"{WEIGHTS_FILE})")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SlimgraphError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise SlimgraphError(f"{config_path} is not a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in SUPPORTED:
        raise SlimgraphError(f"{config_path}: peft_type {config.get('peft_type')!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED)})")
    if not weights_path.is_file():
        pickled = " (it holds adapter_model.bin, a pickle: save with safe_serialization=True)" if (
            folder / "adapter_model.bin").is_file() else ""
        raise SlimgraphError(f"{folder} has no {WEIGHTS_FILE}{pickled}")
    tensors = read_safetensors(weights_path)
    grouped = _group_keys(tensors, LORA_KEYS if peft_type == "LORA" else SHIRA_KEYS, weights_path)
    if not grouped:
        raise SlimgraphError(f"{weights_path} holds no {peft_type} weights")
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    common = dict(path=folder, base_model=config.get("base_model_name_or_path") or None, fan_in_fan_out=fan_in_fan_out)
    if peft_type == "SHIRA":
        if fan_in_fan_out:
            raise SlimgraphError(f"{config_path}: SHiRA with fan_in_fan_out is not supported (PEFT's SHiRA layer "
                                 "adapts nn.Linear weights only)")
        modules = {p: _shira_module(p, parts, weights_path) for p, parts in grouped.items()}
        return Adapter(peft_type=peft_type, modules=modules, **common)
    _check_lora_settings(config, config_path)
    modules = {p: _lora_module(p, parts, config, weights_path) for p, parts in grouped.items()}
    return Adapter(peft_type=peft_type, modules=modules, dora=bool(config.get("use_dora")),
                   rslora=bool(config.get("use_rslora")), **common)


def _group_keys(tensors: dict[str, np.ndarray], known: dict[str, str], where: Path) -> dict[str, dict[str, np.ndarray]]:
    """module path → {part: tensor}; any key that is not `base_model.model.<path>.<known part>` is an error."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    unknown = []
    for key, tensor in tensors.items():
        rest = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else None
        suffix = next((s for s in known if rest is not None and rest.endswith("." + s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        grouped.setdefault(rest[: -len(suffix) - 1], {})[known[suffix]] = tensor
    if unknown:
        parts = ", ".join(sorted(set(known)))
        raise SlimgraphError(f"{where}: {len(unknown)} tensor{'s' if len(unknown) > 1 else ''} slimgraph cannot "
                             f"merge, e.g. {unknown[0]!r} (it reads base_model.model.<module>.{{{parts}}})")
    return grouped


def _check_lora_settings(config: dict[str, Any], where: Path) -> None:
    for key, what in UNSUPPORTED_LORA_SETTINGS.items():
        if config.get(key):
            raise SlimgraphError(f"{where}: {key}={config[key]!r} ({what}) is not supported; merge-lora fuses "
                                 "plain LoRA and DoRA")
    if config.get("bias", "none") != "none":
        raise SlimgraphError(f"{where}: bias={config['bias']!r} saves trained base-model biases beside the adapter, "
                             "which merge-lora does not replace (use bias='none', or lora_bias=True)")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise SlimgraphError(f"{where}: init_lora_weights={init!r} changed the base weights when training began, "
                             "so its factors do not apply to the original base (convert it to a plain LoRA first: "
                             "PEFT's save_pretrained(path_initial_model_for_weight_conversion=...))")


def pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's `get_pattern_key`: the value of the first key (a regex) that matches the end of `path`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _float32(tensor: np.ndarray, what: str, where: Path) -> np.ndarray:
    array = np.asarray(tensor, dtype=np.float32)
    if not np.isfinite(array).all():
        raise SlimgraphError(f"{where}: {what} holds NaN or infinite values")
    return array


def _lora_module(path: str, parts: dict[str, np.ndarray], config: dict[str, Any], where: Path) -> LoraModule:
    embedding = "embedding_a" in parts or "embedding_b" in parts
    a_key, b_key = ("embedding_a", "embedding_b") if embedding else ("a", "b")
    a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    if embedding and ("a" in parts or "b" in parts):
        raise SlimgraphError(f"{where}: {path} has both lora_A/lora_B and lora_embedding_A/lora_embedding_B")
    for key, name, other in ((a_key, a_name, b_name), (b_key, b_name, a_name)):
        if key not in parts:
            raise SlimgraphError(f"{where}: {path} has {other} but no {name}")
    a, b = parts[a_key], parts[b_key]
    if a.ndim != 2 or b.ndim != 2:
        raise SlimgraphError(f"{where}: {path}.{a_name} is {a.ndim}-D: LoRA on convolutions is not supported "
                             "(only linear layers and embeddings)")
    rank = a.shape[0]
    if b.shape[1] != rank:
        raise SlimgraphError(f"{where}: {path}: rank mismatch: {a_name} has {rank} rows, {b_name} "
                             f"{b.shape[1]} columns")
    r = pattern_value(config.get("rank_pattern") or {}, path, config.get("r", rank))
    alpha = pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", r))
    if r != rank:
        raise SlimgraphError(f"{where}: {path}: rank mismatch: adapter_config.json gives r={r} "
                             f"(r / rank_pattern) but {a_name} has {rank} rows")
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    out = b.shape[0]
    magnitude = parts.get("magnitude")
    if bool(config.get("use_dora")) != (magnitude is not None):
        raise SlimgraphError(f"{where}: {path}: use_dora={bool(config.get('use_dora'))} but lora_magnitude_vector "
                             f"is {'missing' if magnitude is None else 'present'}")
    if magnitude is not None and magnitude.shape != (out,):
        raise SlimgraphError(f"{where}: {path}: lora_magnitude_vector has shape {list(magnitude.shape)}, "
                             f"expected [{out}]")
    bias = parts.get("bias")
    if bias is not None and bias.shape != (out,):
        raise SlimgraphError(f"{where}: {path}: lora_B.bias has shape {list(bias.shape)}, expected [{out}]")
    return LoraModule(
        path=path, a=_float32(a, f"{path}.{a_name}", where), b=_float32(b, f"{path}.{b_name}", where),
        scaling=float(scaling),
        magnitude=None if magnitude is None else _float32(magnitude, f"{path}.lora_magnitude_vector", where),
        bias=None if bias is None else _float32(bias, f"{path}.lora_B.bias", where),
        embedding=embedding,
    )


def _shira_module(path: str, parts: dict[str, np.ndarray], where: Path) -> ShiraModule:
    for key, name, other in (("values", "shira_weight", "shira_indices"), ("indices", "shira_indices", "shira_weight")):
        if key not in parts:
            raise SlimgraphError(f"{where}: {path} has {other} but no {name}")
    values, indices = parts["values"], parts["indices"]
    if indices.ndim != 2 or indices.shape[0] != 2 or values.shape != (indices.shape[1],):
        raise SlimgraphError(f"{where}: {path}: shira_indices must be [2, n] and shira_weight [n]; got "
                             f"{list(indices.shape)} and {list(values.shape)}")
    if indices.dtype.kind not in "iu":
        raise SlimgraphError(f"{where}: {path}: shira_indices are {indices.dtype}, not integers")
    rows, cols = (np.asarray(i, dtype=np.int64) for i in indices)
    if len(rows) and min(rows.min(), cols.min()) < 0:
        raise SlimgraphError(f"{where}: {path}: shira_indices has negative entries")
    values = _float32(values, f"{path}.shira_weight", where)
    rows, cols, values = _coalesce(rows, cols, values)
    return ShiraModule(path=path, rows=rows, cols=cols, values=values)


def _coalesce(rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum the values of repeated (row, col) pairs, as PEFT's sparse tensor does when it is added."""
    if not len(rows):
        return rows, cols, values
    keys = rows * (int(cols.max()) + 1) + cols
    unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    if len(unique) == len(keys):
        return rows, cols, values
    summed = np.zeros(len(unique), np.float32)
    np.add.at(summed, inverse, values)
    return rows[first], cols[first], summed


# --- the base model's weights, to fingerprint the adapter's modules with ------------------------


class SafetensorsBaseWeights:
    """The weights of the model an adapter was trained on (a Hugging Face folder or a `.safetensors`
    file), by module path, memory-mapped."""

    def __init__(self, source: str | Path) -> None:
        self.source = Path(source)
        files = [self.source] if self.source.is_file() else sorted(self.source.glob("*.safetensors"))
        if not files:
            raise SlimgraphError(f"base model {self.source} has no .safetensors weights to fingerprint the adapter "
                                 "with")
        self.tensors: dict[str, np.ndarray] = {}
        for file in files:
            self.tensors.update(read_safetensors(file))

    def weight(self, module: str, *, embedding: bool, fan_in_fan_out: bool) -> np.ndarray | None:
        """The module's weight in PyTorch's [out, in] layout (as stored: not converted), or None."""
        key = f"{module}.weight"
        if key not in self.tensors:
            near = [k for k in self.tensors if k.endswith("." + key) or key.endswith("." + k)]
            if len(near) != 1:
                return None
            key = near[0]
        tensor = self.tensors[key]
        if tensor.ndim != 2:
            return None
        return tensor.T if embedding or fan_in_fan_out else tensor  # tables are [num, dim]; Conv1D [in, out]


def base_weights(adapter: Adapter, base: str) -> tuple[SafetensorsBaseWeights | None, str]:
    """The base weights to check `adapter` against, and a line saying where they came from.

    `base`: a folder or file; "auto" (or "") for the adapter's `base_model_name_or_path` when that is
    local; "none" for no check.
    """
    if base.lower() == "none":
        return None, "not checked (base=none)"
    if base and base.lower() != "auto":
        if not Path(base).exists():
            raise SlimgraphError(f"base={base}: no such folder or file")
        return SafetensorsBaseWeights(base), str(base)
    if adapter.base_model and Path(adapter.base_model).exists():
        return SafetensorsBaseWeights(adapter.base_model), adapter.base_model
    where = f"{adapter.base_model!r} is not a local folder" if adapter.base_model else "the adapter names none"
    return None, f"not available ({where}; give base=FOLDER to check fingerprints)"
