"""Run an IR model with ONNX Runtime, and capture intermediate values for calibration."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from slimgraph.errors import SlimgraphError, first_line

# Protobuf cannot hold a model of 2 GiB or more; past this size we go through a file.
PROTO_LIMIT_BYTES = 1_800_000_000

Feeds = Mapping[str, np.ndarray]
FATAL = 4  # ORT's log severity: only fatal errors are printed


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def session_options(threads: int | None = None, *, spinning: bool = True) -> ort.SessionOptions:
    """`spinning=False` for benchmarks: idle worker threads must not spin and steal time
    from another session's run."""
    options = ort.SessionOptions()
    # ORT's own log lines (coloured, on stderr) are noise for our users: a failed run logs
    # an ERROR line before raising, and the exception says the same in slimgraph's words.
    options.log_severity_level = FATAL
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


@contextlib.contextmanager
def serialized(model: ir.Model) -> Iterator[bytes | str]:
    """The model as protobuf bytes, or as a path to a temporary file when it is too large
    or reads weights from external data (which a model loaded from bytes cannot resolve)."""
    external = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    if not external and initializer_bytes(model) < PROTO_LIMIT_BYTES:
        yield ir.serde.serialize_model(model).SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="slimgraph-") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data")
        yield str(path)


def make_session(
    model: ir.Model, threads: int | None = None, *, options: ort.SessionOptions | None = None
) -> ort.InferenceSession:
    ort.set_default_logger_severity(FATAL)  # the process-wide logger, used while a session is built
    with serialized(model) as blob:
        try:
            return ort.InferenceSession(blob, options or session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for invalid graphs
            raise SlimgraphError(f"ONNX Runtime cannot load the model: {first_line(exc)}") from exc


# Ops ONNX Runtime registers in the default domain although the standard has no such op
# (onnxscript's RMSNorm fusion writes SimplifiedLayerNormalization there, as ORT's own tools do).
ORT_DEFAULT_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization"})


def check_model(model: ir.Model) -> None:
    """Structural validity: the ONNX checker, on the serialized model (ONNX Runtime's own
    default-domain ops checked as the contrib ops they are)."""
    ort_ops = any(n.domain in ("", "ai.onnx") and n.op_type in ORT_DEFAULT_DOMAIN_OPS for n in model.graph)
    with serialized(model) as blob:
        checked = blob if isinstance(blob, str) else onnx.load_from_string(blob)
        if ort_ops:  # (the common case skips this: Verify checks after every pass)
            proto = onnx.load(blob, load_external_data=False) if isinstance(blob, str) else checked
            for node in proto.graph.node:
                if node.domain in ("", "ai.onnx") and node.op_type in ORT_DEFAULT_DOMAIN_OPS:
                    node.domain = "com.microsoft"
            if not any(o.domain == "com.microsoft" for o in proto.opset_import):
                proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
            if isinstance(blob, str):
                onnx.save(proto, blob)  # (its external data stays where it was)
        try:
            onnx.checker.check_model(checked)
        except onnx.checker.ValidationError as exc:
            raise SlimgraphError(f"the model is not valid ONNX: {first_line(exc)}") from exc


def run(model: ir.Model | ort.InferenceSession, feeds: Feeds) -> dict[str, np.ndarray]:
    """Run once; returns output name → array, in graph output order."""
    session = model if isinstance(model, ort.InferenceSession) else make_session(model)
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    missing = wanted - set(feeds)
    if missing:
        raise SlimgraphError(f"missing model inputs: {', '.join(sorted(missing))}")
    try:
        values = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
    except Exception as exc:
        raise SlimgraphError(f"ONNX Runtime failed to run the model: {first_line(exc)}") from exc
    return dict(zip(names, values))


def run_all(model: ir.Model, feeds_list: Iterable[Feeds]) -> list[dict[str, np.ndarray]]:
    session = make_session(model)
    return [run(session, feeds) for feeds in feeds_list]


def capture(model: ir.Model, value_names: Iterable[str], feeds_list: Iterable[Feeds]) -> list[dict[str, np.ndarray]]:
    """Values of intermediate tensors (e.g. a linear layer's input) for each feed.

    The named values are exposed as extra graph outputs for the duration of one session;
    the model is left as it was.
    """
    values = {v.name: v for node in model.graph for v in node.outputs}
    values.update({v.name: v for v in model.graph.inputs})
    names = list(dict.fromkeys(value_names))
    unknown = [n for n in names if n not in values]
    if unknown:
        raise SlimgraphError(f"no value named {unknown[0]!r} in the model")
    outputs = model.graph.outputs
    added = [values[n] for n in names if values[n] not in outputs]
    outputs.extend(added)
    try:
        session = make_session(model)
    finally:
        for value in added:
            outputs.remove(value)
    results = []
    for feeds in feeds_list:
        got = run(session, feeds)
        results.append({n: got[n] for n in names})
    return results
