"""prune-width: remove whole dependency groups' channels — FFN inner channels, attention heads,
KV heads, conv output channels — with everything they touch (see `slimgraph.ir.groups`).

`linear(x) → act → down` becomes the same with `ratio` of the inner channels gone: up/gate
columns and biases, down rows. Heads go with their q/k/v columns and o rows, and the reshape
constants that count them; with grouped-query attention, `target=heads` removes query heads, the
same number from every KV group, and `target=kv-heads` whole KV groups. Conv channels go with the
BatchNorm parameters, residual-coupled and concatenated channels, and the next layers' inputs.

Scores (`importance`): magnitude (weights only), wanda (|W|·‖x‖ on calibration tokens) or
activation (mean |h|). Before the channels go, the layers that read them are compensated
(`compensate`, see `slimgraph.passes.prune.compensate`): a ridge refit on the calibration tokens
(default), the removed channels' mean contribution added to the bias, or nothing. `scope=uniform` prunes each layer by `ratio`; `scope=global` ranks the
channels of all layers of a kind together (scores normalised by their layer's mean). Kept widths
are rounded to a multiple of `round_to` (channels; heads are whole already) so kernels stay fast.
"""

from __future__ import annotations

import collections
import fnmatch
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir.groups import Group, remove_channels
from slimgraph.ir.structure import Structures, discover
from slimgraph.measure.evaluate import initializer_bytes
from slimgraph.measure.stats import human_bytes
from slimgraph.passes._infra.base import Pass, PassContext, PassResult
from slimgraph.passes._infra.options import option
from slimgraph.passes._infra.registry import register_pass
from slimgraph.passes.prune.compensate import compensate
from slimgraph.passes.prune.importance import channel_scores, consumer_moments

TARGET_KINDS = {"ffn": ("ffn",), "heads": ("heads",), "kv-heads": ("kv-heads",), "channels": ("channels",),
                "all": ("ffn", "heads", "channels")}
LOOKED_FOR = {"ffn": "FFNs (up[, gate] → activation → down)", "heads": "attention (Softmax of Q·Kᵀ with q/k/v/o projections)",
              "kv-heads": "grouped-query attention (fewer KV heads than query heads)",
              "channels": "convolutions whose output channels can be removed"}


@register_pass
@dataclass(frozen=True, kw_only=True)
class PruneWidth(Pass):
    """Remove the least important FFN channels, attention heads or conv channels, with every tensor they touch."""

    name: ClassVar[str] = "prune-width"
    exact: ClassVar[bool] = False
    target: Literal["ffn", "heads", "kv-heads", "channels", "all"] = "ffn"
    ratio: float = option(0.25, low=0, high=1, high_open=True)
    importance: Literal["magnitude", "wanda", "activation"] = "wanda"
    scope: Literal["uniform", "global"] = "uniform"
    round_to: int = option(8, low=1)
    keep: tuple[str, ...] = ()
    compensate: Literal["refit", "bias", "none"] = "refit"

    def groups(self, found: Structures) -> list[Group]:
        kinds = TARGET_KINDS[self.target]
        return [g for g in found.groups if g.kind in kinds and not any(fnmatch.fnmatchcase(g.name, p) for p in self.keep)]

    def check(self, model: ir.Model) -> list[Group]:
        """The groups `run` prunes."""
        super().check(model)
        found = discover(model)
        if not self.groups(found):
            kinds = TARGET_KINDS[self.target]
            looked = "; ".join(LOOKED_FOR[k] for k in kinds)
            why = f" ({found.not_prunable[0]})" if found.not_prunable else ""
            raise SlimgraphError(f"{self.name}: target={self.target} found nothing to prune: looked for {looked}{why}")
        for pattern in self.keep:
            if not any(fnmatch.fnmatchcase(g.name, pattern) for g in found.groups):
                raise SlimgraphError(f"{self.name}: keep={pattern} matches no layer "
                                     f"(e.g. '{found.groups[0].name}')")
        return self.groups(found)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        groups = self.check(model)
        calibrated = self.importance != "magnitude" or self.compensate != "none"
        activations = consumer_moments(model, groups, ctx, gram=self.compensate == "refit") if calibrated else None
        scores = {g: channel_scores(g, self.importance, activations)
                  for g in ctx.track(groups, f"{self.importance} scores")}
        counts = self._counts(groups, scores)
        removals = {g: _lowest(g, scores[g], n) for g, n in counts.items() if n}
        if not removals:
            raise SlimgraphError(f"{self.name}: ratio={self.ratio} removes nothing once widths are rounded to "
                                 f"multiples of {self.round_to}; raise the ratio or lower round_to")
        before = initializer_bytes(model)
        if self.compensate != "none":
            for group, channels in ctx.track(removals.items(), f"{self.compensate} compensation"):
                compensate(model, group, channels, activations, self.compensate)
        remove_channels(model, removals)
        kept = collections.Counter(f"{g.kind} {g.size}→{g.size - len(removals.get(g, ()))}" for g in groups)
        result = {"removed": ", ".join(f"{len(c)} {g.unit}" for g, c in list(removals.items())[:1])
                  if len(removals) == 1 else f"{sum(len(c) for c in removals.values())} from {len(removals)} layers"}
        result["kept"] = ", ".join(f"{n} × {text}" if n > 1 else text for text, n in kept.items())
        result["importance"] = self.importance + (f" ({ctx.inputs_source})" if calibrated else "")
        if self.compensate != "none":
            result["compensation"] = f"{self.compensate} of the layers that read them"
        result["weights"] = f"{human_bytes(before)} → {human_bytes(initializer_bytes(model))}"
        return PassResult(True, result)

    def _counts(self, groups: list[Group], scores: dict[Group, np.ndarray]) -> dict[Group, int]:
        """How many channels each group loses: `ratio` of each (uniform) or of all of a kind (global),
        then rounded so the kept width is a multiple of `round_to` (for channels)."""
        if self.scope == "uniform":
            wanted = {g: self.ratio * g.size for g in groups}
        else:
            wanted = {}
            for kind in {g.kind for g in groups}:
                members = [g for g in groups if g.kind == kind]
                normalised = np.concatenate([scores[g] / max(scores[g].mean(), 1e-30) for g in members])
                owner = np.concatenate([np.full(g.size, i) for i, g in enumerate(members)])
                lowest = owner[np.argsort(normalised, kind="stable")[: int(round(self.ratio * len(owner)))]]
                removed = np.bincount(lowest, minlength=len(members))
                wanted.update({g: float(removed[i]) for i, g in enumerate(members)})
        return {g: self._rounded(g, n) for g, n in wanted.items()}

    def _rounded(self, group: Group, wanted: float) -> int:
        if group.parts is not None:  # grouped-query heads: the same number from every KV group
            parts = int(group.parts.max()) + 1
            per_part = group.size // parts
            step = int(round(wanted / parts))
            if step >= per_part:
                step = per_part - 1
            if step == 0 and wanted > 0 and self.scope == "uniform":
                raise SlimgraphError(
                    f"{self.name}: {group.name} has {per_part} query heads per KV group; ratio={self.ratio} "
                    f"cannot take the same number from each (the smallest step is {1 / per_part:.3g})")
            return step * parts
        unit = self.round_to if group.kind in ("ffn", "channels") else 1
        kept = group.size - int(round(wanted))
        kept = max(unit, int(round(kept / unit)) * unit) if unit > 1 else max(1, kept)
        return max(group.size - kept, 0)


def _lowest(group: Group, scores: np.ndarray, count: int) -> list[int]:
    """The `count` lowest-scoring channels (with parts: the same number from each part)."""
    if group.parts is None:
        return sorted(np.argsort(scores, kind="stable")[:count].tolist())
    parts = int(group.parts.max()) + 1
    chosen = []
    for part in range(parts):
        members = np.flatnonzero(group.parts == part)
        chosen += members[np.argsort(scores[members], kind="stable")[: count // parts]].tolist()
    return sorted(chosen)
