"""The parts of a model that structure discovery finds (`slimgraph.ir.structure`): linears, embeddings,
FFNs, mixtures of experts, attention, repeated blocks, joined token sequences. Plain records, at the
bottom of the editing core so that every module may name them."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir


@dataclass(frozen=True)
class Linear:
    name: str
    node: ir.Node = field(repr=False, compare=False)
    weight: str
    in_features: int
    out_features: int
    bias: str | None = None

    @property
    def output(self) -> ir.Value:
        """The layer's output, after the bias Add when there is one."""
        out = self.node.outputs[0]
        if self.bias is not None and self.node.op_type == "MatMul":
            (consumer, _), = out.uses()
            return consumer.outputs[0]
        return out

    def to_json(self) -> dict:
        return {"name": self.name, "op": self.node.op_type, "weight": self.weight,
                "in_features": self.in_features, "out_features": self.out_features, "bias": self.bias}


@dataclass(frozen=True)
class Embedding:
    name: str
    node: ir.Node = field(repr=False, compare=False)
    table: str
    num_embeddings: int
    dim: int
    from_graph_input: bool

    def to_json(self) -> dict:
        return {"name": self.name, "table": self.table, "num_embeddings": self.num_embeddings,
                "dim": self.dim, "from_graph_input": self.from_graph_input}


@dataclass(frozen=True)
class FFN:
    name: str
    up: Linear
    down: Linear
    gate: Linear | None
    activation: str

    @property
    def hidden(self) -> int:
        return self.up.in_features

    @property
    def inner(self) -> int:
        return self.up.out_features

    def to_json(self) -> dict:
        return {"name": self.name, "hidden": self.hidden, "inner": self.inner, "activation": self.activation,
                "up": self.up.name, "gate": self.gate.name if self.gate else None, "down": self.down.name}


@dataclass(frozen=True)
class MoE:
    """A mixture of experts: `form` is "com.microsoft.MoE", "com.microsoft.QMoE" or "decomposed";
    `shared` counts the neurons of the shared expert (0: none); `parts` are the FFNs it is made of
    (shared, experts)."""

    name: str
    form: str
    experts: int
    top_k: int
    hidden: int
    expert_inner: int
    activation: str
    shared: int
    parts: tuple[FFN, ...] = field(default=(), repr=False, compare=False)

    def to_json(self) -> dict:
        return {"name": self.name, "form": self.form, "experts": self.experts, "top_k": self.top_k,
                "hidden": self.hidden, "expert_inner": self.expert_inner, "activation": self.activation,
                "shared": self.shared}


@dataclass(frozen=True)
class Attention:
    name: str
    heads: int
    head_dim: int
    kv_heads: int
    q: Linear | None
    k: Linear | None
    v: Linear | None
    o: Linear | None
    scores: ir.Node | None = field(default=None, repr=False, compare=False)  # MatMul(q, kᵀ)
    context: ir.Node | None = field(default=None, repr=False, compare=False)  # MatMul(probs, v)

    @property
    def kv_groups(self) -> int:
        """Query heads per KV head (1: multi-head; >1: grouped-query attention)."""
        return self.heads // self.kv_heads if self.kv_heads else 1

    def to_json(self) -> dict:
        names = {k: (getattr(self, k).name if getattr(self, k) else None) for k in "qkvo"}
        return {"name": self.name, "heads": self.heads, "head_dim": self.head_dim,
                "kv_heads": self.kv_heads, "kv_groups": self.kv_groups, **names}


@dataclass(frozen=True)
class Block:
    """One repeated block and the residual stream into and out of it: bypassing the block
    (`slimgraph.ir.edit.bypass(model, entry, exit)`) drops it; a map inserted at `entry`
    changes everything the block and the blocks after it see."""

    index: int
    name: str
    entry: ir.Value = field(repr=False, compare=False)
    exit: ir.Value = field(repr=False, compare=False)


@dataclass(frozen=True)
class BlockGroup:
    """A repeated block: `count` copies, e.g. prefix 'encoder.layer' with 6 layers."""

    prefix: str
    count: int
    source: str  # "name scopes", "attention blocks" or "residual adds"
    # entry/exit handles, where the residual stream in and out of each block is clear
    blocks: tuple[Block, ...] = field(default=(), compare=False, repr=False)

    def to_json(self) -> dict:
        return {"prefix": self.prefix, "count": self.count, "source": self.source,
                "boundaries": [{"index": b.index, "name": b.name, "entry": b.entry.name, "exit": b.exit.name}
                               for b in self.blocks]}


@dataclass(frozen=True)
class Join:
    """A Concat on the token axis of `[batch, tokens, dim]` values that joins some tokens with others
    (a VLM's image tokens with its text): `before` tokens precede them, and the joined sequence has
    `length` tokens (either None where not fixed)."""

    concat: ir.Node = field(repr=False, compare=False)
    before: int | None
    length: int | None

    @property
    def joined(self) -> ir.Value:
        return self.concat.outputs[0]
