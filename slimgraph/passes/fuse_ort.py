"""fuse-ort: a transformer's attention, residual LayerNorm and bias-GELU subgraphs → ONNX Runtime's
fused contrib ops.

    Softmax(Q·Kᵀ/√d + mask) · V over heads          → com.microsoft.MultiHeadAttention (attention=heads)
    the same with its Q, K, V projections            → com.microsoft.Attention, one packed weight (attention=packed)
    LayerNormalization(x + residual (+ bias))        → com.microsoft.SkipLayerNormalization
    Gelu(x + bias)                                   → com.microsoft.BiasGelu
    RMSNorm                                          → SimplifiedLayerNormalization
    a KV-cache decoder's attention and rotary        → com.microsoft.GroupQueryAttention, RotaryEmbedding
                                                       (`fuse_ort_decoder.py`; first, so that the rules
                                                       below do not claim it as MultiHeadAttention)

On a CPU target (`skip_norm=auto`, the default there) the residual LayerNorms are then split again
(`skip_norm=split` splits the RMSNorms too):

    SkipLayerNormalization(x, residual, γ, β, bias)  → LayerNormalization((x + residual) + bias, γ, β)
    SkipSimplifiedLayerNormalization(x, residual, γ) → SimplifiedLayerNormalization(x + residual, γ)

ONNX Runtime's CPU kernel for the Skip ops is several times slower than the ops it replaces: on
MiniLM's [8, 128, 384], 1.1 ms against 0.24 ms for Add + LayerNormalization (ORT 1.32, 2 threads),
18% of the fused W8A8 model's time (`benchmarks/pruning.py` runs both forms). The bias is added
last on purpose: ONNX Runtime's own SkipLayerNormFusion, which runs when a session loads the
model, matches an Add of two 3-D tensors right before the LayerNorm and would fuse the split back.
A LayerNorm without a bias has no such order, so it stays fused; `cuda` keeps them all. The RMSNorm
form stays fused on a CPU too: SmolLM2's int4 decoder runs 1.08x faster with it (60 nodes fewer per
token; its kernel takes what Add + SimplifiedLayerNormalization take).

Other exporters' CNNs (paddle2onnx's PP-OCR and layout models; `fuse_patterns.py`, with what each
rule bought):

    x · Clip(x + 3, 0, 6) / 6                        → HardSwish (x · HardSigmoid(x) below opset 14)
    Conv · s + c, s · x + c before a Conv            → the Conv, its weight and bias folded

PP-OCRv4 rec 0.65x latency, det 0.78x, PP-OCRv2 cls 0.70x, layout-cdla 0.57x (ORT 1.32, 2 threads).

The transformer rules are onnxscript's `ort_fusions` (kept by the ONNX Runtime exporters' authors);
this pass runs them and those of `fuse_patterns.py`, counts what they fused and refuses a model where
nothing matched. Exact up to the order of float sums. The fused ops run in ONNX Runtime (CPU and
CUDA): the PyTorch and Triton backends do not lower them. Quantize after fusing: `cleanup,fuse-ort,quantize-dynamic` (the fused
patterns look for float MatMuls). `attention=heads` (the default) keeps the Q, K, V projections as
MatMuls, which quantization reaches; a packed Attention weight stays float. On MiniLM at 8 × 128
with W8A8 after it: heads 2.5x the fp32 speed at 0.25x the bytes (AVX-512 VNNI; 2.2x with the Skip
ops), packed 1.9x at 0.34x (measured with the Skip ops).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar, Literal

import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir import edit
from slimgraph.ir.graph import constant_tensor
from slimgraph.ir.opset import default_opset
from slimgraph.measure.target import detect
from slimgraph.passes._infra.base import Pass, PassContext, PassResult, find_reader
from slimgraph.passes._infra.registry import register_pass
from slimgraph.passes.cleanup import Cleanup
from slimgraph.passes.fuse_ort_decoder import DEFAULT_MAX_POSITIONS, fuse_kv_attention, rotary_positions
from slimgraph.passes.fuse_ort_patterns import fuse_exporter_patterns


@register_pass
@dataclass(frozen=True, kw_only=True)
class FuseOrt(Pass):
    """Attention, bias-GELU, HardSwish and Conv-affine subgraphs → ONNX Runtime's fused ops (MultiHeadAttention, GroupQueryAttention in KV-cache decoders, BiasGelu, HardSwish, folded Convs; SkipLayerNormalization on CUDA)."""

    name: ClassVar[str] = "fuse-ort"
    backends: ClassVar[tuple[str, ...] | None] = ("onnxruntime",)
    reads_target: ClassVar[bool] = True  # skip_norm=auto: split on CPUs
    attention: Literal["heads", "packed"] = "heads"
    skip_norm: Literal["auto", "fused", "split"] = "auto"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        nodes = len(model.graph)
        reader = find_reader(model, ctx)
        positions = rotary_positions(reader.model_config(model) if reader is not None else None)
        counts = ort_fusions(model, pack_attention=self.attention == "packed", max_positions=positions)
        exporter = fuse_exporter_patterns(model)  # paddle2onnx's, tf2onnx's forms: fuse_patterns.py
        if not any(counts.values()) and not any(exporter.values()):
            raise SlimgraphError("fuse-ort: nothing to fuse: no attention, LayerNorm-after-residual, GELU, HardSwish "
                                 "or Conv-affine pattern that ONNX Runtime has a fused op for")
        Cleanup().run(model, ctx)  # what the rules leave foldable (a packed Attention's weight: a Concat of constants)
        on_cpu = (ctx.target or detect()).name != "cuda"
        unfused = 0
        if self.skip_norm == "split" or (self.skip_norm == "auto" and on_cpu):
            unfused = split_skip_norms(model, rms=self.skip_norm == "split")
        ops = Counter(node.op_type for node in model.graph if node.domain == "com.microsoft")
        stats = {"fused ops": ", ".join(f"{op} ×{n}" for op, n in sorted(ops.items())) or "none",
                 "nodes": f"{nodes} → {len(model.graph)}"}
        after, before = exporter.get("conv_affine", 0), exporter.get("affine_conv", 0)
        if after + before:
            stats["affines folded into Conv"] = f"{after} after, {before} before"
        if exporter.get("hardswish"):
            stats["HardSwish"] = f"{exporter['hardswish']} (x · Clip(x + 3, 0, 6) / 6)"
        if unfused:
            stats["residual norms split"] = f"{unfused} (Add + LayerNorm: faster than the Skip op on CPU)"
        return PassResult(True, stats)


def ort_fusions(model: ir.Model, *, pack_attention: bool, max_positions: int = DEFAULT_MAX_POSITIONS) -> dict[str, int]:
    """onnxscript's `optimize_for_ort` (its steps, in its order), run here step by step because it has no
    switch for the step that packs an attention's Q, K and V projections into one Attention weight
    (`pack_attention`). Returns how many of each fusion matched."""
    import onnx_ir.passes.common as common_passes
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.ort_fusions import (
        _core,
        attention,
        bias_gelu,
        cos_sin_cache,
        erfgelu,
        gelu,
        gqa,
        gqa_packed_qkv,
        mha,
        mha_bias,
        mha_scale,
        rms_normalization,
        rotary_embedding,
        sdpa,
        sdpa_via_mha,
        skip_normalization,
    )

    rewrite(model, [_core._gemm_to_matmul_add.gemm_to_matmul_add_rule])
    _core._pre_optimize(model)
    counts: dict[str, int] = {"kv_cache_attention": fuse_kv_attention(model, max_positions)}  # before the rules below claim it

    def fuse(name: str, function, **options) -> None:
        counts[name] = function(model, debug=False, **options)

    fuse("erf_gelu", erfgelu.fuse_erfgelu)
    fuse("rms_normalization", rms_normalization.fuse_rms_normalization)
    fuse("skip_layer_normalization", skip_normalization.fuse_skip_layer_normalization)
    fuse("skip_rms_normalization", skip_normalization.fuse_skip_rms_normalization)
    fuse("rotary_embedding", rotary_embedding.fuse_rotary_embedding)
    fuse("cos_sin_cache", cos_sin_cache.fuse_cos_sin_cache)
    common_passes.CommonSubexpressionEliminationPass()(model)
    fuse("partial_rotary_embedding", rotary_embedding.fuse_partial_rotary_embedding)
    fuse("sdpa", sdpa.fuse_sdpa, apply_shape_inference=True)
    fuse("gqa", gqa.fuse_gqa)
    fuse("packed_qkv_for_gqa", gqa_packed_qkv.fuse_qkv_gqa)
    fuse("mha1", mha.fuse_mha1)
    fuse("mha2", mha.fuse_mha2)
    fuse("mha_scale", mha_scale.fuse_mha_scale)
    if counts["mha1"] or counts["mha2"]:
        fuse("mha_bias", mha_bias.fuse_mha_bias)
        if pack_attention:
            fuse("attention", attention.fuse_attention)
    fuse("gelu", gelu.fuse_gelu)
    fuse("bias_gelu", bias_gelu.fuse_bias_gelu)
    fuse("sdpa_via_mha", sdpa_via_mha.replace_sdpa_by_mha)
    optimize(model)
    rewrite(model, _core.ORT_PATTERN_REWRITE_RULES)
    unfuse_weight_matmuls(model)
    matmuls_for_wide_gemms(model)
    reshapes_without_allowzero(model)
    ir.passes.Sequential(
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1),
        common_passes.RemoveInitializersFromInputsPass(),
        common_passes.ShapeInferencePass(),
    )(model)
    return counts


def reshapes_without_allowzero(model: ir.Model) -> int:
    """Reshape's `allowzero` exists from opset 14, yet onnxscript's MaterializeReshapeShape (0.7.2) writes
    `allowzero=1` at any opset (PP-OCRv2 cls upgraded to 13 for quantize-static: an invalid model).
    Where the shape it wrote has no 0, the attribute changes nothing: removed below opset 14."""
    if model.opset_imports.get("", 0) >= 14:
        return 0
    removed = 0
    for node in model.graph:
        if node.op_type == "Reshape" and "allowzero" in node.attributes:
            shape = constant_tensor(node.inputs[1])
            if node.attributes["allowzero"].as_int() == 0 or (shape is not None and 0 not in shape.numpy()):
                del node.attributes["allowzero"]
                removed += 1
    return removed


def unfuse_weight_matmuls(model: ir.Model) -> int:
    """FusedMatMul(x, W, transB=1) with a constant 2-D W (a tied LM head: the embedding table read
    transposed) → MatMul(x, Transpose(W)) again, the linear the quantize passes read (an int4 head
    shares the table with the embedding's GatherBlockQuantized). Returns how many."""
    defaults = {"alpha": 1.0, "transA": 0, "transB": 0, "transBatchA": 0, "transBatchB": 0}  # the op's
    count = 0
    for node in list(model.graph):
        if node.op_type != "FusedMatMul" or node.domain != "com.microsoft" or len(node.inputs) != 2:
            continue
        weight = constant_tensor(node.inputs[1])
        attributes = {name: node.attributes[name].value if name in node.attributes else value
                      for name, value in defaults.items()}
        if weight is None or len(weight.shape) != 2 or attributes != defaults | {"transB": 1}:
            continue
        transpose = ir.node("Transpose", [node.inputs[1]], attributes={"perm": [1, 0]}, name=f"{node.name}_transpose")
        matmul = ir.node("MatMul", [node.inputs[0], transpose.outputs[0]], name=node.name)
        edit.replace_region(model, [node], [transpose, matmul], {node.outputs[0]: matmul.outputs[0]})
        count += 1
    return count


def matmuls_for_wide_gemms(model: ir.Model) -> int:
    """Gemm(A, B, C) reading a fused op's output → MatMul(A, B) + C. onnxscript's MHA rules replace
    the Transpose + Reshape before GPT-2's `Conv1D` (which flattens to [batch · sequence, hidden]
    for a Gemm) by MultiHeadAttention's [batch, sequence, hidden] output, which Gemm does not take
    (the value keeps the Reshape's 2-D shape: it cannot be trusted); MatMul takes either, and the
    Reshape after it restores the shape. Returns how many."""
    count = 0
    for node in list(model.graph):
        a = node.inputs[0] if node.inputs else None
        producer = a.producer() if a is not None else None
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or producer is None \
                or producer.domain != "com.microsoft":
            continue
        attributes = {name: node.attributes[name].value for name in node.attributes}
        if attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
            continue
        new = []
        b = node.inputs[1]
        if attributes.get("transB", 0):
            new.append(ir.node("Transpose", [b], attributes={"perm": [1, 0]}, name=f"{node.name}_transpose_b"))
            b = new[-1].outputs[0]
        new.append(ir.node("MatMul", [a, b], name=f"{node.name}_matmul"))
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            new.append(ir.node("Add", [new[-1].outputs[0], node.inputs[2]], name=f"{node.name}_bias"))
        a.shape = None  # (the Reshape's, see above)
        edit.replace_region(model, [node], new, {node.outputs[0]: new[-1].outputs[0]})
        new[-1].outputs[0].shape = None  # 3-D now, where the Gemm's was 2-D
        count += 1
    return count


def split_skip_norms(model: ir.Model, *, rms: bool = True) -> int:
    """SkipLayerNormalization (and with `rms`, SkipSimplifiedLayerNormalization) → Add(s) +
    (Simplified)LayerNormalization, where ONNX Runtime will not fuse it back (see the module
    docstring); returns how many were split."""
    split = 0
    kinds = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization") if rms else ("SkipLayerNormalization",)
    for node in list(model.graph):
        simplified = node.op_type == "SkipSimplifiedLayerNormalization"
        if node.domain != "com.microsoft" or node.op_type not in kinds:
            continue
        x, skip, gamma, *rest = list(node.inputs) + [None] * 2
        beta, bias = (None, rest[0]) if simplified else (rest[0], rest[1])
        mean_or_std_used = any(out.uses() or out.is_graph_output() for out in node.outputs[1:3])
        if mean_or_std_used or (not simplified and (bias is None or default_opset(model) < 17)):
            continue
        total = ir.node("Add", [x, skip], name=f"{node.name}_residual")
        new = [total]
        if bias is not None:
            new.append(ir.node("Add", [total.outputs[0], bias], name=f"{node.name}_bias"))
        summed = new[-1].outputs[0]
        epsilon = node.attributes.get_float("epsilon", 1e-12)  # the contrib op's default
        if simplified:  # ONNX Runtime's op in the default domain, as onnxscript's RMSNorm fusion writes it
            norm = ir.node("SimplifiedLayerNormalization", [summed, gamma], attributes={"epsilon": epsilon, "axis": -1})
        else:
            norm = ir.node("LayerNormalization", [summed, gamma, *([beta] if beta is not None else [])],
                           attributes={"epsilon": epsilon, "axis": -1})
        norm.name = f"{node.name}_norm"
        new.append(norm)
        outputs = {node.outputs[0]: norm.outputs[0]}
        if len(node.outputs) > 3 and (node.outputs[3].uses() or node.outputs[3].is_graph_output()):
            outputs[node.outputs[3]] = summed  # the residual stream, read by the next block
        edit.replace_region(model, [node], new, outputs)
        split += 1
    return split
