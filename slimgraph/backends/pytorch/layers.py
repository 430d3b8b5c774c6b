"""The layers the structured PyTorch code writes as torch's own modules, found on the IR.

Each match stands for a few ONNX nodes and becomes one module (or function) call:
- MatMul(x, W) [+ Add(b)] or Gemm → nn.Linear (weight in PyTorch's [out, in] layout), or, where
  the source module was transformers' Conv1D, Conv1D (weight kept [in, out], as its state_dict has it);
- Gather(table, ids) → nn.Embedding;  LayerNormalization → nn.LayerNorm;
- RMSNormalization, or x · 1/√(mean(x²) + ε) · w as exporters spell it → nn.RMSNorm;
- Conv → nn.Conv1d/2d/3d;  BatchNormalization (inference) → nn.BatchNorm1d/2d/3d;
- x · sigmoid(x) → F.silu;
- com.microsoft MatMulNBits → QuantizedLinear;  GatherBlockQuantized → QuantizedEmbedding;
  MoE → MixtureOfExperts.

A match is kept only when its inner values are used by nothing else, so replacing it by one
call changes no other node. The module sits at the node's module path (name scopes), so the
generated module's state_dict keys are the source model's; without name scopes, at its weight's
name without `.weight`.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch.nn.functional as F
from torch import nn

from slimgraph.backends.pytorch.lowering import attr
from slimgraph.backends.pytorch.modules import Conv1D, MixtureOfExperts, QuantizedEmbedding, QuantizedLinear
from slimgraph.backends.pytorch.tensors import tensor_array, to_torch
from slimgraph.ir.graph import constant_tensor, filled_constant, is_default_domain, module_path, transposed_source
from slimgraph.ir.structure import bias_of, find_linear, strip_weight_suffix

CLASS_HIERARCHY_KEY = "pkg.torch.onnx.class_hierarchy"


@dataclass
class Layer:
    """`nodes` (in graph order) computed by one call: `module(*inputs)` at `path`, or `function(*inputs)`."""

    path: str
    nodes: list[ir.Node]
    inputs: list[ir.Value]
    output: ir.Value
    module: nn.Module | None = None
    function: Callable | None = None
    # parameter name in the module → (initializer, read transposed), for writing adapters in place
    sources: dict[str, tuple[str, bool]] = field(default_factory=dict)


def find_layers(model: ir.Model) -> dict[ir.Node, Layer]:
    """Every node that is part of a recognised layer → that layer."""
    order = {node: i for i, node in enumerate(model.graph)}
    found: dict[ir.Node, Layer] = {}
    for node in model.graph:
        for recognise in RECOGNISERS:
            layer = recognise(node)
            if layer is None:
                continue
            layer.nodes.sort(key=order.__getitem__)
            if not any(n in found for n in layer.nodes) and _self_contained(layer):
                found.update(dict.fromkeys(layer.nodes, layer))
            break
    return found


def _self_contained(layer: Layer) -> bool:
    """No value inside the layer is read outside it (or is a graph output)."""
    inside = set(layer.nodes)
    for node in layer.nodes:
        for value in node.outputs:
            if value is layer.output:
                continue
            if value.is_graph_output() or any(user not in inside for user, _ in value.uses()):
                return False
    return layer.output.producer() in inside


def _array(value: ir.Value | None) -> np.ndarray | None:
    """A constant input's values: an initializer, a Constant, or a filled ConstantOfShape."""
    tensor = constant_tensor(value)
    if tensor is None:
        filled = filled_constant(value)
        return np.full(filled[0], filled[1][0]) if filled is not None else None
    return tensor_array(tensor)


def _float(array: np.ndarray | None) -> bool:
    return array is not None and array.dtype.kind == "f"


def _parameter(array: np.ndarray) -> nn.Parameter:
    return nn.Parameter(to_torch(array))


def _path(node: ir.Node, weight: ir.Value | None) -> str:
    """The module path of the layer: its name scope, else its weight's name without `.weight`."""
    scope = module_path(node)
    if scope:
        return scope
    return strip_weight_suffix((weight.name if weight is not None else "") or node.name or "layer")


def _source_class(node: ir.Node) -> str:
    """The innermost PyTorch class the node was exported from ('' when not recorded)."""
    try:
        hierarchy = ast.literal_eval(node.metadata_props.get(CLASS_HIERARCHY_KEY, "[]"))
    except (ValueError, SyntaxError):
        return ""
    return hierarchy[-2] if isinstance(hierarchy, list) and len(hierarchy) >= 2 else ""


def _exported_with_bias(node: ir.Node) -> bool:
    """The PyTorch exporter recorded `aten.linear(x, weight, bias)` for this node."""
    fx_node = node.metadata_props.get("pkg.torch.onnx.fx_node", "")
    return bool(re.search(r"aten\.linear\.default\]\(args = \(%\w+, %\w+, %\w+\)", fx_node))


# --- recognisers: node → Layer or None ---------------------------------------------------------


def linear(node: ir.Node) -> Layer | None:
    found = find_linear(node)
    if found is None:
        return None
    if node.op_type == "Gemm" and (attr(node, "alpha", 1.0) != 1.0 or attr(node, "beta", 1.0) != 1.0
                                   or len(node.inputs[0].shape or []) != 2):
        return None
    nodes = [node]
    read_transposed = transposed_source(node.inputs[1])
    weight_value = read_transposed if read_transposed is not None else node.inputs[1]
    weight = _array(weight_value)
    if not _float(weight):
        return None
    if read_transposed is not None:  # W read through Transpose (a tied head): the source is [out, in]
        transpose = node.inputs[1].producer()
        if len(node.inputs[1].uses()) == 1 and not node.inputs[1].is_graph_output():
            nodes.append(transpose)
        out_in, transposed = weight, False
    elif node.op_type == "Gemm" and attr(node, "transB", 0):
        out_in, transposed = weight, False
    else:
        out_in, transposed = weight.T, True
    bias_value = None
    if node.op_type == "Gemm" and found.bias is not None:
        bias_value = node.inputs[2]
    elif (added := bias_of(node, found.out_features)) is not None:  # MatMul, or Gemm without C, + Add
        (add, _), = node.outputs[0].uses()
        nodes.append(add)
        bias_value = next(v for v in add.inputs if v is not None and v.name == added)
    bias = _array(bias_value) if bias_value is not None else None
    if bias_value is not None and (not _float(bias) or bias.shape != (found.out_features,)):
        return None
    if bias is None and _exported_with_bias(node):  # a zero bias the exporter's optimizer dropped
        bias = np.zeros(found.out_features, weight.dtype)
    output = nodes[-1].outputs[0] if nodes[-1].op_type == "Add" else node.outputs[0]
    sources = {"weight": (weight_value.name, transposed)}
    if bias_value is not None:
        sources["bias"] = (bias_value.name, False)
    if _source_class(node).endswith(".Conv1D") and transposed:
        module = Conv1D(found.out_features, found.in_features)
        module.weight = _parameter(weight)
        module.bias = _parameter(bias if bias is not None else np.zeros(found.out_features, weight.dtype))
        sources["weight"] = (weight_value.name, False)
    else:
        module = nn.Linear(found.in_features, found.out_features, bias=bias is not None, device="meta")
        module.weight = _parameter(np.ascontiguousarray(out_in))
        if bias is not None:
            module.bias = _parameter(bias)
    return Layer(_path(node, weight_value), nodes, [node.inputs[0]], output, module, sources=sources)


def embedding(node: ir.Node) -> Layer | None:
    if node.op_type != "Gather" or not is_default_domain(node) or attr(node, "axis", 0) != 0:
        return None
    table, ids = _array(node.inputs[0]), node.inputs[1]
    if not _float(table) or table.ndim != 2 or constant_tensor(ids) is not None:
        return None
    module = nn.Embedding(*table.shape, device="meta")
    module.weight = _parameter(table)
    return Layer(_path(node, node.inputs[0]), [node], [ids], node.outputs[0], module,
                 sources={"weight": (node.inputs[0].name, False)})


def _normalized_shape(node: ir.Node) -> list[int] | None:
    """The trailing sizes a norm normalizes over (its axis to the end), when static."""
    shape = node.inputs[0].shape
    if shape is None:
        return None
    axis = attr(node, "axis", -1)
    axis = axis + len(shape) if axis < 0 else axis
    sizes = list(shape)[axis:]
    return [int(d) for d in sizes] if sizes and all(isinstance(d, int) for d in sizes) else None


def layer_norm(node: ir.Node) -> Layer | None:
    if node.op_type != "LayerNormalization" or not is_default_domain(node):
        return None
    if any(v is not None and (v.uses() or v.is_graph_output()) for v in node.outputs[1:]):
        return None
    shape, scale = _normalized_shape(node), _array(node.inputs[1])
    bias = _array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if shape is None or not _float(scale) or (len(node.inputs) > 2 and node.inputs[2] is not None and not _float(bias)):
        return None
    module = nn.LayerNorm(shape, eps=attr(node, "epsilon", 1e-5), bias=bias is not None, device="meta")
    module.weight = _parameter(scale.reshape(shape))
    if bias is not None:
        module.bias = _parameter(bias.reshape(shape))
    return Layer(_path(node, node.inputs[1]), [node], [node.inputs[0]], node.outputs[0], module)


def _rms_norm_module(dim: list[int], eps: float, scale: np.ndarray) -> nn.RMSNorm:
    module = nn.RMSNorm(dim, eps=eps, device="meta")
    module.weight = _parameter(scale.reshape(dim))
    return module


def rms_norm(node: ir.Node) -> Layer | None:
    """RMSNormalization, or Mul(w, Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2)), ε))))) (either
    operand order; Div(x, Sqrt(...)) and Mul(x, Rsqrt) too), over the last axis."""
    if node.op_type == "RMSNormalization" and is_default_domain(node):
        shape, scale = _normalized_shape(node), _array(node.inputs[1])
        if shape is None or not _float(scale):
            return None
        return Layer(_path(node, node.inputs[1]), [node], [node.inputs[0]], node.outputs[0],
                     _rms_norm_module(shape, attr(node, "epsilon", 1e-5), scale))
    if node.op_type != "Mul" or not is_default_domain(node):
        return None
    scale_value = next((v for v in node.inputs if _float(_array(v))), None)
    normed = next((v for v in node.inputs if v is not scale_value), None)
    if scale_value is None or normed is None or normed.producer() is None:
        return None
    chain = _rms_chain(normed.producer())
    if chain is None:
        return None
    x, eps, nodes = chain
    scale = _array(scale_value)
    if scale.ndim != 1 or x.shape is None or x.shape[-1] != scale.shape[0]:
        return None
    return Layer(_path(node, scale_value), [*nodes, node], [x], node.outputs[0],
                 _rms_norm_module([scale.shape[0]], eps, scale))


def _rms_chain(scaled: ir.Node) -> tuple[ir.Value, float, list[ir.Node]] | None:
    """(x, ε, nodes) when `scaled` computes x / √(mean(x², last axis) + ε)."""
    def producer(value, op):
        node = value.producer() if value is not None else None
        return node if node is not None and node.op_type == op and is_default_domain(node) else None

    if scaled.op_type not in ("Mul", "Div") or not is_default_domain(scaled):
        return None
    for x, other in (scaled.inputs, scaled.inputs[::-1]):
        if scaled.op_type == "Div" and other is not scaled.inputs[1]:
            continue
        if scaled.op_type == "Div":
            steps = [sqrt := producer(other, "Sqrt")]
        else:
            reciprocal = producer(other, "Reciprocal")
            sqrt = producer(reciprocal.inputs[0], "Sqrt") if reciprocal else None
            steps = [reciprocal, sqrt]
        add = producer(sqrt.inputs[0], "Add") if sqrt else None
        if add is None:
            continue
        eps_value = next((v for v in add.inputs if _float(_array(v))), None)
        mean_value = next((v for v in add.inputs if v is not eps_value), None)
        mean = producer(mean_value, "ReduceMean")
        square = producer(mean.inputs[0], "Pow") if mean else None
        if eps_value is None or _array(eps_value).size != 1 or square is None or square.inputs[0] is not x:
            continue
        exponent = _array(square.inputs[1])
        axes = _array(mean.inputs[1]) if len(mean.inputs) > 1 and mean.inputs[1] is not None else \
            np.array(attr(mean, "axes", []))
        rank = len(x.shape or [])
        if exponent is None or exponent.size != 1 or float(exponent.reshape(-1)[0]) != 2.0 or not attr(mean, "keepdims", 1):
            continue
        if not rank or axes is None or [int(a) % rank for a in axes.reshape(-1)] != [rank - 1]:
            continue
        return x, float(_array(eps_value).reshape(-1)[0]), [square, mean, add, *steps, scaled]
    return None


def conv(node: ir.Node) -> Layer | None:
    if node.op_type != "Conv" or not is_default_domain(node) or attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    weight = _array(node.inputs[1])
    bias = _array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if not _float(weight) or weight.ndim not in (3, 4, 5) or (len(node.inputs) > 2 and node.inputs[2] is not None
                                                             and not _float(bias)):
        return None
    spatial = weight.ndim - 2
    pads = attr(node, "pads", [0] * 2 * spatial) if attr(node, "auto_pad", "NOTSET") == "NOTSET" else [0] * 2 * spatial
    if pads[:spatial] != pads[spatial:]:
        return None
    groups = attr(node, "group", 1)
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial]
    module = cls(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                 stride=tuple(attr(node, "strides", [1] * spatial)), padding=tuple(pads[:spatial]),
                 dilation=tuple(attr(node, "dilations", [1] * spatial)), groups=groups, bias=bias is not None,
                 device="meta")
    module.weight = _parameter(weight)
    if bias is not None:
        module.bias = _parameter(bias)
    return Layer(_path(node, node.inputs[1]), [node], [node.inputs[0]], node.outputs[0], module,
                 sources={"weight": (node.inputs[1].name, False)})


def batch_norm(node: ir.Node) -> Layer | None:
    if node.op_type != "BatchNormalization" or not is_default_domain(node) or attr(node, "training_mode", 0):
        return None
    if any(v is not None and (v.uses() or v.is_graph_output()) for v in node.outputs[1:]):
        return None
    scale, bias, mean, var = (_array(v) for v in node.inputs[1:5])
    rank = len(node.inputs[0].shape or [])
    if not all(_float(a) and a.ndim == 1 for a in (scale, bias, mean, var)) or rank not in (2, 3, 4, 5):
        return None
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank]
    module = cls(scale.shape[0], eps=attr(node, "epsilon", 1e-5), momentum=1 - attr(node, "momentum", 0.9))
    module.weight, module.bias = _parameter(scale), _parameter(bias)
    module.running_mean, module.running_var = to_torch(mean), to_torch(var)
    names = [v.name or "" for v in node.inputs[1:5]]  # (scale, bias, mean, var: their common stem)
    stem = os.path.commonprefix(names).rstrip("_./") if module_path(node) is None else ""
    path = stem or _path(node, node.inputs[1])
    return Layer(path, [node], [node.inputs[0]], node.outputs[0], module.eval())


def silu(node: ir.Node) -> Layer | None:
    if node.op_type != "Mul" or not is_default_domain(node):
        return None
    for x, other in (node.inputs, node.inputs[::-1]):
        sigmoid = other.producer() if other is not None else None
        if sigmoid is not None and sigmoid.op_type == "Sigmoid" and is_default_domain(sigmoid) and sigmoid.inputs[0] is x:
            return Layer("", [sigmoid, node], [x], node.outputs[0], function=F.silu)
    return None


def matmul_nbits(node: ir.Node) -> Layer | None:
    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
        return None
    inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
    qweight, scales = _array(inputs[1]), _array(inputs[2])
    zero_points = _array(inputs[3]) if inputs[3] is not None else None
    bias = _array(inputs[5]) if inputs[5] is not None else None
    if qweight is None or scales is None or inputs[4] is not None or (inputs[3] is not None and zero_points is None) \
            or (inputs[5] is not None and bias is None):
        return None
    packed = zero_points is not None and zero_points.dtype == np.uint8
    module = QuantizedLinear(attr(node, "K"), attr(node, "N"), attr(node, "bits", 4), attr(node, "block_size"),
                             bias=bias is not None,
                             zero_points=None if zero_points is None else "packed" if packed else "float")
    module.qweight, module.scales = to_torch(qweight), to_torch(scales)
    if zero_points is not None:
        module.zero_points = to_torch(zero_points)
    if bias is not None:
        module.bias = _parameter(bias)
    return Layer(_path(node, inputs[1]), [node], [node.inputs[0]], node.outputs[0], module)


def gather_block_quantized(node: ir.Node) -> Layer | None:
    if node.op_type != "GatherBlockQuantized" or node.domain != "com.microsoft":
        return None
    if attr(node, "gather_axis", 0) != 0 or attr(node, "quantize_axis", 1) not in (1, -1):
        return None
    data, scales = _array(node.inputs[0]), _array(node.inputs[2])
    has_zero = len(node.inputs) > 3 and node.inputs[3] is not None
    zero_points = _array(node.inputs[3]) if has_zero else None
    shape = node.inputs[0].shape
    if data is None or scales is None or (has_zero and zero_points is None) or shape is None or len(shape) != 2:
        return None
    bits = attr(node, "bits", 4)
    rows, dim = shape
    if node.inputs[0].dtype == ir.DataType.UINT8 and bits == 4:
        dim = dim * 8 // bits
    module = QuantizedEmbedding(rows, dim, bits, attr(node, "block_size", 128),
                                signed=node.inputs[0].dtype == ir.DataType.INT4, zero_points=has_zero)
    module.qweight, module.scales = to_torch(data), to_torch(scales)
    if has_zero:
        module.zero_points = to_torch(zero_points)
    return Layer(_path(node, node.inputs[0]), [node], [node.inputs[1]], node.outputs[0], module)


def mixture(node: ir.Node) -> Layer | None:
    """com.microsoft.MoE with constant experts (what the lowering supports: no fc3, no sparse mixer)."""
    if node.op_type != "MoE" or node.domain != "com.microsoft" or attr(node, "use_sparse_mixer", 0):
        return None
    inputs = list(node.inputs) + [None] * (8 - len(node.inputs))
    fc1, fc2 = _array(inputs[2]), _array(inputs[4])
    bias1, bias2 = (_array(v) if v is not None else None for v in (inputs[3], inputs[5]))
    activation = attr(node, "activation_type", "relu")
    if not (_float(fc1) and _float(fc2)) or inputs[6] is not None or (inputs[3] is None) != (inputs[5] is None) \
            or (inputs[3] is not None and not (_float(bias1) and _float(bias2))) \
            or activation not in ("relu", "gelu", "silu", "identity") and not (
                activation == "swiglu" and attr(node, "swiglu_fusion", 0) == 1):
        return None
    experts, hidden, inner = fc2.shape
    module = MixtureOfExperts(experts, hidden, inner, attr(node, "k", 1), activation,
                              bool(attr(node, "normalize_routing_weights", 0)), bias=bias1 is not None,
                              alpha=attr(node, "activation_alpha", 1.0), beta=attr(node, "activation_beta", 0.0),
                              limit=attr(node, "swiglu_limit", float("inf")))
    module.fc1, module.fc2 = _parameter(fc1), _parameter(fc2)
    if bias1 is not None:
        module.fc1_bias, module.fc2_bias = _parameter(bias1), _parameter(bias2)
    return Layer(_path(node, None), [node], [node.inputs[0], node.inputs[1]], node.outputs[0], module)


RECOGNISERS = (linear, embedding, layer_norm, rms_norm, conv, batch_norm, silu, matmul_nbits, gather_block_quantized,
               mixture)
