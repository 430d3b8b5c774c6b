"""Block-wise calibration: a model's repeated blocks run one at a time, each on what the blocks
before it, as already rewritten, produced (GPTQ's sequential order; llm-compressor's "swapped
loops"). A pass reads the inputs of one block's linears, rewrites that block, and only then is
the block run again to give the next block its input:

    steps = BlockSteps(model, linears, ctx)
    for step in steps:                       # block 0, 1, …, then the linears after the last block
        for linear in step.linears:
            x = step.activations[linear.name]  # [tokens, K], as linear_inputs gives them
            ...                               # rewrite the linear in `model`

Each run is an ONNX Runtime session of the block alone (`evaluate.capture` with `given` values),
so a pass holds one block's weights and the residual stream between blocks (a few MB of
calibration tokens), never a run of the whole model. `steps.state` is that residual stream after
the last step taken: with it, and the rewrites of the blocks done, a run resumes at the next block
(`resume`; `slimgraph.passes._infra.checkpoints` keeps them on disk).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir.parts import Block, Linear
from slimgraph.measure import evaluate
from slimgraph.passes._infra.base import PassContext
from slimgraph.passes.activations import MAX_TOKENS, stack_token_rows

Feeds = dict[str, np.ndarray]


@dataclass
class Step:
    index: int  # the block's; len(blocks) for the linears after the last block
    linears: list[Linear]
    activations: dict[str, np.ndarray]  # linear name → its inputs [tokens, K]


class BlockSteps:
    """The model's linears in steps of one block; see the module docstring."""

    def __init__(self, model: ir.Model, linears: list[Linear], ctx: PassContext, max_tokens: int = MAX_TOKENS):
        blocks = evaluate.repeated_blocks(model)
        if not blocks:
            raise SlimgraphError("block-wise calibration needs repeated blocks whose residual stream in and out is "
                                 "clear (slimgraph inspect lists them); this model has none")
        if not ctx.inputs:
            raise SlimgraphError("no calibration inputs reach the model")
        self.model, self.ctx, self.max_tokens = model, ctx, max_tokens
        self.blocks: list[Block] = blocks
        self.remaining = list(linears)
        self.feeds = [dict(f) for f in ctx.inputs]
        self.state: list[Feeds] = [{} for _ in self.feeds]  # the held residual stream, per feed
        self.done = 0  # steps taken
        # called with (step index, state) once a step's block has run again, as the caller rewrote it
        self.after_step: Callable[[int, list[Feeds]], None] | None = None

    def __len__(self) -> int:
        return len(self.blocks) + 1

    def resume(self, done: int, state: list[Feeds], linears_done: set[str]) -> None:
        """Continue after `done` steps, from `state` (what `state` was then), the linears of those
        steps already rewritten (by name)."""
        self.done, self.state = done, state
        self.remaining = [lin for lin in self.remaining if lin.name not in linears_done]

    def __iter__(self) -> Iterator[Step]:
        while self.done < len(self):
            index = self.done
            block = self.blocks[index] if index < len(self.blocks) else None
            given = self._given()
            if block is not None:
                inside = set(evaluate.view_nodes(self.model, [block.exit], given))
                mine = [lin for lin in self.remaining if lin.node in inside]
            else:
                mine = list(self.remaining)
            activations = self._linear_inputs(mine, given)
            yield Step(index, mine, activations)  # the caller rewrites `mine` here
            self.remaining = [lin for lin in self.remaining if lin not in mine]
            if block is not None:  # the block's output, as the block now computes it
                exits = evaluate.capture(self.model, [block.exit.name], self._fed(), given=given)
                self.state = [{block.exit.name: got[block.exit.name]} for got in exits]
            self.done += 1
            if self.after_step is not None:
                self.after_step(index, self.state)

    def _given(self) -> list[str]:
        return [*self.feeds[0], *self.state[0]]

    def _fed(self) -> list[Feeds]:
        return [{**feeds, **held} for feeds, held in zip(self.feeds, self.state)]

    def _linear_inputs(self, linears: list[Linear], given: list[str]) -> dict[str, np.ndarray]:
        if not linears:
            return {}
        names = {lin.name: lin.node.inputs[0].name for lin in linears}
        captured = evaluate.capture(self.model, list(dict.fromkeys(names.values())), self._fed(), given=given)
        stacked = stack_token_rows(captured, self.feeds, self.ctx.seed, self.max_tokens)
        return {lin: stacked[value] for lin, value in names.items()}
