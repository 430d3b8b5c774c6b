"""quantize-weights: MatMul/Gemm(x, W) [+ bias] → com.microsoft.MatMulNBits(x, q, scales, zp, bias);
com.microsoft.MoE's experts → com.microsoft.QMoE (`experts`, round to nearest); with embeddings=true,
Gather(table, ids) → com.microsoft.GatherBlockQuantized.

Weights are quantized in blocks of `group_size` input channels per output column, to 8, 4
or 2 bits: rtn (round to nearest; bit-identical to onnxruntime's MatMulNBitsQuantizer),
awq (activation-aware channel scales, shared by the linears reading one input and folded into
the norm or linear before them where exact, else a Mul; then a clip search)
or gptq (error feedback through the inverse Hessian). awq and gptq use the pipeline's
calibration inputs (--calib), or synthesized ones, as the report says; with blockwise=true, one
block at a time, each on what the quantized blocks before it produce (`slimgraph.passes.blockwise`),
checkpointed after each block for `optimize --resume`. accuracy_level=4
lets onnxruntime quantize activations to int8 per block: faster, slightly lossy; for 8
and 2 bits it is the only fast CPU kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir.edit import replace_linear, weight_matrix
from slimgraph.ir.nbits import BlockQuantized, quantize_rtn
from slimgraph.ir.parts import Linear
from slimgraph.measure.evaluate import initializer_bytes
from slimgraph.measure.stats import human_bytes
from slimgraph.passes._infra.base import Pass, PassContext, PassResult
from slimgraph.passes._infra.registry import register_pass
from slimgraph.passes.activations import linear_inputs
from slimgraph.passes.blockwise import BlockSteps
from slimgraph.passes.quantize import algorithms
from slimgraph.passes.quantize.awq_scales import ScaleSummary, apply_input_scales
from slimgraph.passes.quantize.experts import quantizable_experts, quantize_experts
from slimgraph.passes.quantize.rewrite import (
    SharedWeights,
    embedding_tables,
    input_dtype,
    matmul_nbits,
    nothing_to_quantize,
    quantizable_linears,
    quantize_embedding,
    share_quantized_table,
    tied_table,
)

GroupSize = Literal[16, 32, 64, 128, 256]  # MatMulNBits block sizes: powers of two from 16


@register_pass
@dataclass(frozen=True, kw_only=True)
class QuantizeWeights(Pass):
    """MatMul/Gemm(x, W) → com.microsoft.MatMulNBits, MoE → QMoE (weights block-quantized to 8, 4 or 2 bits)."""

    name: ClassVar[str] = "quantize-weights"
    exact: ClassVar[bool] = False
    bits: Literal[2, 4, 8] = 4
    group_size: GroupSize = 32
    symmetric: bool = False
    method: Literal["rtn", "awq", "gptq"] = "rtn"
    exclude: tuple[str, ...] = ()
    embeddings: bool = False
    accuracy_level: Literal[0, 4] = 0
    blockwise: bool = False  # awq/gptq: one block at a time, on what the quantized blocks before produce

    def __post_init__(self) -> None:
        if self.blockwise and self.method == "rtn":
            raise SlimgraphError(f"{self.name}: blockwise=true calibrates awq and gptq block by block; rtn reads no "
                                 "calibration inputs")
        if self.embeddings and self.bits == 2:
            raise SlimgraphError(f"{self.name}: embeddings can be quantized to 4 or 8 bits, not 2")

    def quantize(self, weight: np.ndarray, x: np.ndarray | None, s: np.ndarray | None) -> BlockQuantized:
        """The quantized weight; for awq, `weight` is already scaled by s and the layer reads x / s."""
        if self.method == "rtn":
            return quantize_rtn(weight, self.bits, self.group_size, self.symmetric)
        if self.method == "awq":
            return algorithms.quantize_scaled(weight, x, s, self.bits, self.group_size, self.symmetric)
        return algorithms.quantize_gptq(weight, x, self.bits, self.group_size, self.symmetric)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        linears, skipped = quantizable_linears(model, self.exclude)
        mixtures, skipped_mixtures = quantizable_experts(model, self.exclude, self.group_size)
        skipped += skipped_mixtures
        tables = embedding_tables(model, self.exclude) if self.embeddings else []
        if not linears and not tables and not mixtures:
            return nothing_to_quantize(self.name, skipped, "linears quantized")
        before = initializer_bytes(model)
        # A tied LM head is quantized as its embedding is (rtn), so that both read one table.
        tied = {lin.name: table for lin in linears if (table := tied_table(lin, tables)) is not None}
        calibrated = [lin for lin in linears if lin.name not in tied] if self.method != "rtn" else []
        folded, resumed = ScaleSummary(), None
        if calibrated and self.blockwise:
            folded, resumed = self._blockwise(model, calibrated, ctx)
        elif calibrated:
            activations = linear_inputs(model, calibrated, ctx)
            scales: dict[str, np.ndarray] = {}
            if self.method == "awq":
                scales, folded = apply_input_scales(model, calibrated, activations, self.bits, self.group_size,
                                                    self.symmetric)
            for linear in ctx.track(calibrated, f"{self.method} int{self.bits}"):
                q = self.quantize(weight_matrix(linear), activations[linear.name], scales.get(linear.name))
                self._rewrite(model, linear, q)
        # rtn's codes depend on the weight alone: readers of one weight share them (awq's and gptq's
        # depend on each reader's inputs)
        codes, stored = SharedWeights(), SharedWeights()
        rest = [lin for lin in linears if lin not in calibrated]
        for linear in ctx.track(rest, f"rtn int{self.bits}" if calibrated else f"{self.method} int{self.bits}"):
            if linear.name in tied:  # rtn reads the weight in column chunks: any layout will do
                q = quantize_rtn(weight_matrix(linear, contiguous=False), self.bits, self.group_size, self.symmetric)
            else:
                q = codes.get(linear, lambda: self.quantize(weight_matrix(linear, contiguous=False), None, None))
            node = self._rewrite(model, linear, q, stored if linear.name not in tied else None)
            if linear.name in tied:
                share_quantized_table(model, tied[linear.name], node)
        for node in ctx.track(mixtures, f"rtn int{self.bits} experts"):
            quantize_experts(model, node, self.bits, self.group_size, self.symmetric, self.accuracy_level)
        shared = {table.name for table in tied.values()}
        quantized_tables = [quantize_embedding(model, t, self.bits, self.group_size, self.symmetric)
                            for t in tables if t.name not in shared] + [True] * len(shared)
        stats = {
            "linears quantized": len(linears),
            "method": f"{self.method} int{self.bits} g{self.group_size}" + (" sym" if self.symmetric else ""),
            "weights": f"{human_bytes(before)} → {human_bytes(initializer_bytes(model))}",
        }
        if mixtures:
            stats["MoE quantized"] = f"{len(mixtures)} (experts: rtn)" if self.method != "rtn" else len(mixtures)
        if self.embeddings:
            stats["embeddings quantized"] = sum(quantized_tables)
        if tied:
            stats["tied head"] = ", ".join(f"{name} shares its int{self.bits} table with {table.name}"
                                           for name, table in tied.items())
        if self.method != "rtn":
            stats["calibration"] = ctx.inputs_source
        if folded.groups:
            stats["input scales"] = str(folded)
        if resumed:
            stats["resumed"] = resumed
        if skipped:
            stats["skipped"] = len(skipped)
        warnings = []
        if self.bits in (2, 8) and self.accuracy_level == 0:
            warnings.append(f"{self.name}: onnxruntime's CPU kernel for {self.bits}-bit MatMulNBits at accuracy_level 0 "
                            "is a slow fallback (measured 25-50x slower than fp32 in benchmarks/quantize.py); "
                            "accuracy_level=4 is fast and costs little fidelity")
        return PassResult(True, stats, warnings=warnings)

    def _rewrite(self, model: ir.Model, linear: Linear, q: BlockQuantized, stored: SharedWeights | None = None
                 ) -> ir.Node:
        node = matmul_nbits(model, linear, q, accuracy_level=self.accuracy_level, symmetric=self.symmetric,
                            dtype=input_dtype(linear), shared=stored)
        replace_linear(model, linear, [node], node.outputs[0])
        return node

    def _blockwise(self, model: ir.Model, linears: list[Linear], ctx: PassContext) -> tuple[ScaleSummary, str | None]:
        """awq/gptq one block at a time (`slimgraph.passes.blockwise`), each block calibrated on what
        the blocks before it, already quantized, produce; checkpointed after each block when
        `ctx.checkpoints` is set, and resumed from a checkpoint of the same work. Returns awq's
        input scales, and what was resumed (None: nothing)."""
        steps = BlockSteps(model, linears, ctx)
        order: list[list[str]] = []  # per step, its linears in the order rewritten
        done: dict[str, dict[str, np.ndarray]] = {}  # the current step's: linear → what makes its rewrite
        summary = ScaleSummary()
        saved = ctx.checkpoints.start(self.to_text(), model, ctx.inputs) if ctx.checkpoints is not None else None
        resumed = None
        if saved is not None:  # the blocks done: their rewrites made again from what they computed
            by_name = {lin.name: lin for lin in linears}
            for results in saved.steps:
                summary += self._apply(model, [by_name[name] for name in results], results)
                order.append(list(results))
            steps.resume(saved.done, saved.state, {name for results in saved.steps for name in results})
            resumed = f"{saved.done} of {len(steps)} steps done before, read from {ctx.checkpoints.folder}"
        if ctx.checkpoints is not None:
            steps.after_step = lambda index, state: ctx.checkpoints.save(index, done, state, order)
        for step in steps:
            scales: dict[str, np.ndarray] = {}
            if self.method == "awq" and step.linears:
                scales, applied = apply_input_scales(model, step.linears, step.activations, self.bits,
                                                     self.group_size, self.symmetric)
                summary += applied
            done.clear()
            where = f"block {step.index + 1}/{len(steps) - 1}" if step.index < len(steps) - 1 else "after the blocks"
            for linear in ctx.track(step.linears, f"{self.method} int{self.bits}, {where}"):
                q = self.quantize(weight_matrix(linear), step.activations[linear.name], scales.get(linear.name))
                self._rewrite(model, linear, q)
                done[linear.name] = q.to_arrays() | ({"awq_scale": scales[linear.name]} if scales else {})
            order.append(list(done))
        return summary, resumed

    def _apply(self, model: ir.Model, linears: list[Linear], results: dict[str, dict[str, np.ndarray]]
               ) -> ScaleSummary:
        """The rewrites a checkpointed step made (its scales and codes), made again."""
        summary = ScaleSummary()
        if self.method == "awq" and linears:
            summary = apply_input_scales(model, linears, {}, self.bits, self.group_size, self.symmetric,
                                         known={name: arrays["awq_scale"] for name, arrays in results.items()})[1]
        for linear in linears:
            self._rewrite(model, linear, BlockQuantized.from_arrays(results[linear.name]))
        return summary
