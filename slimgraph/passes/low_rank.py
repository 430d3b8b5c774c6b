"""low-rank: MatMul(x, W) [+ b] → MatMul(MatMul(x, L), R) [+ b], a linear factored at rank r.

`W [K, N] ≈ L [K, r] · R [r, N]`, only where it saves at least `min_saving` of the layer's
multiply-adds (`r·(K + N) ≤ (1 − min_saving)·K·N`; never at r ≥ K·N / (K + N)).

- method=svd: `W = U S Vᵀ`, `L = U_r S_r^½`, `R = S_r^½ V_rᵀ`; the relative Frobenius error is
  exactly `√(1 − energy)` where energy = Σ_{i≤r} s_i² / Σ s_i².
- method=activation (SVD-LLM): minimise the layer's output error ‖X(W − LR)‖ on calibration
  activations instead: with `XᵀX = C Cᵀ` (Cholesky, 1% damping), take the SVD of `Cᵀ W`; then
  `L = C⁻ᵀ U_r S_r^½`. It tracks the model's error much better than plain SVD.

The rank: `rank=R`, or `ratio` (the fraction of each layer's parameters kept), or the smallest
rank whose energy reaches `energy` (of the decomposition the method uses).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir.edit import add_initializer, bias_value, replace_linear, weight_matrix
from slimgraph.ir.parts import Linear
from slimgraph.ir.structure import find_linears
from slimgraph.passes._infra.base import Pass, PassContext, PassResult
from slimgraph.passes._infra.options import option
from slimgraph.passes._infra.registry import register_pass
from slimgraph.passes.activations import moments

DAMPING = 0.01


@dataclass(frozen=True)
class Factors:
    left: np.ndarray  # [K, r]
    right: np.ndarray  # [r, N]
    energy: float  # of the kept singular values

    @property
    def rank(self) -> int:
        return self.left.shape[1]


def factor(weight: np.ndarray, gram: np.ndarray | None = None, *, rank: int = 0, ratio: float = 0.0,
           energy: float = 1.0) -> Factors:
    """Factor a [K, N] weight; with the Gram matrix `XᵀX` [K, K] of its calibration activations,
    activation-aware (SVD-LLM)."""
    k, n = weight.shape
    whitening = None
    if gram is not None:
        gram = gram.astype(np.float64) + np.eye(k) * DAMPING * max(np.mean(np.diag(gram)), 1e-12)
        whitening = np.linalg.cholesky(gram)  # lower: XᵀX ≈ C Cᵀ, so ‖X D‖ = ‖Cᵀ D‖
    u, s, vt = _svd(weight.astype(np.float64) if whitening is None else whitening.T @ weight.astype(np.float64))
    shares = np.cumsum(s**2) / max(np.sum(s**2), 1e-300)
    if rank:
        r = min(rank, len(s))
    elif ratio:
        r = max(1, int(ratio * k * n / (k + n)))
    else:
        r = int(np.searchsorted(shares, energy - 1e-12) + 1)
    r = min(r, len(s))
    root = np.sqrt(s[:r])
    left = u[:, :r] * root
    if whitening is not None:
        left = np.linalg.solve(whitening.T, left)
    right = vt[:r]
    right *= root[:, None]
    return Factors(left.astype(np.float32), right.astype(np.float32), float(shares[r - 1]))


def _svd(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The thin SVD of a [K, N] matrix. A wide one (a language model's head: 576 × 49152) goes
    through the eigenvectors of A·Aᵀ [K, K] instead, because LAPACK's SVD holds three more
    copies of A; a truncation `U_r·U_rᵀ·A` stays a projection of A however inexact the smallest
    singular values come out of the squared matrix."""
    k, n = a.shape
    if n < 4 * k:
        return np.linalg.svd(a, full_matrices=False)
    squares, u = np.linalg.eigh(a @ a.T)
    order = np.argsort(squares)[::-1]
    u, s = u[:, order], np.sqrt(np.clip(squares[order], 0, None))
    vt = u.T @ a
    nonzero = s > s[0] * 1e-12
    vt[nonzero] /= s[nonzero, None]
    vt[~nonzero] = 0
    return u, s, vt


@register_pass
@dataclass(frozen=True, kw_only=True)
class LowRank(Pass):
    """MatMul(x, W) → MatMul(MatMul(x, L), R): linears factored at low rank where it saves multiply-adds."""

    name: ClassVar[str] = "low-rank"
    exact: ClassVar[bool] = False
    energy: float = option(0.9, low=0, low_open=True, high=1)
    rank: int = option(0, low=0)
    ratio: float = option(0.0, low=0, high=1, high_open=True)
    method: Literal["svd", "activation"] = "svd"
    min_saving: float = option(0.1, low=0, high=1, high_open=True)
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.rank and self.ratio:
            raise SlimgraphError(f"{self.name}: give rank or ratio, not both")

    def linears(self, model: ir.Model) -> list[Linear]:
        chosen = []
        for linear in find_linears(model):
            names = (linear.name, linear.weight, linear.node.name or "")
            if any(fnmatch.fnmatchcase(n, p) for p in self.exclude for n in names if n):
                continue
            node = linear.node
            if node.op_type == "Gemm" and (node.attributes.get_float("alpha", 1.0) != 1.0
                                           or node.attributes.get_float("beta", 1.0) != 1.0):
                continue
            chosen.append(linear)
        return chosen

    def check(self, model: ir.Model) -> list[Linear]:
        """The linears `run` factors."""
        super().check(model)
        linears = self.linears(model)
        if not linears:
            raise SlimgraphError(f"{self.name}: no linear layer (MatMul/Gemm with a constant 2-D weight) to factor")
        return linears

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        linears = self.check(model)
        grams = _input_grams(model, linears, ctx) if self.method == "activation" else {}
        factored, skipped, before, after, energies = 0, 0, 0, 0, []
        for linear in ctx.track(linears, f"low-rank {self.method}"):
            k, n = linear.in_features, linear.out_features
            f = factor(weight_matrix(linear), grams.pop(linear.name, None), rank=self.rank, ratio=self.ratio,
                       energy=self.energy)
            if f.rank * (k + n) > (1 - self.min_saving) * k * n:
                skipped += 1
                continue
            _replace(model, linear, f)
            factored += 1
            before, after = before + k * n, after + f.rank * (k + n)
            energies.append(f.energy)
        if not factored:
            raise SlimgraphError(f"{self.name}: no layer saves {self.min_saving:.0%} of its multiply-adds at the "
                                 f"rank asked for (energy={self.energy}, rank={self.rank}, ratio={self.ratio})")
        return PassResult(True, {
            "linears factored": f"{factored} of {factored + skipped}",
            "parameters": f"{before:,} → {after:,} ({after / before:.2f}x) in the factored layers",
            "energy kept": f"{min(energies):.3f}–{max(energies):.3f}",
            "method": self.method + ("" if self.method == "svd" else f" ({ctx.inputs_source})"),
        })


def _input_grams(model: ir.Model, linears: list[Linear], ctx: PassContext) -> dict[str, np.ndarray]:
    """Linear name → XᵀX of its input on the calibration tokens (linears reading one input share it)."""
    found = moments(model, {lin.node.inputs[0]: -1 for lin in linears}, ctx, gram=True)
    return {lin.name: found[lin.node.inputs[0]].gram for lin in linears}


def _replace(model: ir.Model, linear: Linear, f: Factors) -> None:
    base = linear.name
    dtype = linear.node.inputs[0].dtype
    numpy_dtype = dtype.numpy() if dtype is not None else np.float32
    left = add_initializer(model, f"{base}.low_rank.left", f.left.astype(numpy_dtype))
    right = add_initializer(model, f"{base}.low_rank.right", f.right.astype(numpy_dtype))
    first = ir.node("MatMul", [linear.node.inputs[0], left], name=f"{linear.node.name or base}_low_rank_left")
    second = ir.node("MatMul", [first.outputs[0], right], name=f"{linear.node.name or base}_low_rank_right")
    nodes = [first, second]
    bias = bias_value(linear)
    if bias is not None:
        nodes.append(ir.node("Add", [second.outputs[0], bias], name=f"{linear.node.name or base}_bias"))
    replace_linear(model, linear, nodes, nodes[-1].outputs[0])
