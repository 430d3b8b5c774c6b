"""Which linear or embedding of the IR each adapter module adapts, and where its weight is stored.

An adapter names modules by their path in the PyTorch base model (`model.layers.0.self_attn.q_proj`).
Each is matched, in this order:

1. by module path: the exporter's name scopes on the node (models from PyTorch or HF folders);
2. by weight name: the initializer's name without `.weight` (ONNX files that kept the names);
3. by fingerprint: the SHA-256 of the base weight the adapter was trained on, read from the base
   model (`base=`, else the adapter's `base_model_name_or_path` when it is a local folder or file),
   against every weight of the same shape — so an adapter trained on the Hugging Face model finds its
   linears in an ONNX export whose weights were renamed and whose name scopes were dropped.

A name matches a path equal to it or ending with it at a dot, either way round: an adapter trained on
`BertModel` fits a graph exported from `BertForMaskedLM` (`bert.encoder…`). Every module must match
exactly one linear (an embedding module: one embedding). When the base weights are known, a module
matched by name must also carry the base weight's fingerprint, or the adapter was trained on another
base model. Anything else is an error that names the module; nothing is skipped.

Shapes and fingerprints are compared in PyTorch's `[out, in]` layout (an embedding is a linear from
one-hot ids: `[dim, num_embeddings]`), whatever the graph's layout; fingerprints hash float32 values
after casting the base weight to the graph's dtype, so a bf16 or fp16 export still matches its base.
`own_weight` then gives each target a weight only it reads, and says how it is stored.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir.edit import (
    add_initializer,
    bias_value,
    constant_array,
    insert_after,
    untie,
    weight_matrix,
    with_input,
)
from slimgraph.ir.graph import constant_tensor, module_path, transposed_source, weight_tensor
from slimgraph.ir.parts import Embedding, Linear
from slimgraph.ir.structure import find_embeddings, find_linears
from slimgraph.passes.adapters.records import Adapter, BaseWeights, LoraModule


@dataclass(frozen=True)
class AdaptedLayer:
    """The linear or embedding an adapter module adapts."""

    module: str  # the module path in the adapter
    name: str  # the linear's or embedding's name in the IR
    matched_by: str  # "module path", "weight name" or "fingerprint"
    linear: Linear | None = None
    embedding: Embedding | None = None

    @property
    def node(self) -> ir.Node:
        return (self.linear or self.embedding).node

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the weight, in PyTorch's layout."""
        if self.linear is not None:
            return self.linear.out_features, self.linear.in_features
        return self.embedding.dim, self.embedding.num_embeddings

    @property
    def dtype(self) -> np.dtype:
        tensor = weight_tensor(self.node.inputs[1])[0] if self.linear else constant_tensor(self.node.inputs[0])
        return tensor.dtype.numpy()

    def weight(self) -> np.ndarray:
        """The weight as contiguous float32 [out, in]."""
        if self.linear is not None:
            return np.ascontiguousarray(weight_matrix(self.linear).T)
        return np.ascontiguousarray(constant_array(self.embedding.node.inputs[0]).T, dtype=np.float32)


@dataclass(frozen=True)
class Storage:
    """Where a target's weight (or bias) lives: an initializer read by its node alone."""

    name: str
    transposed: bool  # stored as [in, out] (MatMul weights, embedding tables), not [out, in]


@dataclass(frozen=True)
class Matches:
    """Each adapter module's target; `checked`: how many were checked against the base's fingerprints."""

    targets: list[AdaptedLayer]
    checked: int
    base: str  # where the base weights came from, or why there were none

    def counts(self) -> str:
        """`36 by module path`, `24 by module path, 12 by fingerprint`."""
        by = collections.Counter(t.matched_by for t in self.targets)
        return ", ".join(f"{n} by {how}" for how, n in by.items())


def fingerprint(weight: np.ndarray) -> str:
    """SHA-256 of a float32 [out, in] weight's values."""
    return hashlib.sha256(np.ascontiguousarray(weight, dtype=np.float32)).hexdigest()


def base_fingerprint(weight: np.ndarray, dtype: np.dtype) -> str:
    """The fingerprint the base weight has once cast to the graph's dtype, as an export would."""
    return fingerprint(np.asarray(weight).astype(dtype).astype(np.float32))


# --- matching ------------------------------------------------------------------------------------


def _strip_weight(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _candidates(model: ir.Model) -> tuple[list[AdaptedLayer], list[AdaptedLayer]]:
    linears = [AdaptedLayer("", lin.name, "", linear=lin) for lin in find_linears(model)]
    tables = [AdaptedLayer("", emb.name, "", embedding=emb) for emb in find_embeddings(model)]
    return linears, tables


def _keys(target: AdaptedLayer) -> tuple[str, str]:
    """(module path, weight name without `.weight`) of a candidate."""
    weight = target.linear.weight if target.linear else target.embedding.table
    return module_path(target.node) or "", _strip_weight(weight)


def _by_name(pool: list[tuple[AdaptedLayer, tuple[str, str]]], path: str, which: int) -> list[AdaptedLayer]:
    exact = [t for t, keys in pool if keys[which] == path]
    if exact:
        return exact
    return [t for t, keys in pool
            if keys[which] and (keys[which].endswith("." + path) or path.endswith("." + keys[which]))]


def match_modules(model: ir.Model, adapter: Adapter, base: BaseWeights | None, base_note: str = "") -> Matches:
    """Each module of `adapter` → the linear or embedding of `model` it adapts (see the module docstring)."""
    linears, tables = ([(t, _keys(t)) for t in pool] for pool in _candidates(model))
    prints: dict[int, str] = {}

    def ir_print(target: AdaptedLayer) -> str:
        if id(target.node) not in prints:
            prints[id(target.node)] = fingerprint(target.weight())
        return prints[id(target.node)]

    def base_print(reference: np.ndarray, dtype: np.dtype, cache: dict) -> str:
        if dtype not in cache:
            cache[dtype] = base_fingerprint(reference, dtype)
        return cache[dtype]

    targets, checked, owner = [], 0, {}
    for module in adapter.modules.values():
        kind = "embedding" if module.embedding else "linear"
        pool = tables if module.embedding else linears
        reference = base.weight(module.path, embedding=module.embedding, fan_in_fan_out=adapter.fan_in_fan_out) \
            if base is not None else None
        found, how = _by_name(pool, module.path, 0), "module path"
        if not found:
            found, how = _by_name(pool, module.path, 1), "weight name"
        reference_prints: dict[np.dtype, str] = {}
        if not found and reference is not None:
            how = "fingerprint"
            found = [t for t, _ in pool if t.shape == reference.shape
                     and ir_print(t) == base_print(reference, t.dtype, reference_prints)]
        if len(found) > 1:
            names = ", ".join(t.name for t in found[:3])
            raise SlimgraphError(f"{adapter.path}: module {module.path!r} matches {len(found)} {kind}s by {how} "
                                 f"({names}{', …' if len(found) > 3 else ''}): cannot tell which one it adapts")
        if not found:
            if base is None:
                hint = f"; the base weights to match by fingerprint are {base_note or 'not available'}"
            elif reference is None:
                hint = f", and {base.source} has no weight for it to match by fingerprint"
            else:
                hint = f", nor by the fingerprint of its weight in {base.source}"
            raise SlimgraphError(f"{adapter.path}: module {module.path!r} matches no {kind} of this model by module "
                                 f"path or weight name{hint}")
        target = dataclasses.replace(found[0], module=module.path, matched_by=how)
        _check_shape(adapter, module, target)
        if target.name in owner:
            raise SlimgraphError(f"{adapter.path}: modules {owner[target.name]!r} and {module.path!r} both match "
                                 f"{kind} {target.name!r}")
        owner[target.name] = module.path
        if reference is not None and how != "fingerprint":
            if reference.shape != target.shape or ir_print(target) != base_print(reference, target.dtype,
                                                                                   reference_prints):
                raise SlimgraphError(
                    f"{adapter.path} was trained on another base model: the weight of {module.path!r} in "
                    f"{base.source} differs from {target.name!r} in this model (or an earlier pass changed it)")
        checked += reference is not None
        targets.append(target)
    return Matches(targets, checked, base_note or (str(base.source) if base else "not available"))


def _check_shape(adapter: Adapter, module, target: AdaptedLayer) -> None:
    out, in_ = target.shape
    if isinstance(module, LoraModule):
        fits = module.shape == (out, in_)
        size = f"{module.shape[0]}×{module.shape[1]}"
    else:
        fits = not len(module.rows) or (module.rows.max() < out and module.cols.max() < in_)
        size = f"indices up to {module.rows.max()}×{module.cols.max()}" if len(module.rows) else ""
    if not fits:
        raise SlimgraphError(f"{adapter.path}: module {module.path!r} ({size}) does not fit {target.name!r} "
                             f"({out}×{in_} as [out, in]) in this model: shape mismatch with the base")


# --- owning the storage ------------------------------------------------------------------------


def _is_own(value: ir.Value | None) -> bool:
    return value is not None and value.is_initializer() and len(value.uses()) == 1 and not value.is_graph_output()


def is_owned(target: AdaptedLayer, *, bias: bool = False) -> bool:
    """Whether the target's weight (and bias) is already an initializer that only its node reads."""
    if target.embedding is not None:
        return _is_own(target.node.inputs[0])
    return _is_own(target.node.inputs[1]) and (not bias or _is_own(bias_value(target.linear)))


def _own(model: ir.Model, node: ir.Node, index: int, name: str) -> ir.Value:
    """Make input `index` of `node` an initializer only that node reads (a copy when it is shared or a
    Constant node's output)."""
    value = node.inputs[index]
    if _is_own(value):
        return value
    copy = add_initializer(model, value.name or name, np.asarray(constant_array(value)))
    with_input(node, index, copy)
    return copy


def own_weight(model: ir.Model, target: AdaptedLayer) -> Storage:
    """Give the target a weight of its own (a tied LM head is untied; a shared table copied), so that
    writing it changes nothing else; returns where it is."""
    if target.embedding is not None:
        value = _own(model, target.node, 0, f"{target.name}.weight")
        return Storage(value.name, transposed=True)
    linear = target.linear
    if transposed_source(linear.node.inputs[1]) is not None:
        untie(model, linear)
    value = _own(model, linear.node, 1, f"{linear.name}.weight")
    gemm_trans_b = linear.node.op_type == "Gemm" and bool(linear.node.attributes.get_int("transB", 0))
    return Storage(value.name, transposed=not gemm_trans_b)


def own_bias(model: ir.Model, target: AdaptedLayer) -> Storage:
    """The same for a linear's bias (for `lora_bias`). A linear without one in the graph (an exporter
    drops a zero bias) gets an `Add` of zeros."""
    if target.linear is None:
        raise SlimgraphError(f"{target.module!r} has lora_bias, but {target.name!r} is not a linear layer")
    value = bias_value(target.linear)
    if value is None:
        output = target.linear.output
        zeros = add_initializer(model, f"{target.name}.bias", np.zeros(target.shape[0], target.dtype))
        add = ir.node("Add", [output, zeros], name=f"{target.linear.node.name or target.name}_lora_bias")
        insert_after(model, output, [add], add.outputs[0])
        return Storage(zeros.name, transposed=False)
    if target.linear.node.op_type == "Gemm":
        node, index = target.linear.node, 2
    else:
        node = target.linear.output.producer()
        index = next(i for i, v in enumerate(node.inputs) if v is value)
    return Storage(_own(model, node, index, f"{target.name}.bias").name, transposed=False)
