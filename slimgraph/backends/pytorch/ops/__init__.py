"""Lowerings, grouped by kind; importing this package registers them all."""

from slimgraph.backends.pytorch.ops import (  # noqa: F401
    attention,
    control_flow,
    elementwise,
    ml,
    moe,
    nn,
    quantized,
    quantized_contrib,
    random,
    recurrent,
    reduce,
    resize,
    signal,
    tensor,
    training,
    value_shaped,
)
