"""com.microsoft.GatherBlockQuantized (quantized embeddings) as a Triton kernel.

`out[i, :] = (codes[indices[i], :] − zero_point) · scale`, with the PyTorch backend's (and ONNX
Runtime's) layout: data `[rows, D]` of 4-bit codes packed two a byte, low nibble first (signed
codes for INT4 data, centred on 0) or of uint8 codes; scales `[rows, BLOCKS]` along D; zero
points packed like the data (4-bit) or uint8 (8-bit), else 0 (INT4) or 2^(bits−1). A program
dequantises BLOCK_D values of one looked-up row; only the rows the indices name are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from string import Template


@dataclass(frozen=True)
class GatherBlockQuantized:
    rows: int
    dim: int
    bits: int
    block_size: int
    signed: bool
    zero_points: bool

    suffix = "gather"

    @property
    def blocks(self) -> int:
        return -(-self.dim // self.block_size)

    def describe(self) -> str:
        return f"GatherBlockQuantized {self.bits}-bit, block {self.block_size}, {self.rows}×{self.dim}"

    def parameters(self) -> list[str]:
        return ["data", "indices", "scales"] + (["zero_points"] if self.zero_points else [])

    def render(self, name: str) -> str:
        if self.bits == 4:
            code = ("    packed = tl.load(data_ptr + row * (D // 2) + d // 2, mask=ok, other=0).to(tl.int32)\n"
                    "    code = (packed >> ((d % 2) * 4)) & 15")
            if self.signed:
                code += "\n    code = tl.where(code >= 8, code - 16, code)  # INT4: two's complement nibbles"
        else:
            code = "    code = tl.load(data_ptr + row * D + d, mask=ok, other=0).to(tl.int32)"
        if not self.zero_points:
            zero_point = f"    zero_point = {0.0 if self.signed else float(1 << (self.bits - 1))!r}"
        elif self.bits == 4:
            zero_point = ("    zero_point_byte = tl.load(zero_points_ptr + row * ((BLOCKS + 1) // 2) + block // 2, mask=ok,"
                          " other=0).to(tl.int32)\n"
                          "    zero_point = ((zero_point_byte >> ((block % 2) * 4)) & 15).to(tl.float32)")
        else:
            zero_point = ("    zero_point = tl.load(zero_points_ptr + row * BLOCKS + block, mask=ok, other=0)"
                          ".to(tl.float32)")
        pointers = "".join(f"{p}_ptr, " for p in self.parameters())
        text = KERNEL.replace("$code", code).replace("$zero_point", zero_point)
        return Template(text + "\n\n\n" + LAUNCHER).substitute(
            name=name, pointers=pointers, args=", ".join(self.parameters()), ROWS=self.rows, D=self.dim,
            BLOCKS=self.blocks, BLOCK_SIZE=self.block_size, describe=self.describe())


KERNEL = '''@triton.jit
def ${name}_kernel(${pointers}out_ptr, ROWS: tl.constexpr, D: tl.constexpr, BLOCKS: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr):
    """BLOCK_D values of the row indices[i] names, dequantised."""
    i = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = d < D
    row = tl.load(indices_ptr + i).to(tl.int64)
    row = tl.where(row < 0, row + ROWS, row)  # ONNX: negative indices count from the end
    block = d // BLOCK_SIZE
$code
$zero_point
    scale = tl.load(scales_ptr + row * BLOCKS + block, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + i * D + d, ((code.to(tl.float32) - zero_point) * scale).to(out_ptr.dtype.element_ty), mask=ok)'''

LAUNCHER = '''def ${name}($args):
    """$describe."""
    indices = indices.contiguous()
    out = torch.empty((*indices.shape, $D), dtype=scales.dtype, device=scales.device)
    count = indices.numel()
    if count:
        grid = (count, triton.cdiv($D, GATHER_BLOCK_D))
        ${name}_kernel[grid]($args, out, ROWS=$ROWS, D=$D, BLOCKS=$BLOCKS, BLOCK_SIZE=$BLOCK_SIZE,
                             BLOCK_D=GATHER_BLOCK_D)
    return out'''
