"""Frontend for `.onnx` files (with external data).

Files older than opset 9 are upgraded to opset 9 with onnx's version converter (as newer
files are when a pass needs a newer opset), and the upgrade is checked: the converted model
must give ONNX Runtime's outputs of the file on synthesized inputs, within fp32 rounding.
"""

from __future__ import annotations

import re
from pathlib import Path

import onnx_ir as ir

from slimgraph.errors import SlimgraphError, first_line
from slimgraph.frontend.onnx_validity import check_model
from slimgraph.ir.meta import SOURCE_KEY
from slimgraph.ir.opset import upgrade_opset

MIN_OPSET = 9
IR_INITIALIZERS_APART = 4


def load_onnx(path: Path) -> ir.Model:
    if path.stat().st_size == 0:
        raise SlimgraphError(f"{path} is empty")
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf's DecodeError and onnx_ir's errors alike
        unsupported = _unsupported(exc)
        if unsupported:
            raise SlimgraphError(f"{path} is valid ONNX, but {unsupported}") from exc
        raise SlimgraphError(f"{path} is not a valid ONNX model (corrupt or truncated): {first_line(exc)}") from exc
    if model.ir_version is None or model.ir_version <= 0 or "" not in model.opset_imports or len(model.graph) == 0:
        raise SlimgraphError(f"{path} is not a valid ONNX model: no graph, IR version or opset")
    _check_external_data(model, path)
    check_model(model, path)  # names, dangling values, cycles, schemas, tensor data: one line each
    _open_negative_dims(model)
    if model.ir_version < IR_INITIALIZERS_APART:
        _initializers_apart(model)
    if model.opset_imports[""] < MIN_OPSET:
        _upgrade(model, path)
    model.meta[SOURCE_KEY] = str(path)
    return model


def _unsupported(exc: BaseException) -> str | None:
    """What onnx_ir (slimgraph's IR) cannot represent in a file that parsed, from its error chain
    (a ZipMap's sequence-of-maps output: "Map types are not supported yet"), or None."""
    chain, cause = [], exc
    while cause is not None and len(chain) < 50:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if not isinstance(chain[-1], NotImplementedError):
        return None
    what = first_line(chain[-1]).split(". Please contribute")[0].rstrip(".")
    names = [m.group(1) for c in chain if (m := re.search(r'name: "([^"]+)"', str(c)))]
    where = f" (value '{names[0]}')" if names else ""
    return f"slimgraph's IR (onnx_ir) cannot hold part of it{where}: {what.lower()}"


def _initializers_apart(model: ir.Model) -> None:
    """IR 3 lists every initializer as a graph input too, yet they are constants there (ONNX Runtime
    lets a feed override an initializer only from IR 4). The model is written at IR 4, where the
    initializers passes add need not be inputs; the listed ones leave the inputs, as they would
    otherwise become overridable at IR 4: neither ONNX Runtime nor cleanup could fold what they feed
    (caffe2's zoo files build every weight with ConstantOfShape: 1.6x slower at batch 1)."""
    import onnx_ir.passes.common as common

    common.RemoveInitializersFromInputsPass()(model)
    model.ir_version = IR_INITIALIZERS_APART


def _open_negative_dims(model: ir.Model) -> None:
    """Older exporters (paddle2onnx, early tf2onnx) write -1 for "any length", which ONNX does not
    define and ONNX Runtime reads as unknown: make those axes unnamed symbolic dims, so that no
    pass or lowering takes -1 for a length."""
    graphs = {model.graph} | {node.graph for node in ir.traversal.RecursiveGraphIterator(model.graph)}  # + subgraphs
    for graph in graphs:
        for value in [*graph.inputs, *graph.outputs, *(v for node in graph for v in node.outputs)]:
            if value.shape is not None and any(isinstance(d, int) and d < 0 for d in value.shape):
                value.shape = ir.Shape([None if isinstance(d, int) and d < 0 else d for d in value.shape])


def _check_external_data(model: ir.Model, path: Path) -> None:
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            data = Path(tensor.base_dir) / tensor.location
            if not data.is_file():
                raise SlimgraphError(f"{path}: external data file '{tensor.location}' is missing")
            end = (tensor.offset or 0) + (tensor.length or 0)
            if data.stat().st_size < end:
                raise SlimgraphError(f"{path}: external data file '{tensor.location}' is truncated")


def _upgrade(model: ir.Model, path: Path) -> None:
    """Convert an old file to MIN_OPSET in place; refuse it if the conversion changed its outputs."""
    from slimgraph.measure import evaluate
    from slimgraph.measure.fidelity import EXACT_RTOL, compare
    from slimgraph.measure.inputs import model_inputs

    opset = model.opset_imports[""]
    original = model.clone()
    try:
        upgrade_opset(model, MIN_OPSET)
    except SlimgraphError as exc:
        raise SlimgraphError(f"{path} uses opset {opset}, and {first_line(exc)}") from exc
    feeds, _ = model_inputs(original)
    try:
        expected = evaluate.run_all(original, feeds)
    except SlimgraphError:
        return  # the file does not run on synthesized inputs: the pipeline's verifier says so
    try:
        error = compare(expected, evaluate.run_all(model, feeds)).max_rel_error
    except (SlimgraphError, ValueError) as exc:
        raise SlimgraphError(
            f"{path}: upgrading opset {opset} to {MIN_OPSET} broke the model: {first_line(exc)}") from exc
    if error > EXACT_RTOL:
        raise SlimgraphError(f"{path}: upgrading opset {opset} to {MIN_OPSET} changed its outputs "
                             f"(max rel error {error:.1e})")
