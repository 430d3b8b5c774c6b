"""FLOPs of a graph: multiply-adds ×2 of what runs at batch 1 and sequence 128.

Each matrix product, convolution, fused attention and MoE counts at the shapes it runs at: the
inputs' symbolic dims are bound by name (`input_sizes`), and a shape the graph computes at run
time (dct-tokens' kept length, heads split by a Reshape of a computed shape) is worked out on a
copy with those sizes by onnxscript's constant folding (`graph_flops`).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from slimgraph.ir.graph import expert_weights

# Symbolic dims are bound to these values for the FLOPs estimate.
FLOPS_BATCH = 1
FLOPS_SEQUENCE = 128


def input_sizes(model: ir.Model) -> dict[str, int]:
    """The inputs' named symbolic dims → the value the FLOPs estimate binds each to: `FLOPS_BATCH` for
    a leading axis, `FLOPS_SEQUENCE` for any other (a name's first place decides)."""
    sizes: dict[str, int] = {}
    sums = []
    for value in model.graph.inputs:
        if value.shape is None or value.is_initializer():
            continue
        for axis, dim in enumerate(value.shape):
            if isinstance(dim, int) or dim.value is None:
                continue
            if "+" in str(dim):
                sums.append(str(dim))
            else:
                sizes.setdefault(str(dim), FLOPS_BATCH if axis == 0 else FLOPS_SEQUENCE)
    for name in sums:  # a KV cache's mask spans `past_sequence + sequence`: the sum of the two
        terms = [sizes.get(term.strip()) for term in name.split("+")]
        sizes[name] = sum(terms) if None not in terms else FLOPS_SEQUENCE
    return sizes


def _dims(value: ir.Value | None, sizes: dict[str, int]) -> list[int] | None:
    """`value`'s shape with the inputs' symbols bound (`sizes`); None when any dim is another symbol."""
    if value is None or value.shape is None:
        return None
    dims = [d if isinstance(d, int) else sizes.get(str(d)) if d.value is not None else None for d in value.shape]
    return None if any(d is None for d in dims) else dims


# Matrix products with MatMul's shapes (inputs 0 and 1): the float one and its integer forms.
MATMUL_LIKE = {("", "MatMul"), ("", "MatMulInteger"), ("com.microsoft", "MatMulIntegerToFloat"),
               ("com.microsoft", "DynamicQuantizeMatMul"), ("com.microsoft", "FusedMatMul")}


def _swap_last(dims: list[int]) -> list[int]:
    return [*dims[:-2], dims[-1], dims[-2]] if len(dims) > 1 else dims


def node_flops(node: ir.Node, sizes: dict[str, int]) -> int | None:
    """Multiply-adds ×2 for MatMul (and its int8 and fused forms), Gemm, Conv, MatMulNBits, fused
    attention and MoE (its top-k experts), from the shapes the graph carries, the inputs' symbols
    bound to `sizes`; None when a shape it needs is unknown."""
    if (node.domain if node.domain != "ai.onnx" else "", node.op_type) in MATMUL_LIKE:
        a, b = _dims(node.inputs[0], sizes), _dims(node.inputs[1], sizes)
        if not a or not b:
            return None
        if node.op_type == "FusedMatMul":  # MatMul of the operands with their last two axes swapped or not
            a, b = (_swap_last(a) if node.attributes.get_int("transA", 0) else a,
                    _swap_last(b) if node.attributes.get_int("transB", 0) else b)
        a, b = (a if len(a) > 1 else [1, *a]), (b if len(b) > 1 else [*b, 1])
        try:
            stacked = math.prod(np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2])))
        except ValueError:
            return None
        return 2 * stacked * a[-2] * a[-1] * b[-1]
    if node.op_type == "Gemm":
        a, b = _dims(node.inputs[0], sizes), _dims(node.inputs[1], sizes)
        if not a or not b:
            return None
        trans_a = node.attributes.get_int("transA", 0)
        trans_b = node.attributes.get_int("transB", 0)
        m, k = (a[1], a[0]) if trans_a else (a[0], a[1])
        n = b[0] if trans_b else b[1]
        return 2 * m * k * n
    if node.op_type == "Conv" or (node.domain == "com.microsoft" and node.op_type == "FusedConv"):
        w, out = _dims(node.inputs[1], sizes), _dims(node.outputs[0], sizes)
        if not w or not out:
            return None
        # out: [N, Cout, *spatial]; w: [Cout, Cin/group, *kernel]
        return 2 * math.prod(out) * math.prod(w[1:])
    if node.domain == "com.microsoft" and node.op_type in ("MoE", "QMoE"):
        return _moe_flops(node, sizes)
    if node.domain == "com.microsoft" and node.op_type in ("MultiHeadAttention", "GroupQueryAttention"):
        return _attention_flops(node, sizes)
    if node.domain == "com.microsoft" and node.op_type == "MatMulNBits":
        rows = _dims(node.inputs[0], sizes)
        if not rows:
            return None
        return 2 * math.prod(rows[:-1]) * node.attributes.get_int("K") * node.attributes.get_int("N")
    return 0


def _attention_flops(node: ir.Node, sizes: dict[str, int]) -> int | None:
    """Q·Kᵀ and the weighted sum of V in a fused attention: 2 products of 2·S·L·(heads·head size) per
    batch row, L the keys attended to (the past's length and the new ones, for GroupQueryAttention)."""
    query = _dims(node.inputs[0], sizes)
    if not query or len(query) != 3:
        return None
    batch, length, width = query
    heads = node.attributes.get_int("num_heads", 1)
    if node.op_type == "GroupQueryAttention":
        kv_heads = node.attributes.get_int("kv_num_heads", heads)
        packed = len(node.inputs) < 2 or node.inputs[1] is None
        width = width // (heads + 2 * kv_heads) * heads if packed else width
        past = _dims(node.inputs[3], sizes) if len(node.inputs) > 3 and node.inputs[3] is not None else [0, 0, 0]
        if past is None:
            return None
        keys = past[2] + length
    else:
        key = _dims(node.inputs[1], sizes) if len(node.inputs) > 1 else None
        if key is None or len(key) != 3:  # packed or 4-D keys: left out rather than guessed
            return None
        keys = key[1]
    return 2 * 2 * batch * length * keys * width


def _moe_flops(node: ir.Node, sizes: dict[str, int]) -> int | None:
    """What runs in a com.microsoft.MoE (or QMoE): every token through its top-k experts' weights
    (fc1, fc2 and the gate fc3 when there is one), not through all of them."""
    rows = _dims(node.inputs[0], sizes)
    values, per_element = expert_weights(node)
    weights = [_dims(value, sizes) for value in values]
    if not rows or any(w is None for w in weights):
        return None
    per_expert = sum(2 * w[1] * w[2] * per_element for w in weights)  # [experts, out, in]: 2·out·in per token
    return math.prod(rows[:-1]) * node.attributes.get_int("k", 1) * per_expert


def graph_flops(model: ir.Model) -> tuple[int, int]:
    """(FLOPs, nodes of unknown shape) at the inputs' symbols bound by `input_sizes`.

    A shape the graph computes at run time (dct-tokens' kept length, heads split by a Reshape of
    a computed shape) is a symbol no input has. Then the shapes are worked out again on a copy
    whose inputs have the bound sizes, so each node counts at the size it runs at: first by onnx's
    shape inference with data propagation (C++, tens of milliseconds: it follows Shape → Gather →
    Concat → Reshape), and where that leaves nodes unknown, by onnxscript's constant folding, which
    also evaluates the arithmetic data propagation cannot (Range, ConstantOfShape, Where) but costs
    `slimgraph diff` 0.2 s to import and ~0.1 s a model.
    """
    sizes = input_sizes(model)
    flops, unknown = _count_flops(model, sizes)
    if unknown:
        found = _with_concrete_shapes(model, sizes)
        if found is not None:
            concrete, uncounted = found
            flops, unknown = _count_flops(concrete, {}, skip=uncounted)
    return flops, unknown


def _count_flops(model: ir.Model, sizes: dict[str, int], skip: set[ir.Node] = frozenset()) -> tuple[int, int]:
    flops = unknown = 0
    for node in model.graph:
        count = node_flops(node, sizes) if node not in skip else 0
        if count is None:
            unknown += 1
        else:
            flops += count
    return flops, unknown


def _with_concrete_shapes(model: ir.Model, sizes: dict[str, int]) -> tuple[ir.Model, set[ir.Node]] | None:
    """A copy of `model` with the inputs' symbols bound and every shape inferred again from them, and
    its nodes not to count (`_shape_stand_ins`); None when the folding cannot run on the graph: the
    estimate then leaves the unknown nodes out."""
    import logging
    import warnings

    concrete = model.clone()  # weights are shared, not copied
    for value in concrete.graph.inputs:
        if value.shape is not None:  # an unnamed dim (an exporter's -1) bound by its axis
            value.shape = ir.Shape([d if isinstance(d, int) else sizes.get(str(d)) if d.value is not None else
                                    FLOPS_BATCH if axis == 0 else FLOPS_SEQUENCE for axis, d in enumerate(value.shape)])
    for node in concrete.graph:
        for value in node.outputs:
            # inferred again from the bound inputs; a shape known already stays, bound
            bound = _dims(value, sizes)
            value.shape = ir.Shape(bound) if bound is not None else None
    # Both log each value they cannot infer or evaluate at the bound sizes.
    quiet = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.level = logging.CRITICAL
    try:
        uncounted = _shape_stand_ins(concrete.graph)
        _infer_shapes(concrete)
        if _count_flops(concrete, {}, skip=uncounted)[1]:
            import onnxscript.optimizer

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                onnxscript.optimizer.fold_constants(concrete, onnx_shape_inference=True, input_size_limit=1024,
                                                    output_size_limit=1 << 16)
    except Exception:  # an op the folding cannot evaluate or infer
        return None
    finally:
        for logger, level in zip(quiet, levels):
            logger.level = level
    return concrete, uncounted


def _infer_shapes(model: ir.Model) -> None:
    """onnx's shape inference with data propagation, on `model` in place (left as it was where it
    fails). It is given no float weight's values, only their shapes and types: shapes are computed
    from integers, and a weight not yet read (`slimgraph.frontend.lazy_weights`) stays unread."""
    from onnx_ir.passes.common import ShapeInferencePass

    held = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.dtype.is_floating_point():
            value.shape, value.dtype = ir.Shape(tensor.shape), tensor.dtype
            held[value], value.const_value = tensor, None
    try:
        ShapeInferencePass(strict_mode=False, data_prop=True)(model)
    finally:
        for value, tensor in held.items():
            value.const_value = tensor


# com.microsoft ops whose outputs (by index) have the shape of their first input.
SAME_SHAPE_OUTPUTS = {"SkipLayerNormalization": (0, 3), "SkipSimplifiedLayerNormalization": (0, 3),
                      "SimplifiedLayerNormalization": (0,), "FastGelu": (0,), "BiasGelu": (0,), "Gelu": (0,),
                      "QuickGelu": (0,), "BiasAdd": (0,), "RotaryEmbedding": (0,), "MoE": (0,), "QMoE": (0,),
                      "Attention": (0,)}


def _shape_stand_ins(graph: ir.Graph) -> set[ir.Node]:
    """Standard ops that give the shapes of the com.microsoft ops' outputs to what reads them: onnx's
    shape inference knows none of those ops, and every shape after one would stay unknown. Returns
    the nodes not to count: the stand-ins, which the op's own count covers; for FusedConv the op
    itself, whose Conv stand-in gets the output shape and so counts it."""
    uncounted: set[ir.Node] = set()
    for node in list(graph):
        if node.domain != "com.microsoft" or not node.inputs or node.inputs[0] is None:
            continue
        x = node.inputs[0]
        if node.op_type in SAME_SHAPE_OUTPUTS:
            outputs = {i: ir.node("Identity", [x]) for i in SAME_SHAPE_OUTPUTS[node.op_type] if i < len(node.outputs)}
        elif node.op_type == "FusedConv":
            conv = {name: a for name, a in node.attributes.items() if not name.startswith("activation")}
            outputs = {0: ir.node("Conv", node.inputs[:3], attributes=conv)}
        elif node.op_type == "FusedMatMul":
            operands = [_transposed(graph, node, v) if node.attributes.get_int(flag, 0) else v
                        for v, flag in zip(node.inputs[:2], ("transA", "transB"))]
            uncounted.update(v.producer() for v, original in zip(operands, node.inputs) if v is not original)
            outputs = {0: ir.node("MatMul", operands)}
        elif node.op_type == "MatMulNBits":
            k, n = node.attributes.get_int("K"), node.attributes.get_int("N")
            outputs = {0: ir.node("MatMul", [x, _placeholder(graph, x, [k, n])])}
        elif node.op_type == "GroupQueryAttention" and x.shape is not None and isinstance(x.shape[-1], int):
            heads, kv_heads = node.attributes.get_int("num_heads"), node.attributes.get_int("kv_num_heads")
            packed = len(node.inputs) < 2 or node.inputs[1] is None
            head_size = x.shape[-1] // (heads + 2 * kv_heads if packed else heads)
            outputs = {0: ir.node("MatMul", [x, _placeholder(graph, x, [x.shape[-1], heads * head_size])])}
        else:
            continue
        for index, stand_in in outputs.items():
            graph.insert_after(node, stand_in)
            ir.convenience.replace_all_uses_with(node.outputs[index], stand_in.outputs[0], replace_graph_outputs=True)
        uncounted.update([node] if node.op_type == "FusedConv" else outputs.values())
    return uncounted


def _transposed(graph: ir.Graph, node: ir.Node, value: ir.Value) -> ir.Value:
    """`value` with its last two axes swapped, by a Transpose put before `node` (rank from its shape)."""
    rank = value.shape.rank() if value.shape is not None else 2
    transpose = ir.node("Transpose", [value], {"perm": [*range(rank - 2), rank - 1, rank - 2]})
    graph.insert_before(node, transpose)
    return transpose.outputs[0]


def _placeholder(graph: ir.Graph, like: ir.Value, shape: list[int]) -> ir.Value:
    """A graph input of `shape` and `like`'s type: a weight's shape for inference, with no data to allocate."""
    value = ir.Value(name=f"_shape_stand_in_{len(graph.inputs)}", shape=ir.Shape(shape),
                     type=like.type or ir.TensorType(ir.DataType.FLOAT))
    graph.inputs.append(value)
    return value
