"""ONNX Runtime backend: write `.onnx` (external data for large weights) and run it in a session.

Every write is atomic: files are written into a temporary folder beside the target and
renamed into place, so a failed or interrupted save leaves no partial output.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from slimgraph.backends.output import check_writable
from slimgraph.errors import SlimgraphError
from slimgraph.ir import evaluate


def save_onnx(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write `model` to `path` atomically; weights go to `<name>.data` when asked or when
    the model is too large for one protobuf (2 GB)."""
    path = Path(path)
    OnnxRuntimeArtifact.check_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = evaluate.initializer_bytes(model) >= evaluate.PROTO_LIMIT_BYTES
    data_name = f"{path.name}.data"
    with tempfile.TemporaryDirectory(prefix=".slimgraph-", dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        try:
            ir.save(model, staged, external_data=data_name if external_data else None)
        except Exception as exc:
            raise SlimgraphError(f"cannot write {path}: {exc}") from exc
        if external_data:
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        os.replace(staged, path)
    return path


class OnnxRuntimeArtifact:
    """A model compiled for ONNX Runtime: call it on inputs, or save it."""

    backend = "onnxruntime"

    @staticmethod
    def check_output(path: Path) -> None:
        if path.suffix.lower() != ".onnx":
            raise SlimgraphError(f"-o {path}: the onnxruntime backend writes a .onnx file")
        check_writable(path, folder=False)

    def __init__(self, model: ir.Model, *, threads: int | None = None, external_data: bool | None = None) -> None:
        self.model = model
        self.threads = threads
        self.external_data = external_data
        self._session: ort.InferenceSession | None = None

    @property
    def session(self) -> ort.InferenceSession:
        if self._session is None:
            self._session = evaluate.make_session(self.model, self.threads)
        return self._session

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        """Run on positional inputs (in graph order) and/or named inputs; returns name → array."""
        names = self.input_names
        if len(args) > len(names):
            raise SlimgraphError(f"the model takes {len(names)} inputs, got {len(args)}")
        feeds: dict[str, Any] = dict(zip(names, args))
        if args and isinstance(args[0], Mapping) and len(args) == 1:
            feeds = dict(args[0])
        feeds.update(kwargs)
        return evaluate.run(self.session, {k: _to_numpy(v) for k, v in feeds.items()})

    def save(self, path: str | os.PathLike) -> Path:
        return save_onnx(self.model, path, external_data=self.external_data)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    return np.asarray(value)

