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
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir.graph import constant_tensor, filled_constant, transposed_source
from slimgraph.ir.parts import Linear

# --- constants ------------------------------------------------------------------------------


def unique_name(model: ir.Model, base: str) -> str:
    """`base`, or `base.2`, `base.3`, … : a name no initializer or node output has yet."""
    taken = set(model.graph.initializers)
    taken.update(v.name for node in model.graph for v in node.outputs if v.name)
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}.{i}"
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


def weight_matrix(linear: Linear) -> np.ndarray:
    """The [K, N] float32 weight of a linear, whatever its layout in the graph."""
    value = linear.node.inputs[1]
    source = transposed_source(value)
    w = np.asarray(constant_array(source if source is not None else value), dtype=np.float32)
    if source is not None:
        w = w.T
    if _gemm_trans_b(linear):
        w = w.T
    return np.ascontiguousarray(w)


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
    for node, index in users:
        node.replace_input_with(index, output)
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
    for node, index in list(exit_.uses()):
        node.replace_input_with(index, entry)
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


def remove_unused_initializers(model: ir.Model) -> None:
    graph = model.graph
    keep = set(graph.inputs) | set(graph.outputs)
    for name, value in list(graph.initializers.items()):
        if not value.uses() and value not in keep:
            del graph.initializers[name]


def clear_shapes(values: Iterable[ir.Value]) -> None:
    """Forget the inferred shapes of activations an edit resized (re-inferred by `refresh_shapes`)."""
    for value in values:
        if constant_tensor(value) is None and not value.is_graph_input() and not value.is_graph_output():
            value.shape = None


def refresh_shapes(model: ir.Model) -> None:
    """Infer the shapes `clear_shapes` forgot (ONNX shape inference; only fills unknown shapes)."""
    from slimgraph.ir.graph import ensure_shapes

    ensure_shapes(model)
