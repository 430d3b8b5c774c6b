"""dct-tokens: tokens `X [B, N, D]` → `A·X [B, N', D]`, their low-frequency DCT coefficients (Fourier-VLM).

`A` keeps the first `N'` coefficients of the orthonormal DCT-II over the tokens and inverts them at
length `N'`, scaled by `√(N'/N)` so that the mean token is unchanged (the DC component):

    A = √(N'/N) · C_{N'}ᵀ · C_N[:N', :]

With `layout=grid` the tokens are an `H×W` grid (vision tokens) and the map is 2-D, `A = A_H ⊗ A_W`
over the kept `h×w` block; with `layout=sequence` it is 1-D over `N`, computed in the graph from the
run-time length when the length is not fixed (`N' = ceil(keep·N)`). Either way it is one MatMul with
a constant (or computed) matrix; no FFT op.

Where: at the entry of block `at` (the residual stream the block reads) or at a named `value`. What
follows the token count downstream: the attention masks of the later blocks (pooled the same way: a
compressed token is real when most of what it mixes was), and a leading CLS token is kept apart
(`cls=auto`: when something after the map reads token 0 alone). `restore=true` maps outputs that
still carry the token axis back to `N` tokens (`(N/N')·Aᵀ`, the low-pass reconstruction), so their
shapes do not change; without it they keep `N'` tokens and are compared by their mean token.

Joined tokens (a LLaVA-style VLM: image tokens concatenated with the text before a causal decoder):
the decoder then reads a shorter sequence, `L = P + N + T → P + N' + T`, as it would had the image
given fewer tokens. What counts the joined length follows: reshape targets, and the position tables
the exporter folded into constants (`arange`, rotary angles `i·θ` and their cos/sin, a causal mask),
which are sliced to their first `L'` positions — for a causal decoder the table of a shorter sequence
is the prefix of the longer one's. A constant with the joined length that is none of these is refused
by name. The outputs keep the text tokens and are compared there with the original's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir import edit
from slimgraph.ir.factors import Factor, FactorFlow, ShapeElement, resized, rewrite_elements, same
from slimgraph.ir.graph import constant_tensor, static_dim
from slimgraph.ir.meta import OUTPUT_MAPS_KEY
from slimgraph.ir.structure import discover
from slimgraph.measure.fidelity import OutputMap
from slimgraph.passes._infra.base import Pass, PassContext, PassResult
from slimgraph.passes._infra.registry import register_pass


def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix C_n [n, n]: coefficients = C_n · x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    c = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    c[0] /= np.sqrt(2.0)
    return c


def compression(n: int, kept: int) -> np.ndarray:
    """A [kept, n]: the first `kept` DCT coefficients of n tokens, as `kept` tokens, mean unchanged."""
    return np.sqrt(kept / n) * dct_matrix(kept).T @ dct_matrix(n)[:kept]


def grid_compression(height: int, width: int, h: int, w: int) -> np.ndarray:
    """A [h·w, H·W] for tokens laid out row-major on an H×W grid (2-D DCT, top-left h×w block)."""
    return np.kron(compression(height, h), compression(width, w))


@register_pass
@dataclass(frozen=True, kw_only=True)
class DctTokens(Pass):
    """Tokens [B, N, D] → their low-frequency DCT coefficients [B, N', D]: every later layer sees fewer tokens."""

    name: ClassVar[str] = "dct-tokens"
    exact: ClassVar[bool] = False
    at: int = -1  # the block whose entry is compressed; -1: use `value`
    value: str = ""
    keep: float = 0.5
    grid: tuple[int, ...] = ()  # [h, w] kept of the H×W grid (layout=grid)
    layout: Literal["sequence", "grid"] = "sequence"
    cls: Literal["auto", "first", "none"] = "auto"
    restore: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.keep <= 1:
            raise SlimgraphError(f"{self.name}: keep must be in (0, 1], got {self.keep}")
        if (self.at < 0) == (not self.value):
            raise SlimgraphError(f"{self.name}: give at=BLOCK or value=NAME (one of them)")
        if self.grid and (len(self.grid) != 2 or min(self.grid) < 1):
            raise SlimgraphError(f"{self.name}: grid must be [h, w] with h, w ≥ 1, got {list(self.grid)}")
        if self.grid and self.layout != "grid":
            raise SlimgraphError(f"{self.name}: grid=[h,w] needs layout=grid")

    def tokens(self, model: ir.Model) -> ir.Value:
        if self.value:
            found = {v.name: v for node in model.graph for v in node.outputs}
            found.update({v.name: v for v in model.graph.inputs})
            if self.value not in found:
                raise SlimgraphError(f"{self.name}: no value named {self.value!r}")
            value = found[self.value]
        else:
            blocks = discover(model).blocks
            handles = blocks.blocks if blocks else ()
            if not handles:
                raise SlimgraphError(f"{self.name}: no blocks with a clear residual stream (see `slimgraph inspect`)")
            if self.at >= len(handles):
                raise SlimgraphError(f"{self.name}: at={self.at} does not exist (blocks 0..{len(handles) - 1})")
            value = handles[self.at].entry
        if value.shape is None or len(value.shape) != 3:
            raise SlimgraphError(f"{self.name}: {value.name!r} is not a [batch, tokens, dim] value "
                                 f"(shape {value.shape})")
        return value

    def check(self, model: ir.Model) -> None:
        super().check(model)
        value = self.tokens(model)
        if self.layout == "grid":
            self._grid(value)
        join = self._join(model, value)
        if join is not None:
            _position_tables(model, join)  # refuses a constant of the joined length it cannot follow

    def _join(self, model: ir.Model, value: ir.Value) -> _Join | None:
        """Where `value`'s tokens are concatenated with others on the token axis, checked."""
        join = _find_join(value)
        if join is None:
            return None
        where = f"{self.name}: {value.name!r} is joined with other tokens into {join.joined.name!r}"
        if join.before is None or join.length is None:
            raise SlimgraphError(f"{where}, and the joined sequence has no fixed length; the positions "
                                 "computed from it could not be followed (export with a fixed text length)")
        if self.layout == "sequence":
            raise SlimgraphError(f"{where}: compress them with layout=grid (the image's H×W tokens)")
        for source in model.graph.inputs:
            if source.shape is not None and join.length in [d for d in source.shape if isinstance(d, int)]:
                raise SlimgraphError(f"{where}, and the input {source.name!r} {list(source.shape)} covers the "
                                     f"joined {join.length} tokens (a mask or positions given by the caller); "
                                     "it cannot be remapped")
        return join

    def _grid(self, value: ir.Value) -> tuple[int, int, int, int, int]:
        """(CLS tokens before the grid, H, W, h, w) for layout=grid."""
        n = static_dim(value, 1)
        if n is None:
            raise SlimgraphError(f"{self.name}: layout=grid needs a fixed token count; {value.name!r} has "
                                 f"{value.shape[1]}")
        for lead in (0, 1):
            side = math.isqrt(n - lead)
            if side * side == n - lead:
                h, w = self.grid or (max(1, round(side * math.sqrt(self.keep))),) * 2
                if h > side or w > side:
                    raise SlimgraphError(f"{self.name}: grid={[h, w]} is larger than the {side}×{side} token grid")
                return lead, side, side, h, w
        raise SlimgraphError(f"{self.name}: {n} tokens are not a square grid (with or without one CLS token); "
                             "grid layouts need H×W tokens")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        self.check(model)
        value = self.tokens(model)
        join = self._join(model, value)
        downstream = _values_after(value, stop=join.concat if join else None)
        lead = 1 if self.cls == "first" or (self.cls == "auto" and _reads_first_token(downstream)) else 0
        if self.layout == "sequence" and join is None and discover(model).lm_heads:
            raise SlimgraphError(f"{self.name}: layout=sequence mixes tokens across positions, which a causal LM "
                                 "cannot take; compress a prefix of vision tokens with value=NAME, layout=grid")
        builder = _Builder(model, value.name or "tokens")
        n = static_dim(value, 1)
        if self.layout == "grid":
            grid_lead, height, width, h, w = self._grid(value)
            lead = max(lead, grid_lead)
            matrix = builder.constant("dct", grid_compression(height, width, h, w).astype(np.float32))
            described = f"{height}×{width} → {h}×{w} tokens"
        else:
            if n is not None:
                kept = max(1, math.ceil(self.keep * (n - lead)))
                matrix = builder.constant("dct", compression(n - lead, kept).astype(np.float32))
                described = f"{n - lead} → {kept} tokens"
            else:
                matrix = builder.runtime_matrix(value, lead, self.keep)
                described = f"N → ceil({self.keep}·N) tokens (computed at run time)"
        new_n = None if n is None else lead + edit.constant_shape(matrix)[0]
        counting = _static_lengths(model, value, new_n, join)  # shape constants after the map that count tokens
        tables = _position_tables(model, join) if join else []
        compressed = builder.apply(value, matrix, lead)
        edit.insert_after(model, value, builder.nodes, compressed)
        compressed.shape = None
        lengths = _follow_lengths(model, builder, value, compressed)
        for tokens, elements, size in counting:
            rewrite_elements(model, {e: resized(e, {tokens: size}) for e in elements},
                             lambda array: edit.add_initializer(model, "shape", array))
            lengths += len(elements)
        stats = {"at": value.name, "tokens": described + (f" (+{lead} CLS kept apart)" if lead else "")}
        if join:
            shorter = join.length - n + new_n
            for table, axes in tables:
                edit.replace_constant(table, _prefix(edit.constant_array(table), axes, shorter), model)
                edit.clear_shapes(_values_after(table))
            _compare_around(model, join, n, new_n)
            stats |= {"joined": f"{join.joined.name!r}: {join.length} → {shorter} tokens",
                      "position tables sliced": str(len(tables)),
                      "compared at": f"the {join.length - n} tokens around the compressed ones"}
        else:
            stats["masks pooled"] = str(_follow_masks(model, builder, compressed, matrix, lead))
        stats["token counts followed"] = str(lengths)  # reshape targets and run-time shapes
        restored = self._outputs(model, builder, compressed, matrix, lead, join)
        edit.clear_shapes(_values_after(compressed))
        edit.refresh_shapes(model)
        if restored:
            stats["restored"] = ", ".join(restored)
        return PassResult(True, stats)

    def _outputs(self, model: ir.Model, builder: _Builder, compressed: ir.Value, matrix: ir.Value, lead: int,
                 join: _Join | None) -> list[str]:
        """Outputs that carry the compressed token axis (before any join): restored to N tokens, or
        mapped for Verify."""
        after = set(_values_after(compressed, stop=join.concat if join else None)) | {compressed}
        reached = [o for o in model.graph.outputs if o in after
                   and o.shape is not None and len(o.shape) == 3]
        if not self.restore:
            maps = dict(model.meta.get(OUTPUT_MAPS_KEY) or {})
            maps.update({o.name: OutputMap(token_mean=True) for o in reached})
            model.meta[OUTPUT_MAPS_KEY] = maps
            return []
        names = [o.name for o in reached]  # (insert_after renames the value it moves off the output)
        for output in reached:
            builder.nodes = []
            restored = builder.restore(output, matrix, lead)
            edit.insert_after(model, output, builder.nodes, restored)
        return names


def _values_after(value: ir.Value, stop: ir.Node | None = None) -> list[ir.Value]:
    """Every value computed from `value` (not through `stop`), in the order found."""
    seen, queue = [], [value]
    found = set()
    while queue:
        current = queue.pop()
        for node, _ in current.uses():
            if node is stop:
                continue
            for out in node.outputs:
                if out not in found:
                    found.add(out)
                    seen.append(out)
                    queue.append(out)
    return seen


@dataclass(frozen=True)
class _Join:
    """A Concat on the token axis that joins the compressed tokens with others (a VLM's text):
    `before` tokens precede them; `length` is the joined sequence's (None where not fixed)."""

    concat: ir.Node
    before: int | None
    length: int | None

    @property
    def joined(self) -> ir.Value:
        return self.concat.outputs[0]


def _find_join(value: ir.Value) -> _Join | None:
    """The Concat on the token axis after `value` that also takes tokens not computed from it."""
    after = set(_values_after(value)) | {value}
    for current in after:
        for node, _ in current.uses():
            axis = node.attributes.get_int("axis", 0) if node.op_type == "Concat" else None
            if axis not in (1, -2) or current.shape is None or len(current.shape) != 3:
                continue
            if any(v is not None and v not in after for v in node.inputs):
                sizes = [static_dim(v, 1) for v in node.inputs]
                before = sizes[:list(node.inputs).index(current)]
                return _Join(node, None if None in before else sum(before),
                             static_dim(node.outputs[0], 1) if None in sizes else sum(sizes))
    return None


def _upstream(value: ir.Value) -> set[ir.Node]:
    """The nodes `value` is computed from."""
    nodes, queue = set(), [value]
    while queue:
        node = queue.pop().producer()
        if node is not None and node not in nodes:
            nodes.add(node)
            queue.extend(v for v in node.inputs if v is not None)
    return nodes


def _position_tables(model: ir.Model, join: _Join) -> list[tuple[ir.Value, list[int]]]:
    """The constants read after the join that have the joined length on some axes, with those
    axes. Each must be a table of positions there — a function of the position (`arange`, rotary
    angles, their cos/sin) or a causal mask — whose prefix is the table of a shorter sequence;
    else refused."""
    upstream = _upstream(join.joined)
    tables: dict[ir.Value, list[int]] = {}
    for node in model.graph:
        if node in upstream:
            continue
        for value in node.inputs:
            tensor = constant_tensor(value)
            if tensor is None or join.length not in tensor.shape or value in tables:
                continue
            array = tensor.numpy()
            axes = [a for a, d in enumerate(array.shape) if d == join.length]
            if not (all(_is_position_function(array, a) for a in axes) or _is_causal_mask(array, axes)):
                raise SlimgraphError(
                    f"dct-tokens: the constant {value.name!r} {list(array.shape)} has the joined sequence's "
                    f"length {join.length} but is not a table of positions (arange, rotary angles, a causal "
                    "mask) whose prefix would serve the shorter sequence; refused rather than computed wrong")
            tables[value] = axes
    return list(tables.items())


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


def _prefix(array: np.ndarray, axes: list[int], length: int) -> np.ndarray:
    """The first `length` positions along each of `axes`."""
    return array[tuple(slice(0, length) if a in axes else slice(None) for a in range(array.ndim))]


def _compare_around(model: ir.Model, join: _Join, n: int, new_n: int) -> None:
    """Outputs carrying the joined tokens: compared with the original's at the other tokens."""
    after = set(_values_after(join.joined)) | {join.joined}
    maps = dict(model.meta.get(OUTPUT_MAPS_KEY) or {})
    for output in model.graph.outputs:
        if output in after and output.shape is not None and len(output.shape) >= 2:
            maps[output.name] = OutputMap(replaced_tokens=(join.before, n, new_n))
    model.meta[OUTPUT_MAPS_KEY] = maps


def _reads_first_token(values: list[ir.Value]) -> bool:
    """Something downstream takes token 0 alone (a BERT pooler, a ViT classifier)."""
    for value in values:
        node = value.producer()
        if node is None or value.shape is None:
            continue
        if node.op_type == "Gather" and node.attributes.get_int("axis", 0) == 1:
            index = constant_tensor(node.inputs[1])
            if index is not None and index.size == 1 and int(index.numpy().reshape(-1)[0]) == 0:
                return True
        if node.op_type == "Slice" and len(node.inputs) >= 4:
            starts, ends, axes = (constant_tensor(v) for v in node.inputs[1:4])
            if None not in (starts, ends, axes) and axes.numpy().reshape(-1).tolist() == [1] and \
                    starts.numpy().reshape(-1).tolist() == [0] and ends.numpy().reshape(-1).tolist() == [1]:
                return True
    return False


class _Builder:
    """The nodes of the map, named after the value they compress."""

    def __init__(self, model: ir.Model, base: str) -> None:
        self.model, self.base, self.nodes = model, base, []
        self.constants: dict[str, ir.Value] = {}
        self.made = 0

    def node(self, op: str, inputs: list, **attributes) -> ir.Value:
        self.made += 1
        node = ir.node(op, inputs, attributes=attributes or None, name=f"{self.base}_dct_{self.made}")
        self.nodes.append(node)
        return node.outputs[0]

    def constant(self, name: str, array: np.ndarray | float | list[int]) -> ir.Value:
        """A constant of the map (floats as float32 scalars, lists as int64 vectors), made once."""
        if name not in self.constants:
            if isinstance(array, float):
                array = np.array(array, np.float32)
            elif isinstance(array, list):
                array = np.array(array, np.int64)
            self.constants[name] = edit.add_initializer(self.model, f"{self.base}.dct_{name}", array)
        return self.constants[name]

    def reduce(self, op: str, x: ir.Value, axes: list[int]) -> ir.Value:
        """ReduceMax/ReduceSum over `axes` keeping them (axes as an input from opset 18, else an attribute)."""
        if op == "ReduceSum" or self.model.opset_imports.get("", 1) >= 18:
            return self.node(op, [x, self.constant(f"axes_{'_'.join(map(str, axes))}", axes)], keepdims=1)
        return self.node(op, [x], axes=axes, keepdims=1)

    def apply(self, tokens: ir.Value, matrix: ir.Value, lead: int) -> ir.Value:
        """A·X over the tokens after the `lead` CLS tokens, which stay in front as they were."""
        if not lead:
            return self.node("MatMul", [matrix, tokens])
        head, rest = self._split(tokens, lead)
        return self.node("Concat", [head, self.node("MatMul", [matrix, rest])], axis=1)

    def restore(self, tokens: ir.Value, matrix: ir.Value, lead: int) -> ir.Value:
        """(N/N')·Aᵀ·Y: back to N tokens, the dropped frequencies zero."""
        if lead:
            head, tokens = self._split(tokens, lead)
        transposed = self.node("Transpose", [matrix], perm=[1, 0])
        rows = self.node("Cast", [self.node("Shape", [transposed], start=0, end=1)], to=ir.DataType.FLOAT)
        cols = self.node("Cast", [self.node("Shape", [transposed], start=1, end=2)], to=ir.DataType.FLOAT)
        scale = self.node("Div", [rows, cols])
        up = self.node("Mul", [self.node("MatMul", [transposed, tokens]), scale])
        return self.node("Concat", [head, up], axis=1) if lead else up

    def _split(self, tokens: ir.Value, lead: int) -> tuple[ir.Value, ir.Value]:
        """(the first `lead` tokens, the rest), along axis 1."""
        axis = self.constant("axis1", [1])
        return (self.node("Slice", [tokens, self.constant("zero_i", [0]), self.constant(f"at_{lead}", [lead]), axis]),
                self.node("Slice", [tokens, self.constant(f"at_{lead}", [lead]), self.constant("end", [2**62]), axis]))

    def runtime_matrix(self, tokens: ir.Value, lead: int, keep: float) -> ir.Value:
        """A [K, N] from the run-time token count (N = length − lead, K = ceil(keep·N))."""
        length = self.node("Shape", [tokens], start=1, end=2)
        n = self.node("Cast", [self.node("Sub", [length, self.constant(f"at_{lead}", [lead])])], to=ir.DataType.FLOAT)
        k = self.node("Ceil", [self.node("Mul", [n, self.constant("keep", float(keep))])])
        c_k, c_n = self._dct(k, k), self._dct(k, n)  # C_K [K, K] and the first K rows of C_N [K, N]
        basis = self.node("MatMul", [self.node("Transpose", [c_k], perm=[1, 0]), c_n])
        return self.node("Mul", [basis, self.node("Sqrt", [self.node("Div", [k, n])])])

    def _dct(self, rows: ir.Value, size: ir.Value) -> ir.Value:
        """The first `rows` rows of the orthonormal DCT-II of `size` points: √(2/N)·cos(π(2i+1)k / 2N),
        row 0 scaled by 1/√2 (as `dct_matrix`), built from Range and Cos."""
        zero, one, two = self.constant("zero", 0.0), self.constant("one", 1.0), self.constant("two", 2.0)
        k = self.node("Unsqueeze", [self.node("Range", [zero, self.node("Squeeze", [rows]), one]), self.constant("axis1", [1])])
        i = self.node("Unsqueeze", [self.node("Range", [zero, self.node("Squeeze", [size]), one]), self.constant("axis0", [0])])
        odd = self.node("Add", [self.node("Mul", [i, two]), one])
        angle = self.node("Div", [self.node("Mul", [self.node("Mul", [odd, k]), self.constant("pi", float(np.pi))]),
                                  self.node("Mul", [size, two])])
        first_row = self.node("Cast", [self.node("Equal", [k, zero])], to=ir.DataType.FLOAT)
        row_scale = self.node("Sub", [one, self.node("Mul", [first_row, self.constant("root_half", float(1 - 1 / np.sqrt(2)))])])
        norm = self.node("Sqrt", [self.node("Div", [two, size])])
        return self.node("Mul", [self.node("Mul", [self.node("Cos", [angle]), row_scale]), norm])


def _static_lengths(model: ir.Model, value: ir.Value, new_length: int | None, join: _Join | None
                    ) -> list[tuple[Factor, list[ShapeElement], int]]:
    """With a fixed token count, the reshape targets after `value` that count the tokens (followed
    through the graph by `slimgraph.ir.factors`) and the count they get; after a join, those that
    count the joined sequence too."""
    if new_length is None:
        return []
    starts = [(value, new_length)]
    if join:
        starts.append((join.joined, join.length - static_dim(value, 1) + new_length))
    found = []
    for start, size in starts:
        flow = FactorFlow()
        tokens = Factor(static_dim(start, 1), "tokens")
        axes = (flow.dim_factors(start.shape[0]), (tokens,), flow.dim_factors(start.shape[2]))
        flow.run(model, {start: axes}, stop=lambda n: join is not None and n is join.concat, outputs_allowed=True)
        found.append((tokens, [e for e in flow.elements if any(same(f, tokens) for f in e.factors)], size))
    return found


_VECTOR_OPS = {"Shape", "Concat", "Slice", "Gather", "Cast", "Identity", "Unsqueeze", "Squeeze"}


def _follow_lengths(model: ir.Model, builder: _Builder, value: ir.Value, compressed: ir.Value) -> int:
    """Shapes computed at run time from a tensor before the map (the exporter's `Shape(input_ids)`)
    and used after it: their token length becomes the compressed one. Each user gets its own copy
    of the shape computation, reading a patched `Shape` whose token axis is the compressed length."""
    token = value.shape[1]
    if isinstance(token, int):
        return 0
    later = set(_values_after(compressed))
    patched: dict[ir.Value, ir.Value] = {}

    def rebuild(vector: ir.Value) -> ir.Value:
        node = vector.producer()
        if node is None or node.op_type not in _VECTOR_OPS or vector in later:
            return vector
        if node.op_type == "Shape":
            source = node.inputs[0]
            if source.shape is None or all(str(d) != str(token) for d in source.shape):
                return vector
            if vector not in patched:
                pieces = [builder.node("Shape", [compressed], start=1, end=2) if str(d) == str(token)
                          else builder.node("Shape", [source], start=i, end=i + 1) for i, d in enumerate(source.shape)]
                start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", len(pieces))
                patched[vector] = builder.node("Concat", pieces[slice(start, end)], axis=0)
            return patched[vector]
        inputs = [rebuild(v) if v is not None else None for v in node.inputs]
        if all(a is b for a, b in zip(inputs, node.inputs)):
            return vector
        builder.made += 1
        clone = ir.node(node.op_type, inputs, attributes=dict(node.attributes), name=f"{node.name}_dct{builder.made}")
        builder.nodes.append(clone)
        return clone.outputs[0]

    followed = 0
    for node in [n for n in model.graph if any(o in later for o in n.outputs)]:
        for index, vector in enumerate(node.inputs):
            if vector is None or vector in later or vector.dtype != ir.DataType.INT64:
                continue
            builder.nodes = []
            rebuilt = rebuild(vector)
            if rebuilt is not vector:
                model.graph.insert_before(node, builder.nodes)
                node.replace_input_with(index, rebuilt)
                followed += 1
    return followed


def _follow_masks(model: ir.Model, builder: _Builder, compressed: ir.Value, matrix: ir.Value, lead: int) -> int:
    """Additive attention masks read after the map: their key axis pooled the same way."""
    later = set(_values_after(compressed))
    pooled = {}
    count = 0
    for attention in discover(model).attention:
        scores = attention.scores
        if scores is None or scores.outputs[0] not in later:
            continue
        for node, _ in scores.outputs[0].uses():
            if node.op_type != "Add":
                continue
            mask = next((v for v in node.inputs if v is not scores.outputs[0]), None)
            if mask is None or mask in later or mask.shape is None or len(mask.shape) != 4:
                continue
            if mask not in pooled:
                builder.nodes = []
                pooled[mask] = _pool_mask(builder, mask, matrix, lead)
                model.graph.insert_before(node, builder.nodes)
            node.replace_input_with(list(node.inputs).index(mask), pooled[mask])
            count += 1
    return count


def _pool_mask(builder: _Builder, mask: ir.Value, matrix: ir.Value, lead: int) -> ir.Value:
    """An additive mask [B, 1, Q, K] (0 where attended) → [B, 1, 1, K']: a compressed key is
    attended when most of the keys it mixes were (their share, weighted by |A|, above one half)."""
    zero, one = builder.constant("zero", 0.0), builder.constant("one", 1.0)
    keys = builder.reduce("ReduceMax", mask, [1, 2])  # [B, 1, 1, K]: 0 where any query attends the key
    valid = builder.node("Cast", [builder.node("Equal", [keys, zero])], to=ir.DataType.FLOAT)
    column = builder.node("Transpose", [valid], perm=[0, 3, 1, 2])  # [B, K, 1, 1] → tokens on axis 1
    column = builder.node("Squeeze", [column, builder.constant("axis3", [3])])  # [B, K, 1]
    head = None
    if lead:
        head, column = builder._split(column, lead)
    weights = builder.node("Abs", [matrix])
    share = builder.node("Div", [builder.node("MatMul", [weights, column]), builder.reduce("ReduceSum", weights, [1])])
    pooled = builder.node("Cast", [builder.node("Greater", [share, builder.constant("half", 0.5)])], to=ir.DataType.FLOAT)
    if lead:
        pooled = builder.node("Concat", [head, pooled], axis=1)
    additive = builder.node("Mul", [builder.node("Sub", [one, pooled]),
                                    builder.constant("lowest", float(np.finfo(np.float32).min))])  # [B, K', 1]
    return builder.node("Unsqueeze", [builder.node("Transpose", [additive], perm=[0, 2, 1]),
                                      builder.constant("axis1", [1])])  # [B, 1, 1, K']
