"""Structure discovery: linear layers, embeddings, LM heads, FFNs, attention, repeated blocks.

Technique passes work on these structures, not on raw ops. Names come from the PyTorch
exporter's name scopes (`pkg.torch.onnx.name_scopes`) when the model has them, and from
initializer names otherwise; the structures themselves are found from graph patterns,
so a plain `.onnx` file without metadata yields the same answer:

- linear: MatMul/Gemm whose weight is a 2-D constant (optional constant bias Add);
- embedding: Gather of rows from a 2-D constant table by non-constant indices;
- attention: Softmax fed by a MatMul of two activations (scores = Q·Kᵀ); heads and head
  dim from Q's [batch, heads, seq, head_dim] shape; KV heads from K's projection width;
- FFN: a linear whose input is an elementwise function of one linear (up) or two linears
  on the same input (gate, up);
- LM head: a linear whose width is an input embedding's vocabulary;
- blocks: module paths `prefix.N` repeated (name scopes), else the attention blocks, else
  residual adds (an Add whose operands are connected: one feeds the other); a block's attention
  and MLP sub-blocks (`sub_block`): the residual branches on its stream;
- MoE: a com.microsoft.MoE node, or TopK over a Softmax whose indices pick the tokens of one FFN
  per expert (the decomposed form); the shared expert is an FFN reading the same rows;
- tokens (`[batch, tokens, dim]`): where they are joined with others (`find_join`: a VLM's image
  tokens with its text) and whether token 0 is read alone (`reads_first_token`: a CLS pooler).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import onnx_ir as ir

from slimgraph.ir import groups
from slimgraph.ir.channels import conv_channel_groups
from slimgraph.ir.graph import (
    ATTENTION_PATH_OPS,
    ELEMENTWISE_OPS,
    MAX_WALK,
    SHAPE_ONLY_OPS,
    Walk,
    cone,
    constant_tensor,
    data_inputs,
    ensure_shapes,
    expert_weights,
    find_downstream,
    find_upstream,
    is_default_domain,
    module_path,
    ops,
    static_dim,
    weight_tensor,
)
from slimgraph.ir.groups import Group
from slimgraph.ir.parts import FFN, Attention, Block, BlockGroup, Embedding, Join, Linear, MoE


def strip_weight_suffix(name: str) -> str:
    """`encoder.dense.weight` → `encoder.dense`; `gpu_0/conv1_w_0` → `gpu_0/conv1`."""
    return re.sub(r"[._/]?(weight|w|kernel)(_\d+)?$", "", name, flags=re.IGNORECASE) or name


@dataclass(frozen=True)
class Structures:
    linears: list[Linear]
    embeddings: list[Embedding]
    ffns: list[FFN]
    attention: list[Attention]
    lm_heads: list[Linear]
    blocks: BlockGroup | None
    named_from_scopes: bool
    groups: list[Group] = field(default_factory=list)  # dependency groups, see slimgraph.ir.groups
    not_prunable: list[str] = field(default_factory=list)  # why a structure has no group
    moes: list[MoE] = field(default_factory=list)

    def groups_of(self, kind: str) -> list[Group]:
        return [g for g in self.groups if g.kind == kind]

    @property
    def vocab_size(self) -> int | None:
        sizes = [e.num_embeddings for e in self.embeddings if e.from_graph_input]
        return max(sizes) if sizes else None

    def to_json(self) -> dict:
        return {
            "named_from": "name scopes" if self.named_from_scopes else "initializer names",
            "blocks": self.blocks.to_json() if self.blocks else None,
            "vocab_size": self.vocab_size,
            "linears": [x.to_json() for x in self.linears],
            "embeddings": [x.to_json() for x in self.embeddings],
            "ffns": [x.to_json() for x in self.ffns],
            "attention": [x.to_json() for x in self.attention],
            "lm_heads": [x.to_json() for x in self.lm_heads],
            "groups": [g.to_json() for g in self.groups],
            "not_prunable": self.not_prunable,
            "moes": [m.to_json() for m in self.moes],
        }


# --- linears and embeddings -------------------------------------------------------------


def bias_of(node: ir.Node, out_features: int) -> str | None:
    """The name of the [out] constant an Add after `node` (its only user) adds, if that is what reads it."""
    uses = node.outputs[0].uses()
    if len(uses) != 1:
        return None
    consumer, _ = uses[0]
    if consumer.op_type != "Add" or not is_default_domain(consumer):
        return None
    for operand in consumer.inputs:
        tensor = constant_tensor(operand)
        if tensor is not None and tuple(tensor.shape) == (out_features,):
            return operand.name
    return None


def find_linear(node: ir.Node) -> Linear | None:
    if not is_default_domain(node) or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    found = weight_tensor(node.inputs[1])
    if found is None or len(found[0].shape) != 2 or constant_tensor(node.inputs[0]) is not None:
        return None
    tensor, weight_name, transposed = found
    rows, cols = tensor.shape[::-1] if transposed else tensor.shape
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return None
        in_f, out_f = (cols, rows) if node.attributes.get_int("transB", 0) else (rows, cols)
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        bias = bias_value.name if bias_value is not None else None
    else:
        in_f, out_f = rows, cols
        bias = bias_of(node, out_f)
    scope = module_path(node)
    name = scope or strip_weight_suffix(weight_name) or node.name or "linear"
    return Linear(name=name, node=node, weight=weight_name, in_features=in_f, out_features=out_f, bias=bias)


def find_linears(model: ir.Model) -> list[Linear]:
    linears = [lin for node in model.graph if (lin := find_linear(node)) is not None]
    # Disambiguate repeated names (e.g. two MatMuls inside one module).
    counts = collections.Counter(lin.name for lin in linears)
    seen: dict[str, int] = collections.Counter()
    unique = []
    for lin in linears:
        if counts[lin.name] > 1:
            seen[lin.name] += 1
            lin = Linear(f"{lin.name}#{seen[lin.name]}", lin.node, lin.weight, lin.in_features, lin.out_features, lin.bias)
        unique.append(lin)
    return unique


def find_embeddings(model: ir.Model) -> list[Embedding]:
    found = []
    for node in model.graph:
        if node.op_type != "Gather" or not is_default_domain(node) or node.attributes.get_int("axis", 0) != 0:
            continue
        table = constant_tensor(node.inputs[0])
        indices = node.inputs[1]
        if table is None or len(table.shape) != 2 or constant_tensor(indices) is not None:
            continue
        if indices.dtype is not None and not indices.dtype.is_integer():
            continue
        name = module_path(node) or strip_weight_suffix(node.inputs[0].name or "") or node.name
        found.append(Embedding(name=name, node=node, table=node.inputs[0].name or "",
                               num_embeddings=table.shape[0], dim=table.shape[1],
                               from_graph_input=_comes_from_graph_input(indices)))
    return found


def _comes_from_graph_input(value: ir.Value) -> bool:
    """True when `value` is a graph input, possibly reshaped or cast."""
    for _ in range(8):
        if value.is_graph_input():
            return True
        producer = value.producer()
        if producer is None or producer.op_type not in SHAPE_ONLY_OPS | {"Cast", "Identity"}:
            return False
        value = producer.inputs[0]
    return False


# --- walking the graph ------------------------------------------------------------------


def _walk_back(start: ir.Value, allowed: set[str], linear_of: dict[ir.Node, Linear]) -> tuple[list[Linear], bool]:
    """Linears reachable backwards from `start` through `allowed` ops only.

    Returns (linears, clean): `clean` is False when the walk met anything else (another
    kind of op or a graph input), i.e. `start` is not a function of those linears alone.
    """
    found: list[Linear] = []
    clean = True
    walk = Walk(start, up=True, through=lambda n: n not in linear_of and n.op_type in allowed)
    for _, node in walk:
        if node in linear_of:
            if linear_of[node] not in found:
                found.append(linear_of[node])
        elif node is None or node.op_type not in allowed:
            clean = False
    return found, clean and not walk.truncated


def _nearest_linear_and_width(start: ir.Value, linear_of: dict[ir.Node, Linear]) -> tuple[Linear | None, int | None]:
    """The closest linear upstream of an attention operand, and the width it contributes.

    The width is the linear's output width, or, when a Split/Slice lies in between (fused
    QKV projections), the width of the slice taken from it (the one nearest the linear).
    """
    width = None
    for value, node in Walk(start, up=True, through=lambda n: n not in linear_of and n.op_type in ATTENTION_PATH_OPS):
        if node in linear_of:
            return linear_of[node], width or linear_of[node].out_features
        if node is not None and node.op_type in ("Split", "Slice") and value.shape is not None and len(value.shape) == 3:
            last = value.shape[-1]
            if isinstance(last, int):
                width = last
    return None, None


def _heads_from_shape(value: ir.Value) -> tuple[int | None, int | None]:
    """(heads, head_dim) from a [batch, heads, seq, head_dim] value, looking through scaling.

    Either may be None when the shape does not say (e.g. a Reshape to [0, 0, -1, 32]).
    """
    current: ir.Value | None = value
    for _ in range(4):
        if current is None:
            break
        shape = current.shape
        if shape is not None and len(shape) == 4:
            heads, head_dim = shape[1], shape[3]
            if isinstance(heads, int) or isinstance(head_dim, int):
                return (heads if isinstance(heads, int) else None, head_dim if isinstance(head_dim, int) else None)
        producer = current.producer()
        if producer is None or producer.op_type not in ("Mul", "Div", "Cast"):
            break
        current = next(iter(data_inputs(producer)), None)
    return None, None


# --- attention, FFNs, heads, blocks -----------------------------------------------------


def find_attention(model: ir.Model, linears: list[Linear]) -> list[Attention]:
    linear_of = {lin.node: lin for lin in linears}
    score_path = {"Add", "Mul", "Div", "Where", "Cast", "Sub", "Softcap", "Tanh"}
    found = []
    for softmax in model.graph:
        if softmax.op_type != "Softmax":
            continue
        scores = find_upstream(softmax.inputs[0], lambda n: n.op_type == "MatMul", ops(score_path))
        if scores is None or any(constant_tensor(v) is not None for v in scores.inputs):
            continue
        q_in, k_in = scores.inputs
        q, q_width = _nearest_linear_and_width(q_in, linear_of)
        k, k_width = _nearest_linear_and_width(k_in, linear_of)
        heads, head_dim = _heads_from_shape(q_in)
        if heads is None and head_dim and q_width and q_width % head_dim == 0:
            heads = q_width // head_dim
        if head_dim is None and heads and q_width and q_width % heads == 0:
            head_dim = q_width // heads
        if not heads or not head_dim:
            continue
        v = o = context = None
        weighted = find_downstream(softmax.outputs[0], lambda n: n.op_type == "MatMul",
                                   ops({"Cast", "Dropout", "Where", "Identity"}))
        if weighted is not None:
            matmul, probs = weighted
            if matmul.inputs[0] is probs:
                v, _ = _nearest_linear_and_width(matmul.inputs[1], linear_of)
                context = matmul
            projection = find_downstream(matmul.outputs[0], linear_of.__contains__,
                                         ops(SHAPE_ONLY_OPS | {"Transpose", "Cast", "Identity"}))
            o = linear_of[projection[0]] if projection else None
        kv_heads = k_width // head_dim if k_width and k_width % head_dim == 0 else heads
        name = module_path(scores) or (_common_prefix([x.name for x in (q, k, v) if x]) or scores.name or "attention")
        found.append(Attention(name=name, heads=heads, head_dim=head_dim, kv_heads=kv_heads, q=q, k=k, v=v, o=o,
                               scores=scores, context=context))
    return found


def _activation_name(ops: set[str]) -> str:
    if "Gelu" in ops or "FastGelu" in ops or "BiasGelu" in ops:
        return "gelu"
    if "Erf" in ops:
        return "gelu"
    if "Tanh" in ops and "Pow" in ops:
        return "gelu_tanh"
    if "Sigmoid" in ops or "Swish" in ops:
        return "silu"
    if "Relu" in ops:
        return "relu"
    if "Tanh" in ops:
        return "tanh"
    return "+".join(sorted(ops)) or "identity"


def _ops_between(end: ir.Value, stops: set[ir.Node]) -> set[str]:
    return {node.op_type for _, node in Walk(end, up=True, through=lambda n: n not in stops)
            if node is not None and node not in stops}


def find_ffns(model: ir.Model, linears: list[Linear], attention: list[Attention]) -> list[FFN]:
    linear_of = {lin.node: lin for lin in linears}
    attention_linears = {id(x) for a in attention for x in (a.q, a.k, a.v) if x is not None}
    allowed = ELEMENTWISE_OPS | SHAPE_ONLY_OPS
    found = []
    for down in linears:
        ups, clean = _walk_back(down.node.inputs[0], allowed, linear_of)
        if not clean or not 1 <= len(ups) <= 2 or any(id(u) in attention_linears for u in ups):
            continue
        if len({id(u.node.inputs[0]) for u in ups}) != 1:
            continue
        if any(u.out_features != down.in_features for u in ups):
            continue
        ops = _ops_between(down.node.inputs[0], {u.node for u in ups})
        if not ops - {"Add", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast"}:
            continue  # two linears in a row, no activation: not an FFN
        gate = None
        up = ups[0]
        if len(ups) == 2:
            # The gate goes through the activation; up only meets it in the product.
            up, gate = sorted(ups, key=_feeds_activation)
        name = _common_prefix([down.name, up.name] + ([gate.name] if gate else []))
        found.append(FFN(name=name or down.name, up=up, down=down, gate=gate, activation=_activation_name(ops)))
    return found


def _feeds_activation(lin: Linear) -> bool:
    return any(c.op_type != "Mul" for c, _ in lin.output.uses())


def find_moes(model: ir.Model, ffns: list[FFN]) -> list[MoE]:
    """Mixtures of experts (see `MoE`), with the FFNs they are made of."""
    reading: dict[ir.Value, list[FFN]] = collections.defaultdict(list)
    for ffn in ffns:
        reading[ffn.up.node.inputs[0]].append(ffn)
    found = []
    for node in model.graph:
        if node.op_type in ("MoE", "QMoE") and node.domain == "com.microsoft":
            moe = _contrib_moe(node)
        elif node.op_type == "TopK" and is_default_domain(node):
            moe = _decomposed_moe(node, reading)
        else:
            continue
        if moe is None:
            continue
        fields, rows, experts = moe
        reshaped = rows.producer()
        sources = [rows] + ([reshaped.inputs[0]] if reshaped is not None and reshaped.op_type == "Reshape" else [])
        shared = [f for value in sources for f in reading.get(value, []) if all(f is not e for e in experts)]
        name = module_path(node) or (shared[0].name if shared else node.name or "moe")
        found.append(MoE(name, *fields, shared=shared[0].inner if len(shared) == 1 else 0,
                         parts=tuple(shared[:1]) + tuple(experts)))
    return found


def _contrib_moe(node: ir.Node) -> tuple[tuple, ir.Value, list[FFN]] | None:
    """A com.microsoft.MoE, or a QMoE (its weights' `in` axis packed, `expert_weights`)."""
    values, per_element = expert_weights(node)
    fc1, fc2 = (constant_tensor(v) for v in values[:2]) if len(values) >= 2 else (None, None)
    if fc1 is None or fc2 is None or len(fc1.shape) != 3 or len(fc2.shape) != 3:
        return None
    attrs = node.attributes
    fields = (f"com.microsoft.{node.op_type}", fc1.shape[0], attrs.get_int("k", 1), fc1.shape[2] * per_element,
              fc2.shape[2] * per_element, attrs.get_string("activation_type", "relu"))
    return fields, node.inputs[0], []


def _decomposed_moe(topk: ir.Node, reading: dict[ir.Value, list[FFN]]) -> tuple[tuple, ir.Value, list[FFN]] | None:
    """TopK over a Softmax whose indices select, per expert, the token rows one FFN reads."""
    probabilities = topk.inputs[0]
    softmax, k = probabilities.producer(), constant_tensor(topk.inputs[1])
    experts = static_dim(probabilities, -1)
    if softmax is None or softmax.op_type != "Softmax" or k is None or not experts:
        return None
    picks = Walk(topk.outputs[1], up=False, through=ops({"Equal", "NonZero", "Gather", "Transpose"}), limit=4096)
    parts = list({id(f): f for value, _ in picks for f in reading.get(value, [])}.values())
    if len(parts) != experts:
        return None
    gather = parts[0].up.node.inputs[0].producer()  # Gather(rows, tokens)
    if gather is None or gather.op_type != "Gather":
        return None
    first = parts[0]
    fields = ("decomposed", experts, int(k.numpy().reshape(-1)[0]), first.hidden, first.inner, first.activation)
    return fields, gather.inputs[0], parts


def find_join(value: ir.Value) -> Join | None:
    """Where the tokens `value` [batch, tokens, dim] are joined with others: the Concat on the token
    axis after it that also takes tokens not computed from it."""
    after = [value, *cone(value)]
    inside = set(after)
    for current in after:
        for node, _ in current.uses():
            axis = node.attributes.get_int("axis", 0) if node.op_type == "Concat" else None
            if axis not in (1, -2) or current.shape is None or len(current.shape) != 3:
                continue
            if any(v is not None and v not in inside for v in node.inputs):
                sizes = [static_dim(v, 1) for v in node.inputs]
                before = sizes[:list(node.inputs).index(current)]
                return Join(node, None if None in before else sum(before),
                            static_dim(node.outputs[0], 1) if None in sizes else sum(sizes))
    return None


def reads_first_token(value: ir.Value, stop: Callable[[ir.Node], bool] | None = None) -> bool:
    """Something computed from the tokens `value` (not through `stop` nodes) takes token 0 alone: a
    BERT pooler, a ViT classifier reading the CLS token."""
    for token in cone(value, stop=stop):
        node = token.producer()
        if node is None or token.shape is None:
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


def find_lm_heads(linears: list[Linear], embeddings: list[Embedding]) -> list[Linear]:
    vocab = {e.num_embeddings for e in embeddings if e.from_graph_input and e.num_embeddings > 2}
    return [lin for lin in linears if lin.out_features in vocab and lin.out_features > lin.in_features]


def _common_prefix(names: Iterable[str]) -> str:
    parts = [n.split(".") for n in names if n]
    if not parts:
        return ""
    prefix = []
    for segments in zip(*parts):
        if len(set(segments)) != 1:
            break
        prefix.append(segments[0])
    return ".".join(prefix)


def blocks_from_scopes(model: ir.Model) -> BlockGroup | None:
    indices: dict[str, set[int]] = collections.defaultdict(set)
    nodes_under: collections.Counter[str] = collections.Counter()
    for node in model.graph:
        path = module_path(node)
        if not path:
            continue
        for match in re.finditer(r"(?:^|\.)(\d+)(?=\.|$)", path):
            prefix = path[: match.start()] if match.start() else ""
            if prefix:
                indices[prefix].add(int(match.group(1)))
                nodes_under[prefix] += 1
    candidates = [(nodes_under[p], p) for p, idx in indices.items() if len(idx) >= 2]
    if not candidates:
        return None
    _, prefix = max(candidates)
    members: dict[int, list[ir.Node]] = collections.defaultdict(list)
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)(?:\.|$)")
    for node in model.graph:
        match = pattern.match(module_path(node) or "")
        if match:
            members[int(match.group(1))].append(node)
    # A block left with no weights (a dropped block's shared mask or rotary nodes) is no block.
    members = {i: nodes for i, nodes in members.items() if any(_has_weight(n) for n in nodes)}
    if len(members) < 2:
        return None
    _adopt_unscoped(model, members)
    blocks = [_boundary(i, f"{prefix}.{i}", nodes) for i, nodes in sorted(members.items())]
    return BlockGroup(prefix=prefix, count=len(members), source="name scopes",
                      blocks=tuple(b for b in blocks if b is not None) if all(blocks) else ())


def _has_weight(node: ir.Node) -> bool:
    return node.op_type not in ("Shape", "Reshape", "Concat", "Expand", "Unsqueeze") and any(
        (t := constant_tensor(v)) is not None and t.size > 1 for v in node.inputs)


def _adopt_unscoped(model: ir.Model, members: dict[int, list[ir.Node]]) -> None:
    """Give a node without a module path (e.g. the Split after a fused projection) to the block
    that every data input and every user of it belongs to."""
    block_of = {node: i for i, nodes in members.items() for node in nodes}
    for node in model.graph:
        if module_path(node) or node in block_of:
            continue
        neighbours = {block_of.get(v.producer()) for v in data_inputs(node)}
        neighbours |= {block_of.get(user) for out in node.outputs for user, _ in out.uses()}
        if len(neighbours) == 1 and None not in neighbours:
            index = neighbours.pop()
            block_of[node] = index
            members[index].append(node)


def _boundary(index: int, name: str, nodes: list[ir.Node]) -> Block | None:
    """The block's residual stream: the one value it hands on that has the shape and dtype of one
    value it reads (other outputs, such as a mask computed once and shared, do not)."""
    inside = set(nodes)
    outputs = [v for n in nodes for v in n.outputs
               if v.is_graph_output() or any(user not in inside for user, _ in v.uses())]
    inputs = list(dict.fromkeys(v for n in nodes for v in n.inputs
                                if v is not None and constant_tensor(v) is None and v.producer() not in inside))
    pairs = [(i, o) for o in outputs for i in inputs if i.dtype == o.dtype and same_shape(i, o)]
    return Block(index, name, *pairs[0]) if len(pairs) == 1 else None


def _residual_block(index: int, add: ir.Node) -> Block | None:
    """A residual block ending in `add`, when its shortcut is the identity: entry is the operand
    the other branch forks from, exit the sum (after the activation that alone reads it)."""
    left, right = (v for v in add.inputs if v is not None)
    for entry, branch in ((left, right), (right, left)):
        forks = any(user is not add for user, _ in entry.uses())
        if forks and _reaches(entry, branch):
            exit_ = add.outputs[0]
            users = exit_.uses()
            if len(users) == 1 and users[0][0].op_type in ("Relu", "Gelu", "Clip") and not exit_.is_graph_output():
                exit_ = users[0][0].outputs[0]
            if same_shape(entry, exit_) and entry.dtype == exit_.dtype:
                return Block(index, add.name or f"residual {index}", entry, exit_)
    return None


def _reaches(source: ir.Value, target: ir.Value, limit: int = MAX_WALK) -> bool:
    """`target` is computed from `source` (within a walk of `limit` values)."""
    return any(value is source for value, _ in Walk(target, up=True, through=lambda n: True, limit=limit))


def sub_block(block: Block, part: Literal["attention", "mlp"]) -> Block | None:
    """The attention (first) or MLP (last) residual branch of a block, as a block of its own
    (`{block.name}.{part}`): its exit is the branch's residual Add, its entry the Add's residual
    operand, so that `edit.bypass` removes the branch and keeps the stream. None where the block
    does not have two residual Adds on its stream."""
    start = block.entry.producer()
    adds = []  # walking up from the exit: the MLP's residual Add comes before the attention's
    for value, node in Walk(block.exit, up=True, through=lambda n: n is not start, limit=4096):
        if node is not None and node is not start and node.op_type == "Add" and value is node.outputs[0]:
            residual = _residual_operand(node)
            if residual is not None and same_shape(residual, block.entry):  # on the residual stream
                adds.append((node, residual))
    if len(adds) < 2:
        return None
    add, residual = adds[-1] if part == "attention" else adds[0]
    return Block(block.index, f"{block.name}.{part}", residual, add.outputs[0])


def _residual_operand(add: ir.Node) -> ir.Value | None:
    """The operand of an Add that the other operand is computed from (the skip connection)."""
    left, right = add.inputs
    for skip, branch in ((left, right), (right, left)):
        if skip is not None and branch is not None and constant_tensor(skip) is None and _reaches(skip, branch, 1024):
            return skip
    return None


def same_shape(a: ir.Value, b: ir.Value) -> bool:
    return a.shape is not None and b.shape is not None and [str(d) for d in a.shape] == [str(d) for d in b.shape]


def _gated(node: ir.Node) -> bool:
    """A product of two computed values (a recurrent cell's gate times its state), not a scaling."""
    return node.op_type == "Mul" and sum(v is not None and constant_tensor(v) is None for v in node.inputs) == 2


def residual_adds(model: ir.Model, max_span: int = MAX_WALK) -> list[ir.Node]:
    """Add/Sum nodes that merge two branches forking from one recent value.

    The fork is the latest common ancestor of the two operands; an identity shortcut forks
    at one operand itself, a projection shortcut (ResNet's first block of a stage) just
    before both branches. `max_span` (in topological positions) keeps far-apart merges out.
    An unrolled LSTM's adds are a recurrence, not residuals: the state update `f·c + i·g` (two gated
    products) and the gate inputs `W·x + U·h` (read only by the Split into gates).
    """
    import networkx as nx  # imported here: every command imports this module, few need residuals

    order = {node: i for i, node in enumerate(model.graph)}
    graph = nx.DiGraph()
    for node in model.graph:
        graph.add_node(node)
        for value in node.inputs:
            if value is not None and value.producer() is not None:
                graph.add_edge(value.producer(), node)
    found = []
    for node in model.graph:
        if node.op_type not in ("Add", "Sum") or len(node.inputs) < 2:
            continue
        producers = [v.producer() for v in node.inputs if v is not None and constant_tensor(v) is None]
        if len(producers) != 2 or any(p is None for p in producers) or producers[0] is producers[1]:
            continue
        a, b = producers
        if all(_gated(p) for p in producers):  # an LSTM/GRU cell's state update: f·c + i·g
            continue
        readers = [user.op_type for user, _ in node.outputs[0].uses()]
        if readers and set(readers) == {"Split"}:  # a recurrent cell's gate inputs W·x + U·h, cut into gates
            continue
        common = (nx.ancestors(graph, a) | {a}) & (nx.ancestors(graph, b) | {b})
        if common and order[node] - order[max(common, key=order.__getitem__)] <= max_span:
            found.append(node)
    return found


def discover(model: ir.Model) -> Structures:
    """Everything slimgraph knows how to find in `model`, with its dependency groups (adds
    inferred shapes if missing)."""
    ensure_shapes(model)
    linears = find_linears(model)
    embeddings = find_embeddings(model)
    attention = find_attention(model, linears)
    ffns = find_ffns(model, linears, attention)
    lm_heads = find_lm_heads(linears, embeddings)
    blocks = blocks_from_scopes(model)
    if blocks is None and len(attention) >= 2:
        blocks = BlockGroup(prefix="", count=len(attention), source="attention blocks")
    if blocks is None:
        adds = residual_adds(model)
        if len(adds) >= 2:
            handles = tuple(b for i, add in enumerate(adds) if (b := _residual_block(i, add)) is not None)
            blocks = BlockGroup(prefix="", count=len(adds), source="residual adds", blocks=handles)
    found, notes = find_groups(model, ffns, attention, lm_heads, embeddings)
    return Structures(
        linears=linears,
        embeddings=embeddings,
        ffns=ffns,
        attention=attention,
        lm_heads=lm_heads,
        blocks=blocks,
        named_from_scopes=any(module_path(n) for n in model.graph),
        groups=found,
        not_prunable=notes,
        moes=find_moes(model, ffns),
    )


def find_groups(model: ir.Model, ffns: list[FFN], attention: list[Attention], lm_heads: list[Linear],
                embeddings: list[Embedding]) -> tuple[list[Group], list[str]]:
    """The dependency groups of the structures found, and why the others have none."""
    found: list[Group] = []
    notes: list[str] = []

    def add(result: Group | list[Group] | str) -> None:
        if isinstance(result, str):
            notes.append(result)
        else:
            found.extend(result if isinstance(result, list) else [result])

    for ffn in ffns:
        add(groups.ffn_group(model, ffn))
    for block in attention:
        add(groups.attention_groups(model, block))
    for head in lm_heads:
        tables = [e.node.inputs[0] for e in embeddings if e.from_graph_input and e.num_embeddings == head.out_features]
        add(groups.vocab_group(model, head, list(dict.fromkeys(tables))))
    if any(node.op_type == "Conv" for node in model.graph):
        conv_groups, reasons = conv_channel_groups(model)
        found += conv_groups
        notes += reasons
    return found, notes
