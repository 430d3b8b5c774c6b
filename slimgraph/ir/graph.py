"""Graph queries over onnx_ir: constants behind values, linear weights, module paths, shapes,
one breadth-first walk that every structure finder and dependency group uses, and `cone`: everything
computed from a value (or that it is computed from).

`walk` goes up through producers or down through consumers, continuing only through the
nodes a predicate lets through, and stops after `limit` values so that a pattern search
never wanders over a whole model. It says whether it stopped early (`Walk.truncated`).
"""

from __future__ import annotations

import ast
import collections
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import onnx_ir as ir

from slimgraph.ir.meta import NAME_SCOPES_KEY

MAX_WALK = 64  # values a pattern walk may visit before it gives up
SHAPE_ONLY_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
# Ops an FFN's activation may be built from (decomposed GELU/SiLU/… included).
ELEMENTWISE_OPS = {
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Neg", "Erf", "Tanh", "Sigmoid", "Gelu", "Relu",
    "LeakyRelu", "Elu", "Selu", "Softplus", "Softsign", "HardSigmoid", "HardSwish", "Mish",
    "Exp", "Clip", "Cast", "FastGelu", "BiasGelu", "QuickGelu", "Swish",
}
# Ops allowed between a projection and the attention scores (bias, RoPE, head split, GQA repeat).
ATTENTION_PATH_OPS = ELEMENTWISE_OPS | SHAPE_ONLY_OPS | {"Transpose", "Split", "Slice", "Concat", "Expand", "Identity", "Gather"}
# Ops whose later inputs are shapes, axes or indices, not data flowing through.
_FIRST_INPUT_ONLY = SHAPE_ONLY_OPS | {"Expand", "Slice", "Split", "Gather", "Transpose"}


def forget_removed_values(graph: ir.Graph) -> None:
    """Let go of the values removed from the graph's inputs and outputs.

    onnx_ir 1.1's input and output containers count the values put in them (`_ref_counter`) and keep
    a value whose count falls to 0 as a key. torch's exporter lifts every parameter to an input before
    making it an initializer, so each exported weight a pass replaces, with its tensor, would live as
    long as the graph. Private, so looked up defensively: an onnx_ir without the counter needs nothing.
    """
    for container in (graph.inputs, graph.outputs):
        counter = getattr(container, "_ref_counter", None)
        if isinstance(counter, collections.Counter):
            for value in [value for value, count in counter.items() if count <= 0]:
                del counter[value]


def is_default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The constant behind a value: an initializer, or the output of a Constant node."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and is_default_domain(producer):
        attr = producer.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            return attr.as_tensor()
    return None


def expert_weights(node: ir.Node) -> tuple[list[ir.Value], int]:
    """A com.microsoft.MoE's or QMoE's expert weights (fc1, fc2, and fc3 where present), each
    [experts, out, in], and how many `in` values one stored element holds: a QMoE packs `8 / bits`
    to a byte (its inputs also carry scales, so the weights sit at other slots), a MoE 1."""
    quantized = node.op_type == "QMoE"
    slots = (2, 5, 8) if quantized else (2, 4, 6)
    values = [node.inputs[i] for i in slots if i < len(node.inputs) and node.inputs[i] is not None]
    return values, 8 // node.attributes.get_int("expert_weight_bits", 4) if quantized else 1


def filled_constant(value: ir.Value | None) -> tuple[tuple[int, ...], np.ndarray] | None:
    """(shape, fill value) of a ConstantOfShape output with a constant shape — how the onnx
    model zoo's 'light' models store their weights — else None."""
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "ConstantOfShape" or not is_default_domain(producer):
        return None
    shape = constant_tensor(producer.inputs[0])
    if shape is None:
        return None
    attr = producer.attributes.get("value")
    fill = attr.as_tensor().numpy().reshape(-1)[:1] if attr is not None else np.zeros(1, np.float32)
    return tuple(int(d) for d in shape.numpy().reshape(-1)), fill


def weight_tensor(value: ir.Value | None) -> tuple[ir.TensorProtocol, str, bool] | None:
    """A 2-D linear weight: (tensor, name, transposed). `transposed` marks a tied weight read
    through Transpose (e.g. an LM head sharing the embedding table)."""
    tensor = constant_tensor(value)
    if tensor is not None:
        return tensor, value.name or "", False
    source = transposed_source(value)
    if source is not None:
        return constant_tensor(source), source.name or "", True
    return None


def transposed_source(value: ir.Value | None) -> ir.Value | None:
    """The 2-D constant that `value` is the Transpose of, if it is one."""
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "Transpose" or not is_default_domain(producer):
        return None
    source = constant_tensor(producer.inputs[0])
    perm = producer.attributes.get_ints("perm", [1, 0])
    if source is not None and len(source.shape) == 2 and list(perm) == [1, 0]:
        return producer.inputs[0]
    return None


def data_inputs(node: ir.Node) -> list[ir.Value]:
    """The inputs that carry data (not shapes, axes or constants) through a node."""
    if node.op_type in _FIRST_INPUT_ONLY:
        first = node.inputs[0] if node.inputs else None
        return [first] if first is not None and constant_tensor(first) is None else []
    return [v for v in node.inputs if v is not None and constant_tensor(v) is None]


def module_path(node: ir.Node) -> str | None:
    """The innermost PyTorch module a node came from ('' for the root), if recorded."""
    raw = node.metadata_props.get(NAME_SCOPES_KEY)
    if not raw:
        return None
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return None
    return scopes[-2] if isinstance(scopes, list) and len(scopes) >= 2 else None


def ensure_shapes(model: ir.Model) -> None:
    """Run ONNX shape inference when some intermediate values have no shape.

    Attention heads are read from shapes, and a plain `.onnx` file often has none. This
    only adds shape information; the graph is otherwise unchanged.
    """
    values = [v for node in ir.traversal.RecursiveGraphIterator(model.graph) for v in node.outputs]  # subgraphs too
    if values and any(v.shape is None for v in values):
        import onnx_ir.passes.common as common

        common.ShapeInferencePass(strict_mode=False)(model)


def static_dim(value: ir.Value | None, axis: int) -> int | None:
    """The length of `value` along `axis` when the graph knows it."""
    if value is None or value.shape is None or not -len(value.shape) <= axis < len(value.shape):
        return None
    dim = value.shape[axis]
    return dim if isinstance(dim, int) else None


class Walk:
    """Breadth-first from `start`, up (producers) or down (consumers).

    Iterating yields `(value, node)` pairs: going up, each value reached with its producer
    (None for a graph input; constants are skipped); going down, each consumer with the
    value it reads. The walk continues through a node only when `through(node)` is true
    (up: into its data inputs; down: into its outputs). After `limit` values it stops and
    sets `truncated`.
    """

    def __init__(self, start: ir.Value | Iterable[ir.Value], *, up: bool,
                 through: Callable[[ir.Node], bool], limit: int = MAX_WALK) -> None:
        self.start = [start] if isinstance(start, ir.Value) else list(start)
        self.up = up
        self.through = through
        self.limit = limit
        self.truncated = False

    def __iter__(self) -> Iterator[tuple[ir.Value, ir.Node | None]]:
        queue = collections.deque(self.start)
        seen: set[ir.Value] = set()
        while queue:
            value = queue.popleft()
            if value in seen:
                continue
            if len(seen) >= self.limit:
                self.truncated = True
                return
            seen.add(value)
            if self.up:
                if constant_tensor(value) is not None:
                    continue
                node = value.producer()
                yield value, node
                if node is not None and self.through(node):
                    queue.extend(data_inputs(node))
            else:
                for node, _ in value.uses():
                    yield value, node
                    if self.through(node):
                        queue.extend(node.outputs)


def cone(start: ir.Value | Iterable[ir.Value], *, up: bool = False,
         stop: Callable[[ir.Node], bool] | None = None) -> list[ir.Value]:
    """Every value computed from `start` (or, with `up`, every value `start` is computed from, graph
    inputs and constants included), `start` itself left out, in the order found. Unlike `Walk`, it
    has no limit and goes through every input and output (shapes and constants too); it does not go
    through a `stop` node (down: its outputs are not reached; up: its inputs are not)."""
    starts = [start] if isinstance(start, ir.Value) else list(start)
    seen, found, stack = set(starts), [], list(starts)
    while stack:
        value = stack.pop()
        if up:
            nodes = [value.producer()] if value.producer() is not None else []
        else:
            nodes = [node for node, _ in value.uses()]
        for node in nodes:
            if stop is not None and stop(node):
                continue
            for reached in node.inputs if up else node.outputs:
                if reached is not None and reached not in seen:
                    seen.add(reached)
                    found.append(reached)
                    stack.append(reached)
    return found


def ops(names: Iterable[str]) -> Callable[[ir.Node], bool]:
    """A `through` predicate: nodes whose op type is one of `names`."""
    allowed = frozenset(names)
    return lambda node: node.op_type in allowed


def find_upstream(value: ir.Value, is_target: Callable[[ir.Node], bool], through: Callable[[ir.Node], bool]
                  ) -> ir.Node | None:
    """The nearest producer upstream of `value` for which `is_target`, passing only `through` nodes."""
    for _, node in Walk(value, up=True, through=lambda n: not is_target(n) and through(n)):
        if node is not None and is_target(node):
            return node
    return None


def find_downstream(value: ir.Value, is_target: Callable[[ir.Node], bool], through: Callable[[ir.Node], bool]
                    ) -> tuple[ir.Node, ir.Value] | None:
    """The nearest consumer downstream of `value` for which `is_target`, with the value it reads."""
    for read, node in Walk(value, up=False, through=lambda n: not is_target(n) and through(n)):
        if is_target(node):
            return node, read
    return None
