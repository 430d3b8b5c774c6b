"""Block-wise weight quantization and the com.microsoft packed layouts, in numpy.

Bit-identical to onnxruntime's MatMulNBitsQuantizer (MLAS `BlockwiseQuantizer`):

- asymmetric: min ≤ 0 ≤ max per block, `scale = (max - min) / (2^b - 1)`,
  `zp = roundf(-min / scale)`; symmetric: `scale = -m / 2^(b-1)` where m is the block's
  value of largest magnitude (sign kept, so it lands on code 0), `zp = 2^(b-1)`;
- `q = clamp(roundf(w * (1 / scale) + zp), 0, 2^b - 1)` in float32, with C's roundf
  (half away from zero, not numpy's half to even);
- MatMulNBits B `[N, K/block, block·b/8]`: each output column's K values, low bits first;
  scales `[N, K/block]`; zero points packed `[N, ceil(K/block · b/8)]`, pad value 2^(b-1).

Other algorithms (clip search, AWQ, GPTQ) reuse `codes_for` and `pack` with their own
scales and zero points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPPORTED_BITS = (2, 4, 8)


@dataclass(frozen=True)
class BlockQuantized:
    """A [K, N] weight quantized in blocks of `block_size` along K, per output column."""

    codes: np.ndarray  # uint8 [N, K_padded]: one code per weight, not yet packed
    scales: np.ndarray  # float32 [N, n_blocks]
    zero_points: np.ndarray  # uint8 [N, n_blocks]
    bits: int
    block_size: int
    k: int  # the true K (codes are zero-padded to a whole number of blocks)

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """As arrays only (for an `.npz`: codes packed, as the model holds them); `from_arrays`
        makes it again."""
        return {"packed_codes": pack(self.codes, self.bits), "scales": self.scales, "zero_points": self.zero_points,
                "sizes": np.array([self.bits, self.block_size, self.k])}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> BlockQuantized:
        bits, block_size, k = (int(v) for v in arrays["sizes"])
        return cls(unpack(arrays["packed_codes"], bits), arrays["scales"], arrays["zero_points"], bits, block_size, k)

    def dequantize(self) -> np.ndarray:
        """The [K, N] float32 weight the codes stand for."""
        n, k_padded = self.codes.shape
        codes = self.codes.reshape(n, -1, self.block_size).astype(np.float32)
        values = (codes - self.zero_points[:, :, None].astype(np.float32)) * self.scales[:, :, None]
        return values.reshape(n, k_padded)[:, : self.k].T.copy()

    def packed_b(self) -> np.ndarray:
        return pack(self.codes, self.bits).reshape(self.n, -1, self.block_size * self.bits // 8)

    def packed_zero_points(self) -> np.ndarray:
        blocks = self.zero_points.shape[1]
        per_byte = 8 // self.bits
        padded = -(-blocks // per_byte) * per_byte
        zp = np.full((self.n, padded), 1 << (self.bits - 1), dtype=np.uint8)
        zp[:, :blocks] = self.zero_points
        return pack(zp, self.bits)

    def nbytes(self, with_zero_points: bool = True) -> int:
        size = self.n * (self.codes.shape[1] * self.bits // 8) + self.scales.nbytes
        return size + (self.packed_zero_points().nbytes if with_zero_points else 0)


def roundf(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero (numpy's round goes to even)."""
    r = np.rint(x)
    ties = np.abs(x - np.trunc(x)) == 0.5
    return np.where(ties, np.trunc(x) + np.sign(x), r)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes along the last axis, low bits first: [..., L] → [..., L·bits/8] uint8."""
    per_byte = 8 // bits
    grouped = codes.astype(np.uint8).reshape(*codes.shape[:-1], -1, per_byte)
    packed = np.zeros(grouped.shape[:-1], dtype=np.uint8)
    for i in range(per_byte):
        packed |= (grouped[..., i] & ((1 << bits) - 1)) << (bits * i)
    return packed


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    per_byte = 8 // bits
    parts = [(packed >> (bits * i)) & ((1 << bits) - 1) for i in range(per_byte)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], -1)


def blocks_of(weight: np.ndarray, block_size: int) -> np.ndarray:
    """[K, N] → [N, n_blocks, block_size] float32, K zero-padded to whole blocks."""
    k, n = weight.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n_blocks * block_size, n), dtype=np.float32)
    padded[:k] = weight
    return padded.T.reshape(n, n_blocks, block_size)


def scale_and_zero_point(
    low: np.ndarray, high: np.ndarray, bits: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per-block scale and zero point from each block's min and max (MLAS range2scale[zp])."""
    low = low.astype(np.float32)
    high = high.astype(np.float32)
    if symmetric:
        extreme = np.where(np.abs(high) > np.abs(low), high, low)
        scale = (-extreme / np.float32(1 << (bits - 1))).astype(np.float32)
        return scale, np.full(scale.shape, 1 << (bits - 1), dtype=np.uint8)
    low = np.minimum(low, np.float32(0))
    high = np.maximum(high, np.float32(0))
    scale = ((high - low) / np.float32((1 << bits) - 1)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        zp_float = np.where(scale != 0, np.float32(0) - low / scale, low).astype(np.float32)
    zp = np.clip(roundf(zp_float), 0, (1 << bits) - 1).astype(np.uint8)
    return scale, zp


def codes_for(blocks: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    """q = clamp(roundf(w · (1/scale) + zp)) per block; blocks [N, B, g], scale/zp [N, B]."""
    with np.errstate(divide="ignore"):
        reciprocal = np.where(scale != 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
    scaled = (blocks * reciprocal[:, :, None]).astype(np.float32) + zp[:, :, None].astype(np.float32)
    return np.clip(roundf(scaled), 0, (1 << bits) - 1).astype(np.uint8)


CHUNK_ELEMENTS = 1 << 22  # quantize ~4M weights at a time: float temporaries stay ~16 MB each


def quantize_rtn(weight: np.ndarray, bits: int, block_size: int, symmetric: bool) -> BlockQuantized:
    """Round-to-nearest block quantization of a [K, N] weight (ORT-compatible), in column chunks."""
    k, n = weight.shape
    n_blocks = -(-k // block_size)
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    codes = np.empty((n, n_blocks * block_size), np.uint8)  # filled in place: no second copy to concatenate
    scales = np.empty((n, n_blocks), np.float32)
    zps = np.empty((n, n_blocks), np.uint8)
    for start in range(0, n, step):
        stop = min(start + step, n)
        blocks = blocks_of(weight[:, start:stop], block_size)
        scales[start:stop], zps[start:stop] = scale_and_zero_point(blocks.min(axis=2), blocks.max(axis=2), bits,
                                                                   symmetric)
        codes[start:stop] = codes_for(blocks, scales[start:stop], zps[start:stop], bits).reshape(stop - start, -1)
    return BlockQuantized(codes, scales, zps, bits, block_size, k)
