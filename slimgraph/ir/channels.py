"""Conv channel groups: which constants change together when output channels of a conv go.

DepGraph's propagation, for NCHW graphs. Starting from a conv's output channels (axis 1), the
channel positions are followed forward to every consumer and backward to every producer that
must agree on them:

- producers: conv weight rows and bias, BatchNormalization scale/bias (mean/var are carried),
  a per-channel Add constant; followed back through channel-wise ops;
- pass-through: Relu/Clip/pools/Dropout, BatchNormalization, per-channel Mul/Add with constants
  (also `Unsqueeze`d ones);
- a grouped conv that makes the channels keeps its groups equal (the same number goes from each);
- coupling: an Add/Sum/Mul of two activations (a residual merge) ties both operands' channels;
  Concat along the channels shifts them by the offset of their input;
- consumers: a conv's weight input-channel axis, and after Flatten/Reshape of a 1×1 map (or a
  global pool), a Gemm/MatMul's weight rows.

Anything else on the way — a cross-channel op (LRN, Softmax over channels), a grouped or depthwise
conv reading the channels (its group count would change), a channel shuffle, a model output —
makes the channels unremovable, and says where.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from slimgraph.ir.edit import constant_shape
from slimgraph.ir.factors import ShapeElement
from slimgraph.ir.graph import constant_tensor, ensure_shapes, filled_constant, is_default_domain, static_dim
from slimgraph.ir.groups import Group, Slice

_CHANNELWISE = {"Relu", "Clip", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Dropout",
                "Identity", "Cast", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
                "Elu", "Selu", "Softplus", "Mish", "Neg", "Abs"}
_ADDITIVE = {"Add", "Sub", "Sum"}
_SCALING = {"Mul", "Div"}
_CHANNEL_AXIS = 1


class _Unremovable(Exception):
    pass


def constant_source(value: ir.Value) -> tuple[ir.Value, list[list[int]]] | None:
    """A constant operand as (the constant it is read from, the axes each Unsqueeze on the way
    inserted, outermost first), looking through Unsqueeze; ConstantOfShape outputs count."""
    inserted: list[list[int]] = []
    for _ in range(4):
        if constant_tensor(value) is not None or filled_constant(value) is not None:
            return value, inserted
        producer = value.producer()
        if producer is None or producer.op_type != "Unsqueeze" or not is_default_domain(producer):
            return None
        given = constant_tensor(producer.inputs[1]) if len(producer.inputs) > 1 else None
        axes = given.numpy().reshape(-1).tolist() if given is not None else list(producer.attributes.get_ints("axes"))
        if value.shape is None:
            return None
        inserted.append([int(a) % len(value.shape) for a in axes])
        value = producer.inputs[0]
    return None


def source_axis(position: int, inserted: list[list[int]]) -> int:
    """The axis of the constant that axis `position` of the (unsqueezed) operand reads."""
    for axes in inserted:
        position -= sum(1 for a in axes if a < position)
    return position


class _Search:
    def __init__(self, channels: int) -> None:
        self.parts: np.ndarray | None = None  # conv group of each channel, when a grouped conv makes them
        self.shrinks: list[tuple[ShapeElement, int]] = []
        self.tracked: dict[ir.Value, tuple[int, np.ndarray]] = {}
        self.slices: dict[tuple[ir.Value, int], Slice] = {}
        self.queue: list[tuple[ir.Value, int, np.ndarray, ir.Node | None]] = []

    def add_slice(self, value: ir.Value, axis: int, indices: np.ndarray, role: str) -> None:
        key = (value, axis)
        if key in self.slices:
            if not np.array_equal(self.slices[key].indices, indices):
                raise _Unremovable(f"{value.name!r} is reached with two different channel layouts")
            return
        self.slices[key] = Slice(value, axis, indices, role)

    def reach(self, value: ir.Value, axis: int, indices: np.ndarray, via: ir.Node | None = None) -> None:
        """`value` carries the channels on `axis`; `via` is the node it was reached through."""
        if value in self.tracked:
            if self.tracked[value][0] != axis or not np.array_equal(self.tracked[value][1], indices):
                raise _Unremovable(f"{value.name!r} is reached with two different channel layouts")
            return
        if value.is_graph_output():
            raise _Unremovable(f"the channels reach the model output {value.name!r}")
        if value.is_graph_input():
            raise _Unremovable(f"the channels come from the model input {value.name!r}")
        self.tracked[value] = (axis, indices)
        self.queue.append((value, axis, indices, via))

    def run(self) -> None:
        while self.queue:
            value, axis, indices, via = self.queue.pop(0)
            producer = value.producer()
            if producer is not None and producer is not via:
                self.backward(producer, value, axis, indices)
            for consumer, slot in value.uses():
                if consumer is not via:
                    self.forward(consumer, slot, axis, indices)

    # --- operands that are constants ---------------------------------------------------------

    def constant_operand(self, node: ir.Node, operand: ir.Value, out_rank: int, axis: int, indices: np.ndarray,
                         role: str) -> bool:
        """Slice a per-channel constant operand of a broadcasting op; False if it is not constant."""
        found = constant_source(operand)
        if found is None:
            return False
        source, inserted = found
        shape = operand.shape if operand.shape is not None else constant_shape(operand)
        position = axis - (out_rank - len(shape))
        if position < 0 or shape[position] == 1:
            return True  # broadcast along the channels: the same for every channel
        if int(indices.max()) >= shape[position]:
            raise _Unremovable(f"{node.op_type} {node.name!r} has a constant narrower than the channels")
        self.add_slice(source, source_axis(position, inserted), indices, role)
        return True

    # --- following the channels ------------------------------------------------------------

    def forward(self, node: ir.Node, slot: int, axis: int, indices: np.ndarray) -> None:
        """The channels reach `node`'s input `slot`: follow them through it (`_FORWARD`)."""
        if not is_default_domain(node):
            raise _Unremovable(f"{node.op_type} {node.name!r} is not followed")
        rule = _FORWARD.get(node.op_type)
        if rule is None:
            raise _Unremovable(f"{node.op_type} {node.name!r} mixes or reshapes the channels")
        rule(self, node, slot, axis, indices)

    def backward(self, node: ir.Node, value: ir.Value, axis: int, indices: np.ndarray) -> None:
        """The channels come out of `node`: follow them to where they are made (`_BACKWARD`)."""
        rule = _BACKWARD.get(node.op_type)
        if rule is None:
            raise _Unremovable(f"the channels come from {node.op_type} {node.name!r}, which is not followed")
        rule(self, node, axis, indices)

    def _through(self, node: ir.Node, value: ir.Value, axis: int, indices: np.ndarray) -> None:
        self.reach(value, axis, indices, via=node)

    def _batch_norm_through(self, node: ir.Node, value: ir.Value, axis: int, indices: np.ndarray) -> None:
        self._batch_norm(node, indices)
        self.reach(value, axis, indices, via=node)

    def _merge(self, node: ir.Node, axis: int, indices: np.ndarray) -> None:
        """An elementwise op on the channels: constants are sliced, activations coupled."""
        rank = len(node.outputs[0].shape) if node.outputs[0].shape is not None else None
        if rank is None:
            raise _Unremovable(f"{node.op_type} {node.name!r} has an output of unknown rank")
        role = "producer" if node.op_type in _ADDITIVE else "carried"
        for operand in node.inputs:
            if operand is None or self.constant_operand(node, operand, rank, axis, indices, role):
                continue
            position = axis - (rank - len(operand.shape))
            if position < 0 or operand.shape[position] == 1:
                continue
            self.reach(operand, position, indices, via=node)
        self.reach(node.outputs[0], axis, indices, via=node)

    def _batch_norm(self, node: ir.Node, indices: np.ndarray) -> None:
        for i, role in zip(range(1, 5), ("producer", "producer", "carried", "carried")):
            found = constant_source(node.inputs[i])
            if found is None:
                raise _Unremovable(f"BatchNormalization {node.name!r} has parameters that are not constant")
            self.add_slice(found[0], source_axis(0, found[1]), indices, role)

    def _conv_output(self, node: ir.Node, indices: np.ndarray) -> None:
        weight = constant_source(node.inputs[1])
        if weight is None:
            raise _Unremovable(f"Conv {node.name!r} has a weight that is not constant")
        groups = node.attributes.get_int("group", 1)
        if groups > 1:  # a grouped conv keeps its groups equal: the same number of channels from each
            if groups == static_dim(node.inputs[0], 1):
                raise _Unremovable(f"Conv {node.name!r} is depthwise (its group count would change)")
            per_group = constant_shape(weight[0])[0] // groups
            parts = indices[:, 0] // per_group
            if self.parts is not None and not np.array_equal(parts, self.parts):
                raise _Unremovable(f"Conv {node.name!r} groups the channels differently from another grouped conv")
            self.parts = parts
        self.add_slice(weight[0], 0, indices, "producer")
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = constant_source(node.inputs[2])
            if bias is None:
                raise _Unremovable(f"Conv {node.name!r} has a bias that is not constant")
            self.add_slice(bias[0], 0, indices, "producer")

    def _conv_input(self, node: ir.Node, axis: int, indices: np.ndarray) -> None:
        if axis != _CHANNEL_AXIS:
            raise _Unremovable(f"Conv {node.name!r} reads the channels on axis {axis}")
        weight = constant_source(node.inputs[1])
        if weight is None:
            raise _Unremovable(f"Conv {node.name!r} has a weight that is not constant")
        groups = node.attributes.get_int("group", 1)
        if groups != 1:
            kind = "depthwise" if groups == static_dim(node.inputs[0], 1) else f"grouped ({groups} groups)"
            raise _Unremovable(f"Conv {node.name!r} is a {kind} conv reading the channels")
        self.add_slice(weight[0], 1, indices, "consumer")

    def _concat(self, node: ir.Node, slot: int, axis: int, indices: np.ndarray) -> None:
        rank = len(node.inputs[slot].shape) if node.inputs[slot].shape is not None else None
        along = node.attributes.get_int("axis", 0) % rank if rank else None
        if along != axis:
            self.reach(node.outputs[0], axis, indices)  # concatenated elsewhere: channels unchanged
            return
        widths = [static_dim(v, axis) for v in node.inputs[:slot]]
        if any(w is None for w in widths):
            raise _Unremovable(f"Concat {node.name!r} has inputs of unknown width")
        self.reach(node.outputs[0], axis, indices + sum(widths), via=node)

    def _flatten(self, node: ir.Node, axis: int, indices: np.ndarray) -> None:
        source, out = node.inputs[0], node.outputs[0]
        if source.shape is None or out.shape is None or len(out.shape) != 2 or axis != _CHANNEL_AXIS:
            raise _Unremovable(f"{node.op_type} {node.name!r} reshapes the channels")
        spatial = [static_dim(source, i) for i in range(2, len(source.shape))]
        if any(s is None for s in spatial) or static_dim(source, 0) != static_dim(out, 0):
            raise _Unremovable(f"{node.op_type} {node.name!r} reshapes the channels")
        area = int(np.prod(spatial)) if spatial else 1
        if node.op_type == "Reshape":
            target = constant_tensor(node.inputs[1])
            width = int(target.numpy().reshape(-1)[-1]) if target is not None else None
            if width is None or width not in (-1, static_dim(source, 1) * area):
                raise _Unremovable(f"Reshape {node.name!r} has a target the channels cannot follow")
            if width != -1:  # an explicit width counts the channels: it shrinks with them
                self.shrinks.append((ShapeElement(((node, 1),), 1, width, ()), indices.shape[1] * area))
        positions = (indices[:, :, None] * area + np.arange(area)).reshape(len(indices), -1)
        self.reach(out, 1, positions, via=node)

    def _linear_input(self, node: ir.Node, axis: int, indices: np.ndarray) -> None:
        rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
        weight = constant_source(node.inputs[1])
        if weight is None or rank is None or axis != rank - 1:
            raise _Unremovable(f"{node.op_type} {node.name!r} mixes the channels")
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            raise _Unremovable(f"Gemm {node.name!r} transposes its input")
        trans_b = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
        self.add_slice(weight[0], 1 if trans_b else 0, indices, "consumer")



def _first_input_only(rule: Callable, what: str) -> Callable:
    """A forward rule for ops that carry the channels only from their first input."""
    def forward(search: _Search, node: ir.Node, slot: int, axis: int, indices: np.ndarray) -> None:
        if slot != 0:
            raise _Unremovable(f"{node.op_type} {node.name!r} {what}")
        rule(search, node, axis, indices)
    return forward


def _coupled_after_concat(search: _Search, node: ir.Node, axis: int, indices: np.ndarray) -> None:
    raise _Unremovable(f"channels coupled after Concat {node.name!r}")


# op → how the channels go through it, forward (search, node, slot, axis, indices) and backward
# (search, node, axis, indices); an op in neither table stops the search with a reason.
_FORWARD: dict[str, Callable] = {
    "Shape": lambda *_: None,
    "Size": lambda *_: None,
    **dict.fromkeys(_CHANNELWISE, lambda s, node, slot, axis, idx: s._through(node, node.outputs[0], axis, idx)),
    "BatchNormalization": lambda s, node, slot, axis, idx: s._batch_norm_through(node, node.outputs[0], axis, idx),
    **dict.fromkeys(_ADDITIVE | _SCALING, lambda s, node, slot, axis, idx: s._merge(node, axis, idx)),
    "Conv": _first_input_only(_Search._conv_input, "reads the channels as a weight"),
    "Concat": _Search._concat,
    "Flatten": _first_input_only(_Search._flatten, "mixes or reshapes the channels"),
    "Reshape": _first_input_only(_Search._flatten, "mixes or reshapes the channels"),
    "Gemm": _first_input_only(_Search._linear_input, "mixes or reshapes the channels"),
    "MatMul": _first_input_only(_Search._linear_input, "mixes or reshapes the channels"),
}
_BACKWARD: dict[str, Callable] = {
    "Conv": lambda s, node, axis, idx: s._conv_output(node, idx),
    **dict.fromkeys(_CHANNELWISE, lambda s, node, axis, idx: s._through(node, node.inputs[0], axis, idx)),
    "BatchNormalization": lambda s, node, axis, idx: s._batch_norm_through(node, node.inputs[0], axis, idx),
    **dict.fromkeys(_ADDITIVE | _SCALING, lambda s, node, axis, idx: s._merge(node, axis, idx)),
    "Concat": _coupled_after_concat,
}

def conv_channel_groups(model: ir.Model) -> tuple[list[Group], list[str]]:
    """Channel groups of every conv's output (each group once), and why the others cannot be pruned."""
    ensure_shapes(model)
    groups: list[Group] = []
    reasons: list[str] = []
    covered: set[ir.Value] = set()
    for node in model.graph:
        if node.op_type != "Conv" or not is_default_domain(node) or node.outputs[0] in covered:
            continue
        channels = static_dim(node.outputs[0], 1)
        weight = constant_source(node.inputs[1])
        if weight is None:
            continue
        if channels is None:
            channels = constant_shape(weight[0])[0]
        search = _Search(channels)
        try:
            search.reach(node.outputs[0], _CHANNEL_AXIS, np.arange(channels, dtype=np.int64)[:, None])
            search.run()
        except _Unremovable as exc:
            covered.update(search.tracked)
            reasons.append(f"{node.name or node.outputs[0].name}: {exc}")
            continue
        covered.update(search.tracked)
        name = node.name or node.outputs[0].name or "conv"
        groups.append(Group("channels", name, channels, list(search.slices.values()), list(search.tracked),
                            shrinks=search.shrinks, parts=search.parts, unit="channels"))
    return groups, reasons
