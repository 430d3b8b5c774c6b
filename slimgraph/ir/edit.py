"""Graph editing shared by every pass: weights in their graph layout, slicing, and node regions.

Rules every function here keeps:

- Tensors are replaced, never written into. A value's tensor may be shared with the reference
  model a pipeline verifies against, or memory-mapped from the user's file; an edit gives the
  value a new tensor and leaves the old one as it was.
- A linear's weight is read and written as a `[K, N]` float32 matrix (inputs × outputs) whatever
  its layout in the graph: MatMul `[K, N]`, Gemm with `transB` `[N, K]`, or a tied table read
  through `Transpose` (`[N, K]`, shared with an embedding; see `untie`).
- New nodes take over the module path (`metadata_props`) of the nodes they replace, and new
  constants get readable, unique names derived from the weight they come from.
- New nodes are made with a `Builder` (named nodes in name scopes, constants made once), put in
  with `insert_after`, `insert_before` or `replace_region`, and read through `redirect`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir.graph import cone, constant_tensor, filled_constant, transposed_source
from slimgraph.ir.meta import NAME_SCOPES_KEY
from slimgraph.ir.parts import Linear

# --- constants ------------------------------------------------------------------------------


def unique_name(taken: ir.Model | Container[str] | Callable[[str], bool], base: str, *, sep: str = ".",
                start: int = 1) -> str:
    """`base`, or `base.2`, `base.3`, … (`sep` between): the first name not `taken`. `taken` is a
    model (the names of its initializers and node outputs), a set of names, or a predicate that
    says whether a name is taken. The search starts at suffix `start` (1: `base` itself)."""
    if isinstance(taken, ir.Model):
        names = set(taken.graph.initializers)
        names.update(v.name for node in taken.graph for v in node.outputs if v.name)
        taken = names
    is_taken = taken if callable(taken) else taken.__contains__
    i = start
    name = base if i == 1 else f"{base}{sep}{i}"
    while is_taken(name):
        i += 1
        name = f"{base}{sep}{i}"
    return name


def add_initializer(model: ir.Model, name: str, tensor: ir.TensorProtocol | np.ndarray) -> ir.Value:
    """Register a new initializer under a unique name derived from `name`."""
    unique = unique_name(model, name)
    if isinstance(tensor, np.ndarray):
        tensor = ir.tensor(tensor, name=unique)
    else:
        tensor.name = unique
    value = ir.Value(name=unique, const_value=tensor, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))
    model.graph.register_initializer(value)
    return value


def replace_constant(value: ir.Value, array: np.ndarray, model: ir.Model | None = None) -> None:
    """Give a constant value (an initializer, a Constant node's output, or a ConstantOfShape
    output, which becomes an initializer: `model` is then needed) a new tensor."""
    if value.const_value is not None or value.is_initializer():
        value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)
    elif filled_constant(value) is not None:
        if model is None:
            raise SlimgraphError(f"{value.name!r} is made by ConstantOfShape: materializing it needs the model")
        value.replace_all_uses_with(add_initializer(model, value.name or "constant", np.ascontiguousarray(array)))
        return
    else:
        producer = value.producer()
        if producer is None or producer.op_type != "Constant" or "value" not in producer.attributes:
            raise SlimgraphError(f"{value.name!r} is not a constant that can be replaced")
        producer.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.ascontiguousarray(array), name=value.name))
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))


def constant_array(value: ir.Value) -> np.ndarray:
    tensor = constant_tensor(value)
    if tensor is not None:
        return tensor.numpy()
    filled = filled_constant(value)
    if filled is None:
        raise SlimgraphError(f"{value.name!r} is not a constant")
    shape, fill = filled
    return np.full(shape, fill[0], dtype=fill.dtype)


def constant_shape(value: ir.Value) -> tuple[int, ...]:
    tensor = constant_tensor(value)
    if tensor is not None:
        return tuple(tensor.shape)
    filled = filled_constant(value)
    if filled is None:
        raise SlimgraphError(f"{value.name!r} is not a constant")
    return filled[0]


def take(model: ir.Model, value: ir.Value, axis: int, keep: Sequence[int] | np.ndarray) -> None:
    """Keep only positions `keep` of a constant along `axis` (a new tensor; the old one untouched).
    A ConstantOfShape output keeps its compact form: its shape shrinks. What its readers produce
    may change size (a pruned head's projection output): their shapes are forgotten, for
    `refresh_shapes`."""
    keep = np.asarray(keep, dtype=np.int64)
    clear_shapes([out for user, _ in value.uses() for out in user.outputs])
    filled = filled_constant(value)
    if filled is not None:
        shape = list(filled[0])
        shape[axis] = len(keep)
        with_input(value.producer(), 0, add_initializer(model, f"{value.name}.shape", np.array(shape, np.int64)))
        value.shape = ir.Shape(shape) if value.type is not None else None
        return
    replace_constant(value, np.take(constant_array(value), keep, axis=axis))


def with_input(node: ir.Node, index: int, value: ir.Value) -> None:
    """Make `node` read `value` at input `index` (other readers of the old value are unaffected)."""
    node.replace_input_with(index, value)


# --- linear weights -------------------------------------------------------------------------


def weight_matrix(linear: Linear, *, contiguous: bool = True) -> np.ndarray:
    """The [K, N] float32 weight of a linear, whatever its layout in the graph; with
    `contiguous=False`, possibly a transposed view (no copy of a large weight read through a Transpose)."""
    value = linear.node.inputs[1]
    source = transposed_source(value)
    w = np.asarray(constant_array(source if source is not None else value), dtype=np.float32)
    if source is not None:
        w = w.T
    if _gemm_trans_b(linear):
        w = w.T
    return np.ascontiguousarray(w) if contiguous else w


def set_weight_matrix(model: ir.Model, linear: Linear, w: np.ndarray) -> None:
    """Write a [K, N] matrix as the linear's weight, in its graph layout and dtype.

    A tied weight (read through Transpose from a table other nodes read too) is untied first,
    so the embedding keeps its table.
    """
    value = linear.node.inputs[1]
    if transposed_source(value) is not None:
        untie(model, linear)
        value = linear.node.inputs[1]
    dtype = constant_array(value).dtype
    stored = w.T if _gemm_trans_b(linear) else w
    if value.is_initializer() and len(value.uses()) > 1:  # shared by another node: give this one its own
        value = add_initializer(model, value.name or linear.name, stored.astype(dtype))
        with_input(linear.node, 1, value)
    else:
        replace_constant(value, stored.astype(dtype))


def conv_weight(node: ir.Node) -> np.ndarray:
    """A Conv's weight `[out, in/groups, kh, kw]` (as stored: Conv has one layout)."""
    if node.op_type != "Conv":
        raise SlimgraphError(f"{node.name!r} is a {node.op_type}, not a Conv")
    return constant_array(node.inputs[1])


def set_conv_weight(model: ir.Model, node: ir.Node, w: np.ndarray) -> None:
    """Write a Conv's weight (same rank; a ConstantOfShape weight becomes an initializer). The node
    gets its own tensor if other nodes read the same one."""
    if w.ndim != len(constant_shape(node.inputs[1])):
        raise SlimgraphError(f"{node.name!r}: a weight of rank {w.ndim} for a rank-{len(constant_shape(node.inputs[1]))} conv")
    value = node.inputs[1]
    if len(value.uses()) > 1:
        with_input(node, 1, add_initializer(model, value.name or f"{node.name}.weight", w))
    else:
        replace_constant(value, w, model)


def untie(model: ir.Model, linear: Linear) -> ir.Value:
    """Give a linear that reads a shared table through Transpose its own [K, N] weight."""
    value = linear.node.inputs[1]
    source = transposed_source(value)
    if source is None:
        return value
    own = constant_array(source).T
    if _gemm_trans_b(linear):
        own = own.T
    new = add_initializer(model, f"{linear.name}.weight", np.ascontiguousarray(own))
    with_input(linear.node, 1, new)
    remove_dead(model)
    return new


def _gemm_trans_b(linear: Linear) -> bool:
    return linear.node.op_type == "Gemm" and bool(linear.node.attributes.get_int("transB", 0))


def bias_value(linear: Linear) -> ir.Value | None:
    """The bias value a linear adds (MatMul + Add, or Gemm's C), if any."""
    if linear.bias is None:
        return None
    if linear.node.op_type == "Gemm":
        return linear.node.inputs[2]
    (add, _), = linear.node.outputs[0].uses()
    return next(v for v in add.inputs if v is not None and v.name == linear.bias)


# --- new nodes ------------------------------------------------------------------------------


class Builder:
    """The nodes and constants a pass adds for one edit, named after what they belong to.

    Nodes are named from `node_names` (fields: `scope`, the current scope; `op`; `n`, a running
    count from `first`), copies from `copy_names` (fields: `name`, the original's; `n`); a node
    given a name keeps it. Inside `with build.scope("router"):` nodes are in the submodule
    `{scope}.router`, and, given `name_scopes` (the exporter's `pkg.torch.onnx.name_scopes` down to
    `scope`), they record it as PyTorch's exporter would. Constants are named from
    `constant_names` (fields: `scope`, the builder's own, whatever the current one; `name`) and
    made once per name and value. `take()` hands over the nodes made since the last call::

        build = Builder(model, "mlp")
        with build.scope("router"):
            logits = build.op("MatMul", [x, build.constant("router.weight", w)])  # mlp.router/MatMul_0
        insert_after(model, x, build.take(), logits)
    """

    def __init__(self, model: ir.Model, scope: str, *, node_names: str = "{scope}/{op}_{n}",
                 constant_names: str = "{scope}.{name}", copy_names: str = "{name}_{n}", first: int = 0,
                 name_scopes: Sequence[str] | None = None, metadata: Mapping[str, str] | None = None,
                 floats: np.dtype | type = np.float32) -> None:
        self.model, self.root = model, scope
        self.node_names, self.constant_names, self.copy_names = node_names, constant_names, copy_names
        self.made = first  # the number the next node is named with
        self.name_scopes = list(name_scopes) if name_scopes is not None else None
        self.metadata = dict(metadata or {})  # what every node made carries
        self.floats = np.dtype(floats)  # what Python floats and float64 arrays become
        self.nodes: list[ir.Node] = []
        self._inner: list[str] = []
        self._constants: dict[tuple, ir.Value] = {}

    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Nodes made inside are in the submodule `name` (dotted: `experts.3`) of the current scope."""
        parts = name.split(".")
        self._inner += parts
        try:
            yield
        finally:
            del self._inner[-len(parts):]

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], attributes: Mapping | None = None, *,
           domain: str = "", outputs: int = 1, name: str | None = None, **more: object
           ) -> ir.Value | tuple[ir.Value, ...]:
        """A new node (attributes as a mapping or as keywords); its output, or its outputs."""
        attributes = {**(attributes or {}), **more}
        node = ir.node(op_type, inputs, attributes or None, domain=domain, num_outputs=outputs, name=name)
        self.add([node])
        return node.outputs[0] if outputs == 1 else tuple(node.outputs)

    def copy(self, node: ir.Node, inputs: Sequence[ir.Value | None]) -> ir.Value:
        """A copy of the one-output `node` that reads `inputs`; its output."""
        name = self.copy_names.format(name=node.name, n=self.made)
        return self.op(node.op_type, inputs, dict(node.attributes), domain=node.domain, name=name)

    def add(self, nodes: Iterable[ir.Node]) -> None:
        """Take nodes made elsewhere (a copied region) into the current scope, naming those without a name."""
        path = ".".join([self.root, *self._inner])
        for node in nodes:
            if not node.name:
                node.name = self.node_names.format(scope=path, op=node.op_type, n=self.made)
            self.made += 1
            if self.name_scopes is not None:
                inner = [".".join([self.root, *self._inner[: i + 1]]) for i in range(len(self._inner))]
                node.metadata_props[NAME_SCOPES_KEY] = repr([*self.name_scopes, *inner, node.name])
            for key, value in self.metadata.items():
                node.metadata_props.setdefault(key, value)
            self.nodes.append(node)

    def constant(self, name: str, value: np.ndarray | float | Sequence[int]) -> ir.Value:
        """A new initializer (a Python float: a scalar; a list: an int64 vector; float64 becomes
        `floats`), or the one made before under the same name with the same value."""
        if isinstance(value, float):
            value = np.array(value, self.floats)
        elif isinstance(value, (list, tuple)):
            value = np.array(value, np.int64)
        elif value.dtype == np.float64:
            value = value.astype(self.floats)
        value = np.array(value, order="C")  # (np.ascontiguousarray would make a scalar 1-D)
        key = (name, value.dtype.str, value.shape, value.tobytes())
        if key not in self._constants:
            full = self.constant_names.format(scope=self.root, name=name)
            self._constants[key] = add_initializer(self.model, full, value)
        return self._constants[key]

    def take(self) -> list[ir.Node]:
        """The nodes made since the last `take`, in the order made (to insert them)."""
        nodes, self.nodes = self.nodes, []
        return nodes


def redirect(users: Iterable[tuple[ir.Node, int]], value: ir.Value) -> None:
    """Make each `(node, input index)` in `users` (some of a value's `uses()`) read `value` instead;
    the value they read before keeps its other readers."""
    for node, index in list(users):
        node.replace_input_with(index, value)


def insert_before(model: ir.Model, node: ir.Node, nodes: Sequence[ir.Node]) -> None:
    """Put `nodes` (in their order) before `node` in the graph, so that `node` may read them."""
    model.graph.insert_before(node, list(nodes))


# --- regions of nodes -----------------------------------------------------------------------


def carry_metadata(nodes: Iterable[ir.Node], source: ir.Node) -> None:
    for node in nodes:
        for key, value in source.metadata_props.items():
            node.metadata_props.setdefault(key, value)


def replace_region(model: ir.Model, old_nodes: Sequence[ir.Node], new_nodes: Sequence[ir.Node],
                   outputs: Mapping[ir.Value, ir.Value]) -> None:
    """Put `new_nodes` where `old_nodes` were: each old output in `outputs` is replaced by its new
    value everywhere (graph outputs keep their names), then the old nodes and whatever only they
    used are removed. New nodes take the first old node's module path."""
    anchor = old_nodes[0]
    carry_metadata(new_nodes, anchor)
    model.graph.insert_before(anchor, list(new_nodes))
    for old, new in outputs.items():
        was_graph_output, name = old.is_graph_output(), old.name
        new.type, new.shape = old.type, old.shape
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        if was_graph_output:  # the model's output keeps its name
            old.name = None
            new.name = name
    model.graph.remove(list(old_nodes), safe=True)
    remove_dead(model)


def replace_linear(model: ir.Model, linear: Linear, nodes: list[ir.Node], output: ir.Value) -> None:
    """Put `nodes` (producing `output`) in place of the linear and its bias Add."""
    old = [linear.node]
    if linear.bias is not None and linear.node.op_type == "MatMul":
        old.append(linear.output.producer())
    replace_region(model, old, nodes, {linear.output: output})


def insert_after(model: ir.Model, value: ir.Value, nodes: Sequence[ir.Node], output: ir.Value) -> None:
    """Insert `nodes` (reading `value`, producing `output`) so that every former reader of
    `value`, graph outputs included, reads `output` instead."""
    users = [(node, index) for node, index in value.uses() if node not in nodes]
    producer = value.producer()
    if producer is not None:
        carry_metadata(nodes, producer)
        model.graph.insert_after(producer, list(nodes))
    else:
        first_user = min((n for n, _ in users), key=list(model.graph).index, default=None)
        if first_user is None:
            model.graph.extend(list(nodes))
        else:
            model.graph.insert_before(first_user, list(nodes))
    output.type, output.shape = value.type, output.shape or value.shape
    redirect(users, output)
    outputs = model.graph.outputs
    for i, out in enumerate(outputs):
        if out is value:
            name = value.name
            value.name = unique_name(model, f"{name}.before")
            output.name = name
            outputs[i] = output


def bypass(model: ir.Model, entry: ir.Value, exit_: ir.Value) -> None:
    """Make everything that read `exit_` read `entry` instead (a block becomes the identity);
    the nodes only the bypassed region used are removed."""
    if entry.type is not None and exit_.type is not None and entry.dtype != exit_.dtype:
        raise SlimgraphError(f"cannot bypass {exit_.name!r} with {entry.name!r}: dtypes differ")
    redirect(exit_.uses(), entry)
    outputs = model.graph.outputs
    for i, out in enumerate(outputs):
        if out is exit_:
            identity = ir.node("Identity", [entry], name=unique_name(model, f"{exit_.name}_bypass"))
            model.graph.append(identity)
            identity.outputs[0].type, identity.outputs[0].shape = exit_.type, exit_.shape
            name, exit_.name = exit_.name, None
            identity.outputs[0].name = name
            outputs[i] = identity.outputs[0]
    remove_dead(model)


def remove_dead(model: ir.Model) -> None:
    """Remove nodes whose outputs nobody reads, then initializers nothing reads."""
    import onnx_ir.passes.common as common

    common.RemoveUnusedNodesPass()(model)
    remove_unused_initializers(model)


def remove_unused_initializers(model: ir.Model) -> list[str]:
    """Remove the initializers that no node (subgraphs included) reads and that are no graph
    input or output; returns their names."""
    graph = model.graph
    keep = set(graph.inputs) | set(graph.outputs)
    unused = [name for name, value in graph.initializers.items() if not value.uses() and value not in keep]
    for name in unused:
        del graph.initializers[name]
    return unused


_SHAPE_VECTOR_OPS = {"Shape", "Concat", "Slice", "Gather", "Cast", "Identity", "Unsqueeze", "Squeeze"}


def follow_length(model: ir.Model, build: Builder, old: ir.Value, new: ir.Value, axis: int) -> int:
    """After `new` took the place of `old` with another length along `axis`, where that length is
    known only at run time: the shape vectors that the nodes computed from `new` read, and that are
    computed from the `Shape` of a tensor with `old`'s length (the exporter's `Shape(input_ids)`),
    read the length from `new` instead. Each reader gets its own copy of the computation (others
    may read it too), made by `build`; returns how many inputs changed. (A fixed length is counted
    by shape constants instead: `factors.length_elements`.)"""
    if build.nodes:
        raise ValueError("follow_length: the builder has nodes not yet inserted (insert build.take() first)")
    length = old.shape[axis]
    if isinstance(length, int):
        return 0
    later = set(cone(new))
    patched: dict[ir.Value, ir.Value] = {}

    def rebuild(vector: ir.Value) -> ir.Value:
        node = vector.producer()
        if node is None or node.op_type not in _SHAPE_VECTOR_OPS or vector in later:
            return vector
        if node.op_type == "Shape":
            source = node.inputs[0]
            if source.shape is None or all(str(d) != str(length) for d in source.shape):
                return vector
            if vector not in patched:
                pieces = [build.op("Shape", [new], start=axis, end=axis + 1) if str(d) == str(length)
                          else build.op("Shape", [source], start=i, end=i + 1) for i, d in enumerate(source.shape)]
                start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", len(pieces))
                patched[vector] = build.op("Concat", pieces[slice(start, end)], axis=0)
            return patched[vector]
        inputs = [rebuild(v) if v is not None else None for v in node.inputs]
        return vector if all(a is b for a, b in zip(inputs, node.inputs)) else build.copy(node, inputs)

    followed = 0
    for node in [n for n in model.graph if any(o in later for o in n.outputs)]:
        for index, vector in enumerate(node.inputs):
            if vector is None or vector in later or vector.dtype != ir.DataType.INT64:
                continue
            rebuilt, nodes = rebuild(vector), build.take()
            if rebuilt is not vector:
                insert_before(model, node, nodes)
                redirect([(node, index)], rebuilt)
                followed += 1
    return followed


def clear_shapes(values: Iterable[ir.Value]) -> None:
    """Forget the inferred shapes of activations an edit resized (re-inferred by `refresh_shapes`)."""
    for value in values:
        if constant_tensor(value) is None and not value.is_graph_input() and not value.is_graph_output():
            value.shape = None


def refresh_shapes(model: ir.Model) -> None:
    """Infer the shapes `clear_shapes` forgot (ONNX shape inference; only fills unknown shapes)."""
    from slimgraph.ir.graph import ensure_shapes

    ensure_shapes(model)
