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
