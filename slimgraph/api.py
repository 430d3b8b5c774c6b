"""Python API helpers that compose the frontends, IR helpers and backends."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx_ir as ir

from slimgraph.measure.diff import DiffResult, diff_models
from slimgraph.measure.summary import ModelSummary, summarize


def save(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write the IR model as `.onnx`, atomically (external data when large or asked)."""
    from slimgraph.backends.onnxruntime import save_onnx

    return save_onnx(model, path, external_data=external_data)


def inspect(source: Any, **load_options: Any) -> ModelSummary:
    """What `slimgraph inspect` shows, as data: statistics (`.stats`: parameters, bytes by
    dtype, op histogram, FLOPs), the structures found (`.structures`: blocks, linears,
    attention, FFNs, embeddings, LM heads) and the largest tensors.

    `source` is a model or anything `slimgraph.load` accepts; `load_options` go to `load`.
    """
    from slimgraph.frontend import load

    return summarize(load(source, **load_options))


def diff(a: Any, b: Any, *, weights: bool = False, a_name: str | None = None, b_name: str | None = None) -> DiffResult:
    """What changed from model `a` to model `b` (models or anything `slimgraph.load` accepts).

    Nodes are matched by name, module path and structure; `.changes` lists what was added,
    removed, replaced or changed by module path, `.weights` the initializers whose bytes
    differ (with `weights=True`, each with its relative L2 change), and `.identical` is
    true only when nothing differs. The names label A and B in the report.
    """
    from slimgraph.frontend import load

    return diff_models(load(a), load(b), weights=weights, a_name=a_name or _name(a), b_name=b_name or _name(b))


def _name(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
