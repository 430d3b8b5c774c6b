"""Dependency groups: everything that must change together when channels of a layer go (DepGraph).

A group has `size` channels; for each constant it touches, a `Slice` gives the positions each
channel owns along one axis (`indices[c]`, the same count per channel). Removing channels removes
those positions from every slice, rewrites the shape constants that count them, and clears the
inferred shapes of the activations that shrink. Groups are found from the graph:

- ffn: an FFN's inner channels — up (and gate) output columns and biases, down input rows;
- heads: attention heads — q/k/v output columns per head, o input rows; with grouped-query
  attention, query heads only inside their KV group and the same number from every group;
- kv-heads (GQA): whole KV groups — k/v columns, the q columns and o rows of their query heads;
- vocab: token rows of the embedding tables the input ids index, the LM head's output columns
  (the same table when tied through Transpose) and the logits' last axis;
- channels: conv output channels (see `slimgraph.ir.channels`).

Heads are followed through reshapes, transposes and the GQA repeat by `slimgraph.ir.factors`, so
that a Reshape target `[0, 0, 12, 32]` or an Expand shape holding the repeat count is rewritten
for the heads that remain (head_dim is never split, as RoPE needs it whole). A group is proven
right by exactness: removing channels equals zeroing their `consumer` slices in the original
(`tests/ir/test_groups.py`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir import edit
from slimgraph.ir.factors import Axes, Factor, FactorFlow, ShapeElement, resized, rewrite_elements, same
from slimgraph.ir.graph import (
    ATTENTION_PATH_OPS,
    SHAPE_ONLY_OPS,
    Walk,
    constant_tensor,
    find_downstream,
    ops,
    transposed_source,
)
from slimgraph.ir.parts import FFN, Attention, Linear

Role = Literal["producer", "consumer", "carried"]
GroupKind = Literal["ffn", "heads", "kv-heads", "vocab", "channels"]
@dataclass(frozen=True, eq=False)
class Slice:
    """Positions of a constant along `axis` owned by each channel: `indices[c]`."""

    value: ir.Value
    axis: int
    indices: np.ndarray  # [channels, per_channel] int64
    role: Role  # producer: makes the channel; consumer: reads it; carried: per-channel, neither


@dataclass(eq=False)
class Group:
    """Channels that go together; see the module docstring."""

    kind: GroupKind
    name: str
    size: int
    slices: list[Slice]
    activations: list[ir.Value] = field(default_factory=list)
    elements: list[ShapeElement] = field(default_factory=list)
    # Axis factors the channels count, with how much each shrinks per channel removed (GQA: a
    # query head is 1/kv_heads of the heads-per-KV repeat count).
    resizes: list[tuple[Factor, Fraction]] = field(default_factory=list)
    # Shape elements that count these channels among others (a flattened width after a Concat):
    # each shrinks by its number of positions per channel removed.
    shrinks: list[tuple[ShapeElement, int]] = field(default_factory=list)
    parts: np.ndarray | None = None  # part of each channel; removal takes the same number from every part
    unit: str = "channels"
    # The factors of each activation's axes, where they were followed: after a removal the
    # activations get their new shapes from them (a head count that shape inference cannot
    # recover through a `[B, S, -1, d]` reshape); others only forget theirs.
    axes: Mapping[ir.Value, Axes] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Group({self.kind} {self.name}: {self.size} {self.unit})"

    def to_json(self) -> dict:
        return {"kind": self.kind, "name": self.name, "size": self.size, "unit": self.unit,
                "tensors": [{"name": s.value.name, "axis": s.axis, "per_channel": int(s.indices.shape[1]),
                             "role": s.role} for s in self.slices],
                "shape_constants": len({id(e) for e in self.elements if self.counts(e)}) + len(self.shrinks),
                "equal_parts": None if self.parts is None else int(self.parts.max()) + 1}

    def counts(self, element: ShapeElement) -> bool:
        """Whether a shape element counts this group's channels (and so changes with them)."""
        return any(same(f, g) for f in element.factors for g, _ in self.resizes)

    def check(self, channels: Sequence[int]) -> np.ndarray:
        """The channels as a sorted array, or a SlimgraphError saying why they cannot go."""
        chosen = np.unique(np.asarray(channels, dtype=np.int64))
        if chosen.size and (chosen[0] < 0 or chosen[-1] >= self.size):
            raise SlimgraphError(f"{self.name}: {self.unit} {chosen.tolist()} out of range (0..{self.size - 1})")
        if chosen.size == self.size:
            raise SlimgraphError(f"{self.name}: removing all {self.size} {self.unit} would remove the layer")
        if self.parts is not None and chosen.size:
            counts = np.bincount(self.parts[chosen], minlength=int(self.parts.max()) + 1)
            if len(set(counts.tolist())) != 1:
                raise SlimgraphError(f"{self.name}: these {self.unit} come in {len(counts)} equal parts (KV groups "
                                     f"or conv groups); remove the same number from each, got {counts.tolist()}")
        return chosen

    def new_sizes(self, removed: int) -> dict[Factor, int]:
        return {f: int(f.find().size - removed * step) for f, step in self.resizes}

    def removed_bytes(self, channels: Sequence[int]) -> int:
        """Bytes of constants a removal frees (a constant shared by two slices counted once)."""
        chosen = self.check(channels)
        positions = _positions({self: chosen})
        total = 0
        for (value, axis), drop in positions.items():
            array = edit.constant_array(value)
            total += array.nbytes // array.shape[axis] * len(drop)
        return total


def _positions(removals: Mapping[Group, np.ndarray]) -> dict[tuple[ir.Value, int], np.ndarray]:
    """(constant, axis) → the positions to drop, gathered over all groups (in original coordinates)."""
    drop: dict[tuple[ir.Value, int], set[int]] = {}
    for group, channels in removals.items():
        for s in group.slices:
            drop.setdefault((s.value, s.axis), set()).update(s.indices[channels].reshape(-1).tolist())
    return {key: np.array(sorted(v), dtype=np.int64) for key, v in drop.items()}


def remove_channels(model: ir.Model, removals: Mapping[Group, Sequence[int]]) -> None:
    """Remove channels of several groups at once (positions are computed before anything moves)."""
    chosen = {group: group.check(channels) for group, channels in removals.items()}
    chosen = {g: c for g, c in chosen.items() if c.size}
    if not chosen:
        return
    shapes = {value: _resized_shape(value, group.axes.get(value), group.new_sizes(channels.size))
              for group, channels in chosen.items() for value in group.activations}
    for (value, axis), drop in _positions(chosen).items():
        length = edit.constant_shape(value)[axis]
        edit.take(model, value, axis, np.setdiff1d(np.arange(length), drop))
    elements: dict[ShapeElement, int] = {}
    shrunk: dict[tuple, ShapeElement] = {}
    for group, channels in chosen.items():
        sizes = group.new_sizes(channels.size)
        for element in group.elements:
            if group.counts(element):
                value = resized(element, sizes)
                if elements.setdefault(element, value) != value:
                    raise SlimgraphError(f"{group.name}: two groups of one attention block cannot be pruned in one step")
        for element, per_channel in group.shrinks:  # several groups may shrink one element: they add up
            # each group's flow found its own copy of the element: one place, one running total
            first = shrunk.setdefault((element.route, element.element), element)
            elements[first] = elements.get(first, first.value) - per_channel * channels.size
        edit.clear_shapes(group.activations)
    rewrite_elements(model, elements, lambda array: edit.add_initializer(model, "shape", array))
    for value, shape in shapes.items():
        if value.is_graph_output():  # a graph output keeps its declared shape through clear_shapes
            value.shape = shape
        elif shape is not None and value.shape is None:
            value.shape = shape
    edit.remove_dead(model)
    edit.refresh_shapes(model)


def _resized_shape(value: ir.Value, axes: Axes | None, sizes: Mapping[Factor, int]) -> ir.Shape | None:
    """The shape `value` has once the factors in `sizes` take their new sizes, where every
    resized axis was a known number made of known factors; None where it cannot be told."""
    if value.shape is None or axes is None or len(axes) != len(value.shape):
        return None
    dims: list[int | ir.SymbolicDim] = []
    for dim, factors in zip(value.shape, axes):
        new = [next((n for g, n in sizes.items() if same(f, g)), f.find().size) for f in factors]
        if new == [f.find().size for f in factors]:
            dims.append(dim)
        elif isinstance(dim, int) and None not in new and math.prod(f.find().size for f in factors) == dim:
            dims.append(math.prod(new))
        else:
            return None
    return ir.Shape(dims)


def zero_channels(model: ir.Model, group: Group, channels: Sequence[int]) -> None:
    """Zero what the channels contribute: their positions in every consumer slice (new tensors)."""
    chosen = group.check(channels)
    for s in group.slices:
        if s.role == "consumer":
            array = edit.constant_array(s.value).copy()
            index = [slice(None)] * array.ndim
            index[s.axis] = s.indices[chosen].reshape(-1)
            array[tuple(index)] = 0
            edit.replace_constant(s.value, array, model)


# --- linear layers ----------------------------------------------------------------------------


def output_slices(linear: Linear, indices: np.ndarray, role: Role = "producer") -> list[Slice]:
    """The output-channel slices of a linear: weight columns (in graph layout) and bias."""
    value = linear.node.inputs[1]
    source = transposed_source(value)
    if source is not None:
        slices = [Slice(source, 0, indices, role)]  # a tied [N, K] table
    else:
        trans_b = linear.node.op_type == "Gemm" and linear.node.attributes.get_int("transB", 0)
        slices = [Slice(value, 0 if trans_b else 1, indices, role)]
    bias = edit.bias_value(linear)
    if bias is not None:
        slices.append(Slice(bias, 0, indices, role))
    return slices


def input_slices(linear: Linear, indices: np.ndarray, role: Role = "consumer") -> list[Slice]:
    """The input-channel slice of a linear: weight rows (in graph layout)."""
    value = linear.node.inputs[1]
    source = transposed_source(value)
    if source is not None:
        return [Slice(source, 1, indices, role)]
    trans_b = linear.node.op_type == "Gemm" and linear.node.attributes.get_int("transB", 0)
    return [Slice(value, 1 if trans_b else 0, indices, role)]


def _blocks(channels: int, width: int) -> np.ndarray:
    """[channels, width]: channel c owns positions c·width … c·width + width − 1."""
    return np.arange(channels * width, dtype=np.int64).reshape(channels, width)


def _private(linears: Sequence[Linear]) -> str | None:
    """Why the weights cannot be edited alone (shared with other nodes), or None."""
    for linear in linears:
        value = linear.node.inputs[1]
        if constant_tensor(value) is None or len(value.uses()) != 1 or transposed_source(value) is not None:
            return f"{linear.name} shares its weight"
    return None


# --- FFN --------------------------------------------------------------------------------------


def ffn_group(model: ir.Model, ffn: FFN) -> Group | str:
    """The FFN's inner channels, or why they cannot be removed."""
    linears = [ffn.up, ffn.down] + ([ffn.gate] if ffn.gate else [])
    if (why := _private(linears)) is not None:
        return why
    if ffn.down.node.op_type == "Gemm" and ffn.down.node.attributes.get_int("transA", 0):
        return f"{ffn.down.name} transposes its input"
    flow = FactorFlow()
    inner = Factor(ffn.inner, "inner")
    try:
        start = {lin.output: _axes_ending(flow, lin, (inner,)) for lin in linears if lin is not ffn.down}
    except SlimgraphError as exc:
        return str(exc)
    flow.run(model, start, stop=lambda n: n is ffn.down.node)
    if flow.lost:
        node, why = flow.lost[0]
        return f"{ffn.name}: cannot follow its channels through {node.op_type} {node.name!r} ({why})"
    reaching = flow.axes.get(ffn.down.node.inputs[0])
    if reaching is None or [f.find() for f in reaching[-1]] != [inner.find()]:
        return f"{ffn.name}: the channels reaching {ffn.down.name} are not the FFN's own"
    identity = np.arange(ffn.inner, dtype=np.int64)[:, None]
    slices = [s for lin in linears if lin is not ffn.down for s in output_slices(lin, identity)]
    slices += input_slices(ffn.down, identity)
    slices += _carried(flow, inner, identity, exclude={s.value for s in slices})
    activations = [ffn.up.node.outputs[0]] + ([ffn.gate.node.outputs[0]] if ffn.gate else []) + _shrinking(flow, inner)
    return Group("ffn", ffn.name, ffn.inner, slices, activations, flow.elements, [(inner, Fraction(1))],
                 unit="channels", axes=flow.axes)


def _axes_ending(flow: FactorFlow, linear: Linear, last: tuple[Factor, ...]) -> Axes:
    """A linear's output axes: its leading axes as the graph says, then `last`."""
    shape = linear.output.shape
    if shape is None:
        raise SlimgraphError(f"{linear.name}: output shape unknown")
    return (*(flow.dim_factors(dim) for dim in list(shape)[:-1]), last)


def _shrinking(flow: FactorFlow, *factors: Factor | None) -> list[ir.Value]:
    """Activations with an axis that counts one of `factors`."""
    counted = [f for f in factors if f is not None]
    return [value for value, axes in flow.axes.items()
            if constant_tensor(value) is None and any(same(f, g) for axis in axes for f in axis for g in counted)]


def _carried(flow: FactorFlow, factor: Factor, indices: np.ndarray, exclude: set[ir.Value]) -> list[Slice]:
    """Constants met on the way whose one axis is exactly `factor` (a per-channel scale or shift)."""
    found = []
    for value, axes in flow.axes.items():
        if value in exclude or constant_tensor(value) is None:
            continue
        for axis, factors in enumerate(axes):
            if len(factors) == 1 and same(factors[0], factor):
                found.append(Slice(value, axis, indices, "carried"))
    return found


# --- attention heads --------------------------------------------------------------------------


def attention_groups(model: ir.Model, attention: Attention) -> list[Group] | str:
    """The heads group (and, with grouped-query attention, the KV-heads group) of an attention
    block, or why its heads cannot be removed."""
    q, k, v, o = attention.q, attention.k, attention.v, attention.o
    if None in (q, k, v, o):
        return f"{attention.name}: q, k, v and o projections not all found"
    fused = q is k or k is v
    if fused and not (q is k is v):
        return f"{attention.name}: partly fused q/k/v projections are not supported"
    if (why := _private([q, o] if fused else [q, k, v, o])) is not None:
        return why
    heads, kv_heads, d = attention.heads, attention.kv_heads, attention.head_dim
    rep = heads // kv_heads
    widths = {"q": heads * d, "k": kv_heads * d, "v": kv_heads * d}
    flow = FactorFlow()
    kv = Factor(kv_heads, "kv_heads" if rep > 1 else "heads")
    repeat = Factor(rep, "heads_per_kv") if rep > 1 else None
    query_heads = (kv, repeat) if repeat else (kv,)
    head_factors = {"q": query_heads, "k": (kv,), "v": (kv,)}
    last = {role: (*head_factors[role], Factor(d, "head_dim")) for role in "qkv"}
    offsets = {"q": 0, "k": 0, "v": 0}
    total = None
    try:
        if fused:
            order = _fused_order(attention)
            if isinstance(order, str):
                return order
            if q.out_features != sum(widths.values()):
                return f"{attention.name}: fused projection width {q.out_features} is not q + k + v"
            for i, role in enumerate(order):
                offsets[role] = sum(widths[r] for r in order[:i])
            total = Factor(q.out_features, "qkv")
            flow.splits[total] = [last[role] for role in order]
            start = {q.output: _axes_ending(flow, q, (total,))}
        else:
            if any(lin.out_features != widths[role] for role, lin in (("q", q), ("k", k), ("v", v))):
                return f"{attention.name}: projection widths do not match {heads} heads × {d}"
            start = {lin.output: _axes_ending(flow, lin, last[role]) for role, lin in (("q", q), ("k", k), ("v", v))}
    except SlimgraphError as exc:
        return str(exc)
    flow.run(model, start, stop=lambda n: n is o.node)
    if flow.lost:
        node, why = flow.lost[0]
        output = next((v.name for v in node.outputs if v.is_graph_output()), None)
        if output is not None and why.startswith("it reaches the model output"):
            # a decoder exported with a KV cache (present.N.key/value): the head count is part of its interface
            return (f"{attention.name}: its keys or values are the model output {output!r} (a KV cache); removing "
                    "heads would change that output's shape, which generation feeds back as the next step's past")
        return f"{attention.name}: cannot follow the heads through {node.op_type} {node.name!r} ({why})"
    reaching = flow.axes.get(o.node.inputs[0])
    if reaching is None or [f.find() for f in reaching[-1][:-1]] != [f.find() for f in query_heads]:
        return f"{attention.name}: the heads reaching {o.name} are not the heads of q/k/v"

    def columns(role: str, per_channel: np.ndarray) -> np.ndarray:
        return offsets[role] + per_channel

    def projections(indices: dict[str, np.ndarray]) -> list[Slice]:
        """Output slices of q/k/v (one slice of the fused weight when they share one)."""
        if fused:
            return output_slices(q, np.concatenate([columns(r, i) for r, i in indices.items()], axis=1))
        lin = {"q": q, "k": k, "v": v}
        return [s for role, i in indices.items() for s in output_slices(lin[role], i)]

    def extra(per_channel: int) -> list[tuple[Factor, Fraction]]:
        return [(total, Fraction(per_channel))] if total is not None else []

    per_head = _blocks(heads, d)
    if repeat is None:  # multi-head attention: a head is its q, k, v columns and o rows
        slices = [*projections({"q": per_head, "k": per_head, "v": per_head}), *input_slices(o, per_head)]
        return [Group("heads", attention.name, heads, slices, _shrinking(flow, kv, total), flow.elements,
                      [(kv, Fraction(1)), *extra(3 * d)], unit="heads", axes=flow.axes)]
    # grouped-query attention: query heads inside their KV group, the same number from every group
    slices = [*projections({"q": per_head}), *input_slices(o, per_head)]
    groups = [Group("heads", attention.name, heads, slices, _shrinking(flow, repeat, total), flow.elements,
                    [(repeat, Fraction(1, kv_heads)), *extra(d)], parts=np.arange(heads) // rep, unit="query heads",
                    axes=flow.axes)]
    # whole KV groups: k/v columns, and the q columns and o rows of their query heads
    per_group = _blocks(kv_heads, rep * d)
    slices = [*projections({"q": per_group, "k": _blocks(kv_heads, d), "v": _blocks(kv_heads, d)}),
              *input_slices(o, per_group)]
    groups.append(Group("kv-heads", attention.name, kv_heads, slices, _shrinking(flow, kv, total), flow.elements,
                        [(kv, Fraction(1)), *extra((rep + 2) * d)], unit="KV heads", axes=flow.axes))
    return groups


def _fused_order(attention: Attention) -> tuple[str, ...] | str:
    """Which output of the Split after a fused projection is q, k and v."""
    split = find_downstream(attention.q.output, lambda n: n.op_type == "Split", ops(SHAPE_ONLY_OPS))
    if split is None or len(split[0].outputs) != 3 or attention.scores is None or attention.context is None:
        return f"{attention.name}: the split of the fused q/k/v projection was not found"
    outputs = list(split[0].outputs)
    order: dict[int, str] = {}
    for role, value in (("q", attention.scores.inputs[0]), ("k", attention.scores.inputs[1]),
                        ("v", attention.context.inputs[1])):
        for reached, _ in Walk(value, up=True, through=lambda n: n is not split[0] and n.op_type in ATTENTION_PATH_OPS):
            if reached in outputs:
                order[outputs.index(reached)] = role
                break
    if sorted(order) != [0, 1, 2] or set(order.values()) != {"q", "k", "v"}:
        return f"{attention.name}: cannot tell q, k and v apart after the fused projection"
    return tuple(order[i] for i in range(3))


# --- vocabulary -------------------------------------------------------------------------------


def vocab_group(model: ir.Model, head: Linear, tables: Sequence[ir.Value]) -> Group | str:
    """Token ids: the LM head's output columns, the rows of the embedding `tables` the input ids
    index (the head's own table when tied), and the logits' last axis up to the model outputs."""
    if head.node.op_type == "Gemm" and head.node.attributes.get_int("transA", 0):
        return f"{head.name} transposes its input"
    vocab = head.out_features
    flow = FactorFlow()
    tokens = Factor(vocab, "vocab")
    try:
        start = {head.output: _axes_ending(flow, head, (tokens,))}
    except SlimgraphError as exc:
        return str(exc)
    flow.run(model, start, stop=lambda n: False, outputs_allowed=True)
    if flow.lost:
        node, why = flow.lost[0]
        return f"{head.name}: cannot follow the logits through {node.op_type} {node.name!r} ({why})"
    identity = np.arange(vocab, dtype=np.int64)[:, None]
    slices = output_slices(head, identity)
    for table in tables:
        if edit.constant_shape(table)[0] != vocab:
            return f"{table.name}: {edit.constant_shape(table)[0]} rows for a vocabulary of {vocab}"
        slices.append(Slice(table, 0, identity, "carried"))
    activations = [head.node.outputs[0], *_shrinking(flow, tokens)]
    return Group("vocab", head.name, vocab, slices, activations, flow.elements, [(tokens, Fraction(1))], unit="tokens")
