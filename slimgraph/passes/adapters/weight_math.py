"""The arithmetic of fusing adapters, in float32 (formulas in PyTorch's `[out, in]` layout).

- LoRA: `W' = W + Σ wᵢ · sᵢ · Bᵢ Aᵢ` (sᵢ = alpha / r, or alpha / √r for rsLoRA; wᵢ the weight
  an adapter is given, times the pass's `scale`); `lora_bias`: `b' = b + Σ wᵢ · sᵢ · b_Bᵢ`.
- DoRA: `W' = m / ‖W + ΔW‖ · (W + ΔW)`, the norm of each output row taken over the input
  dimension (PEFT's `DoraLinearLayer.get_weight_norm`); the magnitude m rescales the whole
  weight, so a DoRA adapter is fused alone.
- SHiRA: `W'[rows, cols] = W[rows, cols] + w · values`, everything else unchanged.

They work on the weight as the graph stores it ([out, in], or [in, out] for MatMul weights and
embedding tables: `transposed`). The merge pass and the in-place switching of `switching` call them
on the same stored base, so a switched-to adapter's weights are bit-identical to the merged
model's; each result is cast to the weight's dtype once, by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from slimgraph.errors import SlimgraphError
from slimgraph.passes.adapters.records import LoraModule, ShiraModule


def lora_delta(module: LoraModule, weight: float = 1.0, transposed: bool = False) -> np.ndarray:
    """`weight · scaling · B @ A` as [out, in] float32, or its transpose `Aᵀ Bᵀ` computed as [in, out]."""
    if transposed:
        product = np.ascontiguousarray(module.a.T) @ np.ascontiguousarray(module.b.T)
    else:
        product = module.b @ module.a
    return product * np.float32(module.scaling * weight)


def fuse_lora(base: np.ndarray, parts: Sequence[tuple[LoraModule, float]], transposed: bool = False) -> np.ndarray:
    """The fused float32 weight: `base` (as stored: [out, in], or [in, out] when `transposed`) plus each
    (module, weight)'s delta; DoRA alone. Working in the stored layout spares two transposed copies."""
    dora = [m for m, _ in parts if m.magnitude is not None]
    if dora and len(parts) > 1:
        raise SlimgraphError(f"{dora[0].path}: a DoRA adapter is fused alone (its magnitude rescales the whole "
                             f"weight), not with {len(parts) - 1} other adapter(s)")
    fused = np.array(base, dtype=np.float32)
    for module, weight in parts:
        fused += lora_delta(module, weight, transposed)
    if dora:
        # ‖W + ΔW‖ of each output row, over the input dimension
        norm = np.linalg.norm(fused, axis=0 if transposed else 1)
        factor = dora[0].magnitude / norm
        fused *= factor[None, :] if transposed else factor[:, None]
    return fused


def fuse_lora_bias(bias: np.ndarray, parts: Sequence[tuple[LoraModule, float]]) -> np.ndarray:
    """`bias + Σ weight · scaling · lora_B.bias` (float32)."""
    fused = np.asarray(bias, dtype=np.float32).copy()
    for module, weight in parts:
        if module.bias is not None:
            fused += module.bias * np.float32(module.scaling * weight)
    return fused


def shira_values(base_values: np.ndarray, module: ShiraModule, weight: float = 1.0) -> np.ndarray:
    """The fused values at a SHiRA module's positions: `base_values + weight · values` (float32)."""
    return np.asarray(base_values, dtype=np.float32) + module.values * np.float32(weight)


def shira_positions(module: ShiraModule, transposed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A SHiRA module's (row, col) positions in the stored layout."""
    return (module.cols, module.rows) if transposed else (module.rows, module.cols)


def fuse_shira(base: np.ndarray, parts: Sequence[tuple[ShiraModule, float]], transposed: bool = False) -> np.ndarray:
    """The fused float32 weight (layout as in `fuse_lora`): each module's values added at its positions."""
    fused = np.array(base, dtype=np.float32)
    for module, weight in parts:
        at = shira_positions(module, transposed)
        fused[at] = shira_values(fused[at], module, weight)
    return fused
