"""ONNX elementwise and row ops written as Triton code, for fused kernels and matmul epilogues.

A fused group is a chain of nodes over one *main* shape `[..., D]`. Every value in it is one of:

- `row`: the main shape, a `[BLOCK_D]` vector in a row kernel (or the matmul's output tile);
- `stat`: one number per row (`[..., 1]`, what ReduceMean with keepdims gives), a 0-d value;
- `vector`: `[D]` (leading axes of size 1), the same for every row: a norm's weight, a bias;
- `scalar`: one number; a constant one is written into the code as a literal.

Each node becomes one line `tN = <expression>  # Op`, computed in float32 whatever the tensors'
dtype (the store casts back). Reductions (ReduceMean/ReduceSum over the last axis,
LayerNormalization, RMSNormalization) need the whole row, so only row kernels take them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from slimgraph.ir.graph import constant_tensor

ROW, STAT, VECTOR, SCALAR = "row", "stat", "vector", "scalar"

UNARY = {
    "Neg": "-{0}", "Reciprocal": "1.0 / {0}", "Sqrt": "tl.sqrt({0})", "Exp": "tl.exp({0})", "Log": "tl.log({0})",
    "Abs": "tl.abs({0})", "Relu": "tl.maximum({0}, 0.0)", "Sigmoid": "tl.sigmoid({0})", "Erf": "tl.math.erf({0})",
    "Tanh": "2.0 * tl.sigmoid(2.0 * {0}) - 1.0",  # (Triton has no tanh; this identity is exact in real numbers)
    "Identity": "{0}", "Cast": "{0}",  # float → float: computed in float32, stored in the output's dtype
}
BINARY = {"Add": "{0} + {1}", "Sub": "{0} - {1}", "Mul": "{0} * {1}", "Div": "{0} / {1}",
          "Max": "tl.maximum({0}, {1})", "Min": "tl.minimum({0}, {1})"}
POWERS = {1.0: "{0}", 2.0: "{0} * {0}", 3.0: "{0} * {0} * {0}", 0.5: "tl.sqrt({0})", -0.5: "tl.rsqrt({0})",
          -1.0: "1.0 / {0}"}
REDUCTIONS = {"ReduceMean", "ReduceSum", "LayerNormalization", "RMSNormalization"}
ELEMENTWISE = set(UNARY) | set(BINARY) | {"Pow", "Gelu", "LeakyRelu", "Clip"}
FUSABLE = ELEMENTWISE | REDUCTIONS
FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


class Unsupported(Exception):
    """This node cannot be written as Triton code here (the message says why)."""


def known(shape: ir.Shape | None) -> bool:
    """Every axis is a number or a named symbol: shapes can be compared (two unnamed symbols never match)."""
    return shape is not None and all(isinstance(d, int) or d.value is not None for d in shape)


def kind_of(value: ir.Value, main: ir.Shape) -> str | None:
    """How `value` relates to the group's main shape `[..., D]` (None: it does not fit)."""
    shape = value.shape
    if not known(shape):
        return None
    dims = list(shape)
    if all(d == 1 for d in dims):
        return SCALAR
    if dims == list(main):
        return ROW
    if dims == [*list(main)[:-1], 1]:
        return STAT
    if dims[-1] == main[-1] and all(d == 1 for d in dims[:-1]) and len(dims) <= len(main):
        return VECTOR
    return None


def literal(value: ir.Value) -> str | None:
    """A constant scalar as Python source, or None when the value is not a finite constant scalar."""
    tensor = constant_tensor(value)
    if tensor is None or math.prod(tensor.shape) != 1:
        return None
    array = np.asarray(tensor.numpy()).reshape(())
    if not math.isfinite(float(array)):
        return None
    # the shortest text that reads back as the same float32 (`1e-06`, not `9.999999974752427e-07`)
    return repr(float(str(np.float32(array)))) if array.dtype == np.float32 else repr(float(array))


@dataclass
class Loads:
    """Where a context reads and writes values: a row kernel (`row * D + cols`) or a matmul tile."""

    row_offsets: str  # offsets of this program's row elements
    mask: str
    vector_offsets: str  # offsets into a [D] vector
    vector_mask: str
    vector_broadcast: str = ""  # e.g. "[None, :]" to lift a vector over a tile's rows
    stat_offset: str = "row"  # offset of this row's single number


@dataclass
class Program:
    """A fused group as Triton code: its inputs (kernel arguments), lines, and outputs."""

    inputs: list[tuple[ir.Value, str, str]] = field(default_factory=list)  # (value, kind, parameter name)
    lines: list[str] = field(default_factory=list)
    names: dict[ir.Value, str] = field(default_factory=dict)  # value → variable in the code
    kinds: dict[ir.Value, str] = field(default_factory=dict)
    reduces: bool = False
    reserved: frozenset[str] = frozenset()  # names the surrounding kernel uses itself

    def parameter(self, value: ir.Value) -> str:
        """A kernel parameter name for an input: a weight's own name (`weight`, `bias`), else x0, x1, ..."""
        taken = {name for _, _, name in self.inputs} | self.reserved
        base = re.sub(r"\W", "_", (value.name or "").rsplit(".", 1)[-1]) if value.const_value is not None else ""
        if not base or base[0].isdigit() or base in taken or base.startswith("t") and base[1:].isdigit():
            base = f"x{len(self.inputs)}"
        while base in taken:
            base += "_"
        return base


def compile_group(nodes: list[ir.Node], main: ir.Shape, loads: Loads, given: dict[ir.Value, str] | None = None,
                  allow_reductions: bool = True, reserved: frozenset[str] = frozenset()) -> Program:
    """The group's nodes (in graph order) as Triton lines. `given` maps values already held in
    variables (a matmul epilogue's accumulator) to their names; `reserved` names are not used for
    inputs. Raises Unsupported."""
    program = Program(reserved=reserved)
    for value, name in (given or {}).items():
        program.names[value], program.kinds[value] = name, ROW
    for i, node in enumerate(nodes):
        arguments = [_operand(program, value, main, loads) if value is not None else None for value in node.inputs]
        kinds = [program.kinds.get(value) for value in node.inputs if value is not None and value in program.kinds]
        name = f"t{i}"
        expression = _expression(node, arguments, kinds, loads, allow_reductions, program, name)
        output = node.outputs[0]
        kind = kind_of(output, main)
        if kind not in (ROW, STAT) or (kind == STAT and ROW in kinds and node.op_type not in REDUCTIONS):
            raise Unsupported(f"{node.op_type} output {output.name!r} has shape {output.shape}, not the group's rows")
        program.lines.append(f"{name} = {expression}  # {node.op_type}")
        program.names[output], program.kinds[output] = name, kind
    return program


def _operand(program: Program, value: ir.Value, main: ir.Shape, loads: Loads) -> str:
    if value in program.names:
        return program.names[value]
    text = literal(value)
    kind = kind_of(value, main)
    if kind == SCALAR and text is not None:
        return text
    if kind is None:
        raise Unsupported(f"input {value.name!r} of shape {value.shape} does not broadcast as a row of {main}")
    if value.dtype not in FLOATS:
        raise Unsupported(f"input {value.name!r} is {value.dtype}, not a float")
    parameter = program.parameter(value)
    pointer = f"{parameter}_ptr"
    if kind == ROW:
        load = f"tl.load({pointer} + {loads.row_offsets}, mask={loads.mask}, other=0.0)"
    elif kind == VECTOR:
        load = f"tl.load({pointer} + {loads.vector_offsets}, mask={loads.vector_mask}, other=0.0){loads.vector_broadcast}"
    elif kind == STAT:
        load = f"tl.load({pointer} + {loads.stat_offset})"
    else:
        load = f"tl.load({pointer})"
    program.inputs.append((value, kind, parameter))
    program.lines.append(f"{parameter} = {load}.to(tl.float32)")
    program.names[value], program.kinds[value] = parameter, kind
    return parameter


def _attribute(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _last_axis(node: ir.Node, axis: int) -> bool:
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    return rank is not None and axis in (-1, rank - 1)


def _expression(node: ir.Node, args: list[str | None], kinds: list[str], loads: Loads, allow_reductions: bool,
                program: Program, name: str) -> str:
    """The node's output as one expression (a norm first adds the lines its statistics need)."""
    op = node.op_type
    if op in REDUCTIONS:
        if not allow_reductions:
            raise Unsupported(f"{op} needs whole rows")
        program.reduces = True
        return _reduction(node, args, loads, program, name)
    if op in UNARY:
        if op == "Cast" and ir.DataType(_attribute(node, "to", 0)) not in FLOATS:
            raise Unsupported("Cast to a non-float type")
        return UNARY[op].format(args[0])
    if op in BINARY:
        return BINARY[op].format(args[0], args[1])
    if op == "Pow":
        exponent = literal(node.inputs[1])
        if exponent is None or float(exponent) not in POWERS:
            raise Unsupported(f"Pow with exponent {node.inputs[1].name!r} (constant 0.5, ±1, 2, 3 or -0.5 only)")
        return POWERS[float(exponent)].format(args[0])
    if op == "Gelu":
        if _attribute(node, "approximate", "none") == "tanh":
            inner = f"0.7978845608028654 * ({args[0]} + 0.044715 * {args[0]} * {args[0]} * {args[0]})"
            return f"0.5 * {args[0]} * (1.0 + (2.0 * tl.sigmoid(2.0 * {inner}) - 1.0))"
        return f"0.5 * {args[0]} * (1.0 + tl.math.erf({args[0]} * 0.7071067811865476))"
    if op == "LeakyRelu":
        return f"tl.where({args[0]} >= 0.0, {args[0]}, {float(_attribute(node, 'alpha', 0.01))!r} * {args[0]})"
    if op == "Clip":
        bounds = [literal(v) if v is not None else None for v in node.inputs[1:3]]
        if any(v is not None and b is None for v, b in zip(node.inputs[1:3], bounds)):
            raise Unsupported("Clip with bounds that are not constant")
        text = args[0]
        if len(bounds) > 0 and bounds[0] is not None:
            text = f"tl.maximum({text}, {bounds[0]})"
        if len(bounds) > 1 and bounds[1] is not None:
            text = f"tl.minimum({text}, {bounds[1]})"
        return text
    raise Unsupported(f"{op} is not an elementwise op the fusion writes")


def _reduction(node: ir.Node, args: list[str | None], loads: Loads, program: Program, name: str) -> str:
    x, inside, op = args[0], loads.mask, node.op_type
    if op in ("ReduceMean", "ReduceSum"):
        axes = _reduce_axes(node)
        if axes is None or len(axes) != 1 or not _last_axis(node, axes[0]) or not _attribute(node, "keepdims", 1):
            raise Unsupported(f"{op} over other axes than the last (with keepdims)")
        total = f"tl.sum(tl.where({inside}, {x}, 0.0), axis=0)"
        return f"{total} / D" if op == "ReduceMean" else total
    if any(len(node.outputs) > i and node.outputs[i] is not None and node.outputs[i].uses() for i in (1, 2)):
        raise Unsupported(f"{op} whose mean or inverse deviation is read")
    if not _last_axis(node, _attribute(node, "axis", -1)):
        raise Unsupported(f"{op} over other axes than the last")
    epsilon = float(_attribute(node, "epsilon", 1e-5))
    scale = args[1]
    if op == "RMSNormalization":
        return f"{x} * tl.rsqrt(tl.sum(tl.where({inside}, {x} * {x}, 0.0), axis=0) / D + {epsilon!r}) * {scale}"
    bias = f" + {args[2]}" if len(args) > 2 and args[2] is not None else ""
    program.lines.append(f"{name}_centered = tl.where({inside}, {x} - tl.sum(tl.where({inside}, {x}, 0.0), axis=0) / D, 0.0)")
    deviation = f"tl.rsqrt(tl.sum({name}_centered * {name}_centered, axis=0) / D + {epsilon!r})"
    return f"{name}_centered * {deviation} * {scale}{bias}"


def _reduce_axes(node: ir.Node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        tensor = constant_tensor(node.inputs[1])
        return None if tensor is None else [int(a) for a in tensor.numpy().reshape(-1)]
    axes = node.attributes.get("axes")
    return list(axes.value) if axes is not None else None
