"""Weight quantizers that use calibration activations X [tokens, K] of a [K, N] weight.

- clip search: per block and output column, shrink the range (1.0 … 0.5 of min/max) to the
  ratio that minimises the layer-output error ||X_b (W_b − Q(W_b))||²;
- AWQ: per input channel scale s = mean|x|^α (α on a grid over [0, 1]) chosen to minimise
  the output error of Q(W·s)/s, then the clip search on W·s; the layer then reads x / s;
- GPTQ: columns quantized in order, each one's error fed forward to the columns not yet
  quantized through the upper Cholesky factor of H⁻¹, H = XᵀX + 1% mean-diagonal damping.

All errors are measured with H = XᵀX, so ||X dW||² = Σ_n dW_nᵀ H dW_n.
"""

from __future__ import annotations

import numpy as np

from slimgraph.ir.nbits import (
    BlockQuantized,
    blocks_of,
    codes_for,
    quantize_rtn,
    scale_and_zero_point,
)

CLIP_RATIOS = np.linspace(1.0, 0.5, 11)
AWQ_GRID = np.linspace(0.0, 1.0, 21)


def gram(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return x64.T @ x64


def output_error(h: np.ndarray, delta: np.ndarray) -> float:
    """||X·delta||² for a [K, N] weight change, from H = XᵀX."""
    d = delta.astype(np.float64)
    return float(np.einsum("kn,kn->", d, h @ d))


def _block_errors(h: np.ndarray, delta: np.ndarray, block_size: int) -> np.ndarray:
    """Output error per (column, block) for a [K, N] change: [N, n_blocks]."""
    k, n = delta.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n_blocks * block_size, n))
    padded[:k] = delta
    h_padded = np.zeros((n_blocks * block_size, n_blocks * block_size))
    h_padded[:k, :k] = h
    d = padded.reshape(n_blocks, block_size, n)
    hb = np.stack([h_padded[i * block_size:(i + 1) * block_size, i * block_size:(i + 1) * block_size]
                   for i in range(n_blocks)])
    return np.einsum("bin,bij,bjn->nb", d, hb, d)


def quantize_clipped(weight: np.ndarray, h: np.ndarray, bits: int, block_size: int, symmetric: bool
                     ) -> BlockQuantized:
    """RTN with, per block and output column, the clip ratio that minimises the output error."""
    k = weight.shape[0]
    blocks = blocks_of(weight, block_size)  # [N, B, g]
    low, high = blocks.min(axis=2), blocks.max(axis=2)
    best_error = best_codes = best_scale = best_zp = None
    for ratio in CLIP_RATIOS:
        scale, zp = scale_and_zero_point(low * ratio, high * ratio, bits, symmetric)
        codes = codes_for(blocks, scale, zp, bits)
        candidate = BlockQuantized(codes.reshape(codes.shape[0], -1), scale, zp, bits, block_size, k)
        errors = _block_errors(h, candidate.dequantize() - weight, block_size)  # [N, B]
        if best_error is None:
            best_error, best_codes, best_scale, best_zp = errors, codes, scale, zp
            continue
        better = errors < best_error
        best_error = np.where(better, errors, best_error)
        best_codes = np.where(better[:, :, None], codes, best_codes)
        best_scale = np.where(better, scale, best_scale)
        best_zp = np.where(better, zp, best_zp)
    return BlockQuantized(best_codes.reshape(best_codes.shape[0], -1), best_scale, best_zp, bits, block_size, k)


def awq_scale(weight: np.ndarray, x: np.ndarray, bits: int, block_size: int, symmetric: bool) -> np.ndarray:
    """The per-input-channel scale s = mean|x|^α (α on a grid) that minimises ||X (Q(W·s)/s − W)||²."""
    h = gram(x)
    mean_abs = np.abs(x).mean(axis=0).astype(np.float64) + 1e-8
    best_error, best_scale = None, np.ones(weight.shape[0])
    for alpha in AWQ_GRID:
        s = mean_abs ** alpha
        s = s / np.sqrt(s.max() * s.min())
        q = quantize_rtn((weight * s[:, None]).astype(np.float32), bits, block_size, symmetric)
        error = output_error(h, q.dequantize() / s[:, None] - weight)
        if best_error is None or error < best_error:
            best_error, best_scale = error, s
    return best_scale.astype(np.float32)


def quantize_scaled(scaled_weight: np.ndarray, x: np.ndarray, s: np.ndarray, bits: int, block_size: int,
                    symmetric: bool) -> BlockQuantized:
    """The clip search on an AWQ-scaled weight W·s, whose layer reads x / s."""
    s64 = s.astype(np.float64)
    return quantize_clipped(scaled_weight, gram(x) / np.outer(s64, s64), bits, block_size, symmetric)


def quantize_awq(weight: np.ndarray, x: np.ndarray, bits: int, block_size: int, symmetric: bool
                 ) -> tuple[BlockQuantized, np.ndarray]:
    """AWQ for one linear: the quantized scaled weight Q(W·s) and the input scale s (the layer reads x / s)."""
    s = awq_scale(weight, x, bits, block_size, symmetric)
    return quantize_scaled((weight * s[:, None]).astype(np.float32), x, s, bits, block_size, symmetric), s


def quantize_gptq(weight: np.ndarray, x: np.ndarray, bits: int, block_size: int, symmetric: bool,
                  damping: float = 0.01, lazy_block: int = 128) -> BlockQuantized:
    """GPTQ with static groups of `block_size` input channels (scales from the updated weights)."""
    k, n = weight.shape
    h = gram(x)
    w = weight.T.astype(np.float64).copy()  # [N, K]: columns are input channels
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += np.eye(k) * damping * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper Cholesky factor of H⁻¹
    n_blocks = -(-k // block_size)
    codes = np.zeros((n, n_blocks * block_size), dtype=np.uint8)
    scales = np.zeros((n, n_blocks), dtype=np.float32)
    zps = np.zeros((n, n_blocks), dtype=np.uint8)
    step = max(lazy_block // block_size, 1) * block_size
    for start in range(0, k, step):
        end = min(start + step, k)
        w1 = w[:, start:end].copy()
        errors = np.zeros_like(w1)
        u1 = u[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % block_size == 0:
                group = w1[:, i:i + block_size].astype(np.float32)
                scale, zp = scale_and_zero_point(group.min(axis=1), group.max(axis=1), bits, symmetric)
                scales[:, column // block_size], zps[:, column // block_size] = scale, zp
            b = column // block_size
            column_values = w1[:, i].astype(np.float32).reshape(n, 1, 1)
            q = codes_for(column_values, scales[:, b:b + 1], zps[:, b:b + 1], bits).reshape(n)
            codes[:, column] = q
            dequantized = (q.astype(np.float32) - zps[:, b]) * scales[:, b]
            error = (w1[:, i] - dequantized) / u1[i, i]
            w1[:, i:] -= np.outer(error, u1[i, i:])
            errors[:, i] = error
        w[:, end:] -= errors @ u[start:end, end:]
    # padded columns (K not a multiple of the block) hold the zero point, as in RTN
    if n_blocks * block_size > k:
        codes[:, k:] = np.repeat(zps[:, -1:], n_blocks * block_size - k, axis=1)
    return BlockQuantized(codes, scales, zps, bits, block_size, k)
