"""kernels.py: the generated Triton kernels and their launchers as one module; loading it; saving
it beside the PyTorch backend's model.py (which calls the launchers as `kernels.<name>`).

Triton reads a kernel's source with `inspect.getsource`, so even the in-memory artifact imports
kernels.py from a file (a private temporary folder that lives as long as the artifact).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import weakref
from pathlib import Path
from types import ModuleType

from slimgraph.backends.triton.plan import LoweringReport, Plan
from slimgraph.errors import SlimgraphError

HEADER = '''"""Triton kernels slimgraph generated for model.py, which calls the launchers below (`kernels.<name>`).

Each launcher prepares its tensors and launches its @triton.jit kernels; the templates they come
from are in slimgraph/backends/triton/templates. They run on a CUDA GPU. Without one, set
TRITON_INTERPRET=1 before importing to run them in Triton's interpreter (slow; for checking).

{report}
"""

import torch
import triton
import triton.language as tl

# Launch settings: module constants, so that a benchmark can sweep them.
{settings}


def dot_precision(x: torch.Tensor) -> str:
    """float32 products stay exact ("ieee"); TF32 would lose ten bits of each operand."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def gemv_step_blocks(blocks: int, block_size: int) -> int:
    """Quantization blocks per GEMV step: about GEMV_STEP_K activations, a power of two."""
    return min(max(1, GEMV_STEP_K // block_size), triton.next_power_of_2(blocks))


def gemm_step_blocks(block_bytes: int) -> int:
    return max(1, GEMM_STEP_BYTES // block_bytes)
'''

# name → (value, what it sets): the defaults, for a GPU.
SETTINGS = {
    "GEMV_MAX_ROWS": (1, "rows of x up to which MatMulNBits takes the GEMV kernel (decoding)"),
    "GEMV_BLOCK_N": (16, "weight rows per GEMV program"),
    "GEMV_STEP_K": (256, "activations per GEMV step (whole quantization blocks)"),
    "GEMV_NUM_WARPS": (4, ""),
    "GEMM_BLOCK_M": (16, ""),
    "GEMM_BLOCK_N": (64, ""),
    "GEMM_NUM_WARPS": (4, ""),
    "GEMM_STEP_BYTES": (32, "packed bytes of a weight row per GEMM step (at least 16: the depth of tl.dot)"),
    "LUT_BLOCK_GROUPS": (64, "groups of 4 activations per T-MAC table program"),
    "GATHER_BLOCK_D": (128, ""),
    "MOE_BLOCK_M": (16, ""),
    "MOE_BLOCK_N": (32, ""),
    "MOE_BLOCK_K": (32, ""),
}
# Triton's interpreter spends about a millisecond of Python per op of every program, whatever the tile
# size, so on CPU the artifact launches fewer, wider programs (the kernels' code is the same).
INTERPRETER_SETTINGS = {"GEMV_BLOCK_N": 256, "GEMV_STEP_K": 1024, "GEMM_BLOCK_M": 64, "GEMM_BLOCK_N": 512,
                        "GEMM_STEP_BYTES": 128, "LUT_BLOCK_GROUPS": 256, "GATHER_BLOCK_D": 1024, "MOE_BLOCK_N": 256,
                        "MOE_BLOCK_K": 128}

GROUP_BY_EXPERT = '''

def group_by_expert(experts: torch.Tensor, count: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, slot) pairs in runs by expert, each run padded to whole blocks of block_m: the pair
    index of each slot (padding holds the number of pairs) and the expert of each block (−1 past
    the last run). Torch ops on the device, without a host sync."""
    flat = experts.reshape(-1).long()
    pairs = flat.numel()
    counts = torch.zeros(count, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank = torch.arange(pairs, device=flat.device) - (torch.cumsum(counts, 0) - counts)[expert_of]
    capacity = -(-(pairs + count * (block_m - 1)) // block_m) * block_m
    slots = torch.full((capacity,), pairs, dtype=torch.int32, device=flat.device)
    slots[(ends - padded)[expert_of] + rank] = order.to(torch.int32)
    starts = torch.arange(0, capacity, block_m, device=flat.device)
    block_experts = torch.searchsorted(ends, starts, right=True)
    return slots, torch.where(block_experts < count, block_experts, -1).to(torch.int32)
'''


def kernels_source(plan: Plan, report: LoweringReport, settings: dict[str, int] | None = None) -> str:
    """kernels.py: the header (launch settings: the defaults, or `settings` where given), then each launcher."""
    unknown = set(settings or ()) - set(SETTINGS)
    if unknown:
        raise SlimgraphError(f"unknown launch settings {', '.join(sorted(unknown))} (known: {', '.join(SETTINGS)})")
    values = {name: (settings or {}).get(name, default) for name, (default, _) in SETTINGS.items()}
    lines = "\n".join(f"{name} = {values[name]}" + (f"  # {SETTINGS[name][1]}" if SETTINGS[name][1] else "")
                      for name in SETTINGS)
    text = HEADER.format(report="\n".join(report.lines()), settings=lines)
    if any("_route[" in source for source in plan.sources.values()):
        text += GROUP_BY_EXPERT
    return text + "".join(f"\n\n{source}\n" for source in plan.sources.values())


def check_interpreter(interpret: bool) -> None:
    """Triton's interpreter works only when TRITON_INTERPRET=1 was set before triton was first imported
    (its own library functions, `tl.sum` and the like, are @triton.jit functions too). On a machine
    without a GPU, interpreting is all Triton can do, so the variable is set here when triton is not
    imported yet; anywhere else it is the user's to set."""
    if interpret and "triton" not in sys.modules:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    interpreted = isinstance(tl.sum, InterpretedFunction)
    if interpret and not interpreted:
        raise SlimgraphError("device cpu runs the kernels in Triton's interpreter, which needs TRITON_INTERPRET=1 "
                             "set before triton is first imported")
    if not interpret and interpreted:
        raise SlimgraphError("TRITON_INTERPRET=1 is set: Triton only interprets, on CPU tensors (device='cpu')")


def load_kernels(source: str, owner: object, interpret: bool) -> ModuleType:
    """Import `source` as a module from a private folder removed with `owner`. With `interpret`,
    its kernels run in Triton's interpreter (on CPU tensors)."""
    check_interpreter(interpret)
    import triton

    folder = Path(tempfile.mkdtemp(prefix="slimgraph-triton-"))
    weakref.finalize(owner, shutil.rmtree, folder, True)
    path = folder / "kernels.py"
    path.write_text(source)
    name = f"slimgraph_kernels_{hashlib.sha256(source.encode()).hexdigest()[:16]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret  # read when @triton.jit runs, i.e. while importing
        spec.loader.exec_module(module)
    return module


def launchers(module: ModuleType, plan: Plan) -> dict:
    """Launcher name → function; each carries the name model.py reaches it through (`kernels`)."""
    found = {}
    for name in plan.sources:
        function = getattr(module, name)
        function.slimgraph_companion = "kernels"  # (read by slimgraph.backends.pytorch.codegen)
        found[name] = function
    return found
