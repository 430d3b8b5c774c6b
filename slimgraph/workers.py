"""`--workers`: where independent work runs: in this process, one item after another (`local`,
the default), or as Ray tasks (`ray` starts a local Ray instance, or joins the cluster that
`RAY_ADDRESS` names; `ray://HOST:PORT` joins that one through the Ray client).

Work is a function `fn(model, shared, item)` mapped over items (`Workers.map`): `--goal`'s
candidates, `mixed-precision`'s per-layer measurements. For Ray, the model and `shared` are put
in Ray's object store once, and every task reads them by reference: the model travels as its
graph (a few MB) and its weights as numpy arrays (`ShippedModel`), which a task on the same node
maps without a copy. A model in what a task returns (a candidate's optimized model) travels back
the same way. The tasks run the same function on the same bytes as the local run, so the results
are equal.

Why not pickle an `ir.Model`: its lazy and external tensors hold closures and open files, and
an ONNX proto of the whole model would copy every weight (and stops at 2 GB).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError

T = TypeVar("T")
R = TypeVar("R")
Task = Callable[[ir.Model, Any, T], R]

SHIPPED_LOCATION = "slimgraph-shipped"  # the placeholder location of a shipped model's weights
SHIP_MIN_BYTES = 1024  # smaller tensors travel inside the graph


class Workers:
    """Runs work in this process, one item after another."""

    name = "local"

    def map(self, fn: Task, model: ir.Model, shared: Any, items: Iterable[T]) -> list[R]:
        """`[fn(model, shared, item) for item in items]`, in order."""
        return [fn(model, shared, item) for item in items]

    def call(self, fn: Task, model: ir.Model | None, shared: Any, item: T, *, resource: str | None = None) -> R:
        """`fn(model, shared, item)` once; `resource`: on a Ray node that has it (Ray workers only)."""
        if resource is not None:
            raise SlimgraphError(f"ray:{resource} names a Ray node; it needs --workers ray")
        return fn(model, shared, item)

    def close(self) -> None:
        pass

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RayWorkers(Workers):
    """Runs each item as a Ray task (one CPU each)."""

    name = "ray"

    def __init__(self, address: str | None = None, **init_options: Any) -> None:
        try:
            import ray
        except ImportError as exc:
            raise SlimgraphError("--workers ray needs Ray: pip install 'slimgraph[ray]'") from exc
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                         **init_options)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise SlimgraphError(f"--workers ray: cannot reach the Ray cluster at {address or 'RAY_ADDRESS'}: "
                                     f"{exc}") from exc
        self._task = ray.remote(num_cpus=1, max_retries=0)(_run_task)

    def map(self, fn: Task, model: ir.Model, shared: Any, items: Iterable[T]) -> list[R]:
        refs = self._put(model, shared)
        return [_unship(r) for r in self._ray.get([self._task.remote(fn, refs, _ship(item)) for item in items])]

    def call(self, fn: Task, model: ir.Model | None, shared: Any, item: T, *, resource: str | None = None) -> R:
        task = self._task
        if resource is not None:
            if not any(resource in node["Resources"] for node in self._ray.nodes() if node["Alive"]):
                raise SlimgraphError(f"no node of the Ray cluster has the resource '{resource}' (start one with "
                                     f"ray start --resources='{{\"{resource}\": 1}}')")
            task = task.options(resources={resource: 0.001})
        return _unship(self._ray.get(task.remote(fn, self._put(model, shared), _ship(item))))

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False

    def _put(self, model: ir.Model | None, shared: Any) -> list:
        # In a list, so that Ray hands the task the references and not the values: the task
        # keeps the model it rebuilt from a reference for the next task that gets the same one.
        return [self._ray.put(_ship(model)), self._ray.put(_ship(shared))]


def parse(text: str | None) -> Workers:
    """`local` (or None), `ray`, or `ray://HOST:PORT`."""
    if text in (None, "local"):
        return Workers()
    if text == "ray":
        return RayWorkers(os.environ.get("RAY_ADDRESS"))
    if text.startswith("ray://"):
        return RayWorkers(text)
    raise SlimgraphError(f"unknown --workers '{text}' (known: local, ray, ray://HOST:PORT)")


_rebuilt: dict[str, ir.Model | None] = {}  # in a Ray worker process: the last model rebuilt, by its reference


def _run_task(fn: Task, refs: list, item: Any) -> Any:
    import ray

    model_ref, shared_ref = refs
    key = model_ref.hex()
    if key not in _rebuilt:
        _rebuilt.clear()
        _rebuilt[key] = _unship(ray.get(model_ref))
    return _ship(fn(_rebuilt[key], _unship(ray.get(shared_ref)), _unship(item)))


@dataclass(frozen=True)
class ShippedModel:
    """An `ir.Model` as picklable parts: its proto with each large weight's data left out, the
    weights as numpy arrays (by placeholder offset), and the model's metadata."""

    proto: bytes
    weights: tuple[np.ndarray, ...]
    meta: dict[str, Any]

    def model(self) -> ir.Model:
        model = ir.serde.deserialize_model(_onnx().ModelProto.FromString(self.proto))
        for graph in model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if isinstance(tensor, ir.ExternalTensor) and tensor.location == SHIPPED_LOCATION:
                    value.const_value = ir.Tensor(self.weights[tensor.offset], dtype=tensor.dtype, name=value.name)
        model.meta.update(self.meta)
        return model


def ship(model: ir.Model) -> ShippedModel:
    """`model` as a `ShippedModel`; the model itself is left as it was."""
    weights: list[np.ndarray] = []
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    try:
        for graph in model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if tensor is None or tensor.dtype == ir.DataType.STRING or tensor.nbytes < SHIP_MIN_BYTES:
                    continue
                placeholder = ir.ExternalTensor(SHIPPED_LOCATION, len(weights), tensor.nbytes, tensor.dtype,
                                                shape=tensor.shape, name=tensor.name or value.name)
                weights.append(tensor.numpy())
                swapped.append((value, tensor))
                value.const_value = placeholder
        proto = ir.serde.serialize_model(model).SerializeToString()
    finally:
        for value, tensor in swapped:
            value.const_value = tensor
    return ShippedModel(proto, tuple(weights), dict(model.meta))


def _onnx():
    import onnx

    return onnx


def _ship(obj: Any) -> Any:
    """`obj` with every `ir.Model` in it (itself, in a tuple or list, or a dataclass field) shipped."""
    return _convert(obj, ir.Model, ship)


def _unship(obj: Any) -> Any:
    return _convert(obj, ShippedModel, ShippedModel.model)


def _convert(obj: Any, kind: type, convert: Callable[[Any], Any]) -> Any:
    if isinstance(obj, kind):
        return convert(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_convert(o, kind, convert) for o in obj)
    if isinstance(obj, Mapping):
        return {k: _convert(v, kind, convert) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changed = {f.name: convert(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                   if f.init and isinstance(getattr(obj, f.name), kind)}
        return dataclasses.replace(obj, **changed) if changed else obj
    return obj
