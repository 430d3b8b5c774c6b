"""What `slimgraph inspect` shows: statistics, detected structures and the largest tensors."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from slimgraph.ir.structure import Structures, discover
from slimgraph.measure.stats import ModelStats, human_bytes, human_count, model_stats


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    bytes: int


@dataclass(frozen=True)
class ModelSummary:
    stats: ModelStats
    structures: Structures
    largest_tensors: list[TensorInfo]
    opset: dict[str, int]
    producer: str

    def to_json(self) -> dict:
        return {
            "producer": self.producer,
            "opset": self.opset,
            "stats": self.stats.to_json(),
            "structures": self.structures.to_json(),
            "largest_tensors": [t.__dict__ | {"shape": list(t.shape)} for t in self.largest_tensors],
        }

    def __repr__(self) -> str:
        stats, found = self.stats, self.structures
        parts = [f"{human_count(stats.parameters)} parameters ({human_bytes(stats.bytes)})", f"{stats.nodes:,} nodes"]
        if found.blocks:
            parts.append(f"{found.blocks.count} blocks" + (f" '{found.blocks.prefix}'" if found.blocks.prefix else ""))
        parts.append(f"{len(found.linears)} linear layers")
        if found.attention:
            first = found.attention[0]
            parts.append(f"{len(found.attention)} attention ({first.heads} heads × {first.head_dim})")
        if found.ffns:
            parts.append(f"{len(found.ffns)} FFNs")
        if found.embeddings:
            parts.append(f"{len(found.embeddings)} embeddings")
        return f"<ModelSummary {', '.join(parts)}>"


def summarize(model: ir.Model, top: int = 10) -> ModelSummary:
    tensors = [
        TensorInfo(name, v.const_value.dtype.name.lower(), tuple(v.const_value.shape), v.const_value.nbytes)
        for name, v in model.graph.initializers.items()
        if v.const_value is not None
    ]
    tensors.sort(key=lambda t: -t.bytes)
    producer = " ".join(x for x in (model.producer_name, model.producer_version) if x)
    return ModelSummary(
        stats=model_stats(model),
        structures=discover(model),
        largest_tensors=tensors[:top],
        opset=dict(model.opset_imports),
        producer=producer,
    )
