"""com.microsoft.MoE → a call of `runtime.mixture_of_experts` (top-k routing, then each expert's
two linears on the tokens routed to it), with ONNX Runtime's CPU kernel's semantics."""

from __future__ import annotations

from slimgraph.backends.pytorch import runtime
from slimgraph.backends.pytorch.lowering import attr, lowers
from slimgraph.errors import SlimgraphError


@lowers("MoE", domain="com.microsoft")
def mixture_of_experts(ctx, node, x, router, fc1, fc1_bias=None, fc2=None, fc2_bias=None, fc3=None, fc3_bias=None):
    activation = attr(node, "activation_type", "relu")
    if fc3 is not None or attr(node, "use_sparse_mixer", 0):
        raise SlimgraphError("pytorch backend: MoE with fc3 weights or use_sparse_mixer is not supported")
    if activation not in ("relu", "gelu", "silu", "identity", "swiglu"):
        raise SlimgraphError(f"pytorch backend: MoE activation {activation!r} is not supported")
    if activation == "swiglu" and attr(node, "swiglu_fusion", 0) != 1:
        raise SlimgraphError("pytorch backend: MoE SwiGLU is supported interleaved (swiglu_fusion=1), as ORT's CPU kernel")
    return ctx.call(runtime.mixture_of_experts, x, router, fc1, fc1_bias, fc2, fc2_bias, attr(node, "k", 1), activation,
                    bool(attr(node, "normalize_routing_weights", 0)), attr(node, "activation_alpha", 1.0),
                    attr(node, "activation_beta", 0.0), attr(node, "swiglu_limit", float("inf")))


@lowers("QMoE", domain="com.microsoft")
def quantized_mixture_of_experts(ctx, node, x, router, fc1, fc1_scales, fc1_bias=None, fc2=None, fc2_scales=None,
                                 fc2_bias=None, fc3=None, fc3_scales=None, fc3_bias=None, fc1_zero_points=None,
                                 fc2_zero_points=None, *rest):
    """The experts' weights dequantized (the codes stay the module's buffers), then MoE as above. At 8 bits,
    and with accuracy_level 4, ONNX Runtime's kernel also quantizes the activations; this computes in float."""
    if fc3 is not None or any(value is not None for value in rest):
        raise SlimgraphError("pytorch backend: QMoE with fc3 weights, router weights or activation scales is not "
                             "supported")
    bits = attr(node, "expert_weight_bits", 4)
    weights = []
    for codes, scales, zero_points, at in ((fc1, fc1_scales, fc1_zero_points, 2), (fc2, fc2_scales, fc2_zero_points, 5)):
        experts, out = (int(d) for d in node.inputs[at].shape[:2])
        blocks = int(node.inputs[at + 1].shape[2]) if len(node.inputs[at + 1].shape) == 3 else 1
        weights.append(_dequantized(ctx, codes, scales, zero_points, bits, (experts, out, blocks)))
    return mixture_of_experts(ctx, node, x, router, weights[0], fc1_bias, weights[1], fc2_bias)


def _dequantized(ctx, codes, scales, zero_points, bits: int, shape: tuple[int, int, int]):
    """[E, out, in·bits/8] codes (low bits first), [E, out, blocks] (or [E, out]) scales → [E, out, in];
    `shape`: (E, out, blocks)."""
    import torch

    from slimgraph.backends.pytorch.ops.quantized import _unpack

    experts, out, blocks = shape
    values = _unpack(ctx, codes, bits).to(scales.dtype).reshape(experts, out, blocks, -1)
    scales = scales.reshape(experts, out, blocks, 1)
    if zero_points is None:
        offsets = torch.full((), float(1 << (bits - 1)), dtype=scales.dtype)
    else:
        offsets = _unpack(ctx, zero_points, bits)[:, :, :blocks].to(scales.dtype).unsqueeze(-1)
    return ((values - offsets) * scales).reshape(experts, out, -1)
