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
from slimgraph.ir.opset import ort_default_domain_ops

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
    if not has_external_data(model) and initializer_bytes(model) < PROTO_LIMIT_BYTES:
        yield ir.serde.serialize_model(model).SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="slimgraph-") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data")
        yield str(path)


def has_external_data(model: ir.Model) -> bool:
    """Whether some of the model's weights are read from external data files."""
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def make_session(
    model: ir.Model, threads: int | None = None, *, options: ort.SessionOptions | None = None
) -> ort.InferenceSession:
    with serialized(model) as blob:
        return _session(blob, options or session_options(threads))


def file_session(path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
    """A session of the `.onnx` file itself: ONNX Runtime memory-maps its external data (page-aligned,
    as slimgraph writes it) where `make_session` would copy every weight to a file of its own."""
    return _session(str(path), options)


def _session(blob: bytes | str, options: ort.SessionOptions) -> ort.InferenceSession:
    ort.set_default_logger_severity(FATAL)  # the process-wide logger, used while a session is built
    try:
        return ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for invalid graphs
        raise SlimgraphError(f"ONNX Runtime cannot load the model: {first_line(exc)}") from exc


def check_model(model: ir.Model) -> None:
    """Structural validity: the ONNX checker, on the serialized model (ONNX Runtime's own
    default-domain ops checked as the contrib ops they are)."""
    ort_ops = any(n.domain in ("", "ai.onnx") and n.op_type in ort_default_domain_ops() for n in model.graph)
    with serialized(model) as blob:
        checked = blob if isinstance(blob, str) else onnx.load_from_string(blob)
        if ort_ops:  # (the common case skips this: Verify checks after every pass)
            proto = onnx.load(blob, load_external_data=False) if isinstance(blob, str) else checked
            for node in proto.graph.node:
                if node.domain in ("", "ai.onnx") and node.op_type in ort_default_domain_ops():
                    node.domain = "com.microsoft"
            if not any(o.domain == "com.microsoft" for o in proto.opset_import):
                proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
            if isinstance(blob, str):
                onnx.save(proto, blob)  # (its external data stays where it was)
        try:
            onnx.checker.check_model(checked)
        except onnx.checker.ValidationError as exc:
            # the checker's message names the node on its next lines: keep them, on one line
            message = " ".join(str(exc).split())
            raise SlimgraphError(f"the model is not valid ONNX: {message}") from exc


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
    """The model's outputs for each feed: in one session, or block by block (`run_by_blocks`) for a
    model of `BLOCKWISE_RUN_BYTES` of weights or more, or whose weights ONNX Runtime's copies of
    them would not fit in the memory available."""
    feeds_list = list(feeds_list)
    weights = initializer_bytes(model)
    if weights >= BLOCKWISE_RUN_BYTES or WHOLE_RUN_COPIES * weights > available_memory():
        found = repeated_blocks(model)
        if found:
            return run_by_blocks(model, feeds_list, found)
    session = make_session(model)
    return [run(session, feeds) for feeds in feeds_list]


# A session holds a model's weights about three times while it is built (the serialized model,
# ONNX Runtime's tensors, its pre-packed ones); block by block, one block's (and no slower: SmolLM2,
# 0.8 s against 3.3 s whole). Below 1 GB, a session of the whole model is the simpler run.
WHOLE_RUN_COPIES = 3
BLOCKWISE_RUN_BYTES = 1_000_000_000


def run_by_blocks(model: ir.Model, feeds_list: list[Feeds], blocks: list | None = None) -> list[dict[str, np.ndarray]]:
    """The model's outputs, computed one repeated block at a time: each block is a session of its
    own (`capture` from the block's input, which the block before computed), so only one block's
    weights are read and held at a time; the outputs a block makes (a decoder's present keys and
    values) are taken as it runs. `blocks`: `repeated_blocks(model)` when None."""
    blocks = blocks or repeated_blocks(model)
    if not blocks or not feeds_list:
        raise SlimgraphError("the model has no repeated blocks to run one at a time" if not blocks else "no inputs")
    outputs = {v.name for v in model.graph.outputs}
    results: list[dict[str, np.ndarray]] = [{} for _ in feeds_list]
    held: list[Feeds] = [{} for _ in feeds_list]  # the residual stream between blocks

    def fed() -> list[Feeds]:
        return [{**feeds, **state} for feeds, state in zip(feeds_list, held)]

    def given() -> list[str]:
        return [*feeds_list[0], *held[0]]

    for block in blocks:
        made = sorted(outputs.intersection(v.name for node in view_nodes(model, [block.exit], given())
                                           for v in node.outputs))
        captured = list(capture(model, [block.exit.name, *made], fed(), given=given()))
        for result, got in zip(results, captured):
            result.update({name: got[name] for name in made})
        held = [{block.exit.name: got[block.exit.name]} for got in captured]
    rest = [name for name in outputs if name not in results[0]]
    if rest:
        for result, got in zip(results, capture(model, rest, fed(), given=given())):
            result.update(got)
    return [{v.name: result[v.name] for v in model.graph.outputs} for result in results]


def repeated_blocks(model: ir.Model) -> list:
    """The model's repeated blocks (`slimgraph.ir.structure`'s `Block`s), in order; empty where they
    are not all found with a clear residual stream in and out."""
    from slimgraph.ir.structure import discover

    found = discover(model).blocks
    return list(found.blocks) if found is not None and found.blocks and len(found.blocks) == found.count else []


def available_memory() -> int:
    """MemAvailable of /proc/meminfo; where it cannot be read, as if there were plenty."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def capture(model: ir.Model, value_names: Iterable[str], feeds_list: Iterable[Feeds], *,
            given: Iterable[str] = ()) -> Iterator[dict[str, np.ndarray]]:
    """Values of intermediate tensors (e.g. a linear layer's input) for each feed, one feed at a
    time (a caller that reduces them as they come never holds them all).

    `given`: intermediate values the feeds hold (a block's input, computed before): the session
    starts from them, and runs none of the nodes before them (`slimgraph.passes.blockwise`).

    The session runs a view of the model (the model is left as it was) whose outputs are the
    named values and whose nodes are only those they need (ONNX Runtime runs every node it is
    given: a language model's logits are as large as its weights), and it reads the large
    weights where they lie (`_capture_view`): capturing costs about what the captured values do.
    """
    values = {v.name: v for node in model.graph for v in node.outputs}
    values.update({v.name: v for v in model.graph.inputs})
    names = list(dict.fromkeys(value_names))
    unknown = [n for n in names if n not in values]
    if unknown:
        raise SlimgraphError(f"no value named {unknown[0]!r} in the model")
    view, weights = _capture_view(model, [values[n] for n in names], {values[n] for n in given if n in values})
    options = session_options()
    options.add_session_config_entry("session.disable_prepacking", "1")  # a copy of every weight
    # What is left of the weights is small or not float; those still in external data are read
    # from their folder (a view cannot be saved as a file with onnx_ir, and needs not be).
    folders = {t.base_dir for v in view.graph.initializers.values() if isinstance(t := v.const_value, ir.ExternalTensor)}
    if len(folders) > 1:
        raise SlimgraphError("the model's external data lies in more than one folder; save it as one model first")
    if folders:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folders.pop()))
    inline = sum(v.const_value.nbytes for v in view.graph.initializers.values()
                 if v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor))
    if inline >= PROTO_LIMIT_BYTES:
        raise SlimgraphError(f"cannot capture calibration values: {inline / 1e9:.1f} GB of weights that are not "
                             "float or feed non-standard ops do not fit in one protobuf")
    session = _session(ir.serde.serialize_model(view).SerializeToString(), options)

    def results() -> Iterator[dict[str, np.ndarray]]:
        for feeds in feeds_list:
            got = run(session, {**feeds, **weights})
            yield {n: got[n] for n in names}

    return results()


def view_nodes(model: ir.Model, outputs: Iterable[ir.Value], given: Iterable[str] = ()) -> list[ir.Node]:
    """The nodes `capture` would run to compute `outputs` from the graph inputs and the `given` values."""
    names = set(given)
    starts = {v for node in model.graph for v in node.outputs if v.name in names}
    return list(_capture_view(model, list(outputs), starts)[0].graph)


# Weights from this size up are fed to a capture session rather than serialized into it.
FED_WEIGHT_BYTES = 1 << 20
_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
_SUBGRAPHS = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)


def _capture_view(model: ir.Model, outputs: list[ir.Value], given: set[ir.Value] = frozenset()
                  ) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """A model sharing `model`'s nodes and values with `outputs` as its outputs and only the
    nodes they need, starting from the graph inputs and the `given` values (inputs of the view);
    its large float weights that only standard ops read are graph inputs,
    returned as feeds (the arrays the IR holds, memory-mapped or in memory). ONNX Runtime copies
    a serialized weight three times (the protobuf bytes, its own tensors, pre-packed ones);
    a fed array it reads where it lies."""
    graph = model.graph
    needed: set[ir.Value] = set(outputs)
    nodes: list[ir.Node] = []
    for node in reversed(list(graph)):  # users come after producers
        if not needed.intersection(node.outputs) or given.issuperset(needed.intersection(node.outputs)):
            continue
        nodes.append(node)
        needed.update(v for v in node.inputs if v is not None)
        for attribute in node.attributes.values():
            if attribute.type in _SUBGRAPHS:  # the values a subgraph reads from this scope
                subgraphs = attribute.value if attribute.type == ir.AttributeType.GRAPHS else [attribute.value]
                needed.update(v for sub in subgraphs for inner in ir.traversal.RecursiveGraphIterator(sub)
                              for v in inner.inputs if v is not None)
    initializers = [v for v in graph.initializers.values() if v in needed]
    fed = [v for v in initializers if v.const_value is not None and v.const_value.nbytes >= FED_WEIGHT_BYTES
           and v.const_value.dtype in _FLOATS and not v.is_graph_input()
           and all(user.graph is graph and user.domain in ("", "ai.onnx") for user, _ in v.uses())]
    inputs = [v for v in graph.inputs if v in needed] + [v for v in given if v in needed and not v.is_graph_input()]
    view = ir.GraphView([*inputs, *fed], outputs, nodes=reversed(nodes),
                        initializers=[v for v in initializers if v not in fed],
                        opset_imports=dict(graph.opset_imports), name=graph.name)
    return (ir.Model(view, ir_version=model.ir_version, functions=list(model.functions.values())),  # type: ignore[arg-type]
            {v.name: v.const_value.numpy() for v in fed})
