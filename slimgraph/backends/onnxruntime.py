"""ONNX Runtime backend: write `.onnx` (external data for large weights) and run it in a session.

Every write is atomic: files are written into a temporary folder beside the target and
renamed into place, so a failed or interrupted save leaves no partial output.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from slimgraph.backends.output import check_writable
from slimgraph.backends.switching import AdapterSwitching
from slimgraph.errors import SlimgraphError, first_line
from slimgraph.ir.cache_signature import cache_layers
from slimgraph.ir.spill import spill_of
from slimgraph.measure import evaluate

# From this many bytes of weights they go to `<name>.data` unless asked otherwise, as ORT GenAI's builder
# and Optimum write large models: a file loaded later is memory-mapped, not read whole. SmolLM2's fp32
# export (538 MB) peaked at 2.2 GB through `slimgraph.load` and a session from one file, 0.81 GB from two.
EXTERNAL_DATA_BYTES = 256 * 2**20


def save_onnx(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write `model` to `path` atomically; weights go to `<name>.data` when asked, or by default
    from EXTERNAL_DATA_BYTES of them (a protobuf cannot hold 2 GB) and for a decoder with a KV cache,
    as ONNX Runtime GenAI's builder writes one: ONNX Runtime memory-maps the weights of a session
    built from the file, where it copies those of a single file (SmolLM2 int4 decoding: peak RSS
    526 → 279 MB)."""
    path = Path(path)
    OnnxRuntimeArtifact.check_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = evaluate.initializer_bytes(model) >= EXTERNAL_DATA_BYTES or cache_layers(model) > 0
    data_name = f"{path.name}.data"
    spill = spill_of(model)
    with tempfile.TemporaryDirectory(prefix=".slimgraph-", dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        if external_data and spill is not None and spill.name == data_name:
            try:  # most weights are in the data file already: write the rest there and move it into place
                spill.publish(model, staged, path)
            except OSError as exc:
                raise SlimgraphError(f"cannot write {path}: {exc}") from exc
            return path
        try:
            with contextlib.nullcontext() if external_data else _weights_in_memory(model):
                ir.save(model, staged, external_data=data_name if external_data else None)
        except Exception as exc:
            raise SlimgraphError(f"cannot write {path}: {exc}") from exc
        if external_data:
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        os.replace(staged, path)
    return path


@contextlib.contextmanager
def _weights_in_memory(model: ir.Model) -> Iterator[None]:
    """Weights read from another file's external data, held in memory while one self-contained
    file is written (onnx_ir would otherwise keep pointing at the input's data file)."""
    swapped = {}
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            swapped[value] = value.const_value
            value.const_value = ir.Tensor(value.const_value.numpy(), name=value.const_value.name)
    try:
        yield
    finally:
        for value, tensor in swapped.items():
            value.const_value = tensor


class OnnxRuntimeArtifact(AdapterSwitching):
    """A model compiled for ONNX Runtime: call it on inputs, or save it; `load_adapter` / `set_adapter`
    switch PEFT adapters in place (slimgraph.backends.switching)."""

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
        # Initializers written in place by adapter switching: arrays owned by OrtValues bound once.
        self._live: dict[str, ort.OrtValue] = {}
        self._binding: ort.IOBinding | None = None

    @property
    def session(self) -> ort.InferenceSession:
        if self._session is None:
            # Live weights are graph inputs too (overridable initializers), so ORT neither folds nor
            # prepacks them: what it reads each run is the array switching writes.
            live = [self.model.graph.initializers[name] for name in self._live]
            self.model.graph.inputs.extend(live)
            try:
                self._session = evaluate.make_session(self.model, self.threads)
            finally:
                for value in live:
                    self.model.graph.inputs.remove(value)
            self._binding = None
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
        if self._live:
            return self._run_bound({k: _to_numpy(v) for k, v in feeds.items()})
        return evaluate.run(self.session, {k: _to_numpy(v) for k, v in feeds.items()})

    def _run_bound(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run with the live weights bound once (no copy per run) and the inputs bound per call."""
        session = self.session
        if self._binding is None:
            self._binding = session.io_binding()
            for name, value in self._live.items():
                self._binding.bind_ortvalue_input(name, value)
        missing = [i.name for i in session.get_inputs() if i.name not in feeds]
        if missing:
            raise SlimgraphError(f"missing model inputs: {', '.join(missing)}")
        names = [o.name for o in session.get_outputs()]
        try:
            for i in session.get_inputs():
                self._binding.bind_cpu_input(i.name, np.ascontiguousarray(feeds[i.name]))
            for name in names:
                self._binding.bind_output(name)
            session.run_with_iobinding(self._binding)
            outputs = [np.array(out) for out in self._binding.copy_outputs_to_cpu()]  # (buffers are reused)
        except Exception as exc:  # ORT raises its own exception types
            raise SlimgraphError(f"ONNX Runtime failed to run the model: {first_line(exc)}") from exc
        finally:
            self._binding.clear_binding_outputs()
        return dict(zip(names, outputs))

    # --- in-place weights for adapter switching (the WeightStore of slimgraph.backends.switching)

    def _adopt_model(self, model: ir.Model) -> None:
        self.model = model
        self._session = None

    def _make_writable(self, names: list[str]) -> None:
        new = [n for n in names if n not in self._live]
        if not new:
            return
        if not self._live:  # from now on the model's tensors change: never the caller's model
            original, self.model = self.model, self.model.clone()
            self.model.meta.update(original.meta)
        for name in new:
            value = self.model.graph.initializers[name]
            array = np.array(value.const_value.numpy())  # a copy: the tensor may be shared or memory-mapped
            self._live[name] = ort.OrtValue.ortvalue_from_numpy(array)
            # The IR tensor shows the live array, so save() writes the weights the artifact runs with.
            value.const_value = ir.Tensor(self._live[name].numpy(), name=name)
        self._session = None  # built again once, with these as inputs; switching never rebuilds it

    def _write_weight(self, name: str, array: np.ndarray) -> None:
        self._live[name].numpy()[...] = array

    def _scatter_weight(self, name: str, index: np.ndarray, values: np.ndarray) -> None:
        self._live[name].numpy().reshape(-1)[index] = values

    def save(self, path: str | os.PathLike) -> Path:
        return save_onnx(self.model, path, external_data=self.external_data)

    def __repr__(self) -> str:
        graph = self.model.graph
        inputs = ", ".join(v.name for v in graph.inputs if not v.is_initializer())
        outputs = ", ".join(v.name for v in graph.outputs)
        size = evaluate.initializer_bytes(self.model) / 1e6
        return f"<OnnxRuntimeArtifact ({inputs}) → ({outputs}): {len(graph)} nodes, {size:.1f} MB of weights>"


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    return np.asarray(value)

