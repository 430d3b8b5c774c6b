"""Weights written to the output's external-data file as passes make them.

A pass that quantizes a model makes its new weights one layer at a time; held in memory until the
model is saved, they add up to the whole quantized model. With a `WeightSpill`, the pipeline
writes each new weight of `MIN_BYTES` or more to `<output>.data` in a staging folder as soon as it
is made (`PassContext.track`, after each item; and after each pass), and the initializer reads it
back from there (`ir.ExternalTensor`, memory-mapped) if anything asks. `save_onnx` then writes only
what is left and moves the file into place: peak memory is a few layers, not the model.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from slimgraph.ir.graph import forget_removed_values

MIN_BYTES = 1 << 20  # smaller weights stay in memory (norms, biases, scales of small layers)
INLINE_BYTES = 1024  # the saved graph holds smaller tensors itself
ALIGNMENT = 4096  # each tensor starts on a page: ONNX Runtime can map it rather than copy it
DEAD_FRACTION = 0.125  # of the file, in weights no longer read: above it, `publish` writes the file again
SPILL_META = "slimgraph.spill"  # on a spilled tensor's `meta`: the WeightSpill holding it


class WeightSpill:
    """The external-data file `name` being filled in `folder` (a staging folder beside the output)."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = folder, name
        self.file = folder / name
        self.file.touch()
        self.written = 0

    @classmethod
    def beside(cls, output: Path) -> WeightSpill:
        """A spill in a new staging folder next to `output`, for `<output name>.data`; `close` removes it."""
        existing = output.parent
        while not existing.is_dir() and existing != existing.parent:
            existing = existing.parent  # the output's folder is made when it is written, not before
        folder = Path(tempfile.mkdtemp(prefix=".slimgraph-spill-", dir=existing))
        return cls(folder, f"{output.name}.data")

    def __call__(self, model: ir.Model, *, everything: bool = False) -> None:
        """Write every in-memory initializer of `MIN_BYTES` or more; with `everything`, every one of
        `INLINE_BYTES` or more not written yet (those still bound to an input file included)."""
        forget_removed_values(model.graph)  # the weights a pass replaced go as it goes, not at its end
        with open(self.file, "ab") as data:
            for value in model.graph.initializers.values():
                tensor = value.const_value
                if tensor is None or self.holds(tensor) or tensor.dtype == ir.DataType.STRING:
                    continue
                in_memory = not isinstance(tensor, (ir.LazyTensor, ir.ExternalTensor))  # those cost nothing unread
                if everything and tensor.nbytes >= INLINE_BYTES or in_memory and tensor.nbytes >= MIN_BYTES:
                    value.const_value = self._write(data, value.name, tensor)

    def _write(self, data, name: str | None, tensor: ir.TensorProtocol) -> ir.ExternalTensor:
        offset = -(-self.written // ALIGNMENT) * ALIGNMENT
        data.write(b"\0" * (offset - self.written))
        if tensor.dtype.bitwidth >= 8:  # the array's own buffer: `tobytes` would copy a large weight once more
            length = data.write(np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8))
        else:  # 4-bit and smaller: numpy holds one value a byte; tobytes packs them
            length = data.write(tensor.tobytes())
        self.written = offset + length
        spilled = ir.ExternalTensor(self.name, offset, length, tensor.dtype, shape=tensor.shape, name=name,
                                    base_dir=self.folder)
        spilled.meta[SPILL_META] = self
        return spilled

    def holds(self, tensor: ir.TensorProtocol) -> bool:
        return isinstance(tensor, ir.ExternalTensor) and tensor.meta.get(SPILL_META) is self

    def publish(self, model: ir.Model, staged_model: Path, target: Path) -> None:
        """Write what is left of the weights here, the graph to `staged_model` (referring to this
        file), and move both into place as `target` and `<target>.data`."""
        self(model, everything=True)
        self._compact(model)
        ir.save(model, staged_model)  # spilled tensors stay references to this file
        data = target.parent / self.name
        self.file.replace(data)
        staged_model.replace(target)
        for value in model.graph.initializers.values():
            if self.holds(value.const_value):
                value.const_value.base_dir = target.parent  # read from where the file now is

    def _compact(self, model: ir.Model) -> None:
        """Write the file again with only the weights the model still reads, where those that passes
        replaced after they were spilled (`fuse-ort`'s fp32 weights, quantized by the next pass) would
        leave more than `DEAD_FRACTION` of it unread: SmolLM2 int4 wrote 156 MB for 88 MB of weights."""
        held = {id(v.const_value): v.const_value for v in model.graph.initializers.values() if self.holds(v.const_value)}
        if self.written - sum(t.length for t in held.values()) <= DEAD_FRACTION * self.written:
            return
        old, self.file, self.written = self.file, self.folder / f"{self.name}.compact", 0
        moved: dict[int, ir.ExternalTensor] = {}
        with open(self.file, "wb") as data:
            for key, tensor in held.items():
                moved[key] = self._write(data, tensor.name, tensor)
        for value in model.graph.initializers.values():
            if id(value.const_value) in moved:
                value.const_value = moved[id(value.const_value)]
        self.file = self.file.replace(old)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def spill_of(model: ir.Model) -> WeightSpill | None:
    """The spill some of the model's initializers were written to, if any."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and isinstance(spill := tensor.meta.get(SPILL_META), WeightSpill):
            return spill
    return None
