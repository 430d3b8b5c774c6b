"""com.microsoft.MoE as Triton kernels, with ONNX Runtime's CPU semantics (as the PyTorch backend's
`runtime.mixture_of_experts`): each token goes to the k experts of highest softmax(router)
probability, weighted by it (renormalised over the k when asked); expert e computes
`fc2[e] · act(fc1[e] · x + b1) + b2` (weights `[experts, out, in]`; SwiGLU interleaves gate and
linear rows of fc1).

1. `route`: one program per token: softmax over the experts, then k rounds of argmax.
2. `group_by_expert` (torch ops on the device, no host sync): the (token, slot) pairs sorted by
   expert, each expert's run padded to whole BLOCK_M blocks, and the expert of each block.
3. `fc1`: a grouped GEMM: block b multiplies its BLOCK_M pairs' token rows by its expert's fc1,
   adds the bias and applies the activation, writing hidden rows in sorted order.
4. `fc2`: the same over the hidden rows with fc2, each row scaled by its routing weight and written
   to its pair's own row; the k rows of a token are summed at the end (no atomics: deterministic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from string import Template

ACTIVATIONS = ("relu", "gelu", "silu", "identity", "swiglu")


@dataclass(frozen=True)
class MixtureOfExperts:
    experts: int
    hidden: int
    inter: int
    top_k: int
    activation: str
    normalize: bool
    fc1_bias: bool
    fc2_bias: bool
    alpha: float = 1.0
    beta: float = 0.0
    limit: float = math.inf

    suffix = "moe"

    def describe(self) -> str:
        return (f"MoE {self.experts} experts, top-{self.top_k}, {self.activation}, hidden {self.hidden}, "
                f"inner {self.inter}")

    def parameters(self) -> list[str]:
        return (["x", "router", "fc1"] + (["fc1_bias"] if self.fc1_bias else []) + ["fc2"]
                + (["fc2_bias"] if self.fc2_bias else []))

    def render(self, name: str) -> str:
        swiglu = self.activation == "swiglu"
        if swiglu:
            products = ("        w_gate = tl.load(fc1_ptr + expert * ROWS * HIDDEN + (2 * n[None, :]) * HIDDEN + k[:, None], "
                        "mask=w_ok, other=0.0)\n"
                        "        w_linear = tl.load(fc1_ptr + expert * ROWS * HIDDEN + (2 * n[None, :] + 1) * HIDDEN "
                        "+ k[:, None], mask=w_ok, other=0.0)\n"
                        "        gate += tl.dot(a, w_gate.to(a.dtype), input_precision=PRECISION)\n"
                        "        linear += tl.dot(a, w_linear.to(a.dtype), input_precision=PRECISION)")
            accumulators = ("    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)\n"
                            "    linear = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)")
        else:
            products = ("        w = tl.load(fc1_ptr + expert * ROWS * HIDDEN + n[None, :] * HIDDEN + k[:, None], "
                        "mask=w_ok, other=0.0)\n"
                        "        acc += tl.dot(a, w.to(a.dtype), input_precision=PRECISION)")
            accumulators = "    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)"
        bias = ""
        if self.fc1_bias and swiglu:
            bias = ("    gate += tl.load(fc1_bias_ptr + expert * ROWS + 2 * n, mask=n_ok, other=0.0).to(tl.float32)[None, :]\n"
                    "    linear += tl.load(fc1_bias_ptr + expert * ROWS + 2 * n + 1, mask=n_ok, other=0.0)"
                    ".to(tl.float32)[None, :]\n")
        elif self.fc1_bias:
            bias = "    acc += tl.load(fc1_bias_ptr + expert * ROWS + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]\n"
        fc2_bias = ("    acc += tl.load(fc2_bias_ptr + expert * HIDDEN + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]\n"
                    if self.fc2_bias else "")
        normalize = ("    chosen_weights = chosen_weights / tl.sum(chosen_weights, axis=0)  # over the k chosen\n"
                     if self.normalize else "")
        fc1_pointers = "x_ptr, fc1_ptr, " + ("fc1_bias_ptr, " if self.fc1_bias else "")
        fc2_pointers = "hidden_ptr, fc2_ptr, " + ("fc2_bias_ptr, " if self.fc2_bias else "")
        text = "\n\n\n".join([ROUTE.replace("$normalize", normalize),
                              FC1.replace("$accumulators", accumulators).replace("$products", products)
                              .replace("$bias", bias).replace("$activation", self._activation()),
                              FC2.replace("$bias", fc2_bias), LAUNCHER])
        return Template(text).substitute(
            name=name, E=self.experts, HIDDEN=self.hidden, INTER=self.inter, TOP_K=self.top_k,
            ROWS=2 * self.inter if swiglu else self.inter, BLOCK_E=1 << max(0, (self.experts - 1).bit_length()),
            BLOCK_K=1 << max(0, (self.top_k - 1).bit_length()), fc1_pointers=fc1_pointers, fc2_pointers=fc2_pointers,
            args=", ".join(self.parameters()), describe=self.describe(),
            fc1_args="tokens, fc1, " + ("fc1_bias, " if self.fc1_bias else ""),
            fc2_args="hidden, fc2, " + ("fc2_bias, " if self.fc2_bias else ""))

    def _activation(self) -> str:
        if self.activation == "relu":
            return "    h = tl.maximum(acc, 0.0)"
        if self.activation == "gelu":  # the tanh approximation, as ONNX Runtime's MoE
            inner = "0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)"
            return f"    h = 0.5 * acc * (1.0 + (2.0 * tl.sigmoid(2.0 * {inner}) - 1.0))"
        if self.activation == "silu":
            return "    h = acc * tl.sigmoid(acc)"
        if self.activation == "identity":
            return "    h = acc"
        lines = []
        if math.isfinite(self.limit):
            lines += [f"    gate = tl.minimum(gate, {self.limit!r})",
                      f"    linear = tl.minimum(tl.maximum(linear, {-self.limit!r}), {self.limit!r})"]
        lines.append(f"    h = gate * tl.sigmoid({self.alpha!r} * gate) * (linear + {self.beta!r})  # SwiGLU")
        return "\n".join(lines)


ROUTE = '''@triton.jit
def ${name}_route(logits_ptr, weights_ptr, experts_ptr, E: tl.constexpr, TOP_K: tl.constexpr,
        BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """One token: softmax over its router logits, then the TOP_K most probable experts and their weights."""
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    logits = tl.load(logits_ptr + t * E + e, mask=e < E, other=float("-inf")).to(tl.float32)
    probabilities = tl.exp(logits - tl.max(logits, axis=0))
    probabilities = probabilities / tl.sum(probabilities, axis=0)
    remaining = tl.where(e < E, probabilities, -1.0)
    slot = tl.arange(0, BLOCK_K)
    chosen_weights = tl.zeros((BLOCK_K,), dtype=tl.float32)
    chosen = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(remaining, axis=0)
        chosen_weights = tl.where(slot == j, tl.max(remaining, axis=0), chosen_weights)
        chosen = tl.where(slot == j, best, chosen)
        remaining = tl.where(e == best, -1.0, remaining)
$normalize    tl.store(weights_ptr + t * TOP_K + slot, chosen_weights, mask=slot < TOP_K)
    tl.store(experts_ptr + t * TOP_K + slot, chosen, mask=slot < TOP_K)'''

FC1 = '''@triton.jit
def ${name}_fc1(${fc1_pointers}slots_ptr, block_experts_ptr, hidden_ptr, PAIRS, HIDDEN: tl.constexpr,
        INTER: tl.constexpr, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Hidden rows act(x · fc1[e]ᵀ + b1) for BLOCK_M (token, slot) pairs that all chose expert e."""
    ROWS: tl.constexpr = $ROWS
    block = tl.program_id(0)
    expert = tl.load(block_experts_ptr + block).to(tl.int64)
    slot = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(slots_ptr + slot)
    valid = pair < PAIRS  # (padding, and the blocks past the last run, hold PAIRS)
    token = (pair // TOP_K).to(tl.int64)
    expert = tl.maximum(expert, 0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < INTER
$accumulators
    for first in range(0, HIDDEN, BLOCK_K):
        k = first + tl.arange(0, BLOCK_K)
        k_ok = k < HIDDEN
        w_ok = k_ok[:, None] & n_ok[None, :]
        a = tl.load(x_ptr + token[:, None] * HIDDEN + k[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
$products
$bias$activation
    tl.store(hidden_ptr + slot[:, None] * INTER + n[None, :], h.to(hidden_ptr.dtype.element_ty),
             mask=valid[:, None] & n_ok[None, :])'''

FC2 = '''@triton.jit
def ${name}_fc2(${fc2_pointers}slots_ptr, block_experts_ptr, weights_ptr, routed_ptr, PAIRS, HIDDEN: tl.constexpr,
        INTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr):
    """Each pair's expert output (h · fc2[e]ᵀ + b2) times its routing weight, in the pair's own row."""
    block = tl.program_id(0)
    expert = tl.load(block_experts_ptr + block).to(tl.int64)
    slot = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(slots_ptr + slot).to(tl.int64)
    valid = pair < PAIRS
    expert = tl.maximum(expert, 0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < HIDDEN
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for first in range(0, INTER, BLOCK_K):
        k = first + tl.arange(0, BLOCK_K)
        k_ok = k < INTER
        a = tl.load(hidden_ptr + slot[:, None] * INTER + k[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(fc2_ptr + expert * HIDDEN * INTER + n[None, :] * INTER + k[:, None],
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(a, w.to(a.dtype), input_precision=PRECISION)
$bias    weight = tl.load(weights_ptr + pair, mask=valid, other=0.0)
    tl.store(routed_ptr + pair[:, None] * HIDDEN + n[None, :], acc * weight[:, None], mask=valid[:, None] & n_ok[None, :])'''

LAUNCHER = '''def ${name}($args):
    """$describe."""
    tokens = x.reshape(-1, $HIDDEN).contiguous()
    count = tokens.shape[0]
    if count == 0:
        return torch.zeros_like(x)
    logits = router.reshape(count, $E).contiguous()
    weights = torch.empty((count, $TOP_K), dtype=torch.float32, device=x.device)
    experts = torch.empty((count, $TOP_K), dtype=torch.int32, device=x.device)
    ${name}_route[(count,)](logits, weights, experts, E=$E, TOP_K=$TOP_K, BLOCK_E=$BLOCK_E, BLOCK_K=$BLOCK_K)
    slots, block_experts = group_by_expert(experts, $E, MOE_BLOCK_M)
    hidden = torch.empty((slots.numel(), $INTER), dtype=x.dtype, device=x.device)
    grid = (block_experts.numel(), triton.cdiv($INTER, MOE_BLOCK_N))
    ${name}_fc1[grid](${fc1_args}slots, block_experts, hidden, count * $TOP_K, HIDDEN=$HIDDEN, INTER=$INTER,
                      TOP_K=$TOP_K, BLOCK_M=MOE_BLOCK_M, BLOCK_N=MOE_BLOCK_N, BLOCK_K=MOE_BLOCK_K,
                      PRECISION=dot_precision(x))
    routed = torch.empty((count * $TOP_K, $HIDDEN), dtype=torch.float32, device=x.device)
    grid = (block_experts.numel(), triton.cdiv($HIDDEN, MOE_BLOCK_N))
    ${name}_fc2[grid](${fc2_args}slots, block_experts, weights, routed, count * $TOP_K, HIDDEN=$HIDDEN,
                      INTER=$INTER, BLOCK_M=MOE_BLOCK_M, BLOCK_N=MOE_BLOCK_N, BLOCK_K=MOE_BLOCK_K,
                      PRECISION=dot_precision(x))
    return routed.view(count, $TOP_K, $HIDDEN).sum(1).to(x.dtype).reshape(x.shape)'''
