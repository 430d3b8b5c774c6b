"""Real PEFT adapters for the tests: made with the `peft` library on real models and trained for a few
steps (so B ≠ 0 and SHiRA's values are not zero), saved as PEFT saves them, with what PEFT computes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from slimgraph.ir.edit import weight_matrix
from slimgraph.ir.meta import NAME_SCOPES_KEY
from slimgraph.ir.structure import find_embeddings, find_linears


@dataclass
class Made:
    """An adapter folder, and PEFT's results on `feeds`: its forward with the adapter active
    (`unmerged`), after `merge_and_unload()` (`merged`), and the merged weights ([out, in], by module)."""

    path: Path
    feeds: dict[str, np.ndarray]
    output: str
    base: np.ndarray
    unmerged: np.ndarray
    merged: np.ndarray
    merged_weights: dict[str, np.ndarray]


def train(model, config, batch: dict, folder: Path, *, steps: int = 2, lr: float = 1e-2, loss=None,
          output: str = "last_hidden_state") -> Made:
    """Wrap `model` with `config`, train a few Adam steps on `batch`, save to `folder`."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(0)
    model.eval()
    with torch.no_grad():
        base = getattr(model(**batch), output).numpy()
    peft_model = get_peft_model(model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr)
    for _ in range(steps):
        result = peft_model(**batch)
        value = loss(result) if loss is not None else -getattr(result, output).pow(2).mean()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    peft_model.eval()
    peft_model.save_pretrained(folder)
    with torch.no_grad():
        unmerged = getattr(peft_model(**batch), output).numpy()
        merged_model = peft_model.merge_and_unload()
        merged = getattr(merged_model(**batch), output).numpy()
    weights = {name[: -len(".weight")]: t.detach().numpy().copy() for name, t in merged_model.state_dict().items()
               if name.endswith(".weight") and t.ndim == 2}
    feeds = {k: v.numpy() for k, v in batch.items()}
    return Made(folder, feeds, output, base, unmerged, merged, weights)


def relative(a: np.ndarray, b: np.ndarray) -> float:
    """max |a − b| / max |b|."""
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def ir_weight(model: ir.Model, module: str) -> np.ndarray:
    """The [out, in] weight of the linear (or the [num, dim] table of the embedding) named `module`."""
    for linear in find_linears(model):
        if linear.name == module:
            return weight_matrix(linear).T
    for table in find_embeddings(model):
        if table.name == module:
            return table.node.inputs[0].const_value.numpy()
    raise KeyError(module)


def anonymize(model: ir.Model) -> ir.Model:
    """What another exporter might write: no name scopes, every initializer and node renamed."""
    clone = model.clone()
    clone.meta.update(model.meta)
    for i, node in enumerate(clone.graph):
        node.metadata_props.pop(NAME_SCOPES_KEY, None)
        node.name = f"node_{i}"
    for i, value in enumerate(list(clone.graph.initializers.values())):
        value.name = f"onnx::MatMul_{i}"
    return clone
