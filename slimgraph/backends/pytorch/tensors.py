"""Arrays between numpy and torch, bfloat16 and 4-bit tensors included."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch


def to_torch(array: np.ndarray) -> torch.Tensor:
    """numpy → torch, including ml_dtypes' bfloat16 (which torch.from_numpy does not know)."""
    array = np.array(array, order="C", copy=True)  # (ascontiguousarray would make 0-D arrays 1-D)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def tensor_array(tensor: ir.TensorProtocol) -> np.ndarray:
    """A tensor as numpy; 4-bit tensors as their packed bytes (torch has no int4)."""
    if tensor.dtype in (ir.DataType.INT4, ir.DataType.UINT4):
        return np.frombuffer(tensor.tobytes(), dtype=np.uint8).copy()
    return tensor.numpy()
