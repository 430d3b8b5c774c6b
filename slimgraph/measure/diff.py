"""Structure-aware diff of two models: which nodes match, and what changed, by module path.

Nodes are matched in stages; each stage sees only what the earlier ones left unmatched:

1. name: the same node name and op, unique on both sides;
2. signature: the same module path, op and initializer inputs, unique on both sides;
3. structure: Weisfeiler–Lehman neighbourhood hashes (networkx) over op, attributes,
   constant shapes and input slots, unique on both sides; then propagation along edges
   from matched pairs; then, within groups of equal hash and equal size, topological order;
   last, propagation that also pairs a node whose op was replaced (in another module).

Unmatched nodes of A are removed, of B added; a module with both is shown as one
replacement (`MatMul [384×1536 f32] + Add → MatMulNBits [384×1536 int4 g32]`). Matched pairs
whose attributes, constant shapes or dtypes differ are changed; those whose inputs come
from different places are rewired. Repeated changes in numbered blocks fold into one line
(`encoder.layer.0–5.intermediate.dense ... ×6`).

Weights are always compared: initializers pair up by name, then by the input slot of
matched nodes, and a pair differs when a hash of its bytes does (blake2b: cheap next to
loading the model). Unpaired initializers of one module on both sides are one replacement
(`f32[384×1536] → u8[1536×12×16] + f32[1536×12] + u8[1536×6]`). `weights=True` adds
the relative L2 change of each pair that differs.
"""

from __future__ import annotations

import collections
import re
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import onnx_ir as ir

from slimgraph.ir.graph import constant_tensor, expert_weights, module_path
from slimgraph.ir.meta import WEIGHT_SOURCE_KEY
from slimgraph.ir.structure import strip_weight_suffix
from slimgraph.measure.stats import ModelStats, model_stats, op_key

if TYPE_CHECKING:
    import networkx as nx

ChangeKind = Literal["added", "removed", "changed", "replaced"]
KINDS: tuple[ChangeKind, ...] = ("replaced", "changed", "added", "removed")
SHORT_DTYPES = {
    "FLOAT": "f32", "FLOAT16": "f16", "BFLOAT16": "bf16", "DOUBLE": "f64", "INT8": "i8", "UINT8": "u8",
    "INT16": "i16", "INT32": "i32", "INT64": "i64", "BOOL": "bool", "INT4": "i4", "UINT4": "u4",
}


@dataclass(frozen=True)
class Change:
    """One change at a module path. `before`/`after` describe the nodes involved."""

    module: str
    kind: ChangeKind
    before: str | None = None
    after: str | None = None
    detail: str = ""
    count: int = 1  # > 1 once folded across numbered blocks

    def describe(self) -> str:
        if self.kind == "added":
            text = f"+ {self.after}"
        elif self.kind == "removed":
            text = f"- {self.before}"
        elif self.kind == "replaced":
            text = f"{self.before} → {self.after}"
        else:
            text = f"{self.before}: {self.detail}"
        return text


WeightKind = Literal["changed", "replaced", "added", "removed"]


@dataclass(frozen=True)
class WeightChange:
    """An initializer that differs. `changed`: same shape and type, other values (`rel_l2`
    when values were compared); `replaced`: other shape or type, or unpaired tensors of one
    module (`detail` says what became what); `added`/`removed`: only in B / only in A."""

    name: str
    shape: tuple[int, ...]
    kind: WeightKind = "changed"
    rel_l2: float | None = None
    detail: str = ""


@dataclass
class DiffResult:
    a_name: str
    b_name: str
    a_stats: ModelStats
    b_stats: ModelStats
    changes: list[Change]
    rewired: list[Change]
    inputs: list[str]
    outputs: list[str]
    weights: list[WeightChange]  # initializers that differ (by fingerprint; see values_compared)
    matched: dict[str, int] = field(default_factory=dict)
    weights_compared: int = 0  # initializer pairs compared
    values_compared: bool = False  # relative L2 computed for the pairs that differ (--weights)

    @property
    def identical(self) -> bool:
        return not (self.changes or self.rewired or self.inputs or self.outputs or self.weights)

    def __repr__(self) -> str:
        if self.identical:
            verdict = "identical"
        else:
            counts = [f"{n} {what}" for n, what in ((sum(c.count for c in self.folded()), "node changes"),
                                                   (len(self.rewired), "rewired"),
                                                   (len(self.inputs) + len(self.outputs), "input/output changes"),
                                                   (len(self.weights), "weights differ")) if n]
            verdict = "different: " + ", ".join(counts)
        return (f"<DiffResult {self.a_name} → {self.b_name}: {verdict}; "
                f"{self.a_stats.nodes} → {self.b_stats.nodes} nodes, {self.a_stats.bytes:,} → {self.b_stats.bytes:,} bytes>")

    def op_delta(self) -> dict[str, tuple[int, int]]:
        ops = dict.fromkeys([*self.a_stats.op_histogram, *self.b_stats.op_histogram])
        rows = {op: (self.a_stats.op_histogram.get(op, 0), self.b_stats.op_histogram.get(op, 0)) for op in ops}
        return {op: counts for op, counts in rows.items() if counts[0] != counts[1]}

    def folded(self, only: ChangeKind | None = None) -> list[Change]:
        changes = [c for c in self.changes if only is None or c.kind == only or
                   (only == "changed" and c.kind == "replaced")]
        return fold(changes)

    def to_json(self) -> dict:
        return {
            "a": self.a_name,
            "b": self.b_name,
            "identical": self.identical,
            "summary": {
                key: {"a": getattr(self.a_stats, key), "b": getattr(self.b_stats, key)}
                for key in ("parameters", "bytes", "nodes", "flops")
            },
            "op_delta": {op: {"a": a, "b": b} for op, (a, b) in self.op_delta().items()},
            "matched": self.matched,
            "changes": [asdict(c) for c in self.folded()],
            "rewired": [asdict(c) for c in fold(self.rewired)],
            "inputs": self.inputs,
            "outputs": self.outputs,
            "weights_compared": self.weights_compared,
            "values_compared": self.values_compared,
            "weights": [
                {"name": w.name, "shape": list(w.shape), "kind": w.kind, "rel_l2": w.rel_l2, "detail": w.detail}
                for w in self.weights
            ],
        }


# --- describing nodes ---------------------------------------------------------------------


def short_dtype(dtype: ir.DataType | None) -> str:
    return SHORT_DTYPES.get(dtype.name, dtype.name.lower()) if dtype is not None else "?"


def _shape_text(shape: Iterable) -> str:
    return "×".join(str(d) for d in shape)


def describe(node: ir.Node) -> str:
    """`MatMul [384×1536 f32]`, `com.microsoft.MatMulNBits [384×1536 int4 g32]`, `Relu`."""
    op = op_key(node)
    if node.domain == "com.microsoft" and node.op_type == "MatMulNBits":
        a = node.attributes
        return f"{op} [{a.get_int('K')}×{a.get_int('N')} int{a.get_int('bits')} g{a.get_int('block_size')}]"
    if node.domain == "com.microsoft" and node.op_type in ("MoE", "QMoE"):
        # [E×(in→expert) top-k act], and a QMoE's bits
        values, per_element = expert_weights(node)
        fc1, fc2 = (constant_tensor(v) for v in values[:2]) if len(values) >= 2 else (None, None)
        if fc1 is not None and fc2 is not None:
            a = node.attributes
            quantized = node.op_type == "QMoE"
            bits = f" int{a.get_int('expert_weight_bits', 4)} g{a.get_int('block_size', 0)}" if quantized else ""
            return (f"{op} [{fc1.shape[0]}×({fc1.shape[2] * per_element}→{fc2.shape[2] * per_element}) "
                    f"top-{a.get_int('k', 1)} {a.get_string('activation_type', 'relu')}{bits}]")
    for value in node.inputs:
        tensor = constant_tensor(value)
        if tensor is not None and tensor.size > 1:
            return f"{op} [{_shape_text(tensor.shape)} {short_dtype(tensor.dtype)}]"
    return op


def group_of(node: ir.Node) -> str:
    """The module path a node belongs to; without name scopes, the weight it reads or its name."""
    path = module_path(node)
    if path:
        return path
    if path is None:
        for value in node.inputs:
            tensor = value.const_value if value is not None and value.is_initializer() else None
            if tensor is not None and tensor.size > 1:
                return strip_weight_suffix(value.name or "")
        if node.name:
            return node.name
    return "(root)"


def _attribute_text(attr: ir.Attr) -> str:
    if attr.type == ir.AttributeType.TENSOR:
        tensor = attr.as_tensor()
        return f"tensor[{_shape_text(tensor.shape)} {short_dtype(tensor.dtype)}]"
    if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        return "graph"
    # ONNX stores float attributes as float32: compare them at that precision, so that a
    # model held in memory and the same model read back from disk are equal.
    if attr.type == ir.AttributeType.FLOAT:
        return repr(float(np.float32(attr.value)))
    if attr.type == ir.AttributeType.FLOATS:
        return repr([float(np.float32(v)) for v in attr.value])
    return repr(attr.value)


def _signature(node: ir.Node) -> tuple:
    attrs = tuple(sorted((name, _attribute_text(a)) for name, a in node.attributes.items()))
    consts = tuple(
        None if (t := constant_tensor(v)) is None else (tuple(t.shape), short_dtype(t.dtype)) for v in node.inputs
    )
    return (op_key(node), attrs, consts, len(node.inputs), len(node.outputs))


# --- matching -----------------------------------------------------------------------------


def _unique_by(nodes: Iterable[ir.Node], key) -> dict:
    groups: dict = collections.defaultdict(list)
    for node in nodes:
        k = key(node)
        if k is not None:
            groups[k].append(node)
    return {k: v[0] for k, v in groups.items() if len(v) == 1}


def _match_unique(a_nodes, b_nodes, key, pairs: dict) -> int:
    left = _unique_by((n for n in a_nodes if n not in pairs), key)
    taken = set(pairs.values())
    right = _unique_by((n for n in b_nodes if n not in taken), key)
    count = 0
    for k, node in left.items():
        if k in right:
            pairs[node] = right[k]
            count += 1
    return count


def _graph_of(model: ir.Model) -> nx.DiGraph:
    import networkx as nx  # imported here: only structural matching needs it, and it costs `diff` 0.1 s

    graph = nx.DiGraph()
    for node in model.graph:
        # ascii(): networkx hashes labels as ASCII, and real graphs carry other characters (found by
        # benchmarks/fuzz.py on a PaddleOCR model)
        graph.add_node(node, label=ascii(_signature(node)))
    for node in model.graph:
        for slot, value in enumerate(node.inputs):
            producer = value.producer() if value is not None else None
            if producer is not None:
                edge = f"{value.index()}>{slot}"
                if graph.has_edge(producer, node):
                    edge = graph[producer][node]["slot"] + "," + edge
                graph.add_edge(producer, node, slot=edge)
    return graph


def _wl_hashes(model: ir.Model) -> dict[ir.Node, list[str]]:
    import networkx as nx

    with warnings.catch_warnings():  # networkx notes that directed hashes changed in 3.5
        warnings.simplefilter("ignore")
        return nx.weisfeiler_lehman_subgraph_hashes(_graph_of(model), edge_attr="slot", node_attr="label", iterations=3)


def _propagate(pairs: dict, a_unmatched: dict, b_unmatched: dict, *, across_ops: bool = False) -> int:
    """Match the unmatched producers and consumers of matched pairs that sit in the same slot.

    Normally both must have the same op. With `across_ops`, a node whose op was replaced
    is paired too, unless both sit in the same module (there the module view already
    shows the replacement, e.g. `MatMul + Add → MatMulNBits`).
    """

    def compatible(pa: ir.Node, pb: ir.Node) -> bool:
        return op_key(pa) == op_key(pb) or (across_ops and group_of(pa) != group_of(pb))

    def consumer_key(node: ir.Node, slot: int) -> tuple:
        return (slot,) if across_ops else (op_key(node), slot)

    count = 0
    frontier = list(pairs.items())
    while frontier:
        a, b = frontier.pop()
        candidates = []
        for va, vb in zip(a.inputs, b.inputs):
            pa = va.producer() if va is not None else None
            pb = vb.producer() if vb is not None else None
            if pa is not None and pb is not None:
                candidates.append((pa, pb))
        for va, vb in zip(a.outputs, b.outputs):
            uses_a = collections.defaultdict(list)
            uses_b = collections.defaultdict(list)
            for node, slot in va.uses():
                uses_a[consumer_key(node, slot)].append(node)
            for node, slot in vb.uses():
                uses_b[consumer_key(node, slot)].append(node)
            for key, nodes in uses_a.items():
                if len(nodes) == 1 and len(uses_b.get(key, [])) == 1:
                    candidates.append((nodes[0], uses_b[key][0]))
        for pa, pb in candidates:
            if pa in a_unmatched and pb in b_unmatched and compatible(pa, pb):
                pairs[pa] = pb
                del a_unmatched[pa], b_unmatched[pb]
                frontier.append((pa, pb))
                count += 1
    return count


def match_nodes(a: ir.Model, b: ir.Model) -> tuple[dict[ir.Node, ir.Node], dict[str, int]]:
    a_nodes, b_nodes = list(a.graph), list(b.graph)
    pairs: dict[ir.Node, ir.Node] = {}
    stages = {}
    stages["name"] = _match_unique(a_nodes, b_nodes, lambda n: (n.name, op_key(n)) if n.name else None, pairs)
    init_names = lambda n: tuple(v.name for v in n.inputs if v is not None and v.is_initializer())  # noqa: E731
    stages["signature"] = _match_unique(
        a_nodes, b_nodes, lambda n: (module_path(n) or "", op_key(n), init_names(n)) if init_names(n) or module_path(n) else None,
        pairs,
    )
    structural = 0
    if len(pairs) < len(a_nodes) or len(pairs) < len(b_nodes):
        hashes = _wl_hashes(a) | _wl_hashes(b)  # keyed by node: the two graphs' nodes are distinct
        label = lambda n: hashes[n][-1]  # noqa: E731
        structural += _match_unique(a_nodes, b_nodes, label, pairs)
        # Insertion-ordered "sets", so that results never depend on hash order.
        taken = set(pairs.values())
        a_unmatched = dict.fromkeys(n for n in a_nodes if n not in pairs)
        b_unmatched = dict.fromkeys(n for n in b_nodes if n not in taken)
        structural += _propagate(pairs, a_unmatched, b_unmatched)
        # Equal-hash groups of equal size: pair in topological order.
        groups_a = collections.defaultdict(list)
        groups_b = collections.defaultdict(list)
        for node in a_unmatched:
            groups_a[label(node)].append(node)
        for node in b_unmatched:
            groups_b[label(node)].append(node)
        for k, nodes in groups_a.items():
            if len(nodes) == len(groups_b.get(k, [])):
                for na, nb in zip(nodes, groups_b[k]):
                    pairs[na] = nb
                    del a_unmatched[na], b_unmatched[nb]
                    structural += 1
        structural += _propagate(pairs, a_unmatched, b_unmatched)
        structural += _propagate(pairs, a_unmatched, b_unmatched, across_ops=True)
    stages["structure"] = structural
    return pairs, stages


# --- comparing ----------------------------------------------------------------------------


def _source(value: ir.Value | None, pairs: dict, side: str) -> tuple:
    """Where an input comes from, comparable across the two graphs.

    ("node", id of the producer in B, output index), ("new",) for a producer with no
    counterpart, ("input", name), ("initializer",) or ("none",).
    """
    if value is None:
        return ("none",)
    producer = value.producer()
    if producer is not None:
        counterpart = pairs.get(producer) if side == "a" else producer
        matched = side == "b" and producer in pairs.values() or side == "a" and counterpart is not None
        return ("node", id(counterpart), value.index()) if matched else ("new",)
    if value.is_graph_input():
        return ("input", value.name)
    if value.is_initializer():
        return ("initializer",)
    return ("none",)


def _compare_pair(na: ir.Node, nb: ir.Node, pairs: dict) -> tuple[str | None, list[int]]:
    """(change detail or None, input slots that now come from elsewhere) for a matched pair."""
    details = []
    attrs_a = {k: _attribute_text(v) for k, v in na.attributes.items()}
    attrs_b = {k: _attribute_text(v) for k, v in nb.attributes.items()}
    for name in sorted(set(attrs_a) | set(attrs_b)):
        if attrs_a.get(name) != attrs_b.get(name):
            details.append(f"{name} {attrs_a.get(name, '∅')} → {attrs_b.get(name, '∅')}")
    for slot, (va, vb) in enumerate(zip(na.inputs, nb.inputs)):
        ta, tb = constant_tensor(va), constant_tensor(vb)
        if ta is not None and tb is not None and (tuple(ta.shape) != tuple(tb.shape) or ta.dtype != tb.dtype):
            details.append(
                f"input {slot} [{_shape_text(ta.shape)} {short_dtype(ta.dtype)}] → "
                f"[{_shape_text(tb.shape)} {short_dtype(tb.dtype)}]"
            )
    if len(na.inputs) != len(nb.inputs):
        details.append(f"{len(na.inputs)} → {len(nb.inputs)} inputs")
    rewired = []
    for slot, (va, vb) in enumerate(zip(na.inputs, nb.inputs)):
        sa, sb = _source(va, pairs, "a"), _source(vb, pairs, "b")
        # A producer replaced by a new one (removed on one side, added on the other) is
        # already shown as a replacement; anything else that moved is rewiring.
        if sa != sb and not (sa == ("new",) and sb == ("new",)):
            rewired.append(slot)
    return ("; ".join(details) or None), rewired


def _io_changes(a_values: list[ir.Value], b_values: list[ir.Value], what: str) -> list[str]:
    from slimgraph.measure.stats import describe_value

    a_map = {v.name: describe_value(v) for v in a_values if not v.is_initializer()}
    b_map = {v.name: describe_value(v) for v in b_values if not v.is_initializer()}
    changes = []
    for name in a_map:
        if name not in b_map:
            changes.append(f"{what} {name} {a_map[name]} removed")
        elif a_map[name] != b_map[name]:
            changes.append(f"{what} {name}: {a_map[name]} → {b_map[name]}")
    changes += [f"{what} {name} {b_map[name]} added" for name in b_map if name not in a_map]
    return changes


def _same_bytes(a: ir.TensorProtocol, b: ir.TensorProtocol) -> bool:
    """Byte for byte (a memcmp of the two buffers: faster than hashing both); weights bound to the
    same bytes of the same file (two loads of one folder) are equal without reading them."""
    source = a.meta.get(WEIGHT_SOURCE_KEY) if isinstance(a, ir.LazyTensor) else None
    if source is not None and isinstance(b, ir.LazyTensor) and b.meta.get(WEIGHT_SOURCE_KEY) == source:
        return True
    return a is b or a.tobytes() == b.tobytes()


def _tensor_text(tensor: ir.TensorProtocol) -> str:
    return f"{short_dtype(tensor.dtype)}[{_shape_text(tensor.shape)}]"


def _consumer_module(value: ir.Value, counterpart: dict[ir.Node, ir.Node] | None = None) -> str:
    """The module of the first node that reads `value` (of its matched node in A, for B)."""
    for node, _ in value.uses():
        return group_of((counterpart or {}).get(node, node))
    return value.name or "(root)"


def _weight_changes(a: ir.Model, b: ir.Model, pairs: dict, values: bool) -> tuple[list[WeightChange], int]:
    """Initializers that differ, and how many pairs were compared (see the module docstring)."""
    a_inits, b_inits = a.graph.initializers, b.graph.initializers
    matched: dict[str, ir.Value] = {name: b_inits[name] for name in a_inits if name in b_inits}
    for na, nb in pairs.items():
        if op_key(na) != op_key(nb):  # a replaced op: its input slots mean other things
            continue
        for va, vb in zip(na.inputs, nb.inputs):
            if va is not None and vb is not None and va.is_initializer() and vb.is_initializer():
                if va.name not in matched and vb not in matched.values():
                    matched[va.name] = vb
    changes = []
    compared = 0
    for name, vb in matched.items():
        ta, tb = a_inits[name].const_value, vb.const_value
        if ta is None or tb is None:
            continue
        compared += 1
        if tuple(ta.shape) != tuple(tb.shape) or ta.dtype != tb.dtype:
            changes.append(WeightChange(name, tuple(ta.shape), "replaced",
                                        detail=f"{_tensor_text(ta)} → {_tensor_text(tb)}"))
            continue
        if _same_bytes(ta, tb):
            continue
        rel_l2 = None
        if values:
            xa, xb = ta.numpy(), tb.numpy()
            if xa.dtype.kind in "fiub" and xb.dtype.kind in "fiub":
                xa64, xb64 = xa.astype(np.float64), xb.astype(np.float64)
                norm = float(np.linalg.norm(xa64))
                delta = float(np.linalg.norm(xb64 - xa64))
                rel_l2 = delta / norm if norm else float("inf")
        changes.append(WeightChange(name, tuple(ta.shape), "changed", rel_l2))
    # Unpaired initializers, grouped by the module that reads them: both sides → replaced.
    paired_b = {id(v) for v in matched.values()}
    gone: dict[str, list[ir.Value]] = collections.defaultdict(list)
    new: dict[str, list[ir.Value]] = collections.defaultdict(list)
    for name, value in a_inits.items():
        if name not in matched and value.const_value is not None:
            gone[_consumer_module(value)].append(value)
    b_to_a = {nb: na for na, nb in pairs.items()}
    for value in b_inits.values():
        if id(value) not in paired_b and value.const_value is not None:
            new[_consumer_module(value, b_to_a)].append(value)
    # Without module paths, a tensor derived from another is named after it (`fc1.weight.q8`).
    loose = [v for module, values in new.items() if module not in gone for v in values]
    for module, values in list(gone.items()):
        if module in new:
            continue
        derived = [v for v in loose if any((v.name or "").startswith(f"{old.name}.") for old in values)]
        if derived:
            new[module] = derived
            for value in derived:
                loose.remove(value)
                origin = _consumer_module(value, b_to_a)
                new[origin].remove(value)
    for module in dict.fromkeys([*gone, *new]):
        before, after = gone.get(module, []), new.get(module, [])
        if before and after:
            text = " + ".join(_tensor_text(v.const_value) for v in before)
            text += " → " + " + ".join(_tensor_text(v.const_value) for v in after)
            changes.append(WeightChange(" + ".join(v.name for v in before), tuple(before[0].const_value.shape),
                                        "replaced", detail=text))
        for value in before if not after else []:
            changes.append(WeightChange(value.name, tuple(value.const_value.shape), "removed",
                                        detail=_tensor_text(value.const_value)))
        for value in after if not before else []:
            changes.append(WeightChange(value.name, tuple(value.const_value.shape), "added",
                                        detail=_tensor_text(value.const_value)))
    order = {"changed": 0, "replaced": 1, "removed": 2, "added": 3}
    changes.sort(key=lambda w: (order[w.kind], -(w.rel_l2 or 0.0)))
    return changes, compared


def _summarize(descriptions: list[str]) -> str:
    counts = collections.Counter(descriptions)
    return " + ".join(f"{d} ×{c}" if c > 1 else d for d, c in counts.items())


def module_changes(removed: list[tuple[str, str]], added: list[tuple[str, str]]) -> list[Change]:
    """Removed and added nodes, given as (module, description), as changes per module:
    a module that lost some nodes and gained others shows one replacement."""
    gone: dict[str, list[str]] = collections.defaultdict(list)
    new: dict[str, list[str]] = collections.defaultdict(list)
    for module, description in removed:
        gone[module].append(description)
    for module, description in added:
        new[module].append(description)
    changes = []
    for module in dict.fromkeys([*gone, *new]):
        if gone.get(module) and new.get(module):
            changes.append(Change(module, "replaced", before=_summarize(gone[module]), after=_summarize(new[module])))
        elif gone.get(module):
            changes.append(Change(module, "removed", before=_summarize(gone[module])))
        else:
            changes.append(Change(module, "added", after=_summarize(new[module])))
    return changes


def diff_models(a: ir.Model, b: ir.Model, *, weights: bool = False, a_name: str = "A", b_name: str = "B") -> DiffResult:
    """What changed from `a` to `b` (see the module docstring); `weights`: also the relative
    L2 change of every initializer whose bytes differ."""
    pairs, stages = match_nodes(a, b)
    changes: list[Change] = []
    rewired: list[Change] = []
    matched_b = set(pairs.values())
    for na in a.graph:  # graph order: the same result on every run
        if na not in pairs:
            continue
        nb = pairs[na]
        detail, slots = _compare_pair(na, nb, pairs)
        if op_key(na) != op_key(nb):
            changes.append(Change(group_of(nb), "replaced", before=describe(na), after=describe(nb)))
        elif detail:
            changes.append(Change(group_of(nb), "changed", before=describe(na), after=describe(nb), detail=detail))
        if slots:
            detail = f"input {', '.join(map(str, slots))} comes from elsewhere"
            rewired.append(Change(group_of(nb), "changed", before=describe(nb), after=describe(nb), detail=detail))
    changes += module_changes(
        [(group_of(n), describe(n)) for n in a.graph if n not in pairs],
        [(group_of(n), describe(n)) for n in b.graph if n not in matched_b],
    )
    weight_changes, compared = _weight_changes(a, b, pairs, values=weights)
    return DiffResult(
        a_name=a_name,
        b_name=b_name,
        a_stats=model_stats(a),
        b_stats=model_stats(b),
        changes=changes,
        rewired=rewired,
        inputs=_io_changes(list(a.graph.inputs), list(b.graph.inputs), "input"),
        outputs=_io_changes(list(a.graph.outputs), list(b.graph.outputs), "output"),
        weights=weight_changes,
        matched=stages | {"a_nodes": len(a.graph), "b_nodes": len(b.graph)},
        weights_compared=compared,
        values_compared=weights,
    )


# --- folding repeated changes -------------------------------------------------------------

# A block index (`layer.3.x`) or an exporter's numbering (`/Constant_17`, `conv2d_4/BiasAdd`).
_INDEX = re.compile(r"(?<=[._/])\d+(?=[._/]|$)")


def _ranges(values: list[int]) -> str:
    values = sorted(set(values))
    if len(values) > 1 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}–{values[-1]}"
    return "{" + ",".join(map(str, values)) + "}"


def fold(changes: list[Change]) -> list[Change]:
    """Fold changes that differ only in numbers: `layer.0.x`…`layer.5.x` → `layer.0–5.x` ×6,
    `/Constant_1`…`/Constant_19` → `/Constant_1–19` ×19."""
    groups: dict[tuple, list[tuple[list[int], Change]]] = {}
    for change in changes:
        indices = [int(m) for m in _INDEX.findall(change.module)]
        template = _INDEX.sub("#", change.module)
        key = (template, change.kind, change.before, change.after, change.detail)
        groups.setdefault(key, []).append((indices, change))
    folded = []
    for (template, kind, before, after, detail), members in groups.items():
        if len(members) == 1:
            folded.append(members[0][1])
            continue
        columns = list(zip(*(indices for indices, _ in members)))
        parts = iter(_ranges(list(col)) if len(set(col)) > 1 else str(col[0]) for col in columns)
        module = re.sub("#", lambda _: next(parts), template)
        count = sum(c.count for _, c in members)
        folded.append(Change(module, kind, before, after, detail, count))
    return folded
