"""Several adapters beside one compiled artifact, switched by writing its weights in place.

`artifact.load_adapter(path, name)` reads a PEFT adapter and matches it against the artifact's model
as the merge passes do; `artifact.set_adapter(name)` makes it the active one and
`artifact.set_adapter(None)` goes back to the base. A switch restores what the active adapter
changed, then applies the new one:

- SHiRA: a scatter. The base values at its positions are saved when it is loaded; restoring writes
  them back (never a subtraction: `(w + v) − v` is not `w` in reduced precision), applying writes
  `base + values` at its positions and nothing else.
- LoRA / DoRA: a fuse. The weight becomes `fuse_lora(base, …)`, the function the merge-lora pass
  calls, so the weights are bit-identical to the merged model's; restoring writes the saved base.

Artifacts get this from the `AdapterSwitching` mixin and provide the writes (`WeightStore`): the
ONNX Runtime artifact binds the written initializers once as overridable inputs and updates those
arrays in place; the PyTorch artifact writes its parameters in place. A weight that another node
reads too (a tied LM head, a shared table) is first given its own copy, in a clone of the model that
the artifact adopts — once, when the adapter is loaded; a switch never rebuilds anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from slimgraph.errors import SlimgraphError

if TYPE_CHECKING:
    import onnx_ir as ir

    from slimgraph.passes.adapters.records import Adapter, LoraModule, ShiraModule
    from slimgraph.passes.adapters.targets import Storage


class WeightStore(Protocol):
    """What an artifact provides for switching: its model, and in-place writes of its initializers."""

    model: ir.Model

    def _adopt_model(self, model: ir.Model) -> None:
        """Run `model` from now on: an equivalent model whose shared weights were given copies. The
        initializers made writable before stay writable."""

    def _make_writable(self, names: list[str]) -> None:
        """Make these initializers writable in place by the two methods below."""

    def _write_weight(self, name: str, array: np.ndarray) -> None:
        """Replace an initializer's values (same shape, layout and dtype)."""

    def _scatter_weight(self, name: str, index: np.ndarray, values: np.ndarray) -> None:
        """Write `values` at flat positions `index` of an initializer."""


@dataclass(frozen=True)
class _Write:
    """What one adapter module writes: a whole weight (LoRA) or some positions of it (SHiRA)."""

    module: LoraModule | ShiraModule
    weight: Storage
    bias: Storage | None = None  # lora_bias
    index: np.ndarray | None = None  # SHiRA: flat positions in the stored layout
    base_values: np.ndarray | None = None  # SHiRA: the values saved there

    @property
    def whole(self) -> list[str]:
        """The initializers this write replaces whole."""
        if self.index is not None:
            return []
        return [self.weight.name] + ([self.bias.name] if self.bias else [])


@dataclass(frozen=True)
class _Loaded:
    adapter: Adapter
    writes: list[_Write]
    scale: float


class AdapterBank:
    """The adapters loaded beside one artifact, the one active, and the base weights they change."""

    def __init__(self, store: WeightStore) -> None:
        self.store = store
        self.loaded: dict[str, _Loaded] = {}
        self.active: str | None = None
        self._base: dict[str, np.ndarray] = {}  # initializer → its values before any adapter (never written)

    def load(self, path: str | os.PathLike, name: str, *, scale: float = 1.0, base: str = "auto") -> None:
        from slimgraph.frontend.peft_files import base_weights, read_adapter
        from slimgraph.passes.adapters.targets import match_modules

        if not isinstance(name, str) or not name:
            raise SlimgraphError(f"an adapter's name must be a non-empty string, not {name!r}")
        if name in self.loaded:
            raise SlimgraphError(f"an adapter named {name!r} is already loaded")
        adapter = read_adapter(path)
        weights, note = base_weights(adapter, base)
        active = self.active
        self.set(None)  # matching sees the base weights (fingerprints); put back below
        try:
            model = self.store.model
            matches = match_modules(model, adapter, weights, note)
            if not all(_owned(t, adapter.modules[t.module]) for t in matches.targets):
                # Shared weights get their own copies in a clone, which the artifact adopts.
                model = model.clone()
                model.meta.update(self.store.model.meta)
                matches = match_modules(model, adapter, weights, note)
            writes = self._plan(model, adapter, matches.targets)
            if model is not self.store.model:
                self.store._adopt_model(model)
            self.store._make_writable(sorted({n for w in writes for n in (w.weight.name, *w.whole)}))
            self.loaded[name] = _Loaded(adapter, writes, float(scale))
        finally:
            self.set(active)

    def _plan(self, model: ir.Model, adapter: Adapter, targets: list) -> list[_Write]:
        from slimgraph.passes.adapters.records import LoraModule
        from slimgraph.passes.adapters.targets import own_bias, own_weight
        from slimgraph.passes.adapters.weight_math import shira_positions

        writes = []
        for target in targets:
            module = adapter.modules[target.module]
            weight = own_weight(model, target)
            bias = own_bias(model, target) if isinstance(module, LoraModule) and module.bias is not None else None
            for storage in (weight, bias):
                if storage is not None and storage.name not in self._base:
                    self._base[storage.name] = model.graph.initializers[storage.name].const_value.numpy()
            if isinstance(module, LoraModule):
                writes.append(_Write(module, weight, bias))
                continue
            stored = self._base[weight.name]
            index = np.ravel_multi_index(shira_positions(module, weight.transposed), stored.shape)
            writes.append(_Write(module, weight, index=index, base_values=stored.reshape(-1)[index].copy()))
        return writes

    def set(self, name: str | None) -> None:
        if name is not None and name not in self.loaded:
            loaded = ", ".join(repr(n) for n in self.loaded) or "none"
            raise SlimgraphError(f"no adapter named {name!r} is loaded (loaded: {loaded}); the active adapter "
                                 f"is still {self.active!r}")
        if name == self.active:
            return
        new = self.loaded.get(name)
        rewritten = {n for w in new.writes for n in w.whole} if new else set()
        if self.active is not None:
            self._restore(self.loaded[self.active], keep=rewritten)
        self.active = None
        if new is not None:
            self._apply(new)
        self.active = name

    def _restore(self, loaded: _Loaded, keep: set[str]) -> None:
        for write in loaded.writes:
            if write.index is not None:
                self.store._scatter_weight(write.weight.name, write.index, write.base_values)
                continue
            for storage in (write.weight, write.bias):
                if storage is not None and storage.name not in keep:  # the next adapter replaces it whole
                    self.store._write_weight(storage.name, self._base[storage.name])

    def _apply(self, loaded: _Loaded) -> None:
        from slimgraph.passes.adapters.weight_math import fuse_lora, fuse_lora_bias, shira_values

        for write in loaded.writes:
            base = self._base[write.weight.name]
            if write.index is not None:
                values = shira_values(write.base_values, write.module, loaded.scale).astype(base.dtype)
                self.store._scatter_weight(write.weight.name, write.index, values)
                continue
            parts = [(write.module, loaded.scale)]
            fused = fuse_lora(base, parts, write.weight.transposed)
            self.store._write_weight(write.weight.name, fused.astype(base.dtype, copy=False))
            if write.bias is not None:
                bias = self._base[write.bias.name]
                self.store._write_weight(write.bias.name, fuse_lora_bias(bias, parts).astype(bias.dtype))


def _owned(target: Any, module: Any) -> bool:
    from slimgraph.passes.adapters.targets import is_owned

    return is_owned(target, bias=getattr(module, "bias", None) is not None)


class AdapterSwitching:
    """Mixin for artifacts: `load_adapter`, `set_adapter`, `active_adapter`, `adapters`.

    The artifact provides `model` and the `WeightStore` methods.
    """

    def load_adapter(self, path: str | os.PathLike, name: str, *, scale: float = 1.0, base: str = "auto") -> None:
        """Read a PEFT adapter folder (LoRA, DoRA or SHiRA) and keep it ready under `name`.

        `scale` multiplies its delta; `base` is the base model folder to check fingerprints against (by
        default the adapter's `base_model_name_or_path` when it is local). The adapter is not active
        until `set_adapter(name)`.
        """
        self._adapter_bank().load(path, name, scale=scale, base=base)

    def set_adapter(self, name: str | None) -> None:
        """Switch to the adapter loaded as `name`, in place (None: the base model). An unknown name is
        an error that leaves the artifact on its current adapter."""
        self._adapter_bank().set(name)

    @property
    def active_adapter(self) -> str | None:
        bank = self.__dict__.get("_adapters")
        return bank.active if bank is not None else None

    @property
    def adapters(self) -> dict[str, str]:
        """Loaded adapters: name → what it is (`LoRA r=8 on 60 modules`)."""
        bank = self.__dict__.get("_adapters")
        return {n: loaded.adapter.describe() for n, loaded in bank.loaded.items()} if bank is not None else {}

    def _adapter_bank(self) -> AdapterBank:
        if "_adapters" not in self.__dict__:
            self.__dict__["_adapters"] = AdapterBank(self)
        return self.__dict__["_adapters"]
