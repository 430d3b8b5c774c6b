"""merge-lora and merge-shira: PEFT adapter folders fused into the weights they adapt.

- `merge-lora{adapter=PATH}`: `W += s · B A` per adapted module (s = alpha / r, rsLoRA alpha / √r,
  per module from `rank_pattern` / `alpha_pattern`), DoRA (`W' = m / ‖W + ΔW‖ · (W + ΔW)`),
  embedding LoRA, `lora_bias`, GPT-2's Conv1D (`fan_in_fan_out`) — see `weight_math` and `slimgraph.frontend.peft_files`.
  Several adapters, each with a weight: `merge-lora{adapter=[a,b],weights=[0.7,0.3]}` adds
  `0.7 · ΔW_a + 0.3 · ΔW_b`; `scale` multiplies every delta (PEFT's `set_scale`).
- `merge-shira{adapter=PATH}`: `W[rows, cols] += values` (same options).

The adapter folder is read and checked before any pass runs; every module must find its linear
or embedding (`targets`: module path, weight name, or the base weight's fingerprint), or the pass
fails naming it. Deltas are computed in float32 and cast to the weight's dtype once. A tied LM head
is untied first, so the embedding keeps its table (as PEFT's unmerged forward computes).

The passes are not `exact`: the model is meant to change, and its fidelity against the original
says by how much.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir.edit import constant_array, replace_constant
from slimgraph.measure.diff import Change, fold
from slimgraph.passes._infra.base import Pass, PassContext, PassResult, reader_of
from slimgraph.passes._infra.registry import register_pass
from slimgraph.passes.adapters.records import SUPPORTED, Adapter, LoraModule
from slimgraph.passes.adapters.targets import AdaptedLayer, Storage, match_modules, own_bias, own_weight
from slimgraph.passes.adapters.weight_math import fuse_lora, fuse_lora_bias, fuse_shira


@dataclass(frozen=True, kw_only=True)
class MergeAdapters(Pass):
    """Base of merge-lora and merge-shira: read, match, fuse."""

    exact: ClassVar[bool] = False
    peft_type: ClassVar[str]
    adapter: tuple[str, ...]
    weights: tuple[float, ...] = ()
    scale: float = 1.0
    base: str = "auto"  # the base model (folder or .safetensors) to fingerprint; auto: the adapter's own; none

    def __post_init__(self) -> None:
        if not self.adapter:
            raise SlimgraphError(f"{self.name}: adapter= needs at least one PEFT adapter folder")
        if self.weights and len(self.weights) != len(self.adapter):
            raise SlimgraphError(f"{self.name}: weights= has {len(self.weights)} values for {len(self.adapter)} "
                                 "adapters (one each)")
        if not all(math.isfinite(w) for w in (*self.weights, self.scale)):
            raise SlimgraphError(f"{self.name}: weights and scale must be finite numbers")

    def read(self, model: ir.Model, ctx: PassContext | None = None) -> list[Adapter]:
        reader = reader_of(model, ctx, needed_for=self.name)
        adapters = [reader.adapter(path) for path in self.adapter]
        for adapter in adapters:
            if adapter.peft_type != self.peft_type:
                raise SlimgraphError(f"{adapter.path} is a {adapter.peft_type} adapter: merge it with "
                                     f"{SUPPORTED[adapter.peft_type]}, not {self.name}")
        return adapters

    def check(self, model: ir.Model) -> None:
        super().check(model)
        self.read(model)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        adapters = self.read(model, ctx)
        weights = self.weights or (1.0,) * len(adapters)
        plan: dict[str, tuple[AdaptedLayer, list]] = {}
        described, bases, counts = [], [], []
        for adapter, weight in zip(adapters, weights):  # every adapter is matched before anything is written
            base, note = reader_of(model, ctx, needed_for=self.name).base_weights(adapter, self.base)
            matches = match_modules(model, adapter, base, note)
            for target in matches.targets:
                plan.setdefault(target.name, (target, []))[1].append((adapter.modules[target.module],
                                                                       weight * self.scale))
            label = f"{adapter.path.name}: {adapter.describe()}" + (f" ×{weight:g}" if self.weights else "")
            described.append(label)
            counts.append(matches.counts())
            checked = f"{matches.checked} of {len(matches.targets)} checked against {matches.base}" if base else \
                matches.base
            bases.append(checked)
        for target, parts in ctx.track(list(plan.values()), self.name):
            self._fuse(model, target, parts)
        names = [t.name if t.name == t.module else f"{t.module} → {t.name}" for t, _ in plan.values()]
        stats = {
            "adapters": "; ".join(described),
            "modules fused": f"{len(plan)} ({'; '.join(counts)})",
            "fused into": ", ".join(f"{c.module} ×{c.count}" if c.count > 1 else c.module
                                    for c in fold([Change(n, "changed") for n in names])),
            "base weights": "; ".join(bases),
        }
        if self.scale != 1.0:
            stats["scale"] = self.scale
        return PassResult(True, stats)

    def _fuse(self, model: ir.Model, target: AdaptedLayer, parts: list) -> None:
        storage = own_weight(model, target)  # a tied or shared weight gets its own copy first
        base = model.graph.initializers[storage.name].const_value.numpy()
        fuse = fuse_lora if self.peft_type == "LORA" else fuse_shira
        _write(model, storage, fuse(base, parts, storage.transposed))
        if any(isinstance(m, LoraModule) and m.bias is not None for m, _ in parts):
            storage = own_bias(model, target)
            bias = constant_array(model.graph.initializers[storage.name])
            _write(model, storage, fuse_lora_bias(bias, parts))


def _write(model: ir.Model, storage: Storage, fused: np.ndarray) -> None:
    """Store a float32 array (in the initializer's layout) in the initializer's dtype."""
    value = model.graph.initializers[storage.name]
    replace_constant(value, fused.astype(value.const_value.dtype.numpy()))


@register_pass
@dataclass(frozen=True, kw_only=True)
class MergeLora(MergeAdapters):
    """W += s·B·A: PEFT LoRA / DoRA adapter folders fused into the linears and embeddings they adapt."""

    name: ClassVar[str] = "merge-lora"
    peft_type: ClassVar[str] = "LORA"


@register_pass
@dataclass(frozen=True, kw_only=True)
class MergeShira(MergeAdapters):
    """W[rows, cols] += values: PEFT SHiRA sparse adapters fused into the linears they adapt."""

    name: ClassVar[str] = "merge-shira"
    peft_type: ClassVar[str] = "SHIRA"
