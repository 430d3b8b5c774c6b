"""Lowerings, grouped by kind; importing this package registers them all."""

from slimgraph.backends.pytorch.ops import attention, elementwise, nn, quantized, reduce, resize, tensor  # noqa: F401
