"""IR → torch.fx.GraphModule: each ONNX node through its lowering; weights become
parameters (float) or buffers (integer) under the initializer's dotted name
(`encoder.layer.0.attention.self.query.weight`), so the module reads like one written by hand."""

from __future__ import annotations

import keyword
import re
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir
import torch
import torch.fx as fx

from slimgraph.backends.pytorch.lowering import Dims, find_lowering
from slimgraph.backends.pytorch.tensors import tensor_array, to_numpy, to_torch
from slimgraph.errors import SlimgraphError
from slimgraph.ir.edit import unique_name
from slimgraph.ir.graph import module_path

if TYPE_CHECKING:
    from slimgraph.backends.pytorch.layers import Layer

FLOAT_KINDS = "fc"  # numpy dtype kinds that become trainable parameters
FOLD_LIMIT = 1 << 16  # fold ops on constants up to this many elements per input


def identifier(name: str, fallback: str = "value") -> str:
    """A valid Python identifier made from an ONNX name."""
    text = re.sub(r"\W", "_", name or "") or fallback
    if text[0].isdigit():
        text = f"_{text}"
    return f"{text}_" if keyword.iskeyword(text) else text


class _Tracer(fx.proxy.GraphAppendingTracer):
    """fx's tracer for appending to a graph, except that a tensor a lowering passes as an argument
    (`x.index_select(0, torch.tensor([2, 1]))`) becomes a buffer: fx would write it into the code
    as `torch.Tensor(size=[2], dtype=int64)`, which neither holds its values nor runs."""

    def __init__(self, graph: fx.Graph, builder: Builder) -> None:
        super().__init__(graph)
        self.builder = builder

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor) and not isinstance(a, fx.Proxy):
            return self.builder.constant(to_numpy(a), trainable=False).node
        return super().create_arg(a)


class Builder:
    """Holds the fx graph being built and what each IR value became."""

    def __init__(self, model: ir.Model, layers: dict[ir.Node, Layer] | None = None, options: dict | None = None) -> None:
        self.model = model
        self.options = options or {}  # the artifact's lowering options (ort_threads: see ops/recurrent.py)
        self.layers = layers or {}  # nodes lowered as one module call (structured code), see layers.py
        self.layer_at: dict[str, Layer] = {}  # attribute → the layer module there
        self.initializer_at: dict[str, str] = {}  # attribute → the initializer it holds
        self.graph = fx.Graph()
        self.tracer = _Tracer(self.graph, self)
        self.root = torch.nn.Module()
        self.values: dict[ir.Value, Any] = {}
        self._tensor_names: dict[int, str] = {}  # id(array) → preferred attribute name
        self._materialized: dict[int, fx.Proxy] = {}
        self._attribute_names = _AttributeNames()
        self._keep: list[np.ndarray] = []  # arrays named by id must outlive the build

    # --- reading inputs --------------------------------------------------------------------

    def tensor(self, value: Any) -> fx.Proxy | None:
        """Any input as a traced tensor (constants become parameters or buffers)."""
        if value is None or isinstance(value, fx.Proxy):
            return value
        if isinstance(value, Dims):
            known = value.known()
            if known is not None:
                return self.constant(known)
            stacked = self.call(torch.stack, [self.call(torch.as_tensor, item) if isinstance(item, fx.Proxy)
                                              else self.constant(np.array(item, np.int64)) for item in value.items])
            return stacked.reshape(()) if value.scalar else stacked
        if isinstance(value, np.ndarray):
            return self.constant(value)
        raise TypeError(f"cannot make a tensor of {type(value).__name__}")

    def const(self, value: Any) -> np.ndarray | None:
        """The input's value when it is known while building (constants, fully known Dims)."""
        if isinstance(value, np.ndarray):
            return value
        if isinstance(value, Dims):
            return value.known()
        return None

    def ints(self, value: Any) -> list:
        """A 1-D int input as a list of Python ints and traced sizes (for shapes and axes)."""
        if isinstance(value, Dims):
            return list(value.items)
        array = self.const(value)
        if array is not None:
            return [int(v) for v in np.asarray(array).reshape(-1)]
        if isinstance(value, fx.Proxy):
            return value.tolist()  # data-dependent: resolved at run time
        raise SlimgraphError("pytorch backend: expected a 1-D integer input")

    def dims(self, value: ir.Value, tensor: fx.Proxy) -> list:
        """The shape of an input as a list: static sizes from the IR, `x.size(i)` for the rest."""
        if value.shape is None:
            raise SlimgraphError(f"pytorch backend: the rank of {value.name!r} is not known")
        return [d if isinstance(d, int) else tensor.size(i) for i, d in enumerate(value.shape)]

    def lookup(self, value: ir.Value) -> Any:
        """What an IR value became (None when it is not lowered yet)."""
        return self.values.get(value)

    # --- building ---------------------------------------------------------------------------

    def call(self, fn, *args, **kwargs) -> fx.Proxy:
        """Record fn(*args) in the graph (for functions that do not accept proxies)."""
        node = self.graph.call_function(fn, tuple(_nodes(a) for a in args), {k: _nodes(v) for k, v in kwargs.items()})
        return fx.Proxy(node, self.tracer)

    def statistic(self, value: Any) -> fx.Proxy | None:
        """Like tensor(), but a float initializer stays a buffer: running statistics (BatchNorm's
        mean and variance) are state, not weights to train."""
        return self.constant(value, trainable=False) if isinstance(value, np.ndarray) else self.tensor(value)

    def call_or_fold(self, fn, *args, **kwargs) -> Any:
        """fn(*args) now when no argument is traced (a tensor result becomes a constant),
        else recorded in the graph."""
        if any(isinstance(a, fx.Proxy) for a in (*args, *kwargs.values())):
            return self.call(fn, *args, **kwargs)
        with torch.no_grad():
            result = fn(*args, **kwargs)
        return tuple(to_numpy(r) for r in result) if isinstance(result, tuple) else to_numpy(result)

    def constant(self, array: np.ndarray, name: str | None = None, trainable: bool = True) -> fx.Proxy:
        """A constant as a parameter (float initializers: trainable) or a buffer."""
        # Cached by id: keep the array alive, or a later temporary could reuse its id.
        self._keep.append(array)
        key = id(array)
        if key in self._materialized:
            return self._materialized[key]
        name = self._unique_attribute(name or self._tensor_names.get(key) or "constant")
        if key in self._tensor_names:
            self.initializer_at[name] = self._tensor_names[key]
        data = to_torch(array)
        if trainable and array.dtype.kind in FLOAT_KINDS and key in self._tensor_names:
            _attach(self.root, name, torch.nn.Parameter(data, requires_grad=True))
        else:
            _attach(self.root, name, data, buffer=True)
        proxy = fx.Proxy(self.graph.get_attr(name), self.tracer)
        self._materialized[key] = proxy
        return proxy

    def _unique_attribute(self, name: str) -> str:
        return self._attribute_names.claim(attribute_path(name))

    def build(self) -> fx.GraphModule:
        from slimgraph.ir.graph import ensure_shapes

        ensure_shapes(self.model)  # ranks and static sizes let lowerings write plain Python
        graph = self.model.graph
        self._load_initializers(graph)
        for value in graph.inputs:
            if value in self.values:
                continue  # an initializer listed as input (old opsets): a constant
            placeholder = self.graph.placeholder(identifier(value.name, "input"))
            self.values[value] = fx.Proxy(placeholder, self.tracer)
        for node in graph:
            self._lower(node)
        return self._finish(graph.outputs, "SlimgraphModule")

    def _finish(self, outputs: list[ir.Value], class_name: str) -> fx.GraphModule:
        """The GraphModule returning these values as a tuple (dead code removed)."""
        self.graph.output(tuple(self.tensor(self.lookup(v)).node for v in outputs))
        _place_factories(self.graph)
        module = fx.GraphModule(self.root, self.graph, class_name=class_name)
        module.graph.eliminate_dead_code()  # (after: call_module nodes need the owning module)
        module.graph.lint()
        module.recompile()
        return module

    def subgraph(self, graph: ir.Graph, name: str) -> tuple[fx.Proxy, list[fx.Proxy]]:
        """A subgraph (If branch, Loop or Scan body) as a submodule of its own: (the submodule, the
        outer values it reads, which it takes as arguments after its own inputs)."""
        child = SubgraphBuilder(self, graph)
        module = child.build_function()
        attribute = self._unique_attribute(name)
        _attach(self.root, attribute, module)
        return fx.Proxy(self.graph.get_attr(attribute), self.tracer), child.captured

    def call_subgraph(self, graph: ir.Graph, name: str, *inputs: fx.Proxy) -> fx.Proxy:
        """Call a subgraph that always runs (a modifier, not a branch): self.<name>(*inputs)."""
        module, captured = self.subgraph(graph, name)
        node = self.graph.call_module(module.node.target, tuple(_nodes(a) for a in (*inputs, *captured)))
        module.node.graph.erase_node(module.node)  # (the get_attr `subgraph` made is not needed)
        return fx.Proxy(node, self.tracer)

    def _load_initializers(self, graph: ir.Graph) -> None:
        for name, value in graph.initializers.items():
            if value.const_value is not None:
                array = tensor_array(value.const_value)
                self._keep.append(array)
                self._tensor_names[id(array)] = name
                self.values[value] = array

    def _lower(self, node: ir.Node) -> None:
        last = self.graph._root.prev  # (the fx nodes after it are this node's: tagged with its module path)
        layer = self.layers.get(node)
        if layer is None:
            self._lower_op(node)
        elif node is layer.nodes[0]:
            self._call_layer(layer)
        scope = layer.path if layer is not None and layer.module is not None else module_path(node)
        while (last := last.next) is not self.graph._root:
            last.meta.setdefault("scope", scope)

    def _call_layer(self, layer: Layer) -> None:
        inputs = tuple(self.tensor(self.lookup(v)).node for v in layer.inputs)
        if layer.module is None:
            self.values[layer.output] = fx.Proxy(self.graph.call_function(layer.function, inputs), self.tracer)
            return
        attribute = self._unique_attribute(layer.path)
        _attach(self.root, attribute, layer.module)
        self.layer_at[attribute] = layer
        self.values[layer.output] = fx.Proxy(self.graph.call_module(attribute, inputs), self.tracer)

    def _lower_op(self, node: ir.Node) -> None:
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        opset = self.model.opset_imports.get(domain, 1)
        lowering = find_lowering(node, opset)
        inputs = [self.lookup(v) if v is not None else None for v in node.inputs]
        if self._fold(lowering, node, inputs):
            return
        if lowering.tensors:
            inputs = [self.tensor(x) for x in inputs]
        try:
            result = lowering.fn(self, node, *inputs)
        except SlimgraphError:
            raise
        except Exception as exc:
            raise SlimgraphError(
                f"pytorch backend: lowering {node.op_type} (node {node.name or '(unnamed)'}) failed: {exc}"
            ) from exc
        results = result if isinstance(result, tuple) else (result,)
        for value, produced in zip(node.outputs, results):
            if value is not None and value.name:
                self.values[value] = produced

    def _fold(self, lowering, node: ir.Node, inputs: list) -> bool:
        """Run an op whose inputs are all constants now (eagerly, on real tensors), keeping the
        result as a constant: shape arithmetic then stays Python values and no dead code remains."""
        present = [x for x in inputs if x is not None]
        if not lowering.tensors or not present or not all(isinstance(x, np.ndarray) and x.size <= FOLD_LIMIT
                                                          for x in present):
            return False
        if node.op_type.startswith("Random") or node.op_type in ("Bernoulli", "Multinomial"):
            return False
        try:
            with torch.no_grad():
                result = lowering.fn(self, node, *[to_torch(x) if x is not None else None for x in inputs])
        except Exception:  # not foldable eagerly (the lowering needs traced values): lower it normally
            return False
        results = result if isinstance(result, tuple) else (result,)
        if not all(isinstance(r, torch.Tensor) for r in results):
            return False
        for value, produced in zip(node.outputs, results):
            if value is not None and value.name:
                self.values[value] = to_numpy(produced)
        return True


class SubgraphBuilder(Builder):
    """Builds a subgraph as a function of its inputs and of the outer values it reads. Those
    (and its constants, which stay the outer module's parameters and buffers) become extra
    arguments: `captured` lists them, as the outer graph passes them."""

    def __init__(self, parent: Builder, graph: ir.Graph) -> None:
        super().__init__(parent.model, options=parent.options)
        self.parent, self.subgraph_ir = parent, graph
        self.captured: list[fx.Proxy] = []
        self._captures: dict[Any, fx.Proxy] = {}

    def lookup(self, value: ir.Value) -> Any:
        if value in self.values:
            return self.values[value]
        outer = self.parent.lookup(value)
        if outer is None or isinstance(outer, np.ndarray):
            return outer  # (constants stay constants: folding and shape arithmetic keep working)
        return self._capture(value, lambda: self.parent.tensor(outer), value.name)

    def constant(self, array: np.ndarray, name: str | None = None, trainable: bool = True) -> fx.Proxy:
        self._keep.append(array)
        return self._capture(id(array), lambda: self.parent.constant(array, name, trainable), name or "constant")

    def _capture(self, key: Any, outer, name: str) -> fx.Proxy:
        if key not in self._captures:
            self.captured.append(outer())
            self._captures[key] = fx.Proxy(self.graph.placeholder(self._argument(name)), self.tracer)
        return self._captures[key]

    def _argument(self, name: str) -> str:
        taken = {n.name for n in self.graph.nodes} | {n.target for n in self.graph.nodes}
        return unique_name(taken, identifier(name, "value"), sep="_")

    def build_function(self) -> fx.GraphModule:
        self._load_initializers(self.subgraph_ir)
        for value in self.subgraph_ir.inputs:
            self.values[value] = fx.Proxy(self.graph.placeholder(self._argument(value.name)), self.tracer)
        for node in self.subgraph_ir:
            self._lower(node)
        return self._finish(self.subgraph_ir.outputs, "Subgraph")


FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor, torch.rand, torch.randn,
             torch.eye}


def _place_factories(graph: fx.Graph) -> None:
    """Tensors made from scratch (torch.arange(n), ...) go on the first input's device, so that
    the module runs wherever it and its inputs are moved (`module.cuda()`)."""
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    made = [n for n in graph.nodes if n.op == "call_function" and n.target in FACTORIES and "device" not in n.kwargs]
    if not inputs or not made:
        return
    anchor = next(n for n in graph.nodes if n.op != "placeholder")
    for placeholder in inputs:  # (a subgraph adds arguments as it meets outer values: gather them first)
        anchor.prepend(placeholder)
    with graph.inserting_after(inputs[-1]):
        device = graph.call_function(getattr, (inputs[0], "device"))
    for node in made:
        node.kwargs = {**node.kwargs, "device": device}


def _nodes(arg: Any) -> Any:
    """Proxies inside (nested) arguments → their fx nodes."""
    if isinstance(arg, fx.Proxy):
        return arg.node
    if isinstance(arg, (list, tuple)):
        return type(arg)(_nodes(a) for a in arg)
    return arg


def attribute_path(name: str) -> str:
    """The dotted attribute an initializer named `name` becomes (unless it clashes with one taken
    before it: then `_2`, `_3`, ... is appended)."""
    # a number stays one below a parent (`layers.0`: a ModuleList's index); at the top it is no attribute
    # name (the TorchScript exporter 1.x names nodes `391`)
    parts = [p if p.isdigit() and i else identifier(p) for i, p in enumerate(name.split("."))]
    # a segment may not shadow an nn.Module attribute (`half`, `eval`, `training`, ...)
    parts = [f"{p}_" if hasattr(torch.nn.Module, p) or p == "training" else p for p in parts]
    return ".".join(parts)


class _AttributeNames:
    """The dotted attribute names taken so far. A name may be neither taken nor a module above a
    taken name, nor lie below one (a tensor cannot hold attributes). Sets of names and of their
    module prefixes, and the next free `_N` per base, keep each claim cheap: a graph lowers to
    thousands of constants, and a scan of the taken names per candidate made that cubic."""

    def __init__(self) -> None:
        self._taken: set[str] = set()
        self._modules: set[str] = set()
        self._next_suffix: dict[str, int] = {}

    def _below_taken(self, name: str) -> str | None:
        """The taken name that `name` would lie below, if any."""
        parts = name.split(".")
        return next((p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in self._taken), None)

    def _free(self, name: str) -> bool:
        return name not in self._taken and name not in self._modules

    def claim(self, base: str) -> str:
        """`base`, or `base_2`, `base_3`, ... : the first that is free. A base below a taken name
        (`q.weight.scale` once `q.weight` is a tensor) joins that segment: `q.weight_scale`."""
        while (owner := self._below_taken(base)) is not None:
            base = owner + "_" + base[len(owner) + 1:]
        candidate = unique_name(lambda name: not self._free(name), base, sep="_", start=self._next_suffix.get(base, 1))
        self._next_suffix[base] = 1 if candidate == base else int(candidate[len(base) + 1:])
        self._taken.add(candidate)
        parts = candidate.split(".")
        self._modules.update(".".join(parts[:j]) for j in range(1, len(parts)))
        return candidate


def _attach(root: torch.nn.Module, dotted: str, value: torch.Tensor | torch.nn.Module, buffer: bool = False) -> None:
    """Put a parameter, buffer or submodule at a dotted path under root, making the modules above it."""
    # (codegen.TEMPLATE has its twin: the generated model.py must not import slimgraph)
    *path, leaf = dotted.split(".")
    module = root
    for part in path:
        if not hasattr(module, part):
            module.add_module(part, torch.nn.Module())
        module = getattr(module, part)
    if isinstance(value, torch.nn.Module):
        module.add_module(leaf, value)
    elif buffer:
        module.register_buffer(leaf, value)
    else:
        module.register_parameter(leaf, value)


def build_module(model: ir.Model, options: dict | None = None) -> fx.GraphModule:
    """The model as a torch.fx.GraphModule returning a tuple of its outputs."""
    return Builder(lowerable(model), options=options).build()


def lowerable(model: ir.Model) -> ir.Model:
    """The model ready for the lowering table: calls of the model's functions (e.g. those passes
    add in the `slimgraph` domain) inlined, on a copy — the table holds ONNX ops, not the model's own."""
    from slimgraph.backends.pytorch import ops  # noqa: F401  (registers the lowerings)

    if model.functions:
        from onnx_ir.passes.common import InlinePass

        model = model.clone()
        InlinePass()(model)
    return model
