"""A PEFT adapter as data: its modules' LoRA factors or SHiRA values in float32 (read from files by
`slimgraph.frontend.peft_files`), and the weights of the base model it was trained on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

SUPPORTED = {"LORA": "merge-lora", "SHIRA": "merge-shira"}  # peft_type → the pass that merges it


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module: `ΔW = scaling · B @ A` in PyTorch's [out, in] layout."""

    path: str
    a: np.ndarray  # [r, in]
    b: np.ndarray  # [out, r]
    scaling: float
    magnitude: np.ndarray | None = None  # DoRA: [out]
    bias: np.ndarray | None = None  # lora_bias: [out]
    embedding: bool = False

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the weight it adapts."""
        return self.b.shape[0], self.a.shape[1]


@dataclass(frozen=True)
class ShiraModule:
    """One SHiRA-adapted module: `W[rows, cols] += values` (PyTorch's [out, in] layout; no repeats)."""

    path: str
    rows: np.ndarray  # int64 [n]
    cols: np.ndarray  # int64 [n]
    values: np.ndarray  # float32 [n]
    embedding: bool = False


@dataclass(frozen=True)
class Adapter:
    """A PEFT adapter folder, read and checked."""

    path: Path
    peft_type: str  # "LORA" or "SHIRA"
    modules: dict[str, LoraModule | ShiraModule]
    base_model: str | None  # `base_model_name_or_path`
    fan_in_fan_out: bool  # GPT-2's Conv1D stores its weight [in, out]
    dora: bool = False
    rslora: bool = False

    def describe(self) -> str:
        """`LoRA r=8 α=16 on 12 modules`, `DoRA r=4–8 ...`, `SHiRA on 6 modules (9,216 values)`."""
        count = f"{len(self.modules)} module{'s' if len(self.modules) != 1 else ''}"
        if self.peft_type == "SHIRA":
            values = sum(len(m.values) for m in self.modules.values())
            return f"SHiRA on {count} ({values:,} values)"
        ranks = sorted({m.rank for m in self.modules.values()})
        rank = f"r={ranks[0]}" if len(ranks) == 1 else f"r={ranks[0]}–{ranks[-1]}"
        kind = "DoRA" if self.dora else "LoRA"
        return f"{kind} {rank}{' (rsLoRA)' if self.rslora else ''} on {count}"


class BaseWeights(Protocol):
    """The weights of the model an adapter was trained on, by module path."""

    source: Path

    def weight(self, module: str, *, embedding: bool, fan_in_fan_out: bool) -> np.ndarray | None:
        """The module's weight in PyTorch's [out, in] layout, or None when the base has none."""
