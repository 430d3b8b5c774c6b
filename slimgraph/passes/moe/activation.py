"""An FFN's activation as a piece of graph: found between the up/gate outputs and the down
projection's input, named by what it computes, and copied for any subset of neurons.

- region: the nodes from the up (and gate) outputs to the down projection's input. Elementwise
  ops whose constant operands are scalars or hold one value per neuron, and reshapes that keep
  the neuron axis last (GPT-2's Gemm works on [tokens, inner] rows and reshapes around its GELU);
- kind: what the region computes, found by running it with ONNX Runtime on a grid of inputs and
  comparing with what `com.microsoft.MoE` implements (relu, gelu with the tanh approximation,
  silu, identity, SiLU-gated "swiglu"). Op names do not say it: `Gelu` may be exact or tanh,
  exporters spell SiLU as Sigmoid·x, Swish or HardSwish, and GELU as Erf or Tanh formulas;
- copy: the region's nodes for given neurons on [tokens, neurons] rows — reshapes dropped,
  per-neuron constants sliced, scalars made rank 0 so that nothing broadcasts to a new axis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir import edit
from slimgraph.ir.graph import ELEMENTWISE_OPS, SHAPE_ONLY_OPS, Walk, constant_tensor, static_dim
from slimgraph.ir.parts import FFN
from slimgraph.measure import evaluate

PASS_THROUGH = SHAPE_ONLY_OPS | {"Identity"}
# What com.microsoft.MoE computes (ORT 1.32's CPU kernel, checked by running it); "gelu" is the
# tanh approximation, "swiglu" is silu(gate) · up.
ORT_KINDS = ("relu", "gelu", "silu", "identity", "swiglu")
PROBE_ROWS = 161
PROBE_TOLERANCE = 1e-5  # relative to the largest output; erf vs tanh GELU differ by ~3e-4


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _gelu_erf(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


PLAIN = {"relu": lambda u: np.maximum(u, 0), "gelu": _gelu_tanh, "silu": _silu, "identity": lambda u: u,
         "gelu (erf)": _gelu_erf}
GATED = {"swiglu": lambda g, u: _silu(g) * u, "gelu-gated (erf)": lambda g, u: _gelu_erf(g) * u,
         "gelu-gated (tanh)": lambda g, u: _gelu_tanh(g) * u}


@dataclass(frozen=True)
class Activation:
    """The nodes computing `output` (the down projection's input) from `up` (and `gate`)."""

    ffn: FFN
    nodes: tuple[ir.Node, ...]  # in graph order
    up: ir.Value
    gate: ir.Value | None
    output: ir.Value

    @property
    def inner(self) -> int:
        return self.ffn.inner


def find_activation(model: ir.Model, ffn: FFN) -> Activation:
    """The FFN's activation region, or a SlimgraphError saying why it cannot be copied per neuron."""
    up, gate = ffn.up.output, ffn.gate.output if ffn.gate else None
    entries = {up} | ({gate} if gate is not None else set())
    output = ffn.down.node.inputs[0]
    region: list[ir.Node] = []
    walk = Walk(output, up=True, through=lambda n: not any(o in entries for o in n.outputs))
    for value, node in walk:
        if value in entries:
            continue
        if node is None:
            raise SlimgraphError(f"{ffn.name}: its activation reads the graph input {value.name!r}")
        if node not in region:
            region.append(node)
    if walk.truncated:
        raise SlimgraphError(f"{ffn.name}: its activation is too large to follow")
    for node in region:
        _check_node(ffn, node, region, entries)
    order = {node: i for i, node in enumerate(model.graph)}
    return Activation(ffn, tuple(sorted(region, key=order.__getitem__)), up, gate, output)


def _check_node(ffn: FFN, node: ir.Node, region: list[ir.Node], entries: set[ir.Value]) -> None:
    what = f"{ffn.name}: its activation has {node.op_type} {node.name!r}"
    if len(node.outputs) != 1:
        raise SlimgraphError(f"{what} with {len(node.outputs)} outputs")
    if node.op_type in PASS_THROUGH:
        if static_dim(node.inputs[0], -1) != ffn.inner or static_dim(node.outputs[0], -1) != ffn.inner:
            raise SlimgraphError(f"{what}, which does not keep the {ffn.inner} neurons as the last axis")
        return
    if node.op_type not in ELEMENTWISE_OPS:
        raise SlimgraphError(f"{what}, which is not elementwise")
    produced = {n.outputs[0] for n in region} | entries
    for value in node.inputs:
        if value is None or value in produced:
            continue
        tensor = constant_tensor(value)
        if tensor is None:
            raise SlimgraphError(f"{what}, which reads {value.name!r} from outside the FFN")
        shape = tuple(tensor.shape)
        if tensor.size != 1 and (not shape or shape[-1] != ffn.inner or any(d != 1 for d in shape[:-1])):
            raise SlimgraphError(f"{what} with a constant of shape {list(shape)} (neither a scalar nor one per neuron)")


def copy_activation(activation: Activation, neurons: np.ndarray, up: ir.Value, gate: ir.Value | None,
                    constant: Callable[[ir.Value, np.ndarray], ir.Value]) -> tuple[list[ir.Node], ir.Value]:
    """The activation's nodes for `neurons`, reading rows [tokens, len(neurons)] `up` (and `gate`).

    `constant(source, array)` makes a constant in the target graph: a scalar (rank 0) or the
    source's values for `neurons`; it may return a value it made before for the same source."""
    mapped: dict[ir.Value, ir.Value] = {activation.up: up}
    if activation.gate is not None:
        mapped[activation.gate] = gate
    nodes = []
    for node in activation.nodes:
        if node.op_type in PASS_THROUGH:
            mapped[node.outputs[0]] = mapped[node.inputs[0]]
            continue
        inputs = []
        for value in node.inputs:
            if value is None or value in mapped:
                inputs.append(mapped.get(value) if value is not None else None)
                continue
            array = edit.constant_array(value)
            inputs.append(constant(value, array.reshape(()) if array.size == 1 else array.reshape(-1)[neurons]))
        attributes = [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()]
        new = ir.Node(node.domain, node.op_type, inputs, attributes, version=node.version)
        nodes.append(new)
        mapped[node.outputs[0]] = new.outputs[0]
    return nodes, mapped[activation.output]


def kind(model: ir.Model, activation: Activation) -> str:
    """What the activation computes: one of ORT_KINDS, or a description of another function
    ('gelu (erf)', or 'other') — found by running it on a grid of inputs."""
    rows = np.linspace(-8, 8, PROBE_ROWS)[:, None] * np.ones((1, activation.inner))
    other = np.tile(np.linspace(-3, 3, activation.inner), (PROBE_ROWS, 1))
    gated = activation.gate is not None
    feeds = {"up": (other if gated else rows).astype(np.float32)}
    if gated:
        feeds["gate"] = rows.astype(np.float32)
    got = _run(model, activation, feeds).astype(np.float64)
    u, g = feeds["up"].astype(np.float64), feeds.get("gate")
    candidates = {name: f(g.astype(np.float64), u) for name, f in GATED.items()} if gated else \
        {name: f(u) for name, f in PLAIN.items()}
    for name, expected in candidates.items():
        if np.abs(got - expected).max() <= PROBE_TOLERANCE * max(1.0, np.abs(expected).max()):
            return name
    return "other"


def _run(model: ir.Model, activation: Activation, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The activation alone, as a small model run by ONNX Runtime."""
    inputs = {name: ir.Value(name=name, shape=ir.Shape([PROBE_ROWS, activation.inner]),
                             type=ir.TensorType(ir.DataType.FLOAT)) for name in feeds}
    initializers: list[ir.Value] = []

    def constant(source: ir.Value, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=f"c{len(initializers)}", const_value=ir.tensor(array, name=f"c{len(initializers)}"))
        initializers.append(value)
        return value

    nodes, output = copy_activation(activation, np.arange(activation.inner), inputs["up"], inputs.get("gate"),
                                    constant)
    if not nodes:  # the identity
        return feeds["up"]
    output.name = "h"
    graph = ir.Graph(list(inputs.values()), [output], nodes=nodes, initializers=initializers,
                     opset_imports=dict(model.opset_imports))
    return evaluate.run(ir.Model(graph, ir_version=model.ir_version), feeds)["h"]
