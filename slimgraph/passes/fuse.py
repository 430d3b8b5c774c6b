"""fuse-ort: a transformer's attention, residual LayerNorm and bias-GELU subgraphs → ONNX Runtime's
fused contrib ops.

    Softmax(Q·Kᵀ/√d + mask) · V over heads          → com.microsoft.MultiHeadAttention (attention=heads)
    the same with its Q, K, V projections            → com.microsoft.Attention, one packed weight (attention=packed)
    LayerNormalization(x + residual (+ bias))        → com.microsoft.SkipLayerNormalization
    Gelu(x + bias)                                   → com.microsoft.BiasGelu
    (and RMSNorm, rotary embeddings, grouped-query attention where a decoder has them)

The rewrite rules are onnxscript's `ort_fusions` (kept by the ONNX Runtime exporters' authors); this
pass runs them, counts what they fused and refuses a model where nothing matched. Exact up to the
order of float sums. The fused ops run in ONNX Runtime (CPU and CUDA): the PyTorch and Triton
backends do not lower them. Quantize after fusing: `cleanup,fuse-ort,quantize-dynamic` (the fused
patterns look for float MatMuls). `attention=heads` (the default) keeps the Q, K, V projections as
MatMuls, which quantization reaches; a packed Attention weight stays float. On MiniLM at 8 × 128
with W8A8 after it: heads 2.1x the fp32 speed at 0.25x the bytes, packed 1.9x at 0.34x.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar, Literal
from unittest import mock

import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.passes._infra.base import Pass, PassContext, PassResult
from slimgraph.passes._infra.registry import register_pass
from slimgraph.passes.cleanup import Cleanup


@register_pass
@dataclass(frozen=True, kw_only=True)
class FuseOrt(Pass):
    """Attention, residual LayerNorm and bias-GELU subgraphs → ONNX Runtime's fused ops (MultiHeadAttention, SkipLayerNormalization, BiasGelu)."""

    name: ClassVar[str] = "fuse-ort"
    backends: ClassVar[tuple[str, ...] | None] = ("onnxruntime",)
    attention: Literal["heads", "packed"] = "heads"

    def __post_init__(self) -> None:
        if self.attention not in ("heads", "packed"):
            raise SlimgraphError(f"fuse-ort: attention must be heads or packed, got {self.attention!r}")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        from onnxscript.rewriter.ort_fusions import _core, optimize_for_ort

        nodes = len(model.graph)
        if self.attention == "packed":
            _, counts = optimize_for_ort(model)
        else:  # onnxscript has no switch for its last attention step, the one that packs the projections
            with mock.patch.object(_core, "fuse_attention", lambda model, debug=False: 0):
                _, counts = optimize_for_ort(model)
        if not any(counts.values()):
            raise SlimgraphError("fuse-ort: nothing to fuse: no attention, LayerNorm-after-residual or GELU pattern "
                                 "that ONNX Runtime has a fused op for")
        Cleanup().run(model, ctx)  # what the rules leave foldable (a packed Attention's weight: a Concat of constants)
        ops = Counter(node.op_type for node in model.graph if node.domain == "com.microsoft")
        return PassResult(True, {"fused ops": ", ".join(f"{op} ×{n}" for op, n in sorted(ops.items())),
                                 "nodes": f"{nodes} → {len(model.graph)}"})
