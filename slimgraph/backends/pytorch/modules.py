"""Modules the structured PyTorch code uses where torch has no layer of its own: GPT-2's Conv1D
(a linear that keeps its weight as [in, out], so the source model's state_dict loads), the
block-quantized layers of onnxruntime's MatMulNBits / GatherBlockQuantized, and its MoE. Each uses only torch;
saving a module copies the source of those it uses into `model.py`."""

from __future__ import annotations

import torch
from torch import nn

from slimgraph.backends.pytorch.runtime import mixture_of_experts


class Conv1D(nn.Module):
    """transformers' Conv1D: y = x · W + b with W stored [in, out]."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).reshape(*x.shape[:-1], self.nf)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., L] → codes [..., L·8/bits], low bits first."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return torch.bitwise_and(torch.bitwise_right_shift(packed.unsqueeze(-1), shifts), (1 << bits) - 1).flatten(-2)


class QuantizedLinear(nn.Module):
    """A linear layer with block-quantized weights (onnxruntime's MatMulNBits): `bits`-bit codes of
    W [out, in] in blocks of `block_size` along `in`, one scale (and zero point) per block."""

    def __init__(self, in_features: int, out_features: int, bits: int, block_size: int, bias: bool = False,
                 zero_points: str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits, self.block_size = in_features, out_features, bits, block_size
        self.register_buffer("qweight", torch.empty(0, dtype=torch.uint8))  # [out, blocks, block·bits/8]
        self.register_buffer("scales", torch.empty(0))  # [out · blocks]
        self.zero_points_packed = zero_points == "packed"  # uint8 codes packed as qweight's, else floats
        self.register_buffer("zero_points", torch.empty(0, dtype=torch.uint8) if zero_points else None)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def dequantized_weight(self) -> torch.Tensor:
        n, k, block = self.out_features, self.in_features, self.block_size
        blocks = -(-k // block)
        codes = unpack_codes(self.qweight, self.bits).reshape(n, blocks, block).to(self.scales.dtype)
        if self.zero_points is None:
            zero = torch.full((n, blocks, 1), float(1 << (self.bits - 1)), dtype=self.scales.dtype,
                              device=codes.device)
        elif self.zero_points_packed:
            zero = unpack_codes(self.zero_points, self.bits)[:, :blocks].to(self.scales.dtype).unsqueeze(-1)
        else:
            zero = self.zero_points.reshape(n, blocks, 1)
        return ((codes - zero) * self.scales.reshape(n, blocks, 1)).reshape(n, blocks * block)[:, :k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.dequantized_weight().t())
        return y + self.bias if self.bias is not None else y


class QuantizedEmbedding(nn.Module):
    """An embedding table with block-quantized rows (onnxruntime's GatherBlockQuantized, 4-bit
    codes in MatMulNBits' byte layout or int4, or 8-bit): `table[ids]` dequantized."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, block_size: int, signed: bool,
                 zero_points: bool) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.bits, self.block_size = num_embeddings, embedding_dim, bits, block_size
        self.signed = signed
        self.register_buffer("qweight", torch.empty(0, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(0))
        self.register_buffer("zero_points", torch.empty(0, dtype=torch.uint8) if zero_points else None)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows, dim, block = self.num_embeddings, self.embedding_dim, self.block_size
        scales = self.scales.reshape(rows, -1)
        if self.bits == 4:
            nibbles = unpack_codes(self.qweight.reshape(rows, -1), 4)[:, :dim]
            codes = torch.where(nibbles >= 8, nibbles.to(torch.int16) - 16, nibbles.to(torch.int16)) \
                if self.signed else nibbles
        else:
            codes = self.qweight.reshape(rows, dim)
        if self.zero_points is None:  # int4 is centred on 0; unsigned codes on 2^(bits-1)
            zero = torch.zeros((), dtype=scales.dtype) if self.signed else \
                torch.full((), float(1 << (self.bits - 1)), dtype=scales.dtype)
        else:
            zero = unpack_codes(self.zero_points.reshape(rows, -1), 4) if self.bits == 4 else \
                self.zero_points.reshape(rows, -1)
            zero = zero[:, : -(-dim // block)].to(scales.dtype).repeat_interleave(block, dim=1)[:, :dim]
        table = (codes.to(scales.dtype) - zero.to(codes.device)) * scales.repeat_interleave(block, dim=1)[:, :dim]
        return table[ids]


class MixtureOfExperts(nn.Module):
    """onnxruntime's com.microsoft.MoE: each token goes to the `k` experts its router scores highest;
    expert e is fc2[e] · act(fc1[e] · x + b1) + b2 (weights [experts, out, in])."""

    def __init__(self, experts: int, hidden: int, inner: int, k: int, activation: str, normalize_routing: bool,
                 bias: bool, alpha: float = 1.0, beta: float = 0.0, limit: float = float("inf")) -> None:
        super().__init__()
        self.k, self.activation, self.normalize_routing = k, activation, normalize_routing
        self.alpha, self.beta, self.limit = alpha, beta, limit
        gated = 2 if activation == "swiglu" else 1
        self.fc1 = nn.Parameter(torch.empty(experts, gated * inner, hidden))
        self.fc2 = nn.Parameter(torch.empty(experts, hidden, inner))
        self.fc1_bias = nn.Parameter(torch.empty(experts, gated * inner)) if bias else None
        self.fc2_bias = nn.Parameter(torch.empty(experts, hidden)) if bias else None

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        return mixture_of_experts(x, router_logits, self.fc1, self.fc1_bias, self.fc2, self.fc2_bias, self.k,
                                  self.activation, self.normalize_routing, self.alpha, self.beta, self.limit)
