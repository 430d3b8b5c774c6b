"""Opset conversion with onnx's version converter, for passes that need a newer opset."""

from __future__ import annotations

import functools

import onnx.defs
import onnx.helper
import onnx.version_converter
import onnx_ir as ir

from slimgraph.errors import SlimgraphError


def default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", 1)


@functools.cache
def ort_default_domain_ops() -> frozenset[str]:
    """The ops ONNX Runtime registers in the default domain although ONNX defines no such op
    (`SimplifiedLayerNormalization`, which onnxscript's RMSNorm fusion writes, as ORT's own tools do)."""
    from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema

    return frozenset(s.name for s in get_all_operator_schema() if s.domain == "" and not onnx.defs.has(s.name))


def upgrade_opset(model: ir.Model, version: int) -> bool:
    """Convert `model` in place to at least `version` of the default domain; True if converted."""
    if default_opset(model) >= version:
        return False
    proto = ir.serde.serialize_model(model)
    try:
        converted = onnx.version_converter.convert_version(proto, version)
    except Exception as exc:
        raise SlimgraphError(f"cannot convert the model from opset {default_opset(model)} to {version}: {exc}") from exc
    new = ir.serde.deserialize_model(converted)
    meta = dict(model.meta)
    # ir.Model has no "replace contents" call: move the converted graph in, keep identity.
    model.graph = new.graph  # the opset imports live on the graph
    needed_ir = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", version)])
    model.ir_version = max(new.ir_version or 0, needed_ir)
    model.meta.update(meta)
    return True
