"""Axis factors: how each axis of a tensor decomposes into named factors, followed through the graph.

A projection's output `[batch, seq, heads·head_dim]` has axes `(batch) (seq) (heads, head_dim)`.
Row-major reshapes only regroup this flat sequence of factors, transposes permute the axes,
broadcasts (Expand, elementwise ops) add new factors, and where two non-1 axes meet in a
broadcast their factors are the same, so they are unified (union-find). Following the factors
of the q/k/v projections through an attention block tells, for every shape constant on the way
(a Reshape target, an Expand shape, given directly or assembled by Concat from pieces), which
factors each of its elements counts, so that removing heads can rewrite exactly those elements.

`FactorFlow.run` follows values forward from the given start values until `stop` nodes; values
it cannot follow (an op it does not know, a reshape it cannot explain) are recorded in `lost`.

Where a sequence's length changes (fewer tokens), `length_elements` finds the shape elements that
count it and `position_axes` tells a table of positions (whose prefix serves the shorter sequence)
from a constant that merely has the length.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir.graph import cone, constant_tensor, is_default_domain, static_dim

Axes = tuple[tuple["Factor", ...], ...]  # one tuple of factors per axis; () is a size-1 axis

_SAME_SHAPE_OPS = {
    "Identity", "Cast", "CastLike", "Neg", "Abs", "Sqrt", "Exp", "Log", "Erf", "Tanh", "Sigmoid", "Relu", "Gelu",
    "Softmax", "LogSoftmax", "IsNaN", "IsInf", "Not", "Dropout", "Reciprocal", "Sin", "Cos", "Softplus", "Elu",
    "LeakyRelu", "HardSigmoid", "HardSwish", "Clip", "Floor", "Ceil", "Round", "Sign",
}
_BROADCAST_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Equal", "Less", "Greater", "And", "Or",
                  "LessOrEqual", "GreaterOrEqual", "Xor", "Mod", "PRelu"}
_REDUCE_OPS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
               "ReduceSumSquare", "ReduceLogSumExp"}
_SHAPE_VECTOR_OPS = {"Shape", "Concat", "Slice", "Gather", "Cast", "Identity", "Unsqueeze", "Squeeze", "Constant"}


class Factor:
    """A factor of an axis length: a number (or a symbolic length), unified by identity classes."""

    def __init__(self, size: int | None, label: str, anonymous: bool = False) -> None:
        self.size, self.label = size, label
        self.anonymous = anonymous  # a length read from a shape, not one a caller follows: it may be split
        self._parent: Factor = self

    def find(self) -> Factor:
        root = self
        while root._parent is not root:
            root = root._parent
        self._parent = root
        return root

    def __repr__(self) -> str:
        return f"{self.label}={self.size if self.size is not None else '?'}"


def unify(a: Factor, b: Factor) -> None:
    ra, rb = a.find(), b.find()
    if ra is not rb:
        rb._parent = ra
        if ra.size is None:
            ra.size = rb.size


def same(a: Factor, b: Factor) -> bool:
    return a.find() is b.find()


Route = tuple[tuple[ir.Node, int], ...]  # (node, input) from the constant's holder up to the shaped node


@dataclass(frozen=True, eq=False)
class ShapeElement:
    """Element `element` of the constant at `route[0]` (node, input); the value reaches the node
    it shapes (a Reshape or Expand) along `route`; it counts `factors`."""

    route: Route
    element: int
    value: int
    factors: tuple[Factor, ...]


@dataclass
class _Piece:
    """An element of a shape vector: a constant (with where it is stored) or the factors of an axis."""

    factors: tuple[Factor, ...] | None = None
    constant: int | None = None
    where: tuple[Route, int] | None = None


@dataclass
class FactorFlow:
    symbols: dict[str, Factor] = field(default_factory=dict)
    axes: dict[ir.Value, Axes] = field(default_factory=dict)
    elements: list[ShapeElement] = field(default_factory=list)
    lost: list[tuple[ir.Node, str]] = field(default_factory=list)
    # A factor that stands for several tensors side by side (fused q/k/v columns), and the
    # factors of each part: a Split along it gives each output its part.
    splits: dict[Factor, list[tuple[Factor, ...]]] = field(default_factory=dict)

    # --- factors of values ------------------------------------------------------------------

    def dim_factors(self, dim: int | ir.SymbolicDim | None, label: str = "") -> tuple[Factor, ...]:
        if isinstance(dim, int):
            return () if dim == 1 else (Factor(dim, label or str(dim), anonymous=not label),)
        name = getattr(dim, "value", None)
        if name is None:
            return (Factor(None, label or "?"),)
        # the exporter names a flattened axis after its parts: "batch*sequence"
        parts = name.split("*") if all(p.isidentifier() for p in name.split("*")) else [name]
        for part in parts:
            if part not in self.symbols:
                self.symbols[part] = Factor(None, part)
        return tuple(self.symbols[part] for part in parts)

    def of(self, value: ir.Value) -> Axes | None:
        """The factors of a value: followed, or read from its (static or symbolic) shape."""
        if value in self.axes:
            return self.axes[value]
        tensor = constant_tensor(value)
        shape = tensor.shape if tensor is not None else value.shape
        if shape is None:
            return None
        axes = tuple(self.dim_factors(d) for d in shape)
        self.axes[value] = axes
        return axes

    # --- the walk ---------------------------------------------------------------------------

    def run(self, model: ir.Model, start: dict[ir.Value, Axes], stop: Callable[[ir.Node], bool],
            outputs_allowed: bool = False) -> None:
        """Follow the factors of `start` values forward through the graph, up to `stop` nodes
        (reaching a model output is a loss, unless `outputs_allowed`)."""
        self.axes.update(start)
        # shapes read at run time are not followed: a reshape reads them through where it uses them
        reached = set(start) | set(cone(start, stop=lambda n: stop(n) or n.op_type in ("Shape", "Size")))
        for node in model.graph:  # topological order: a node's inputs are done before it
            inputs = [v for v in node.inputs if v is not None and v in reached]
            if not inputs or stop(node) or node.op_type in ("Shape", "Size"):  # read through by reshapes
                continue
            if any(v not in self.axes for v in inputs):
                self._lose(node, "an input that could not be followed")
                continue
            outputs = self._step(node)
            if outputs is None:
                continue
            for out, axes in zip(node.outputs, outputs):
                if axes is not None:
                    self.axes[out] = axes
                    if out.is_graph_output() and not outputs_allowed:
                        self._lose(node, f"it reaches the model output {out.name!r}")

    def _lose(self, node: ir.Node, why: str) -> None:
        self.lost.append((node, why))
        return None

    def _step(self, node: ir.Node) -> list[Axes | None] | None:
        op = node.op_type if is_default_domain(node) else f"{node.domain}.{node.op_type}"
        ins = [self.of(v) if v is not None else None for v in node.inputs]
        if op in _SAME_SHAPE_OPS:
            return [ins[0]] + [None] * (len(node.outputs) - 1)
        if op in _BROADCAST_OPS:
            operands = [a for a in ins if a is not None]
            if len(operands) != len([v for v in node.inputs if v is not None]):
                return self._lose(node, "an operand without a known shape")
            return [self._broadcast(node, operands)]
        if op == "Transpose":
            perm = node.attributes.get_ints("perm", list(range(len(ins[0])))[::-1])
            return [tuple(ins[0][p] for p in perm)]
        if op in ("Unsqueeze", "Squeeze"):
            return [self._unsqueeze(node, ins[0])]
        if op == "Reshape":
            return [self._reshape(node, ins[0], node.inputs[1], allowzero=node.attributes.get_int("allowzero", 0))]
        if op == "Expand":
            return [self._expand(node, ins[0])]
        if op == "MatMul":
            a, b = ins
            if a is None or b is None or len(a) < 2 or len(b) < 2:
                return self._lose(node, "MatMul of operands of unknown rank")
            batch = self._broadcast(node, [a[:-2], b[:-2]])
            return [(*batch, a[-2], b[-1])]
        if op == "Split" and (parts := self._split_parts(node, ins[0])) is not None:
            return parts
        if op in ("Slice", "Split", "Concat", "Gather", "LayerNormalization", "RMSNormalization"):
            return self._from_output_shapes(node, ins[0])
        if op in _REDUCE_OPS:
            return self._reduce(node, ins[0])
        return self._lose(node, f"{op} is not followed")

    def _reduce(self, node: ir.Node, axes: Axes | None) -> list[Axes | None] | None:
        """A reduction that keeps its axes (an exporter's RMSNorm): the other axes keep their factors.
        One over a followed factor is a loss — what it computes depends on the length that changes."""
        if axes is None:
            return None
        if node.attributes.get_int("keepdims", 1) != 1:
            return self._lose(node, "a reduction that drops its axes")
        reduced = node.attributes.get_ints("axes")
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            tensor = constant_tensor(node.inputs[1])
            if tensor is None:
                return self._lose(node, "reduction axes computed at run time")
            reduced = tensor.numpy().reshape(-1).tolist()
        if not reduced and not node.attributes.get_int("noop_with_empty_axes", 0):
            reduced = range(len(axes))
        if any(not f.anonymous or not f.find().anonymous for a in reduced or () for f in axes[a]):
            return self._lose(node, "a reduction over a followed axis")
        return self._from_output_shapes(node, axes)

    def _split_parts(self, node: ir.Node, axes: Axes | None) -> list[Axes] | None:
        """A Split of a fused axis into its registered parts (recording the split sizes)."""
        if axes is None:
            return None
        axis = node.attributes.get_int("axis", 0) % len(axes)
        if len(axes[axis]) != 1 or axes[axis][0].find() not in {f.find() for f in self.splits}:
            return None
        parts = next(p for f, p in self.splits.items() if same(f, axes[axis][0]))
        if len(parts) != len(node.outputs):
            return self._lose(node, f"a split into {len(node.outputs)} parts of {len(parts)} fused tensors")
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            sizes = self.pieces(node.inputs[1], ((node, 1),))
            if sizes is None or len(sizes) != len(parts):
                return self._lose(node, "split sizes that are not known")
            for piece, part in zip(sizes, parts):
                if piece.constant != _product(part):
                    return self._lose(node, "split sizes that do not match the fused parts")
                self._record(piece, part)
        elif node.attributes.get_ints("split"):
            return self._lose(node, "split sizes given as an attribute (opset < 13)")
        return [tuple(part if i == axis else a for i, a in enumerate(axes)) for part in parts]

    def _broadcast(self, node: ir.Node, operands: list[Axes]) -> Axes:
        rank = max(len(a) for a in operands)
        out = []
        for axis in range(rank):
            chosen: tuple[Factor, ...] = ()
            for operand in operands:
                i = axis - (rank - len(operand))
                if i < 0 or not operand[i]:
                    continue
                if not chosen:
                    chosen = operand[i]
                elif not self._unify_axes(chosen, operand[i]):
                    self._lose(node, f"axes {chosen} and {operand[i]} are broadcast together")
            out.append(chosen)
        return tuple(out)

    @staticmethod
    def _unify_axes(a: tuple[Factor, ...], b: tuple[Factor, ...]) -> bool:
        if len(a) == len(b) and all(x.size == y.size or None in (x.size, y.size) for x, y in zip(a, b)):
            for x, y in zip(a, b):
                unify(x, y)
            return True
        return _product(a) == _product(b) and _product(a) is not None

    def _unsqueeze(self, node: ir.Node, axes: Axes | None) -> Axes | None:
        if axes is None:
            return None
        given = constant_tensor(node.inputs[1]) if len(node.inputs) > 1 else None
        which = [int(a) for a in given.numpy().reshape(-1)] if given is not None else list(
            node.attributes.get_ints("axes", []))
        out = list(axes)
        if node.op_type == "Unsqueeze":
            rank = len(axes) + len(which)
            for a in sorted(a % rank for a in which):
                out.insert(a, ())
        else:
            drop = {a % len(axes) for a in which} if which else {i for i, f in enumerate(axes) if not f}
            out = [f for i, f in enumerate(axes) if i not in drop]
        return tuple(out)

    def _from_output_shapes(self, node: ir.Node, first: Axes | None) -> list[Axes | None]:
        """Ops that change one axis: axes whose length is unchanged keep their factors."""
        outputs = []
        for out in node.outputs:
            if first is None or out.shape is None or len(out.shape) != len(first):
                outputs.append(self._lose(node, "an output of unknown or different rank"))
                continue
            source = node.inputs[0].shape
            kept = []
            for i, dim in enumerate(out.shape):
                same_length = source is not None and i < len(source) and (
                    source[i] == dim or (isinstance(dim, int) and _product(first[i]) == dim))
                kept.append(first[i] if same_length else self.dim_factors(dim))
            outputs.append(tuple(kept))
        return outputs

    # --- shape vectors: the elements of a shape, constant or read at run time ----------------

    def pieces(self, value: ir.Value, route: Route) -> list[_Piece] | None:
        """The elements of a 1-D shape vector `value`, read by `route[0]` (node, input)."""
        tensor = constant_tensor(value)
        if tensor is not None:
            return [_Piece(constant=int(x), where=(route, i)) for i, x in enumerate(tensor.numpy().reshape(-1))]
        node = value.producer()
        if node is None or node.op_type not in _SHAPE_VECTOR_OPS:
            return None
        if node.op_type == "Shape":
            axes = self.of(node.inputs[0])
            if axes is None:
                return None
            start = node.attributes.get_int("start", 0)
            end = node.attributes.get_int("end", len(axes))
            return [_Piece(factors=a) for a in axes[slice(start, end)]]
        if node.op_type == "Concat":
            parts = [self.pieces(v, ((node, i), *route)) for i, v in enumerate(node.inputs)]
            return None if any(p is None for p in parts) else [p for part in parts for p in part]
        source = self.pieces(node.inputs[0], ((node, 0), *route))
        if source is None or node.op_type in ("Cast", "Identity"):
            return source
        if node.op_type == "Slice":
            bounds = [constant_tensor(v) for v in node.inputs[1:3]]
            if any(b is None for b in bounds):
                return None
            start, end = (int(b.numpy().reshape(-1)[0]) for b in bounds)
            return source[slice(start, end)]
        if node.op_type == "Gather":
            index = constant_tensor(node.inputs[1])
            return None if index is None else [source[int(i)] for i in index.numpy().reshape(-1)]
        return source  # Unsqueeze/Squeeze of a 0-D or 1-D vector keeps its elements

    def _record(self, piece: _Piece, factors: tuple[Factor, ...]) -> None:
        if piece.where is not None:
            route, element = piece.where
            self.elements.append(ShapeElement(route, element, piece.constant, factors))

    def _reshape(self, node: ir.Node, axes: Axes | None, shape: ir.Value, allowzero: int) -> Axes | None:
        pieces = self.pieces(shape, ((node, 1),))
        if axes is None or pieces is None:
            return self._lose(node, "a reshape whose target is not known")
        flat = [f for axis in axes for f in axis]
        if not allowzero:
            pieces = [_Piece(factors=axes[i]) if p.constant == 0 else p for i, p in enumerate(pieces)]
        groups = self._assign(flat, pieces)
        if groups is None:
            return self._lose(node, "a reshape that does not regroup whole factors")
        for piece, factors in zip(pieces, groups):
            if piece.constant is not None and piece.constant > 0:
                self._record(piece, factors)
        return tuple(groups)

    def _assign(self, flat: list[Factor], pieces: list[_Piece]) -> list[tuple[Factor, ...]] | None:
        """Split the flat factors into consecutive groups, one per target piece (-1 takes the rest)."""
        wildcard = [i for i, p in enumerate(pieces) if p.constant == -1]
        if len(wildcard) > 1:
            return None
        cut = wildcard[0] if wildcard else len(pieces)
        flat = list(flat)  # consuming may split a plain length in two
        left = self._consume(flat, pieces[:cut])
        if left is None:
            return None
        used = sum(len(g) for g in left)
        if not wildcard:
            return left if used == len(flat) else None
        tail = flat[used:][::-1]
        right = self._consume(tail, [p for p in pieces[cut + 1:]][::-1], reverse=True)
        if right is None:
            return None
        rest = tail[sum(len(g) for g in right):][::-1]
        return [*left, tuple(rest), *[g[::-1] for g in right][::-1]]

    @staticmethod
    def _consume(flat: list[Factor], pieces: list[_Piece], reverse: bool = False) -> list[tuple[Factor, ...]] | None:
        groups, pos = [], 0
        for piece in pieces:
            if piece.factors is not None:
                want = piece.factors[::-1] if reverse else piece.factors
                got = flat[pos:pos + len(want)]
                if len(got) != len(want) or not all(same(a, b) for a, b in zip(got, want)):
                    return None
                groups.append(tuple(got))
                pos += len(want)
                continue
            target, taken = piece.constant, []
            while target != 1 and pos < len(flat):
                factor = flat[pos].find()
                size = factor.size
                if size is not None and target % size and factor.anonymous and size % target == 0:
                    # a plain length split by the reshape (48 → 4 × 12): it is two factors from here on
                    flat[pos:pos + 1] = [Factor(target, str(target), True), Factor(size // target, str(size // target), True)]
                    continue
                if size is None or target % size:
                    return None
                taken.append(flat[pos])
                target //= size
                pos += 1
            if target != 1:
                return None
            groups.append(tuple(taken))
        return groups

    def _expand(self, node: ir.Node, axes: Axes | None) -> Axes | None:
        pieces = self.pieces(node.inputs[1], ((node, 1),))
        if axes is None or pieces is None:
            return self._lose(node, "an Expand whose shape is not known")
        rank = max(len(axes), len(pieces))
        padded = [()] * (rank - len(axes)) + list(axes)
        targets = [_Piece(constant=1)] * (rank - len(pieces)) + pieces
        out = []
        for have, piece in zip(padded, targets):
            if have:
                if piece.constant is not None and piece.constant > 1:
                    self._record(piece, have)  # an explicit length of a kept axis: it counts its factors
                out.append(have)
            elif piece.factors is not None:
                out.append(piece.factors)
            elif piece.constant in (None, 1):
                out.append(())
            else:
                new = (Factor(piece.constant, f"expand{piece.constant}"),)
                self._record(piece, new)
                out.append(new)
        return tuple(out)


def _product(factors: Iterable[Factor]) -> int | None:
    sizes = [f.find().size for f in factors]
    return None if any(s is None for s in sizes) else math.prod(sizes)


def resized(element: ShapeElement, new_sizes: Mapping[Factor, int]) -> int:
    """The element's value once each factor in `new_sizes` has its new size."""
    value = element.value
    for factor, new_size in new_sizes.items():
        count = sum(1 for f in element.factors if same(f, factor))
        value = value // factor.find().size ** count * new_size ** count
    return value


def length_elements(model: ir.Model, value: ir.Value, axis: int, stop: Callable[[ir.Node], bool] | None = None
                    ) -> tuple[Factor, list[ShapeElement]]:
    """The factor of `value`'s (fixed-length) axis `axis`, and the shape elements after `value` (up
    to `stop` nodes; model outputs may be reached) that count it: once the axis has another length,
    `rewrite_elements` gives each `resized(element, {factor: length})`."""
    flow = FactorFlow()
    length = Factor(static_dim(value, axis), "length")
    axes = tuple((length,) if i == axis else flow.dim_factors(d) for i, d in enumerate(value.shape))
    flow.run(model, {value: axes}, stop=stop or (lambda node: False), outputs_allowed=True)
    return length, [e for e in flow.elements if any(same(f, length) for f in e.factors)]


def position_axes(array: np.ndarray, length: int) -> list[int] | None:
    """The axes of a constant that have a sequence's `length`, when along them it is a table of
    positions whose prefix is the table of a shorter sequence: a function of the position on each
    (`arange`, rotary angles and their cos/sin) or a causal mask on the last two. None when it has
    that length but is neither (a learned per-token constant): a shorter sequence has no table."""
    axes = [a for a, d in enumerate(array.shape) if d == length]
    if all(_is_position_function(array, a) for a in axes) or _is_causal_mask(array, axes):
        return axes
    return None


def _is_position_function(array: np.ndarray, axis: int) -> bool:
    """Every line along `axis` satisfies x[i+1] + x[i−1] = 2κ·x[i] with one κ per line: it is
    `a + b·i` (κ = 1), `a·cos(iω) + b·sin(iω)` (κ = cos ω) or their hyperbolic twin (κ > 1) of the
    position i — the tables of positions, rotary angles and their cos/sin are; a per-token constant
    of any other make (a learned bias) is not."""
    x = np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1).astype(np.float64)
    if len(x) < 3:
        return True
    middle, sides = x[1:-1], x[2:] + x[:-2]
    kappa = (sides * middle).sum(axis=0) / np.maximum(2 * (middle * middle).sum(axis=0), 1e-300)
    residual = np.abs(sides - 2 * kappa * middle).max()
    return bool(residual <= 1e-3 * max(1.0, np.abs(x).max()))


def _is_causal_mask(array: np.ndarray, axes: list[int]) -> bool:
    """A [.., L, L] mask with one value on and below the diagonal and another above it."""
    if len(axes) != 2 or axes[1] != array.ndim - 1 or axes[0] != array.ndim - 2:
        return False
    blocks = array.reshape(-1, *array.shape[-2:])
    below = np.tril(np.ones(array.shape[-2:], bool))
    return all(np.all(b[below] == b[0, 0]) and np.all(b[~below] == b[0, -1]) for b in blocks)


def rewrite_elements(model: ir.Model, values: Mapping[ShapeElement, int],
                     make_constant: Callable[[np.ndarray], ir.Value]) -> None:
    """Give shape elements new values. Each shaped node gets its own copy of the nodes that compute
    its shape vector, with new constants: the originals may be shared with other layers."""
    by_user: dict[tuple[ir.Node, int], dict[tuple[ir.Node, int, int], int]] = {}
    on_route: dict[tuple[ir.Node, int], set[ir.Node]] = {}
    for element, new_value in values.items():
        holder, slot = element.route[0]
        changes = by_user.setdefault(element.route[-1], {})
        key = (holder, slot, element.element)
        if changes.get(key, new_value) != new_value:
            raise SlimgraphError(f"{holder.name}: two edits resize one shape element differently (layers whose "
                                 "widths meet in one Reshape); change them in separate steps")
        changes[key] = new_value
        on_route.setdefault(element.route[-1], set()).update(node for node, _ in element.route[:-1])
    for (user, slot), changes in by_user.items():
        route_nodes = on_route[(user, slot)]

        def rebuild(value: ir.Value, reader: ir.Node, index: int) -> ir.Value:
            edits = {e: v for (n, i, e), v in changes.items() if n is reader and i == index}
            if edits:
                array = constant_tensor(value).numpy().copy()
                flat = array.reshape(-1)
                for element, new_value in edits.items():
                    flat[element] = new_value
                return make_constant(array)
            producer = value.producer()
            if producer is None or producer not in route_nodes:
                return value
            clone = ir.node(producer.op_type, [rebuild(v, producer, i) if v is not None else None
                                               for i, v in enumerate(producer.inputs)],
                            attributes=dict(producer.attributes), domain=producer.domain,
                            name=f"{producer.name}_for_{user.name}", metadata_props=dict(producer.metadata_props))
            clone.outputs[0].type, clone.outputs[0].shape = producer.outputs[0].type, producer.outputs[0].shape
            model.graph.insert_before(user, clone)
            return clone.outputs[0]

        user.replace_input_with(slot, rebuild(user.inputs[slot], user, slot))
