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
from slimgraph.ir.factors import Factor, ShapeElement, length_elements, position_axes, resized, rewrite_elements
from slimgraph.ir.graph import NAME_SCOPES_KEY, cone, constant_tensor, static_dim
from slimgraph.ir.meta import OUTPUT_MAPS_KEY
from slimgraph.ir.parts import Join
from slimgraph.ir.structure import discover, find_join, reads_first_token
from slimgraph.measure.fidelity import OutputMap
from slimgraph.passes._infra.base import Pass, PassContext, PassResult
from slimgraph.passes._infra.options import option
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
    at: int | None = option(None, low=0)  # the block whose entry is compressed (or give `value`)
    value: str = ""
    keep: float = option(0.5, low=0, low_open=True, high=1)
    grid: tuple[int, ...] = ()  # [h, w] kept of the H×W grid (layout=grid)
    layout: Literal["sequence", "grid"] = "sequence"
    cls: Literal["auto", "first", "none"] = "auto"
    restore: bool = True

    def __post_init__(self) -> None:
        if (self.at is None) == (not self.value):
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

    def check(self, model: ir.Model) -> tuple[ir.Value, Join | None]:
        """The tokens `run` compresses, and where they are joined with others (None: nowhere)."""
        super().check(model)
        value = self.tokens(model)
        if self.layout == "grid":
            self._grid(value)
        join = self._join(model, value)
        if join is not None:
            _position_tables(model, join)  # refuses a constant of the joined length it cannot follow
        return value, join

    def _join(self, model: ir.Model, value: ir.Value) -> Join | None:
        """Where `value`'s tokens are concatenated with others on the token axis, checked."""
        join = find_join(value)
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
        value, join = self.check(model)
        before_join = (lambda n: n is join.concat) if join else None
        lead = 1 if self.cls == "first" or (self.cls == "auto" and reads_first_token(value, before_join)) else 0
        if self.layout == "sequence" and join is None and discover(model).lm_heads:
            raise SlimgraphError(f"{self.name}: layout=sequence mixes tokens across positions, which a causal LM "
                                 "cannot take; compress a prefix of vision tokens with value=NAME, layout=grid")
        build = _builder(model, value)
        n = static_dim(value, 1)
        if self.layout == "grid":
            grid_lead, height, width, h, w = self._grid(value)
            lead = max(lead, grid_lead)
            matrix = build.constant("dct", grid_compression(height, width, h, w).astype(np.float32))
            described = f"{height}×{width} → {h}×{w} tokens"
        else:
            if n is not None:
                kept = max(1, math.ceil(self.keep * (n - lead)))
                matrix = build.constant("dct", compression(n - lead, kept).astype(np.float32))
                described = f"{n - lead} → {kept} tokens"
            else:
                matrix = _runtime_matrix(build, value, lead, self.keep)
                described = f"N → ceil({self.keep}·N) tokens (computed at run time)"
        new_n = None if n is None else lead + edit.constant_shape(matrix)[0]
        counting = self._counting(model, value, new_n, join)
        tables = _position_tables(model, join) if join else []
        compressed = _apply(build, value, matrix, lead)
        edit.insert_after(model, value, build.take(), compressed)
        compressed.shape = None
        lengths = edit.follow_length(model, build, value, compressed, axis=1)  # run-time shapes
        for tokens, elements, size in counting:
            rewrite_elements(model, {e: resized(e, {tokens: size}) for e in elements},
                             lambda array: edit.add_initializer(model, "shape", array))
            lengths += len(elements)
        stats = {"at": value.name, "tokens": described + (f" (+{lead} CLS kept apart)" if lead else "")}
        if join:
            shorter = join.length - n + new_n
            for table, axes in tables:
                edit.replace_constant(table, _prefix(edit.constant_array(table), axes, shorter), model)
                edit.clear_shapes(cone(table))
            _compare_around(model, join, n, new_n)
            stats |= {"joined": f"{join.joined.name!r}: {join.length} → {shorter} tokens",
                      "position tables sliced": str(len(tables)),
                      "compared at": f"the {join.length - n} tokens around the compressed ones"}
        else:
            stats["masks pooled"] = str(_follow_masks(model, build, compressed, matrix, lead))
        stats["token counts followed"] = str(lengths)  # reshape targets and run-time shapes
        restored = self._outputs(model, build, compressed, matrix, lead, join)
        edit.clear_shapes(cone(compressed))
        edit.refresh_shapes(model)
        if restored:
            stats["restored"] = ", ".join(restored)
        return PassResult(True, stats)

    def _counting(self, model: ir.Model, value: ir.Value, new_n: int | None, join: Join | None
                  ) -> list[tuple[Factor, list[ShapeElement], int]]:
        """With a fixed token count, the shape constants after `value` that count the tokens, and the
        count they get; after a join, those that count the joined sequence too."""
        if new_n is None:
            return []
        starts = [(value, new_n)] + ([(join.joined, join.length - static_dim(value, 1) + new_n)] if join else [])
        stop = (lambda node: node is join.concat) if join else None
        return [(*length_elements(model, start, 1, stop), size) for start, size in starts]

    def _outputs(self, model: ir.Model, build: edit.Builder, compressed: ir.Value, matrix: ir.Value, lead: int,
                 join: Join | None) -> list[str]:
        """Outputs that carry the compressed token axis (before any join): restored to N tokens, or
        mapped for Verify."""
        after = {compressed, *cone(compressed, stop=(lambda n: n is join.concat) if join else None)}
        reached = [o for o in model.graph.outputs if o in after
                   and o.shape is not None and len(o.shape) == 3]
        if not self.restore:
            maps = dict(model.meta.get(OUTPUT_MAPS_KEY) or {})
            maps.update({o.name: OutputMap(token_mean=True) for o in reached})
            model.meta[OUTPUT_MAPS_KEY] = maps
            return []
        names = [o.name for o in reached]  # (insert_after renames the value it moves off the output)
        for output in reached:
            restored = _restore(build, output, matrix, lead)
            edit.insert_after(model, output, build.take(), restored)
        return names


def _position_tables(model: ir.Model, join: Join) -> list[tuple[ir.Value, list[int]]]:
    """The constants read after the join that have the joined length on some axes, with those
    axes. Each must be a table of positions there — a function of the position (`arange`, rotary
    angles, their cos/sin) or a causal mask — whose prefix is the table of a shorter sequence;
    else refused."""
    upstream = {v.producer() for v in (join.joined, *cone(join.joined, up=True))}  # the nodes it is computed from
    tables: dict[ir.Value, list[int]] = {}
    for node in model.graph:
        if node in upstream:
            continue
        for value in node.inputs:
            tensor = constant_tensor(value)
            if tensor is None or join.length not in tensor.shape or value in tables:
                continue
            axes = position_axes(tensor.numpy(), join.length)
            if axes is None:
                raise SlimgraphError(
                    f"dct-tokens: the constant {value.name!r} {list(tensor.shape)} has the joined sequence's "
                    f"length {join.length} but is not a table of positions (arange, rotary angles, a causal "
                    "mask) whose prefix would serve the shorter sequence; refused rather than computed wrong")
            tables[value] = axes
    return list(tables.items())


def _prefix(array: np.ndarray, axes: list[int], length: int) -> np.ndarray:
    """The first `length` positions along each of `axes`."""
    return array[tuple(slice(0, length) if a in axes else slice(None) for a in range(array.ndim))]


def _compare_around(model: ir.Model, join: Join, n: int, new_n: int) -> None:
    """Outputs carrying the joined tokens: compared with the original's at the other tokens."""
    after = {join.joined, *cone(join.joined)}
    maps = dict(model.meta.get(OUTPUT_MAPS_KEY) or {})
    for output in model.graph.outputs:
        if output in after and output.shape is not None and len(output.shape) >= 2:
            maps[output.name] = OutputMap(replaced_tokens=(join.before, n, new_n))
    model.meta[OUTPUT_MAPS_KEY] = maps


def _builder(model: ir.Model, value: ir.Value) -> edit.Builder:
    """The nodes of the map, named after the value they compress (`x_dct_1`, `x.dct_axis1`). In a graph
    with the exporter's name scopes they are the module `dct-tokens`: diff and the change tree show
    them as one addition, not one line per node."""
    scoped = any(NAME_SCOPES_KEY in node.metadata_props for node in model.graph)
    return edit.Builder(model, value.name or "tokens", node_names="{scope}_dct_{n}",
                        constant_names="{scope}.dct_{name}", copy_names="{name}_dct{n}", first=1,
                        name_scopes=["", "dct-tokens"] if scoped else None)


def _reduce(build: edit.Builder, op: str, x: ir.Value, axes: list[int]) -> ir.Value:
    """ReduceMax/ReduceSum over `axes` keeping them (axes as an input from opset 18, else an attribute)."""
    if op == "ReduceSum" or build.model.opset_imports.get("", 1) >= 18:
        return build.op(op, [x, build.constant(f"axes_{'_'.join(map(str, axes))}", axes)], keepdims=1)
    return build.op(op, [x], axes=axes, keepdims=1)


def _apply(build: edit.Builder, tokens: ir.Value, matrix: ir.Value, lead: int) -> ir.Value:
    """A·X over the tokens after the `lead` CLS tokens, which stay in front as they were."""
    if not lead:
        return build.op("MatMul", [matrix, tokens])
    head, rest = _split(build, tokens, lead)
    return build.op("Concat", [head, build.op("MatMul", [matrix, rest])], axis=1)


def _restore(build: edit.Builder, tokens: ir.Value, matrix: ir.Value, lead: int) -> ir.Value:
    """(N/N')·Aᵀ·Y: back to N tokens, the dropped frequencies zero."""
    if lead:
        head, tokens = _split(build, tokens, lead)
    transposed = build.op("Transpose", [matrix], perm=[1, 0])
    rows = build.op("Cast", [build.op("Shape", [transposed], start=0, end=1)], to=ir.DataType.FLOAT)
    cols = build.op("Cast", [build.op("Shape", [transposed], start=1, end=2)], to=ir.DataType.FLOAT)
    scale = build.op("Div", [rows, cols])
    up = build.op("Mul", [build.op("MatMul", [transposed, tokens]), scale])
    return build.op("Concat", [head, up], axis=1) if lead else up


def _split(build: edit.Builder, tokens: ir.Value, lead: int) -> tuple[ir.Value, ir.Value]:
    """(the first `lead` tokens, the rest), along axis 1."""
    axis = build.constant("axis1", [1])
    return (build.op("Slice", [tokens, build.constant("zero_i", [0]), build.constant(f"at_{lead}", [lead]), axis]),
            build.op("Slice", [tokens, build.constant(f"at_{lead}", [lead]), build.constant("end", [2**62]), axis]))


def _runtime_matrix(build: edit.Builder, tokens: ir.Value, lead: int, keep: float) -> ir.Value:
    """A [K, N] from the run-time token count (N = length − lead, K = ceil(keep·N))."""
    length = build.op("Shape", [tokens], start=1, end=2)
    n = build.op("Cast", [build.op("Sub", [length, build.constant(f"at_{lead}", [lead])])], to=ir.DataType.FLOAT)
    k = build.op("Ceil", [build.op("Mul", [n, build.constant("keep", float(keep))])])
    c_k, c_n = _dct(build, k, k), _dct(build, k, n)  # C_K [K, K] and the first K rows of C_N [K, N]
    basis = build.op("MatMul", [build.op("Transpose", [c_k], perm=[1, 0]), c_n])
    return build.op("Mul", [basis, build.op("Sqrt", [build.op("Div", [k, n])])])


def _dct(build: edit.Builder, rows: ir.Value, size: ir.Value) -> ir.Value:
    """The first `rows` rows of the orthonormal DCT-II of `size` points: √(2/N)·cos(π(2i+1)k / 2N),
    row 0 scaled by 1/√2 (as `dct_matrix`), built from Range and Cos."""
    zero, one, two = build.constant("zero", 0.0), build.constant("one", 1.0), build.constant("two", 2.0)
    k = build.op("Unsqueeze", [build.op("Range", [zero, build.op("Squeeze", [rows]), one]), build.constant("axis1", [1])])
    i = build.op("Unsqueeze", [build.op("Range", [zero, build.op("Squeeze", [size]), one]), build.constant("axis0", [0])])
    odd = build.op("Add", [build.op("Mul", [i, two]), one])
    angle = build.op("Div", [build.op("Mul", [build.op("Mul", [odd, k]), build.constant("pi", float(np.pi))]),
                             build.op("Mul", [size, two])])
    first_row = build.op("Cast", [build.op("Equal", [k, zero])], to=ir.DataType.FLOAT)
    row_scale = build.op("Sub", [one, build.op("Mul", [first_row, build.constant("root_half", float(1 - 1 / np.sqrt(2)))])])
    norm = build.op("Sqrt", [build.op("Div", [two, size])])
    return build.op("Mul", [build.op("Mul", [build.op("Cos", [angle]), row_scale]), norm])


def _follow_masks(model: ir.Model, build: edit.Builder, compressed: ir.Value, matrix: ir.Value, lead: int) -> int:
    """Additive attention masks read after the map: their key axis pooled the same way."""
    later = set(cone(compressed))
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
                pooled[mask] = _pool_mask(build, mask, matrix, lead)
                edit.insert_before(model, node, build.take())
            edit.redirect([(node, list(node.inputs).index(mask))], pooled[mask])
            count += 1
    return count


def _pool_mask(build: edit.Builder, mask: ir.Value, matrix: ir.Value, lead: int) -> ir.Value:
    """An additive mask [B, 1, Q, K] (0 where attended) → [B, 1, 1, K']: a compressed key is
    attended when most of the keys it mixes were (their share, weighted by |A|, above one half)."""
    zero, one = build.constant("zero", 0.0), build.constant("one", 1.0)
    keys = _reduce(build, "ReduceMax", mask, [1, 2])  # [B, 1, 1, K]: 0 where any query attends the key
    valid = build.op("Cast", [build.op("Equal", [keys, zero])], to=ir.DataType.FLOAT)
    column = build.op("Transpose", [valid], perm=[0, 3, 1, 2])  # [B, K, 1, 1] → tokens on axis 1
    column = build.op("Squeeze", [column, build.constant("axis3", [3])])  # [B, K, 1]
    head = None
    if lead:
        head, column = _split(build, column, lead)
    weights = build.op("Abs", [matrix])
    share = build.op("Div", [build.op("MatMul", [weights, column]), _reduce(build, "ReduceSum", weights, [1])])
    pooled = build.op("Cast", [build.op("Greater", [share, build.constant("half", 0.5)])], to=ir.DataType.FLOAT)
    if lead:
        pooled = build.op("Concat", [head, pooled], axis=1)
    additive = build.op("Mul", [build.op("Sub", [one, pooled]),
                                build.constant("lowest", float(np.finfo(np.float32).min))])  # [B, K', 1]
    return build.op("Unsqueeze", [build.op("Transpose", [additive], perm=[0, 2, 1]),
                                  build.constant("axis1", [1])])  # [B, 1, 1, K']
