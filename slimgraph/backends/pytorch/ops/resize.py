"""Resize: one interpolation matrix per resized axis, applied with a matmul along that axis.

Resize is linear in its input along each axis (for every mode, coordinate transformation
and nearest mode, with or without antialias), so the matrix M [out, in] of an axis is the
op applied to the identity: we obtain it from onnx's reference implementation (the
ReferenceEvaluator) on a 2-D identity, rather than re-deriving its formulas. The constant
term that tf_crop_and_resize's extrapolation value adds is the op applied to zeros.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from slimgraph.backends.pytorch.lowering import attr, lowers
from slimgraph.errors import SlimgraphError

PASSED_ATTRIBUTES = ("mode", "coordinate_transformation_mode", "nearest_mode", "cubic_coeff_a", "exclude_outside",
                     "extrapolation_value", "antialias")


def _axis_matrix(node, opset: int, length_in: int, length_out: int, scale: float | None,
                 roi: tuple[float, float] | None) -> tuple[np.ndarray, np.ndarray]:
    """(M [out, in], offset [out]) such that resizing a vector v gives M @ v + offset."""
    from onnx.reference import ReferenceEvaluator

    attributes = {n: attr(node, n) for n in PASSED_ATTRIBUTES if node.attributes.get(n) is not None}
    inputs = ["x", "roi", "scales" if scale is not None else "", "sizes" if scale is None else ""]
    resize = helper.make_node("Resize", [i for i in inputs if i] if scale is not None else ["x", "roi", "", "sizes"],
                              ["y"], **attributes)
    initializers = [onnx.numpy_helper.from_array(
        np.array([0, roi[0], 1, roi[1]] if roi else [], np.float32), "roi")]
    if scale is not None:
        initializers.append(onnx.numpy_helper.from_array(np.array([1.0, scale], np.float32), "scales"))
    else:
        initializers.append(onnx.numpy_helper.from_array(np.array([length_in + 1, length_out], np.int64), "sizes"))
    graph = helper.make_graph([resize], "axis", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, None)],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    evaluator = ReferenceEvaluator(model)
    # rows 0..in-1: the identity; last row: zeros (gives the constant term)
    basis = np.vstack([np.eye(length_in), np.zeros((1, length_in))])
    (out,) = evaluator.run(None, {"x": basis})
    if out.shape[1] != length_out:
        raise SlimgraphError(f"pytorch backend: Resize axis gives {out.shape[1]} values, expected {length_out}")
    offset = out[-1]
    return (out[:-1] - offset).T, offset


@lowers("Resize", since=11, tensors=False)
def resize(ctx, node, x, roi=None, scales=None, sizes=None):
    x = ctx.tensor(x)
    shape_in, shape_out = node.inputs[0].shape, node.outputs[0].shape
    if shape_in is None or shape_out is None or not all(isinstance(d, int) for d in (*shape_in, *shape_out)):
        raise SlimgraphError("pytorch backend: Resize needs static input and output shapes")
    rank = len(shape_in)
    axes = [a + rank if a < 0 else a for a in (attr(node, "axes") or range(rank))]
    scale_values = ctx.const(scales) if scales is not None else None
    roi_values = ctx.const(roi) if roi is not None else None
    if scale_values is not None and scale_values.size == 0:
        scale_values = None
    if roi_values is not None and roi_values.size == 0:
        roi_values = None
    opset = ctx.model.opset_imports.get("", 11)
    dtype = node.inputs[0].dtype.numpy()
    for position, axis in enumerate(axes):
        length_in, length_out = shape_in[axis], shape_out[axis]
        scale = float(scale_values[position]) if scale_values is not None else None
        if scale is None and sizes is None:
            raise SlimgraphError("pytorch backend: Resize needs constant scales or sizes")
        if scale == 1.0 and length_in == length_out and attr(node, "coordinate_transformation_mode") != \
                "tf_crop_and_resize":
            continue
        region = (float(roi_values[position]), float(roi_values[position + len(axes)])) \
            if roi_values is not None else None
        matrix, offset = _axis_matrix(node, opset, length_in, length_out, scale, region)
        if np.array_equal(matrix, np.eye(length_in)) and not offset.any():
            continue
        weights = ctx.constant(matrix.T.astype(np.float64 if dtype.kind != "f" else dtype))
        moved = x.movedim(axis, -1)
        resized = torch.matmul(moved.to(weights.dtype), weights)
        if offset.any():
            resized = resized + ctx.constant(offset.astype(matrix.dtype if dtype.kind != "f" else dtype))
        x = resized.movedim(-1, axis)
    return x.to(torch.from_numpy(np.empty(0, dtype)).dtype) if dtype.kind != "f" else x
