"""Window functions (HannWindow, HammingWindow, BlackmanWindow) → torch's *_window."""

from __future__ import annotations

import torch

from slimgraph.backends.pytorch.lowering import attr, lowers
from slimgraph.backends.pytorch.ops.tensor import scalar, torch_dtype


def _window(make):
    def lower(ctx, node, size):
        length = scalar(size)
        dtype = torch_dtype(attr(node, "output_datatype", 1))
        # computed in float64 like the ONNX reference, then cast
        window = make(length, periodic=bool(attr(node, "periodic", 1)), dtype=torch.float64)
        return window.to(dtype)

    return lower


lowers("HannWindow", since=17, tensors=False)(_window(lambda n, **kw: torch.hann_window(n, **kw)))
# ONNX's Hamming coefficients are 25/46 and 21/46 (torch's default 0.54/0.46 rounds them)
lowers("HammingWindow", since=17, tensors=False)(
    _window(lambda n, **kw: torch.hamming_window(n, alpha=25 / 46, beta=21 / 46, **kw)))
lowers("BlackmanWindow", since=17, tensors=False)(_window(lambda n, **kw: torch.blackman_window(n, **kw)))
