"""A fused group of elementwise and norm ops (fusion.py) as one Triton kernel: one program per row.

The program loads its row of each row input, the `[D]` vectors and scalars once, runs the group's
lines (expressions.py) in float32, and stores each output: a whole row, or one number per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from string import Template

from slimgraph.backends.triton.expressions import ROW


@dataclass(frozen=True)
class RowKernel:
    d: int
    parameters_: tuple[str, ...]  # tensor inputs, in call order
    kinds: tuple[str, ...]  # their kinds (expressions.ROW, STAT, VECTOR, SCALAR)
    lines: tuple[str, ...]
    outputs: tuple[tuple[str, str, str], ...]  # (variable, kind, dtype expression for the launcher)
    ops: str

    suffix = "fused"

    def describe(self) -> str:
        return f"fused {self.ops} over rows of {self.d}"

    def parameters(self) -> list[str]:
        return list(self.parameters_)

    def render(self, name: str) -> str:
        first = next(p for p, kind in zip(self.parameters_, self.kinds) if kind == ROW)
        stores, allocations, names = [], [], []
        for i, (variable, kind, dtype) in enumerate(self.outputs):
            out = f"out{i}"
            names.append(out)
            if kind == ROW:
                stores.append(f"    tl.store({out}_ptr + row * D + cols, {variable}.to({out}_ptr.dtype.element_ty), "
                              "mask=inside)")
                allocations.append(f"    {out} = torch.empty({first}.shape, dtype={dtype}, device={first}.device)")
            else:
                stores.append(f"    tl.store({out}_ptr + row, {variable}.to({out}_ptr.dtype.element_ty))")
                allocations.append(f"    {out} = torch.empty((*{first}.shape[:-1], 1), dtype={dtype}, "
                                   f"device={first}.device)")
        contiguous = "".join(f"    {p} = {p}.contiguous()\n" for p, kind in zip(self.parameters_, self.kinds)
                             if kind == ROW)
        pointers = "".join(f"{p}_ptr, " for p in (*self.parameters_, *names))
        body = "\n".join(f"    {line}" for line in self.lines)
        returned = names[0] if len(names) == 1 else "(" + ", ".join(names) + ")"
        text = (KERNEL.replace("$body", body).replace("$stores", "\n".join(stores)) + "\n\n\n"
                + LAUNCHER.replace("$contiguous", contiguous).replace("$allocations", "\n".join(allocations)))
        return Template(text).substitute(
            name=name, pointers=pointers, D=self.d, BLOCK_D=1 << max(0, (self.d - 1).bit_length()), first=first,
            args=", ".join(self.parameters_), call=", ".join((*self.parameters_, *names)), returned=returned,
            describe=self.describe())


KERNEL = '''@triton.jit
def ${name}_kernel(${pointers}D: tl.constexpr, BLOCK_D: tl.constexpr):
    """One row of D values per program."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
$body
$stores'''

LAUNCHER = '''def ${name}($args):
    """$describe."""
$contiguous    rows = ${first}.numel() // $D
$allocations
    if rows:
        ${name}_kernel[(rows,)]($call, D=$D, BLOCK_D=$BLOCK_D)
    return $returned'''
