"""PEFT adapters on slimgraph models: fuse them into a model, or switch them on a compiled artifact.

    import slimgraph
    import slimgraph.adapters

    model = slimgraph.load("path/to/base")                    # HF folder, .onnx (names may be gone), ...
    artifact = slimgraph.adapters.compile_with_adapters(
        model, {"lora": "out/lora", "shira": "out/shira"}, backend="onnxruntime")  # or "pytorch"
    artifact.set_adapter("shira")   # in place: SHiRA is a scatter, LoRA a fuse
    artifact.set_adapter(None)      # the base weights again, bit for bit

    slimgraph.adapters.read("out/lora")            # <Adapter LoRA r=8 on 60 modules>
    slimgraph.adapters.match(model, "out/lora")    # which linear each module adapts, and how it was found
    slimgraph.adapters.merge(model, "out/lora")    # merge-lora (or merge-shira), verified like any pass

Any artifact of `slimgraph.compile` has `load_adapter(path, name)`, `set_adapter(name | None)`,
`active_adapter` and `adapters` (from `slimgraph.backends.switching`, which the backends build
on). Loading may rebuild the artifact's session or module once, when the adapter writes weights no
earlier adapter did (ONNX Runtime binds them as overridable inputs) or a tied weight must be given
its own copy; switching never rebuilds anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import onnx_ir as ir

from slimgraph.backends import Artifact, compile
from slimgraph.frontend.peft_files import base_weights, read_adapter
from slimgraph.passes import PassRecord, Pipeline
from slimgraph.passes.adapters.merge import MergeLora, MergeShira
from slimgraph.passes.adapters.records import Adapter
from slimgraph.passes.adapters.targets import Matches, match_modules

__all__ = ["Adapter", "Matches", "compile_with_adapters", "match", "merge", "read"]


def read(path: str | os.PathLike) -> Adapter:
    """Read and check a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`)."""
    return read_adapter(path)


def match(model: ir.Model, adapter: str | os.PathLike, *, base: str = "auto") -> Matches:
    """Which linear or embedding of `model` each module of the adapter adapts, and how it was found
    (module path, weight name or fingerprint of the base weight; `base` as in merge-lora)."""
    read_back = read_adapter(adapter)
    weights, note = base_weights(read_back, base)
    return match_modules(model, read_back, weights, note)


def merge(model: ir.Model, adapter: str | os.PathLike | Sequence[str | os.PathLike], *,
          weights: Sequence[float] = (), scale: float = 1.0, base: str = "auto", verify: bool = True) -> PassRecord:
    """Fuse one adapter (or several LoRA adapters, with `weights`) into `model` in place: merge-lora
    or merge-shira, whichever the adapter's `peft_type` asks for, run as a verified pipeline."""
    paths = [str(adapter)] if isinstance(adapter, (str, os.PathLike)) else [str(a) for a in adapter]
    kind = read_adapter(paths[0]).peft_type
    merge_pass = (MergeLora if kind == "LORA" else MergeShira)(
        adapter=tuple(paths), weights=tuple(weights), scale=scale, base=base)
    return Pipeline([merge_pass]).run(model, verify=verify).records[0]


def compile_with_adapters(model: ir.Model, adapters: Mapping[str, str | os.PathLike], *,
                          backend: str = "onnxruntime", active: str | None = None, **options: Any) -> Artifact:
    """`slimgraph.compile(model, backend)` with each `name → adapter folder` loaded, `active` set."""
    artifact = compile(model, backend=backend, **options)
    for name, path in adapters.items():
        artifact.load_adapter(path, name)
    artifact.set_adapter(active)
    return artifact
