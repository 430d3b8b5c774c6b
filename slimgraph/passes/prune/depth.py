"""prune-depth: drop whole repeated blocks, or only their attention or MLP sub-block.

A block becomes the identity on its residual stream: `x + f(LN(x))` → `x` (the block's entry
value goes where its exit went; `slimgraph.ir.edit.bypass`). Which blocks: ShortGPT's block
influence, BI = 1 − cos(x_in, x_out) averaged over calibration tokens (the blocks that change
the residual stream least go first), or the ones `drop` names. `part=attention|mlp` removes one
residual branch inside each chosen block instead (BlockPruner): its residual Add then passes its
input through. The last block is never dropped unless named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir import edit
from slimgraph.ir.parts import Block
from slimgraph.ir.structure import discover, sub_block
from slimgraph.measure import evaluate
from slimgraph.passes._infra.base import Pass, PassContext, PassResult
from slimgraph.passes._infra.options import option
from slimgraph.passes._infra.registry import register_pass
from slimgraph.passes.activations import token_rows


@register_pass
@dataclass(frozen=True, kw_only=True)
class PruneDepth(Pass):
    """Drop the blocks (or their attention/MLP sub-blocks) that change the residual stream least: block(x) → x."""

    name: ClassVar[str] = "prune-depth"
    exact: ClassVar[bool] = False
    blocks: int = option(0, low=0)  # how many; 0: use ratio
    ratio: float = option(0.2, low=0, high=1, high_open=True)
    importance: Literal["block-influence", "explicit"] = "block-influence"
    drop: tuple[int, ...] = ()
    part: Literal["block", "attention", "mlp"] = "block"

    def __post_init__(self) -> None:
        if self.importance == "explicit" and not self.drop:
            raise SlimgraphError(f"{self.name}: importance=explicit needs drop=[i,...]")
        if self.drop and self.importance != "explicit":
            object.__setattr__(self, "importance", "explicit")

    def spans(self, model: ir.Model) -> list[Block]:
        """What each choice removes: a block, or its attention or MLP sub-block (`structure.sub_block`)."""
        found = discover(model).blocks
        if found is None:
            raise SlimgraphError(f"{self.name}: no repeated blocks found (looked for numbered module paths, "
                                 "attention blocks and residual adds)")
        if len(found.blocks) != found.count:
            raise SlimgraphError(f"{self.name}: found {found.count} blocks but the residual stream in and out of "
                                 f"only {len(found.blocks)} of them; cannot drop blocks safely")
        if self.part == "block":
            return list(found.blocks)
        spans = [sub_block(b, self.part) for b in found.blocks]
        missing = [b.name for b, s in zip(found.blocks, spans) if s is None]
        if missing:
            raise SlimgraphError(f"{self.name}: part={self.part}: no residual Add for it in {missing[0]}")
        return spans

    def check(self, model: ir.Model) -> list[Block]:
        """The spans (blocks or sub-blocks) `run` chooses from."""
        super().check(model)
        spans = self.spans(model)
        bad = [i for i in self.drop if not 0 <= i < len(spans)]
        if bad:
            raise SlimgraphError(f"{self.name}: drop={bad[0]} does not exist (blocks 0..{len(spans) - 1})")
        if self.blocks > len(spans):
            raise SlimgraphError(f"{self.name}: blocks={self.blocks}, but the model has {len(spans)} "
                                 f"{'blocks' if self.part == 'block' else self.part + ' sub-blocks'}")
        if len(set(self.drop)) >= len(spans) or self._count(len(spans)) >= len(spans):
            raise SlimgraphError(f"{self.name}: dropping all {len(spans)} blocks would leave no model")
        return spans

    def _count(self, total: int) -> int:
        return len(set(self.drop)) if self.drop else (self.blocks or int(round(self.ratio * total)))

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        spans = self.check(model)
        if self.drop:
            chosen = sorted(set(self.drop))
            scores = None
        else:
            scores = block_influence(model, spans, ctx)
            candidates = np.argsort(scores[:-1], kind="stable")  # never the last block unless named
            chosen = sorted(candidates[: self._count(len(spans))].tolist())
        if not chosen:
            raise SlimgraphError(f"{self.name}: ratio={self.ratio} of {len(spans)} blocks rounds to none")
        for i in reversed(chosen):  # the last first: a later block's entry is an earlier one's exit
            edit.bypass(model, spans[i].entry, spans[i].exit)
        stats = {"dropped": ", ".join(spans[i].name for i in chosen),
                 "blocks": f"{len(spans)} → {len(spans) - len(chosen)}" + ("" if self.part == "block" else f" {self.part}")}
        if scores is not None:
            stats["block influence"] = " ".join(f"{s:.3f}" for s in scores)
            stats["calibration"] = ctx.inputs_source
        return PassResult(True, stats)


def block_influence(model: ir.Model, spans: list[Block], ctx: PassContext) -> np.ndarray:
    """ShortGPT's BI per span: 1 − cos(x_in, x_out) per token, averaged over calibration tokens."""
    names = [n for span in spans for n in (span.entry.name, span.exit.name)]
    captured = evaluate.capture(model, names, ctx.inputs)
    total, count = np.zeros(len(spans)), 0
    for feeds, values in zip(ctx.inputs, captured):
        for i, span in enumerate(spans):
            a = token_rows(values[span.entry.name], feeds).astype(np.float64)
            b = token_rows(values[span.exit.name], feeds).astype(np.float64)
            cos = (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
            total[i] += (1 - cos).sum()
            if i == 0:
                count += a.shape[0]
    return total / max(count, 1)
