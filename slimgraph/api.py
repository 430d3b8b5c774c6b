"""Python API helpers that compose the frontends, IR helpers and backends."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx_ir as ir

from slimgraph.ir.diff import DiffResult, diff_models
from slimgraph.ir.summary import ModelSummary, summarize


def save(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write the IR model as `.onnx`, atomically (external data when large or asked)."""
    from slimgraph.backends.onnxruntime import save_onnx

    return save_onnx(model, path, external_data=external_data)


def inspect(source: Any, **load_options: Any) -> ModelSummary:
    """Statistics, structures and largest tensors of a model or anything `load` accepts."""
    from slimgraph.frontend import load

    return summarize(load(source, **load_options))


def diff(a: Any, b: Any, *, weights: bool = False) -> DiffResult:
    """What changed from model `a` to model `b` (models or anything `load` accepts)."""
    from slimgraph.frontend import load

    return diff_models(load(a), load(b), weights=weights, a_name=_name(a), b_name=_name(b))


def _name(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
