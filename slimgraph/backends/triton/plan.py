"""What the Triton backend runs as generated kernels, and what it leaves to the PyTorch lowering.

- `com.microsoft.MatMulNBits`, `GatherBlockQuantized` and `MoE` get a kernel each when their
  attributes are ones the templates take; otherwise they stay on the PyTorch lowering, and the
  report says why (`Plan.left`).
- Fusion groups (fusion.py) of two nodes or more, or with a norm, become one row kernel.
- A group with no reduction that reads a MatMulNBits output (and is that output's only reader)
  becomes the matmul kernel's epilogue instead: bias + activation, residual adds, SiLU(gate) · up.
- Everything else: the PyTorch lowering.

Kernels are named after the module path of the node they serve (`model.layers.3.mlp.down_proj` →
`model_layers_3_mlp_down_proj_int4`). Calls with the same kernel (same template, attributes and
shapes) and module paths that differ only in layer numbers share one kernel, named with `N` for
the number (`model_layers_N_mlp_down_proj_int4`): each distinct `@triton.jit` function compiles on
its own, so thirty identical layers would otherwise cost thirty compilations.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import onnx_ir as ir

from slimgraph.backends.triton import fusion
from slimgraph.backends.triton.expressions import (
    FLOATS,
    ROW,
    SCALAR,
    VECTOR,
    Loads,
    Unsupported,
    compile_group,
    kind_of,
)
from slimgraph.backends.triton.templates.gather import GatherBlockQuantized
from slimgraph.backends.triton.templates.matmul_nbits import TERNARY, Epilogue, MatMulNBits
from slimgraph.backends.triton.templates.moe import ACTIVATIONS, MixtureOfExperts
from slimgraph.backends.triton.templates.rowwise import RowKernel
from slimgraph.ir.edit import unique_name
from slimgraph.ir.graph import constant_tensor, module_path

MS = "com.microsoft"
MAX_ROW = 16384  # longest row a row kernel holds in registers
# Names the matmul templates use for their own values: an epilogue input may not take them.
MATMUL_NAMES = frozenset({"x", "b", "scales", "zero_points", "bias", "y", "lut", "acc", "n", "m", "k", "q", "j", "g", "row",
                "scale", "dot", "packed", "zero_point", "blocks", "first", "shift", "a", "w", "byte", "groups", "sums"})
ROW_LOADS = Loads(row_offsets="row * D + cols", mask="inside", vector_offsets="cols", vector_mask="inside")
GEMV_LOADS = Loads(row_offsets="row * N + n", mask="n_ok", vector_offsets="n", vector_mask="n_ok")
GEMM_LOADS = Loads(row_offsets="m[:, None] * N + n[None, :]", mask="m_ok[:, None] & n_ok[None, :]",
                   vector_offsets="n", vector_mask="n_ok", vector_broadcast="[None, :]")
TORCH_DTYPES = {ir.DataType.FLOAT: "torch.float32", ir.DataType.FLOAT16: "torch.float16",
                ir.DataType.BFLOAT16: "torch.bfloat16"}


class Spec(Protocol):
    """A kernel template with its parameters: equal specs share one launcher."""

    suffix: str

    def describe(self) -> str: ...

    def parameters(self) -> list[str]: ...

    def render(self, name: str) -> str: ...


@dataclass
class KernelCall:
    """Nodes lowered together by one launcher call, made where the last of them stands."""

    nodes: list[ir.Node]
    inputs: list[ir.Value]  # the launcher's arguments, in order
    outputs: list[ir.Value]  # what it returns (a tuple when several)
    spec: Spec
    path: str  # what the kernel is named after
    launcher: str = ""


@dataclass
class Plan:
    calls: list[KernelCall] = field(default_factory=list)
    left: list[tuple[ir.Node, str]] = field(default_factory=list)  # kernel ops kept on PyTorch, and why
    sources: dict[str, str] = field(default_factory=dict)  # launcher name → its code (kernels first)
    descriptions: dict[str, str] = field(default_factory=dict)  # launcher name → what it computes

    def report(self, graph: ir.Graph) -> LoweringReport:
        in_kernels = {n for call in self.calls for n in call.nodes}
        return LoweringReport(
            kernels={name: (self.descriptions[name], sum(c.launcher == name for c in self.calls))
                     for name in self.sources},
            triton=collections.Counter(_op(n) for n in graph if n in in_kernels),
            pytorch=collections.Counter(_op(n) for n in graph if n not in in_kernels),
            left=[(_op(n), n.name or "(unnamed)", why) for n, why in self.left])


@dataclass
class LoweringReport:
    """Which ops run as Triton kernels and which on the PyTorch lowering (and why, for kernel ops)."""

    kernels: dict[str, tuple[str, int]]  # launcher → (what it computes, how many calls)
    triton: collections.Counter  # op → nodes inside kernels
    pytorch: collections.Counter  # op → nodes on the PyTorch lowering
    left: list[tuple[str, str, str]]  # (op, node, why) for kernel ops kept on PyTorch

    def summary(self) -> list[str]:
        """Where the nodes run: two lines."""
        def ops(counter: collections.Counter) -> str:
            return ", ".join(f"{op} {count}" for op, count in counter.most_common()) or "none"

        return [f"Triton kernels: {len(self.kernels)} launchers, {sum(c for _, c in self.kernels.values())} calls, "
                f"{sum(self.triton.values())} nodes ({ops(self.triton)})",
                f"PyTorch lowering: {sum(self.pytorch.values())} nodes ({ops(self.pytorch)})"]

    def lines(self) -> list[str]:
        """The summary, then each kernel op left to PyTorch and why (model.py's header)."""
        return self.summary() + [f"left to PyTorch: {op} {node}: {why}" for op, node, why in self.left]

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def to_json(self) -> dict:
        return {"kernels": {name: {"computes": what, "calls": calls} for name, (what, calls) in self.kernels.items()},
                "triton_nodes": dict(self.triton), "pytorch_nodes": dict(self.pytorch),
                "left_to_pytorch": [{"op": op, "node": node, "why": why} for op, node, why in self.left]}


def _op(node: ir.Node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def plan(model: ir.Model, ternary: str = "mixpe", fuse: bool = True) -> Plan:
    """Decide each node's lowering (see the module docstring). The model must have shapes."""
    if ternary not in TERNARY:
        raise ValueError(f"ternary={ternary!r}; expected one of {', '.join(TERNARY)}")
    graph = model.graph
    result = Plan()
    by_output: dict[ir.Value, KernelCall] = {}
    for node in graph:
        if node.domain != MS or node.op_type not in KERNEL_OPS:
            continue
        spec = KERNEL_OPS[node.op_type](node, ternary)
        if isinstance(spec, str):
            result.left.append((node, spec))
            continue
        inputs = [v for v in node.inputs if v is not None]
        call = KernelCall([node], inputs, [node.outputs[0]], spec, _path(node))
        result.calls.append(call)
        by_output[node.outputs[0]] = call
    if fuse:
        taken = {n for call in result.calls for n in call.nodes}
        outputs = set(graph.outputs)
        for group in fusion.find_fusion_groups(graph, exclude=taken):
            if group.reduces:
                _row_kernel(group, outputs, result)
            elif not _into_epilogue(group, by_output, outputs) and len(group.nodes) >= 2:
                _row_kernel(group, outputs, result)  # (a lone elementwise op gains nothing as a kernel)
    position = {node: i for i, node in enumerate(graph)}
    result.calls.sort(key=lambda call: position[call.nodes[-1]])
    _name(result)
    return result


# --- kernel ops ---------------------------------------------------------------------------------


def fill_kernel_shapes(model: ir.Model) -> None:
    """Shapes and dtypes of the kernel ops' outputs where the graph lacks them (ONNX's shape inference
    does not know com.microsoft ops, so what follows them has none either): fusion needs them."""
    for node in model.graph:
        output = node.outputs[0] if node.domain == MS and node.outputs else None
        if output is None or output.shape is not None or node.inputs[0] is None:
            continue
        first = node.inputs[0]
        if node.op_type == "MatMulNBits" and first.shape is not None:
            output.shape, output.dtype = ir.Shape([*first.shape[:-1], _attr(node, "N")]), first.dtype
        elif node.op_type == "MoE" and first.shape is not None:
            output.shape, output.dtype = first.shape, first.dtype
        elif node.op_type == "GatherBlockQuantized" and node.inputs[1].shape is not None and node.inputs[0].shape:
            table = node.inputs[0].shape
            output.shape = ir.Shape([*node.inputs[1].shape, table[-1]]) if len(table) == 2 else None
            output.dtype = node.inputs[2].dtype


def _attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _input(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if len(node.inputs) > i else None


def _matmul_nbits(node: ir.Node, ternary: str) -> MatMulNBits | str:
    k, n, bits, block = _attr(node, "K"), _attr(node, "N"), _attr(node, "bits", 4), _attr(node, "block_size")
    a, b, zero_points = node.inputs[0], node.inputs[1], _input(node, 3)
    if bits not in (2, 4, 8):
        return f"{bits}-bit weights (the kernels take 2, 4 and 8 bits)"
    if not isinstance(block, int) or block < 16 or block & (block - 1):
        return f"block_size {block} (the kernels take powers of two from 16)"
    if _input(node, 4) is not None:
        return "a g_idx input (act-order blocks)"
    if a.dtype not in FLOATS or b.dtype != ir.DataType.UINT8:
        return f"A of {a.dtype} and B of {b.dtype} (the kernels take float A and uint8 B)"
    if zero_points is None:
        mode = "default"
    elif zero_points.dtype == ir.DataType.UINT8:
        mode = "packed"
    elif zero_points.dtype == _input(node, 2).dtype:
        mode = "float"
    else:
        return f"zero points of {zero_points.dtype}"
    spec = MatMulNBits(k, n, bits, block, mode, _input(node, 5) is not None)
    if bits == 2 and mode == "packed" and _ternary_codes(spec, b, zero_points):
        spec = replace(spec, ternary=ternary)
    return spec


def _ternary_codes(spec: MatMulNBits, b: ir.Value, zero_points: ir.Value) -> bool:
    """2-bit codes in {0, 1, 2} with zero point 1 everywhere: ternary weights {−1, 0, +1} · scale."""
    from slimgraph.ir.nbits import unpack

    codes, zps = constant_tensor(b), constant_tensor(zero_points)
    if codes is None or zps is None:
        return False
    unpacked_zps = unpack(zps.numpy().reshape(spec.n, -1), 2)[:, :spec.blocks]
    return bool(np.all(unpacked_zps == 1)) and not bool(np.any(unpack(codes.numpy().reshape(-1), 2) == 3))


def _gather_block_quantized(node: ir.Node, ternary: str) -> GatherBlockQuantized | str:
    data, scales, zero_points = node.inputs[0], node.inputs[2], _input(node, 3)
    bits, block = _attr(node, "bits", 4), _attr(node, "block_size", 128)
    shape = data.shape
    if shape is None or len(shape) != 2 or not all(isinstance(d, int) for d in shape):
        return "data that is not a 2-D table of known size"
    rows, dim = shape
    if _attr(node, "gather_axis", 0) != 0 or _attr(node, "quantize_axis", 1) not in (1, -1):
        return "a gather axis other than 0 or blocks along other than the last axis"
    if scales.dtype not in FLOATS:
        return f"scales of {scales.dtype}"
    packed4 = (ir.DataType.UINT4, ir.DataType.INT4)
    blocks = -(-dim // block)
    if bits == 4 and (data.dtype not in packed4 or dim % 2 or (zero_points is not None and (
            zero_points.dtype not in packed4 or blocks % 2))):
        return "4-bit data or zero points not packed as (u)int4 two a byte along whole rows"
    if bits == 8 and (data.dtype != ir.DataType.UINT8 or (zero_points is not None
                                                          and zero_points.dtype != ir.DataType.UINT8)):
        return "8-bit data or zero points that are not uint8"
    if bits not in (4, 8):
        return f"{bits}-bit codes"
    return GatherBlockQuantized(rows, dim, bits, block, data.dtype == ir.DataType.INT4, zero_points is not None)


def _mixture_of_experts(node: ir.Node, ternary: str) -> MixtureOfExperts | str:
    activation = _attr(node, "activation_type", "relu")
    x, fc1, fc2 = node.inputs[0], node.inputs[2], _input(node, 4)
    if _input(node, 6) is not None or _attr(node, "use_sparse_mixer", 0):
        return "fc3 weights or use_sparse_mixer"
    if activation not in ACTIVATIONS or (activation == "swiglu" and _attr(node, "swiglu_fusion", 0) != 1):
        return f"activation {activation!r} (the kernels take {', '.join(ACTIVATIONS)}; SwiGLU interleaved)"
    shapes = [v.shape for v in (fc1, fc2)] if fc2 is not None else [None]
    if any(s is None or len(s) != 3 or not all(isinstance(d, int) for d in s) for s in shapes):
        return "expert weights of unknown shape"
    if x.dtype not in FLOATS:
        return f"input of {x.dtype}"
    experts, hidden, inter = fc2.shape[0], fc2.shape[1], fc2.shape[2]
    rows = 2 * inter if activation == "swiglu" else inter
    if list(fc1.shape) != [experts, rows, hidden]:
        return f"fc1 of shape {fc1.shape} with fc2 of shape {fc2.shape}"
    return MixtureOfExperts(experts, hidden, inter, _attr(node, "k", 1), activation,
                            bool(_attr(node, "normalize_routing_weights", 0)), _input(node, 3) is not None,
                            _input(node, 5) is not None, float(_attr(node, "activation_alpha", 1.0)),
                            float(_attr(node, "activation_beta", 0.0)),
                            float(_attr(node, "swiglu_limit", float("inf"))))


KERNEL_OPS = {"MatMulNBits": _matmul_nbits, "GatherBlockQuantized": _gather_block_quantized,
              "MoE": _mixture_of_experts}


# --- fusion -------------------------------------------------------------------------------------


def _into_epilogue(group: fusion.FusionGroup, by_output: dict[ir.Value, KernelCall], graph_outputs: set[ir.Value]) -> bool:
    """Make the group the epilogue of the MatMulNBits kernel whose output it reads (the latest such)."""
    members = set(group.nodes)
    outputs = group.outputs(graph_outputs)
    if len(outputs) != 1 or kind_of(outputs[0], group.main) != ROW:
        return False
    for value in reversed(group.inputs()):
        call = by_output.get(value)
        if (call is None or not isinstance(call.spec, MatMulNBits) or call.spec.epilogue is not None
                or value in graph_outputs or any(user not in members for user, _ in value.uses())
                or value.shape != group.main or outputs[0].dtype != value.dtype):
            continue
        try:
            gemv = compile_group(group.nodes, group.main, GEMV_LOADS, {value: "acc"}, False, MATMUL_NAMES)
            gemm = compile_group(group.nodes, group.main, GEMM_LOADS, {value: "acc"}, False, MATMUL_NAMES)
        except Unsupported:
            return False
        if any(kind not in (ROW, VECTOR, SCALAR) for _, kind, _ in gemv.inputs):
            return False
        epilogue = Epilogue(
            parameters=tuple(name for _, _, name in gemv.inputs),
            row_parameters=tuple(name for _, kind, name in gemv.inputs if kind == ROW),
            gemv_lines=tuple(gemv.lines), gemm_lines=tuple(gemm.lines), result=gemv.names[outputs[0]],
            ops=_ops(group.nodes))
        call.spec = replace(call.spec, epilogue=epilogue)
        call.nodes = call.nodes + group.nodes
        call.inputs = call.inputs + [v for v, _, _ in gemv.inputs]
        call.outputs = outputs
        return True
    return False


def _row_kernel(group: fusion.FusionGroup, graph_outputs: set[ir.Value], result: Plan) -> None:
    """The group as one row kernel, when its row fits in registers and every op can be written."""
    d = group.main[-1]
    if d > MAX_ROW:
        return
    try:
        program = compile_group(group.nodes, group.main, ROW_LOADS)
    except Unsupported:
        return
    rows = [(value, name) for value, kind, name in program.inputs if kind == ROW]
    if not rows:
        return
    first_value, first = rows[0]
    outputs = group.outputs(graph_outputs)
    specs = []
    for value in outputs:
        kind = program.kinds[value]
        dtype = f"{first}.dtype" if value.dtype == first_value.dtype else TORCH_DTYPES[value.dtype]
        specs.append((program.names[value], kind, dtype))
    spec = RowKernel(d, tuple(name for _, _, name in program.inputs), tuple(kind for _, kind, _ in program.inputs),
                     tuple(program.lines), tuple(specs), _ops(group.nodes))
    result.calls.append(KernelCall(list(group.nodes), [v for v, _, _ in program.inputs], outputs, spec,
                                   _path(group.nodes[-1])))


def _ops(nodes: list[ir.Node]) -> str:
    names = [n.op_type for n in nodes]
    return " → ".join(names) if len(names) <= 8 else " → ".join(names[:7]) + f" → … ({len(names)} ops)"


# --- names --------------------------------------------------------------------------------------


def _path(node: ir.Node) -> str:
    path = module_path(node)
    return path if path else (node.name or node.op_type)


def _fold(path: str) -> str:
    return ".".join("N" if part.isdigit() else part for part in path.split("."))


def _identifier(text: str) -> str:
    name = re.sub(r"\W+", "_", text).strip("_") or "kernel"
    return f"k_{name}" if name[0].isdigit() else name


def _name(result: Plan) -> None:
    """One launcher per (spec, module path with layer numbers folded); see the module docstring."""
    shared: dict[tuple, list[KernelCall]] = {}
    for call in result.calls:
        shared.setdefault((call.spec, _fold(call.path)), []).append(call)
    taken: set[str] = set()
    for (spec, folded), calls in shared.items():
        paths = {c.path for c in calls}
        name = unique_name(taken, _identifier(f"{paths.pop() if len(paths) == 1 else folded}_{spec.suffix}"), sep="_")
        taken.add(name)
        for call in calls:
            call.launcher = name
        result.sources[name] = spec.render(name)
        result.descriptions[name] = spec.describe()
