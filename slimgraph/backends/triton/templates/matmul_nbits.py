"""com.microsoft.MatMulNBits as Triton kernels: `y = x · dequant(B)ᵀ (+ bias)`, 2/4/8-bit weights.

Layout (slimgraph.ir.nbits, bit-identical to ONNX Runtime): B is uint8
`[N, BLOCKS, BLOCK_SIZE·BITS/8]`, so weight row n is `BLOCKS · BLOCK_BYTES` contiguous bytes and
byte b of it holds the codes of k = b·PER_BYTE … b·PER_BYTE + PER_BYTE − 1, low bits first.
Scales are `[N, BLOCKS]`; zero points either packed like B (`[N, ceil(BLOCKS/PER_BYTE)]`), or in
the scales' dtype (`[N, BLOCKS]`), or absent (2^(BITS−1)). `dequant = (q − zero_point) · scale`.

Both kernels read each packed byte once and take it apart in registers, one bit position
(`shift`) at a time: the codes at `shift` of consecutive bytes are every PER_BYTE-th k, so each
`shift` pairs them with a strided slice of x — no interleaving needed.

- GEMV (one row of x, decoding): a program owns BLOCK_N weight rows and walks K a few
  quantization blocks per step. Per block it keeps `Σ x·q` and `Σ x`, and applies the scale and
  zero point once per block (MixPE: `y = Σ_g s_g (Σ_{k∈g} x_k q_k − z_g Σ_{k∈g} x_k)`).
- GEMM (prefill): tiles of `[BLOCK_M, BLOCK_N]`, the weight tile dequantised to x's dtype and
  multiplied with `tl.dot` (exact float32 products, `ieee`, when x is float32).
- Ternary weights (2-bit, zero point 1: what `ternarize` writes): the GEMV needs no multiply,
  `Σ x·(q − 1)` is adds and subtracts selected by the code (`mixpe`), or T-MAC's lookup table
  (`lut`): a first kernel tabulates, for every 4 consecutive activations, the 16 sums of their
  subsets; each byte's two bit planes then index it: `Σ x·q = T[plane 0] + 2·T[plane 1]`.

An epilogue (a fused group of elementwise ops on y, expressions.py) runs on the accumulator
before the store: bias + activation, residual adds.
"""

from __future__ import annotations

from dataclasses import dataclass
from string import Template

ZERO_POINTS = ("default", "packed", "float")
TERNARY = ("mixpe", "lut")


@dataclass(frozen=True)
class Epilogue:
    """Elementwise code on the matmul result, written once per kernel context (GEMV and GEMM)."""

    parameters: tuple[str, ...]  # kernel pointer arguments (without `_ptr`), in call order
    row_parameters: tuple[str, ...]  # those holding full [rows, N] tensors (reshaped by the launcher)
    gemv_lines: tuple[str, ...]
    gemm_lines: tuple[str, ...]
    result: str  # the variable holding the output
    ops: str  # what it computes, for the docstring


@dataclass(frozen=True)
class MatMulNBits:
    k: int
    n: int
    bits: int
    block_size: int
    zero_points: str  # one of ZERO_POINTS
    bias: bool
    ternary: str | None = None  # one of TERNARY when the weights are ternary
    epilogue: Epilogue | None = None

    @property
    def blocks(self) -> int:
        return -(-self.k // self.block_size)

    @property
    def suffix(self) -> str:
        return "ternary" if self.ternary else f"int{self.bits}"

    def describe(self) -> str:
        fused = f" + {self.epilogue.ops}" if self.epilogue else ""
        what = f"ternary ({self.ternary})" if self.ternary else f"{self.bits}-bit"
        return f"MatMulNBits {what}, block {self.block_size}, K={self.k} N={self.n}{fused}"

    def parameters(self) -> list[str]:
        """The launcher's (and kernels') tensor arguments, in the order the node's inputs come."""
        names = ["x", "b", "scales"]
        if self.zero_points != "default":
            names.append("zero_points")
        if self.bias:
            names.append("bias")
        return names + list(self.epilogue.parameters if self.epilogue else ())

    def render(self, name: str) -> str:
        per_byte = 8 // self.bits
        values = dict(
            name=name, K=self.k, N=self.n, BITS=self.bits, BLOCK_SIZE=self.block_size, BLOCKS=self.blocks,
            PER_BYTE=per_byte, BLOCK_BYTES=self.block_size // per_byte, MASK=(1 << self.bits) - 1,
            ZP_BYTES=-(-self.blocks // per_byte), DEFAULT_ZP=f"{float(1 << (self.bits - 1))!r}",
            pointers="".join(f"{p}_ptr, " for p in self.parameters()), args=", ".join(self.parameters()),
            describe=self.describe(),
        )
        constants = ["BITS", "PER_BYTE", "BLOCK_SIZE", "BLOCK_BYTES", "MASK"]
        constants += {"default": ["DEFAULT_ZP"], "packed": ["ZP_BYTES"], "float": []}[self.zero_points]
        values["constants"] = "\n".join(f"    {c}: tl.constexpr = {values[c]}" for c in constants)
        parts = [self._gemv(values), self._gemm(values)]
        if self.ternary == "lut":
            parts.insert(0, Template(LUT_KERNEL).substitute(values))
        parts.append(self._launcher(values))
        return "\n\n\n".join(parts)

    # --- the pieces -----------------------------------------------------------------------------

    def _zero_point(self, blocks: str, n: str, mask: str, indent: str) -> str:
        if self.zero_points == "default":
            return f"{indent}zero_point = DEFAULT_ZP"
        if self.zero_points == "float":
            return (f"{indent}zero_point = tl.load(zero_points_ptr + {n} * BLOCKS + {blocks}, mask={mask}, "
                    f"other=0.0).to(tl.float32)")
        return (f"{indent}zero_point_bytes = tl.load(zero_points_ptr + {n} * ZP_BYTES + {blocks} // PER_BYTE, "
                f"mask={mask}, other=0).to(tl.int32)\n"
                f"{indent}zero_point = ((zero_point_bytes >> (({blocks} % PER_BYTE) * BITS)) & MASK).to(tl.float32)")

    def _finish(self, indent: str, lines: tuple[str, ...] | None, bias: str) -> str:
        """Bias, then the epilogue's lines; `y` holds what is stored."""
        out = []
        if self.bias:
            out.append(f"{indent}acc += {bias}")
        if self.epilogue:
            out += [f"{indent}{line}" for line in lines]
            out.append(f"{indent}y = {self.epilogue.result}")
        else:
            out.append(f"{indent}y = acc")
        return "\n".join(out)

    def _gemv(self, values: dict) -> str:
        if self.ternary == "lut":
            body = GEMV_LUT_STEP
        elif self.ternary == "mixpe":
            body = GEMV_TERNARY_STEP
        else:
            body = GEMV_STEP.replace("$zero_point", self._zero_point("blocks[None, :]", "n[:, None]",
                                                                      "n_ok[:, None] & blocks_ok[None, :]", " " * 8))
        finish = self._finish("    ", self.epilogue.gemv_lines if self.epilogue else None,
                              "tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)")
        extra = ", lut_ptr" if self.ternary == "lut" else ""
        text = GEMV.replace("$step", body).replace("$finish", finish).replace("$extra", extra)
        return Template(text.replace("$constants", values["constants"])).substitute(
            values, gemv_doc=GEMV_DOCS[self.ternary])

    def _gemm(self, values: dict) -> str:
        zero_point = self._zero_point("blocks[:, None]", "n[None, :]", "blocks_ok[:, None] & n_ok[None, :]", " " * 8)
        finish = self._finish("    ", self.epilogue.gemm_lines if self.epilogue else None,
                              "tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]")
        text = GEMM.replace("$zero_point", zero_point).replace("$finish", finish)
        return Template(text.replace("$constants", values["constants"])).substitute(values)

    def _launcher(self, values: dict) -> str:
        rows = "".join(f"    {p} = {p}.reshape(rows, $N).contiguous()\n"
                       for p in (self.epilogue.row_parameters if self.epilogue else ()))
        if self.ternary == "lut":
            gemv = GEMV_LUT_LAUNCH
        else:
            gemv = GEMV_LAUNCH
        text = LAUNCHER.replace("$row_inputs", rows).replace("$gemv", gemv)
        return Template(text).substitute(values)


GEMV_DOCS = {
    None: "One row of x against BLOCK_N weight rows; scale and zero point applied once per quantization block.",
    "mixpe": "One row of x against BLOCK_N ternary weight rows: Σ x·(q − 1) by selects, no multiply; "
             "the scale once per block.",
    "lut": "One row of x against BLOCK_N ternary weight rows: each byte's two bit planes index the table of "
           "4-activation subset sums (T-MAC); the scale once per block.",
}

GEMV = '''@triton.jit
def ${name}_gemv(${pointers}y_ptr$extra, K: tl.constexpr, N: tl.constexpr, BLOCKS: tl.constexpr,
        BLOCK_N: tl.constexpr, STEP_BLOCKS: tl.constexpr):
    """$gemv_doc"""
$constants
    row = tl.program_id(1).to(tl.int64)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    g = tl.arange(0, STEP_BLOCKS)
    j = tl.arange(0, BLOCK_BYTES)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for first in range(0, BLOCKS, STEP_BLOCKS):
        blocks = first + g
        blocks_ok = blocks < BLOCKS
        byte_ok = n_ok[:, None, None] & blocks_ok[None, :, None]
        packed = tl.load(b_ptr + (n[:, None, None] * BLOCKS + blocks[None, :, None]) * BLOCK_BYTES + j[None, None, :],
                         mask=byte_ok, other=0).to(tl.int32)
        scale = tl.load(scales_ptr + n[:, None] * BLOCKS + blocks[None, :], mask=n_ok[:, None] & blocks_ok[None, :],
                        other=0.0).to(tl.float32)
$step
$finish
    tl.store(y_ptr + row * N + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)'''

GEMV_STEP = '''        dot = tl.zeros((BLOCK_N, STEP_BLOCKS), dtype=tl.float32)
        x_sum = tl.zeros((STEP_BLOCKS,), dtype=tl.float32)
        for shift in tl.static_range(PER_BYTE):
            k = blocks[:, None] * BLOCK_SIZE + j[None, :] * PER_BYTE + shift
            x = tl.load(x_ptr + row * K + k, mask=blocks_ok[:, None] & (k < K), other=0.0).to(tl.float32)
            q = ((packed >> (shift * BITS)) & MASK).to(tl.float32)
            dot += tl.sum(q * x[None, :, :], axis=2)
            x_sum += tl.sum(x, axis=1)
$zero_point
        acc += tl.sum(scale * (dot - zero_point * x_sum[None, :]), axis=1)'''

GEMV_TERNARY_STEP = '''        dot = tl.zeros((BLOCK_N, STEP_BLOCKS), dtype=tl.float32)
        for shift in tl.static_range(PER_BYTE):
            k = blocks[:, None] * BLOCK_SIZE + j[None, :] * PER_BYTE + shift
            x = tl.load(x_ptr + row * K + k, mask=blocks_ok[:, None] & (k < K), other=0.0).to(tl.float32)
            q = (packed >> (shift * BITS)) & MASK  # 0, 1, 2 for −1, 0, +1
            dot += tl.sum(tl.where(q == 2, x[None, :, :], tl.where(q == 0, -x[None, :, :], 0.0)), axis=2)
        acc += tl.sum(scale * dot, axis=1)'''

GEMV_LUT_STEP = '''        groups = (row * BLOCKS * BLOCK_BYTES + blocks[None, :, None] * BLOCK_BYTES + j[None, None, :]) * 16
        plane_0 = (packed & 1) | ((packed >> 1) & 2) | ((packed >> 2) & 4) | ((packed >> 3) & 8)
        plane_1 = ((packed >> 1) & 1) | ((packed >> 2) & 2) | ((packed >> 3) & 4) | ((packed >> 4) & 8)
        sums = (tl.load(lut_ptr + groups + plane_0, mask=byte_ok, other=0.0)
                + 2.0 * tl.load(lut_ptr + groups + plane_1, mask=byte_ok, other=0.0)
                - tl.load(lut_ptr + groups + 15, mask=byte_ok, other=0.0))  # Σ x·(q − 1) over the byte's 4 codes
        acc += tl.sum(scale * tl.sum(sums, axis=2), axis=1)'''

LUT_KERNEL = '''@triton.jit
def ${name}_lut(x_ptr, lut_ptr, K: tl.constexpr, GROUPS: tl.constexpr, BLOCK_GROUPS: tl.constexpr):
    """T-MAC's table: for every 4 consecutive activations, the sums of each of their 16 subsets
    (entry i adds the activations whose bit is set in i)."""
    row = tl.program_id(1).to(tl.int64)
    group = tl.program_id(0) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)
    member = tl.arange(0, 4)
    entry = tl.arange(0, 16)
    k = group[:, None] * 4 + member[None, :]
    x = tl.load(x_ptr + row * K + k, mask=(k < K) & (group[:, None] < GROUPS), other=0.0).to(tl.float32)
    chosen = ((entry[None, :] >> member[:, None]) & 1).to(tl.float32)
    table = tl.sum(x[:, :, None] * chosen[None, :, :], axis=1)
    tl.store(lut_ptr + (row * GROUPS + group[:, None]) * 16 + entry[None, :], table, mask=group[:, None] < GROUPS)'''

GEMM = '''@triton.jit
def ${name}_gemm(${pointers}y_ptr, M, K: tl.constexpr, N: tl.constexpr, BLOCKS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STEP_BLOCKS: tl.constexpr, PRECISION: tl.constexpr):
    """A [BLOCK_M, BLOCK_N] tile of y: STEP_BLOCKS quantization blocks of weights dequantised per step,
    one tl.dot per bit position within a byte."""
$constants
    STEP_BYTES: tl.constexpr = STEP_BLOCKS * BLOCK_BYTES
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < N
    byte = tl.arange(0, STEP_BYTES)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for first in range(0, BLOCKS, STEP_BLOCKS):
        blocks = first + byte // BLOCK_BYTES
        blocks_ok = blocks < BLOCKS
        packed = tl.load(b_ptr + n[None, :] * (BLOCKS * BLOCK_BYTES) + first * BLOCK_BYTES + byte[:, None],
                         mask=blocks_ok[:, None] & n_ok[None, :], other=0).to(tl.int32)
        scale = tl.load(scales_ptr + n[None, :] * BLOCKS + blocks[:, None], mask=blocks_ok[:, None] & n_ok[None, :],
                        other=0.0).to(tl.float32)
$zero_point
        for shift in tl.static_range(PER_BYTE):
            k = first * BLOCK_SIZE + byte * PER_BYTE + shift
            a = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
            w = (((packed >> (shift * BITS)) & MASK).to(tl.float32) - zero_point) * scale
            acc += tl.dot(a, w.to(a.dtype), input_precision=PRECISION)
$finish
    tl.store(y_ptr + m[:, None] * N + n[None, :], y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])'''

GEMV_LAUNCH = '''        grid = (triton.cdiv($N, GEMV_BLOCK_N), rows)
        ${name}_gemv[grid]($args, y, K=$K, N=$N, BLOCKS=$BLOCKS, BLOCK_N=GEMV_BLOCK_N,
                           STEP_BLOCKS=gemv_step_blocks($BLOCKS, $BLOCK_SIZE), num_warps=GEMV_NUM_WARPS)'''

GEMV_LUT_LAUNCH = '''        lut = torch.empty((rows, $BLOCKS * $BLOCK_BYTES, 16), dtype=torch.float32, device=x.device)
        groups = $BLOCKS * $BLOCK_BYTES
        ${name}_lut[(triton.cdiv(groups, LUT_BLOCK_GROUPS), rows)](x, lut, K=$K, GROUPS=groups,
                                                                   BLOCK_GROUPS=LUT_BLOCK_GROUPS)
        grid = (triton.cdiv($N, GEMV_BLOCK_N), rows)
        ${name}_gemv[grid]($args, y, lut, K=$K, N=$N, BLOCKS=$BLOCKS, BLOCK_N=GEMV_BLOCK_N,
                           STEP_BLOCKS=gemv_step_blocks($BLOCKS, $BLOCK_SIZE), num_warps=GEMV_NUM_WARPS)'''

LAUNCHER = '''def ${name}($args):
    """$describe."""
    shape = (*x.shape[:-1], $N)
    rows = x.numel() // $K
    x = x.reshape(rows, $K).contiguous()
$row_inputs    y = torch.empty((rows, $N), dtype=x.dtype, device=x.device)
    if rows == 0:
        return y.reshape(shape)
    if rows <= GEMV_MAX_ROWS:  # decoding: weights read once per row, dequantised in registers
$gemv
    else:
        grid = (triton.cdiv(rows, GEMM_BLOCK_M), triton.cdiv($N, GEMM_BLOCK_N))
        ${name}_gemm[grid]($args, y, rows, K=$K, N=$N, BLOCKS=$BLOCKS, BLOCK_M=GEMM_BLOCK_M,
                           BLOCK_N=GEMM_BLOCK_N, STEP_BLOCKS=gemm_step_blocks($BLOCK_BYTES),
                           PRECISION=dot_precision(x), num_warps=GEMM_NUM_WARPS)
    return y.reshape(shape)'''
