"""A KV-cache decoder's attention → ONNX Runtime's GroupQueryAttention, its rotary → RotaryEmbedding.

Per layer of a graph with the KV-cache signature (`ir/cache_signature.py`):

    q, k, v = x·Wq, x·Wk, x·Wv                             → Split(x·[Wq | Wk | Wv]): one MatMul
    heads(q), heads(k) rotated (x·cos + rotate_half(x)·sin)  → RotaryEmbedding(q|k, position_ids, cos, sin)
    present = Concat(past, heads(k|v)); GQA head repeat;
    Softmax(Q·Kᵀ·scale + mask) · V; merged heads           → GroupQueryAttention(q, k, v, past_key, past_value,
                                                               seqlens_k, total_sequence_length, attention_bias)
                                                               (its output is the merged heads: no Reshape)

The rotary tables (`[max_positions, head_dim / 2]`) are the model's own: its cos/sin subgraph run
once over every position, so RoPE scaling (llama3, yarn's attention factor) is kept as computed.
Rotary stays outside GroupQueryAttention on purpose: its own rotary reads only the first
position of a prompt, so a left-padded batch would be rotated at the wrong positions;
RotaryEmbedding takes every token's position. The mask becomes an additive `attention_bias`
built once from `attention_mask` (0 where kept, the float minimum under padding), with
`seqlens_k = total - 1` for every row: a left-padded row's pads hold cache slots too.

onnxscript's own GQA rule (`ort_fusions.gqa`) matches the exporters' forms it was written for and
none of what transformers 5 exports (the repeat of the KV heads as Unsqueeze/Expand/Reshape, the
NaN guard after the Softmax), so the layers are found here from the cache signature, which every
KV-cache export (ours, Optimum's, ORT GenAI's) names the same way, and each match is checked
op by op: anything else (partial rotary, a mask that is not read from `attention_mask`, a
softcap) leaves that layer as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.ir import edit
from slimgraph.ir.cache_signature import ATTENTION_MASK, INPUT_IDS, POSITION_IDS, cache_layers, past_name, present_name
from slimgraph.ir.graph import cone, constant_tensor, ensure_shapes

DEFAULT_MAX_POSITIONS = 4096  # the rotary table's length when the model's config does not say
REPEAT_OPS = frozenset({"Unsqueeze", "Expand", "Reshape", "Transpose"})  # the KV heads' repeat and Kᵀ


@dataclass
class _Layer:
    """What one layer's fused attention reads and replaces."""

    index: int
    q: ir.Value  # the projections, [batch, sequence, heads · head_dim]
    k: ir.Value
    v: ir.Value
    merge: ir.Node  # the Reshape that merges the heads: it reads GroupQueryAttention's output instead
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    cos: ir.Value | None  # the rotary cos/sin (None: no rotary)
    sin: ir.Value | None
    scores: ir.Node  # Q·Kᵀ: the fused nodes take its module path


def rotary_positions(config: Mapping[str, Any] | None) -> int:
    """`max_positions` for a model's Hugging Face config: its `max_position_embeddings`, else 4096."""
    value = (config or {}).get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else DEFAULT_MAX_POSITIONS


def fuse_kv_attention(model: ir.Model, max_positions: int = DEFAULT_MAX_POSITIONS) -> int:
    """Fuse every layer of a KV-cache decoder that matches (module docstring); returns how many.
    `max_positions`: the rotary tables' length (`rotary_positions` of the model's config)."""
    layers = cache_layers(model)
    names = {v.name for v in model.graph.inputs}
    if not layers or ATTENTION_MASK not in names:
        return 0
    ensure_shapes(model)
    matched = [m for i in range(layers) if (m := _match(model, i)) is not None]
    rotary = [m for m in matched if m.cos is not None]
    if rotary and POSITION_IDS not in names:
        matched = [m for m in matched if m.cos is None]
        rotary = []
    if not matched:
        return 0
    build = edit.Builder(model, "attention")
    inputs = {v.name: v for v in model.graph.inputs}
    shared = _shared_inputs(build, inputs[INPUT_IDS], inputs[ATTENTION_MASK], matched[0].q)
    tables = _rotary_tables(model, build, rotary[0], max_positions) if rotary else None
    if rotary and tables is None:
        matched = [m for m in matched if m.cos is None]
        if not matched:
            edit.remove_unused_initializers(model)  # the constants made for the shared inputs
            return 0
    new_nodes = build.take()
    mask_readers = [node for node, _ in inputs[ATTENTION_MASK].uses()]
    if mask_readers:  # the shared inputs take the module path of the exporter's own mask (the model's root)
        edit.carry_metadata(new_nodes, mask_readers[0])
    outputs = {v.name: v for v in model.graph.outputs}
    for layer in matched:
        with build.scope(f"layers.{layer.index}"):
            q, k, v = _packed_projections(model, build, layer) or (layer.q, layer.k, layer.v)
            if layer.cos is not None:
                cos, sin = tables
                q = build.op("RotaryEmbedding", [q, inputs[POSITION_IDS], cos, sin], domain="com.microsoft",
                             num_heads=layer.heads)
                k = build.op("RotaryEmbedding", [k, inputs[POSITION_IDS], cos, sin], domain="com.microsoft",
                             num_heads=layer.kv_heads)
            attended, present_k, present_v = build.op(
                "GroupQueryAttention",
                [q, k, v, inputs[past_name(layer.index, "key")], inputs[past_name(layer.index, "value")],
                 shared["seqlens_k"], shared["total"], None, None, None, shared["bias"]],
                domain="com.microsoft", outputs=3, num_heads=layer.heads, kv_num_heads=layer.kv_heads,
                scale=layer.scale)
        layer_nodes = build.take()
        edit.carry_metadata(layer_nodes, layer.scores)  # the layer's module path (self_attn)
        new_nodes += layer_nodes
        _read_merged(layer.merge, attended)
        for kind, new in (("key", present_k), ("value", present_v)):
            old = outputs[present_name(layer.index, kind)]
            new.shape, new.dtype = old.shape, old.dtype
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            old.name, new.name = None, present_name(layer.index, kind)
    model.graph.extend(new_nodes)
    model.graph.sort()  # each layer's new nodes read that layer's projections
    model.opset_imports.setdefault("com.microsoft", 1)
    edit.remove_dead(model)
    return len(matched)


def _read_merged(merge: ir.Node, attended: ir.Value) -> None:
    """Make what read the merged heads read GroupQueryAttention's output, which is them already
    ([batch, sequence, heads · head_dim], in the order [b, s, h, d] was): the merging Reshape goes,
    unless it flattens further (GPT-2's Conv1D: [b · s, h · d]), in which case it reads the output."""
    target = merge.inputs[1].shape if merge.inputs[1] is not None else None
    if target is not None and len(target) == 1 and target[0] == 3:
        attended.shape = merge.outputs[0].shape
        ir.convenience.replace_all_uses_with(merge.outputs[0], attended)
    else:
        edit.with_input(merge, 0, attended)


def _packed_projections(model: ir.Model, build: edit.Builder, layer: _Layer) -> tuple[ir.Value, ...] | None:
    """`x·[Wq | Wk | Wv]` split in three, when the projections are bias-free MatMuls of one input
    by constant weights: one matrix-vector product per token where there were three (ONNX Runtime
    GenAI's builder packs them too). The new MatMul is the module `…qkv_proj` quantize passes read."""
    nodes = [value.producer() for value in (layer.q, layer.k, layer.v)]
    if any(node is None or node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") for node in nodes):
        return None
    x = nodes[0].inputs[0]
    weights = [constant_tensor(node.inputs[1]) for node in nodes]
    if any(node.inputs[0] is not x for node in nodes) or any(w is None or len(w.shape) != 2 for w in weights):
        return None
    arrays = [w.numpy() for w in weights]
    q_weight = nodes[0].inputs[1].name or "q_proj.weight"
    name = edit.unique_name(model, q_weight.replace("q_proj", "qkv_proj") if "q_proj" in q_weight else f"{q_weight}.qkv")
    packed = edit.add_initializer(model, name, np.concatenate(arrays, axis=1))
    matmul = ir.node("MatMul", [x, packed], name=(nodes[0].name or "q_proj").replace("q_proj", "qkv_proj"))
    for key, value in nodes[0].metadata_props.items():  # the module path, q_proj → qkv_proj
        matmul.metadata_props[key] = value.replace("q_proj", "qkv_proj")
    build.add([matmul])
    sizes = build.constant("qkv_sizes", [a.shape[1] for a in arrays])
    return build.op("Split", [matmul.outputs[0], sizes], axis=-1, outputs=3)


# --- matching one layer ---------------------------------------------------------------------


def _match(model: ir.Model, index: int) -> _Layer | None:
    """Layer `index`'s attention, if it is the form the module docstring fuses."""
    by_name = {v.name: v for v in model.graph.outputs}
    present_k, present_v = by_name[present_name(index, "key")], by_name[present_name(index, "value")]
    new_k, new_v = _appended(present_k, past_name(index, "key")), _appended(present_v, past_name(index, "value"))
    if new_k is None or new_v is None:
        return None
    v = _merged_heads_source(new_v)
    k, k_rotary = _rotated(new_k)
    if v is None or k is None:
        return None
    scores = _consumer(present_k, "MatMul")
    if scores is None or scores.inputs[1] not in cone(present_k) and scores.inputs[1] is not present_k:
        return None
    q_rotated, q_scale = _scaled(scores.inputs[0])
    k_scale = _scale_on_path(present_k, scores.inputs[1])
    q, q_rotary = _rotated(q_rotated)
    if q is None or k_scale is None or (q_rotary is None) != (k_rotary is None):
        return None
    if q_rotary is not None and (q_rotary[0] is not k_rotary[0] or q_rotary[1] is not k_rotary[1]):
        return None
    merge = _attention_tail(scores, present_v)
    if merge is None or any(x.shape is None or len(x.shape) != 3 for x in (q, k, v)):
        return None
    kv_heads, head_dim = present_k.shape[1], present_k.shape[3]
    width = q.shape[-1] if q.shape is not None else None
    if not all(isinstance(d, int) for d in (kv_heads, head_dim, width)) or width % head_dim:
        return None
    heads = width // head_dim
    if heads % kv_heads:
        return None
    cos, sin = q_rotary if q_rotary is not None else (None, None)
    return _Layer(index, q, k, v, merge, heads, kv_heads, head_dim, q_scale * k_scale, cos, sin, scores)


def _appended(present: ir.Value, past: str) -> ir.Value | None:
    """`new` in `present = Concat(past, new)` along the sequence axis."""
    node = present.producer()
    if node is None or node.op_type != "Concat" or len(node.inputs) != 2 or node.inputs[0].name != past:
        return None
    return node.inputs[1] if node.attributes.get_int("axis", 0) in (2, -2) else None


def _merged_heads_source(heads: ir.Value) -> ir.Value | None:
    """`x` in `Transpose(Reshape(x, [batch, sequence, heads, head_dim]), (0, 2, 1, 3))`: the projection."""
    transpose = heads.producer()
    if transpose is None or transpose.op_type != "Transpose" or tuple(transpose.attributes.get_ints("perm", ())) != (0, 2, 1, 3):
        return None
    reshape = transpose.inputs[0].producer()
    if reshape is None or reshape.op_type != "Reshape":
        return None
    return reshape.inputs[0]


def _rotated(value: ir.Value) -> tuple[ir.Value | None, tuple[ir.Value, ir.Value] | None]:
    """The projection behind `value` and, if `value` is `x·cos + rotate_half(x)·sin` of its heads,
    the cos and sin it reads; (None, None) when `value` is neither."""
    plain = _merged_heads_source(value)
    if plain is not None:
        return plain, None
    add = value.producer()
    if add is None or add.op_type != "Add":
        return None, None
    products = [p.producer() for p in add.inputs]
    if any(p is None or p.op_type != "Mul" for p in products):
        return None, None
    for straight, rotated in (products, products[::-1]):
        for x, cos in (straight.inputs, straight.inputs[::-1]):
            for half, sin in (rotated.inputs, rotated.inputs[::-1]):
                if _is_rotate_half(half, x):
                    source = _merged_heads_source(x)
                    return (source, (cos, sin)) if source is not None else (None, None)
    return None, None


def _is_rotate_half(value: ir.Value, x: ir.Value) -> bool:
    """`value` is `Concat(-x[..., d/2:], x[..., :d/2])` (transformers' `rotate_half`, the whole head)."""
    concat = value.producer()
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2:
        return False
    neg = concat.inputs[0].producer()
    if neg is None or neg.op_type != "Neg":
        return False
    second, first = neg.inputs[0].producer(), concat.inputs[1].producer()
    head_dim = x.shape[-1] if x.shape is not None else None
    if not isinstance(head_dim, int):
        return False
    return _is_slice(second, x, head_dim // 2, None) and _is_slice(first, x, 0, head_dim // 2)


def _is_slice(node: ir.Node | None, x: ir.Value, start: int, end: int | None) -> bool:
    if node is None or node.op_type != "Slice" or node.inputs[0] is not x or len(node.inputs) < 4:
        return False
    starts, ends, axes = (constant_tensor(v) for v in node.inputs[1:4])
    if starts is None or ends is None or axes is None:
        return False
    steps = constant_tensor(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
    if steps is not None and steps.numpy().tolist() != [1]:
        return False
    end_ok = ends.numpy().tolist() == [end] if end is not None else int(ends.numpy()[0]) >= (x.shape[-1])
    return starts.numpy().tolist() == [start] and end_ok and axes.numpy().tolist() in ([3], [-1])


def _consumer(value: ir.Value, op_type: str) -> ir.Node | None:
    """The first `op_type` node reached from `value` through the repeat/scale ops (Shape reads not followed)."""
    queue, seen = [value], set()
    while queue:
        current = queue.pop(0)
        for node, _ in current.uses():
            if node in seen:
                continue
            seen.add(node)
            if node.op_type == op_type:
                return node
            if node.op_type in REPEAT_OPS or node.op_type in ("Mul", "Div"):
                queue.extend(node.outputs)
    return None


def _scalar(value: ir.Value) -> float | None:
    tensor = constant_tensor(value)
    if tensor is None or tensor.size != 1:
        return None
    return float(tensor.numpy().reshape(()))


def _scaled(value: ir.Value) -> tuple[ir.Value, float]:
    """`x` and `s` where `value` is `x`, `x · s` or `x / s` (s a constant scalar)."""
    scale = 1.0
    node = value.producer()
    while node is not None and node.op_type in ("Mul", "Div"):
        factor = _scalar(node.inputs[1])
        if factor is None and node.op_type == "Mul":
            factor = _scalar(node.inputs[0])
            value = node.inputs[1]
        else:
            value = node.inputs[0]
        if factor is None:
            break
        scale *= factor if node.op_type == "Mul" else 1 / factor
        node = value.producer()
    return value, scale


def _scale_on_path(start: ir.Value, end: ir.Value) -> float | None:
    """The product of the constant scales between `start` and `end`, when only repeat ops and
    scales lie between them; None otherwise."""
    scale, value = 1.0, end
    while value is not start:
        node = value.producer()
        if node is None:
            return None
        if node.op_type in ("Mul", "Div"):
            value, factor = _scaled(value)
            if value.producer() is node:
                return None
            scale *= factor
        elif node.op_type in REPEAT_OPS:
            value = node.inputs[0]
        else:
            return None
    return scale


def _attention_tail(scores: ir.Node, present_v: ir.Value) -> ir.Node | None:
    """From `scores = Q·Kᵀ`: `+ mask` (read from attention_mask), Softmax over keys, the NaN guard,
    `· V` (from `present_v`), heads merged. The Reshape that merges them, or None."""
    value = _only_user_output(scores.outputs[0])
    add = value.producer() if value is not None else None
    if add is None or add.op_type != "Add":
        return None
    mask = add.inputs[1] if add.inputs[0] is scores.outputs[0] else add.inputs[0]
    sources = {v.name for v in cone(mask, up=True) if v.is_graph_input()}  # (the past read for its shape)
    if ATTENTION_MASK not in sources or any(s not in (INPUT_IDS, POSITION_IDS, ATTENTION_MASK)
                                            and not s.startswith("past_key_values.") for s in sources):
        return None
    softmax = _single_consumer(add.outputs[0])
    if softmax is None or softmax.op_type != "Softmax" or softmax.attributes.get_int("axis", -1) not in (-1, 3):
        return None
    probs = softmax.outputs[0]
    guard = _nan_guard(probs)
    if guard is not None:
        probs = guard
    weighted = _single_consumer(probs)
    if weighted is None or weighted.op_type != "MatMul" or weighted.inputs[0] is not probs:
        return None
    if _scale_on_path(present_v, weighted.inputs[1]) != 1.0:
        return None
    transpose = _single_consumer(weighted.outputs[0])
    if transpose is None or transpose.op_type != "Transpose" or tuple(transpose.attributes.get_ints("perm", ())) != (0, 2, 1, 3):
        return None
    reshape = _single_consumer(transpose.outputs[0])
    return reshape if reshape is not None and reshape.op_type == "Reshape" else None


def _only_user_output(value: ir.Value) -> ir.Value | None:
    node = _single_consumer(value)
    return node.outputs[0] if node is not None else None


def _single_consumer(value: ir.Value) -> ir.Node | None:
    users = value.uses()
    if len(users) != 1 or value.is_graph_output():
        return None
    return users[0][0]


def _nan_guard(probs: ir.Value) -> ir.Value | None:
    """The output of `Where(IsNaN(p), 0, p)` after the Softmax, if there is one."""
    users = {node.op_type: node for node, _ in probs.uses()}
    if set(users) != {"IsNaN", "Where"}:
        return None
    where = users["Where"]
    if where.inputs[0] is not users["IsNaN"].outputs[0] or where.inputs[2] is not probs or _scalar(where.inputs[1]) != 0:
        return None
    return where.outputs[0]


# --- what every layer shares ------------------------------------------------------------------


def _shared_inputs(build: edit.Builder, input_ids: ir.Value, mask: ir.Value, like: ir.Value) -> dict[str, ir.Value]:
    """seqlens_k ([batch] int32: total - 1), total_sequence_length (int32 scalar) and the additive
    attention bias [batch, 1, sequence, total] from the attention mask."""
    dtype = like.dtype or ir.DataType.FLOAT
    with build.scope("mask"):
        total = build.op("Shape", [mask], start=1, end=2)
        batch = build.op("Shape", [input_ids], start=0, end=1)
        sequence = build.op("Shape", [input_ids], start=1, end=2)
        last = build.op("Sub", [total, build.constant("one", [1])])
        seqlens = build.op("Cast", [build.op("Expand", [last, batch])], to=ir.DataType.INT32)
        total_scalar = build.op("Cast", [build.op("Squeeze", [total])], to=ir.DataType.INT32)
        kept = build.op("Unsqueeze", [build.op("Cast", [mask], to=ir.DataType.BOOL), build.constant("axes", [1, 2])])
        zero = build.constant("zero", np.zeros((), dtype.numpy()))
        lowest = build.constant("lowest", np.array(np.finfo(dtype.numpy()).min, dtype.numpy()))
        bias = build.op("Where", [kept, zero, lowest])
        shape = build.op("Concat", [batch, build.constant("one", [1]), sequence, total], axis=0)
        bias = build.op("Expand", [bias, shape])
    return {"seqlens_k": seqlens, "total": total_scalar, "bias": bias}


def _rotary_tables(model: ir.Model, build: edit.Builder, layer: _Layer, positions: int
                   ) -> tuple[ir.Value, ir.Value] | None:
    """The cos and sin tables `[max_positions, head_dim / 2]`, from the model's own subgraph run over
    positions 0 … max − 1 (None if that subgraph reads anything but position_ids, or its two
    halves differ: not transformers' rotate_half layout)."""
    from slimgraph.measure.evaluate import capture

    sources = {v.name for v in cone([layer.cos, layer.sin], up=True) if v.is_graph_input()}
    if sources != {POSITION_IDS}:
        return None
    feeds = {POSITION_IDS: np.arange(positions, dtype=np.int64)[None, :]}
    got = next(capture(model, [layer.cos.name, layer.sin.name], [feeds]))
    half = layer.head_dim // 2
    tables = []
    for kind, value in (("cos", layer.cos), ("sin", layer.sin)):
        table = got[value.name].reshape(positions, layer.head_dim)
        if not np.array_equal(table[:, :half], table[:, half:]):
            return None
        tables.append(build.constant(f"rotary.{kind}_table", np.ascontiguousarray(table[:, :half])))
    return tables[0], tables[1]
