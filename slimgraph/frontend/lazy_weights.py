"""Capture a Hugging Face folder without reading its weights.

The model is built with every parameter standing in as one zero broadcast to its shape (a
zero-stride view: no memory), torch exports the graph from it, and each parameter's initializer
is then bound to where its bytes lie: a memory-mapped slice of a safetensors file, read (and a
bf16/fp16 weight widened to float32) only when something reads that weight. A pass that
quantizes a weight reads it once; a weight nobody changes is read once more, by the writer.

A KV-cache export also runs the PyTorch model on its example prompt (the example steps' past keys
and values are real); then each module reads its own weights just before it runs (`onloaded`).

The exporter's own optimizer folds `Transpose(W)` of a linear weight into a new initializer by
computing it; here the transpose is folded into the binding instead (read transposed), before
that optimizer runs, so that nothing is computed from the stand-ins.

A folder is captured this way when every parameter is a tensor of the same name and shape in its
safetensors files (`plan`); otherwise (weights in `.bin` files, names a checkpoint conversion
maps) it is loaded whole, as before.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.frontend.safetensors_file import DTYPES, read_header
from slimgraph.ir.meta import WEIGHT_SOURCE_KEY
from slimgraph.measure.process import count_mapped_read

WIDENED = {"BF16", "F16", "F32"}  # read as float32, the dtype the graph computes in


@dataclass(frozen=True)
class WeightSource:
    """Where one initializer's bytes lie: tensor `key` of safetensors `file`, optionally transposed."""

    file: Path
    key: str
    dtype: str  # the safetensors dtype (BF16, F16, F32, …)
    shape: tuple[int, ...]  # as stored
    begin: int  # absolute byte offsets in the file
    end: int
    transposed: bool = False

    @property
    def graph_shape(self) -> tuple[int, ...]:
        return self.shape[::-1] if self.transposed else self.shape

    @property
    def graph_dtype(self) -> ir.DataType:
        return ir.DataType.FLOAT if self.dtype in WIDENED else ir.DataType.from_numpy(DTYPES[self.dtype])

    def read(self) -> np.ndarray:
        """The tensor as the graph holds it (float32, transposed if bound so)."""
        if self.end == self.begin:  # an empty tensor: nothing to map
            array = np.zeros(self.shape, DTYPES[self.dtype])
        else:
            stored = np.memmap(self.file, dtype=np.uint8, mode="r", offset=self.begin, shape=(self.end - self.begin,))
            count_mapped_read(self.end - self.begin)
            array = stored.view(DTYPES[self.dtype]).reshape(self.shape)
        dtype = np.float32 if self.dtype in WIDENED else array.dtype  # bf16/fp16 widen exactly
        if self.transposed:
            return np.asarray(array.T, dtype=dtype, order="C")  # widened and transposed in one copy
        return array.astype(dtype, copy=False)  # float32 stays mapped

    def tensor(self, name: str | None = None) -> ir.LazyTensor:
        """The initializer's tensor, read on each use and never kept: a copy of the graph (FLOPs' shape
        pass, Verify's reference) shares it, and would keep a kept array alive after the graph let go."""
        tensor = ir.LazyTensor(lambda: ir.Tensor(self.read()), dtype=self.graph_dtype,
                               shape=ir.Shape(self.graph_shape), name=name)
        tensor.meta[WEIGHT_SOURCE_KEY] = self
        return tensor

    def to_json(self, folder: Path) -> dict[str, Any]:
        return {"file": self.file.relative_to(folder).as_posix(), "key": self.key, "transposed": self.transposed}


def safetensors_index(folder: Path) -> dict[str, WeightSource]:
    """Tensor name → where it lies, over every `.safetensors` file at the top of the folder."""
    index: dict[str, WeightSource] = {}
    for path in sorted(folder.glob("*.safetensors")):
        header, start = read_header(path)
        for key, entry in header.items():
            if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
                continue  # a dtype slimgraph does not read: that parameter stays unbound (loaded whole)
            begin, end = (start + int(x) for x in entry["data_offsets"])
            shape = tuple(int(d) for d in entry["shape"])
            if end - begin != math.prod(shape) * DTYPES[entry["dtype"]].itemsize:
                raise SlimgraphError(f"{path}: tensor {key!r} does not fit its bytes")
            index[key] = WeightSource(path, key, entry["dtype"], shape, begin, end)
    return index


def source_of(tensor: ir.TensorProtocol | None) -> WeightSource | None:
    return tensor.meta.get(WEIGHT_SOURCE_KEY) if isinstance(tensor, ir.LazyTensor) else None


def bound_sources(model: ir.Model) -> dict[str, WeightSource]:
    """Initializer name → its WeightSource, for the initializers still bound to a file."""
    return {name: source for name, value in model.graph.initializers.items()
            if (source := source_of(value.const_value)) is not None}


def rebind(model: ir.Model, folder: Path, bindings: dict[str, dict[str, Any]]) -> None:
    """Bind initializers to the folder's files again, as `WeightSource.to_json` recorded them."""
    index = safetensors_index(folder)
    for name, record in bindings.items():
        source = index.get(record["key"])
        if source is None or source.file.name != Path(record["file"]).name:
            raise SlimgraphError(f"{folder}: tensor {record['key']!r} is no longer in {record['file']}")
        if record["transposed"]:
            source = _transposed(source)
        value = model.graph.initializers[name]
        value.const_value = source.tensor(name)
        value.shape = ir.Shape(source.graph_shape)


# --- capture ------------------------------------------------------------------------------------


def plan(model: Any, index: dict[str, WeightSource]) -> tuple[dict[str, WeightSource], str | None]:
    """Every parameter name of `model` (tied ones under each of their names) → its source, and
    why not all of them can be bound to `index` (None when they can)."""
    tied: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(parameter), []).append(name)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    sources: dict[str, WeightSource] = {}
    for names in tied.values():
        source = next((index[name] for name in names if name in index), None)
        shape = tuple(parameters[names[0]].shape)
        if source is None:
            return sources, f"parameter {names[0]} is not a tensor of that name in the safetensors files"
        if source.shape != shape:
            return sources, f"parameter {names[0]} has shape {shape}; the file's is {source.shape}"
        if source.dtype not in WIDENED:
            return sources, f"parameter {names[0]} is stored as {source.dtype}"
        sources.update(dict.fromkeys(names, source))
    return sources, None


@dataclass
class StandIns:
    """A model built with stand-in parameters, and where each one's weight lies."""

    model: Any
    sources: dict[str, WeightSource]  # parameter name (tied ones under each name) → its source
    zero: Any  # the one tensor every stand-in is a view of

    def bind(self, exported: ir.Model) -> None:
        """Bind the export's stand-in initializers to their sources (`bind_parameters`)."""
        bind_parameters(exported, self.sources, self.zero)

    def onloaded(self) -> contextlib.AbstractContextManager:
        """Where the model runs with its real weights, read one module at a time (`onloaded`)."""
        return onloaded(self.model, self.sources)


def build_with_stand_ins(build: Callable[[], Any], index: dict[str, WeightSource]) -> StandIns | None:
    """`build()` (a torch module) with stand-in parameters, or None when `index` does not hold every
    one of them (`plan`)."""
    with parameters_on_meta():
        model = build()
    sources, unbound = plan(model, index)
    if unbound is not None:
        return None
    return StandIns(model.eval(), sources, stand_in_parameters(model))


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside create their parameters on the meta device (buffers stay real: they are
    computed at construction, like rotary frequencies, and are not in the checkpoint)."""
    import torch

    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, parameter):
        if parameter is not None and parameter.device.type != "meta":
            parameter = torch.nn.Parameter(parameter.to("meta"), requires_grad=parameter.requires_grad)
        register(module, name, parameter)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def stand_in_parameters(model: Any) -> Any:
    """Replace every meta parameter by a zero-stride view of one float32 zero; tied parameters
    stay tied. Returns that zero: an initializer whose tensor is a view of it is a stand-in."""
    import torch

    zero = torch.zeros((), dtype=torch.float32)
    replaced: dict[int, torch.nn.Parameter] = {}
    for name, parameter in list(model.named_parameters(remove_duplicate=False)):
        owner, _, attribute = name.rpartition(".")
        module = model.get_submodule(owner)
        if id(parameter) not in replaced:
            replaced[id(parameter)] = torch.nn.Parameter(zero.expand(parameter.shape), requires_grad=False)
        setattr(module, attribute, replaced[id(parameter)])
    return zero


@contextlib.contextmanager
def onloaded(model: Any, sources: dict[str, WeightSource]) -> Iterator[None]:
    """While the PyTorch model runs for real (a KV-cache export's example steps), each module's own
    parameters are read from the folder just before it runs and dropped after it: one layer's
    weights in memory at a time (llm-compressor's sequential onloading). Not while torch exports:
    the graph must see the stand-ins, not constants."""
    import torch

    def load(module, args, prefix, names):
        for name in names:
            array = np.array(sources[f"{prefix}{name}"].read())  # (a float32 file's map is read-only)
            setattr(module, name, torch.nn.Parameter(torch.from_numpy(array), requires_grad=False))

    def drop(module, args, output, stand_ins):
        for name, stand_in in stand_ins.items():
            setattr(module, name, stand_in)

    handles = []
    for prefix, module in model.named_modules():
        stand_ins = dict(module.named_parameters(recurse=False))
        if not stand_ins:
            continue
        prefix = f"{prefix}." if prefix else ""
        handles.append(module.register_forward_pre_hook(
            lambda m, a, prefix=prefix, names=list(stand_ins): load(m, a, prefix, names)))
        handles.append(module.register_forward_hook(
            lambda m, a, o, stand_ins=stand_ins: drop(m, a, o, stand_ins)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def bind_parameters(model: ir.Model, index: dict[str, WeightSource], zero: Any) -> None:
    """Bind every stand-in initializer to its source by name (`plan`'s, tied names included); then fold `Transpose` of a bound
    2-D weight read by that Transpose alone into a transposed binding."""
    graph = model.graph
    for name, value in list(graph.initializers.items()):
        raw = getattr(value.const_value, "raw", None)
        if raw is None or not hasattr(raw, "data_ptr") or raw.data_ptr() != zero.data_ptr():
            continue
        if name not in index:
            raise SlimgraphError(f"the export names a parameter {name!r} that no safetensors file holds")
        # A new value, not the exporter's: that one was a graph input first, and onnx_ir's input
        # container keeps it in a counter (`slimgraph.ir.graph.forget_removed_values`).
        graph.initializers.pop(name)
        bound = ir.Value(name=name, shape=value.shape, type=value.type, const_value=index[name].tensor(name))
        graph.register_initializer(bound)
        value.replace_all_uses_with(bound, replace_graph_outputs=True)
    _fold_bound_transposes(model)


def _fold_bound_transposes(model: ir.Model) -> None:
    graph = model.graph
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        weight = node.inputs[0]
        source = source_of(weight.const_value) if weight is not None else None
        perm = node.attributes.get("perm")
        if source is None or len(source.graph_shape) != 2 or len(weight.uses()) != 1 or weight.is_graph_output() \
                or (perm is not None and list(perm.as_ints()) != [1, 0]):
            continue
        if source.transposed:
            continue
        transposed = _transposed(source)
        output = node.outputs[0]
        name = output.name
        output.name = None  # the folded weight takes its name
        folded = ir.Value(name=name, shape=ir.Shape(transposed.graph_shape),
                          type=ir.TensorType(transposed.graph_dtype), const_value=transposed.tensor(name))
        graph.register_initializer(folded)
        output.replace_all_uses_with(folded, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        graph.initializers.pop(weight.name)


def _transposed(source: WeightSource) -> WeightSource:
    return replace(source, transposed=True)
