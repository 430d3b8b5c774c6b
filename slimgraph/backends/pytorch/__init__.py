"""PyTorch backend: the IR as PyTorch modules, callable like the other artifacts and saved as
`model.py` + `model.safetensors`.

Two styles of code: `structured` (the default) writes the model as a hand-written one would be —
one class per kind of repeated block, layers as nn.Linear / nn.LayerNorm / nn.Embedding / ...,
the source model's parameter names (structured.py); `fx` writes torch.fx's flat forward of every
op (builder.py), for graphs with control flow (If/Loop/Scan), which the structured style leaves to it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.backends.output import check_writable
from slimgraph.backends.switching import AdapterSwitching
from slimgraph.errors import SlimgraphError


class PyTorchArtifact(AdapterSwitching):
    """A model compiled to PyTorch: `artifact.module` is the torch.fx.GraphModule; `load_adapter` /
    `set_adapter` switch PEFT adapters by writing its parameters in place
    (slimgraph.backends.switching)."""

    backend = "pytorch"

    @staticmethod
    def check_output(path: Path) -> None:
        if path.suffix.lower() not in ("", ".pt2"):
            raise SlimgraphError(f"-o {path}: the pytorch backend writes a folder (model.py + model.safetensors) "
                                 "or a .pt2 file")
        check_writable(path, folder=not path.suffix)

    def __init__(self, model: ir.Model, style: str = "structured", ort_threads: int | None = None) -> None:
        """`ort_threads`: the intra-op threads of the ONNX Runtime session whose int8 recurrent
        results to reproduce (com.microsoft.DynamicQuantizeLSTM, see ops/recurrent.py); by
        default ORT's default on this machine, its physical cores."""
        if style not in STYLES:
            raise SlimgraphError(f"pytorch backend: unknown style {style!r} (one of: {', '.join(STYLES)})")
        if ort_threads is not None and ort_threads < 1:
            raise SlimgraphError(f"pytorch backend: ort_threads must be at least 1, not {ort_threads}")
        self.requested_style = style
        self.options = {"ort_threads": ort_threads}
        self._build(model)
        self.input_names = [v.name for v in model.graph.inputs if not v.is_initializer()]
        self.output_names = [v.name for v in model.graph.outputs]

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        """Run on positional inputs (graph order) and/or named inputs; returns name → numpy array."""
        return run_module(self.module, self.input_names, self.output_names, args, kwargs)

    def __repr__(self) -> str:
        parameters = sum(p.numel() for p in self.module.parameters())
        adapter = f", adapter {self.active_adapter!r}" if self.active_adapter else ""
        return (f"<PyTorchArtifact ({', '.join(self.input_names)}) → ({', '.join(self.output_names)}): "
                f"{self.style} {type(self.module).__name__}, {parameters / 1e6:.1f}M parameters{adapter}>")

    def _dynamic_shapes(self) -> tuple:
        """torch.export.Dim.AUTO for every axis that is symbolic in the ONNX graph."""
        import torch

        by_name = {v.name: v for v in self.model.graph.inputs}
        return tuple(
            {axis: torch.export.Dim.AUTO for axis, dim in enumerate(by_name[n].shape or []) if not isinstance(dim, int)}
            or None
            for n in self.input_names
        )

    def save(self, path: str | os.PathLike) -> Path:
        """`DIR/` → DIR/model.py + DIR/model.safetensors; `NAME.pt2` → a torch.export program."""
        from slimgraph.backends.pytorch.codegen import save_directory, save_pt2
        from slimgraph.backends.pytorch.tensors import to_torch
        from slimgraph.measure.inputs import model_inputs

        path = Path(path)
        self.check_output(path)
        if path.suffix.lower() == ".pt2":
            feeds = model_inputs(self.model)[0][-1]  # the last synthesized feed has batch 2: not specialized to 1
            example = tuple(to_torch(feeds[n]) for n in self.input_names)
            return save_pt2(self.module, example, path, self._dynamic_shapes())
        if self.code is not None:
            from slimgraph.backends.pytorch.codegen import current_weights, save_structured

            return save_structured(self.code.source, current_weights(self.module, self.code.weights), path)
        return save_directory(self.module, path)

    @property
    def source(self) -> str:
        """The generated forward code: model.py's classes (structured), or the fx module's forward."""
        return self.code.source if self.code is not None else self.module.code

    def _build(self, model: ir.Model) -> None:
        """self.module from `model`: structured where the graph allows it, else fx (self.style says which)."""
        from slimgraph.backends.pytorch.builder import build_module

        self.model = model
        self.code = None
        self.sources: dict[str, tuple[str, bool]] = {}  # initializer → (parameter, stored transposed)
        if self.requested_style == "structured" and not has_subgraphs(model):
            from slimgraph.backends.pytorch.structured import generate, instantiate

            self.code = generate(model, self.options)
            self.module = instantiate(self.code)
            self.sources = self.code.sources
            self.style = "structured"
        else:
            self.module = build_module(model, self.options)
            self.style = "fx"

    # --- in-place weights for adapter switching (the WeightStore of slimgraph.backends.switching)

    def _adopt_model(self, model: ir.Model) -> None:
        self._build(model)
        writable = self.__dict__.pop("_writable", {})
        self._make_writable(list(writable))

    def _make_writable(self, names: list[str]) -> None:
        import torch

        from slimgraph.backends.pytorch.builder import attribute_path
        from slimgraph.backends.pytorch.tensors import to_torch

        writable = self.__dict__.setdefault("_writable", {})
        for name in (n for n in names if n not in writable):  # the parameter that holds it, with its values
            path, transposed = self.sources.get(name, (attribute_path(name), False))
            try:
                parameter = self.module.get_parameter(path)
            except AttributeError:
                raise SlimgraphError(f"the PyTorch module has no parameter for initializer {name!r}") from None
            held = parameter.detach().cpu()
            if not torch.equal(held.T if transposed else held,
                               to_torch(self.model.graph.initializers[name].const_value.numpy())):
                raise SlimgraphError(f"the PyTorch module's parameter for initializer {name!r} does not hold its values")
            writable[name] = parameter

    def _parameter(self, name: str):
        return self.__dict__["_writable"][name]

    def graph_weight(self, name: str) -> np.ndarray:
        """The values of initializer `name` as the module holds them now, in the graph's layout."""
        from slimgraph.backends.pytorch.tensors import to_numpy

        path, transposed = self.sources.get(name, (None, False))
        parameter = self._parameter(name) if name in self.__dict__.get("_writable", {}) else \
            self.module.get_parameter(path) if path else None
        if parameter is None:
            raise SlimgraphError(f"the PyTorch module has no parameter for initializer {name!r}")
        return to_numpy(parameter.T if transposed else parameter)

    def _write_weight(self, name: str, array: np.ndarray) -> None:
        import torch

        values = _shared_tensor(array)
        with torch.no_grad():
            self._parameter(name).copy_(values.T if self.sources.get(name, ("", False))[1] else values)

    def _scatter_weight(self, name: str, index: np.ndarray, values: np.ndarray) -> None:
        import torch

        parameter = self._parameter(name)
        if self.sources.get(name, ("", False))[1]:  # the graph's [K, N] is held as [N, K]: move each index
            columns = self.model.graph.initializers[name].shape[1]
            index = (index % columns) * parameter.shape[1] + index // columns
        with torch.no_grad():  # (index_copy_: `flat[index] = values` takes 100x longer on CPU)
            parameter.view(-1).index_copy_(0, torch.from_numpy(index).to(parameter.device),
                                           _shared_tensor(values).to(parameter.device))


STYLES = ("structured", "fx")


def has_subgraphs(model: ir.Model) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for node in ir.traversal.RecursiveGraphIterator(
        model.graph) for a in node.attributes.values())


def _shared_tensor(array: np.ndarray):
    """A torch view of a writable array (no copy), else a copy (read-only arrays, bfloat16)."""
    import torch

    from slimgraph.backends.pytorch.tensors import to_torch

    if array.flags.writeable and array.flags.c_contiguous and array.dtype.name != "bfloat16":
        return torch.from_numpy(array)
    return to_torch(array)


def run_module(module: Any, input_names: list[str], output_names: list[str], args: tuple, kwargs: dict,
               device: Any = None) -> dict[str, np.ndarray]:
    """`module(*inputs)` on positional (graph order) and/or named inputs, without gradients, on
    `device` if given; returns output name → numpy array."""
    import torch

    from slimgraph.backends.pytorch.tensors import to_numpy, to_torch

    feeds = dict(zip(input_names, args))
    feeds.update(kwargs)
    missing = [n for n in input_names if n not in feeds]
    if missing:
        raise SlimgraphError(f"missing model inputs: {', '.join(missing)}")
    tensors = [feeds[n] if isinstance(feeds[n], torch.Tensor) else to_torch(np.asarray(feeds[n])) for n in input_names]
    if device is not None:
        tensors = [t.to(device) for t in tensors]
    with torch.no_grad():
        outputs = module(*tensors)
    return {name: to_numpy(out) for name, out in zip(output_names, outputs)}
