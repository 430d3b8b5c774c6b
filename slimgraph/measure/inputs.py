"""Sample inputs synthesized from a graph's input types, in shapes the model accepts.

Sizes of the axes the graph leaves open (named, unnamed, or `-1` as older exporters write)
come from each axis's role:
- batch: the first axis of an input, and every open axis of a recurrent state input;
- spatial: height and width of an image (rank 4 with 1, 3 or 4 channels on axis 1);
- sequence: any other open axis.
Axes that share a name share a size, and an axis named as a sum of others (`past_sequence +
sequence`, as the exporter names a KV cache's length) is their sum.

Values are valid for what consumes them: token ids stay below the embedding table's row
count, an attention mask is ones, token-type ids are zeros, position ids count up, a state
(`state`, `h0`, `c`, `hidden`, ...) is zeros, and an integer scalar named like a sample rate
(`sr`, `sample_rate`) is 16000.

`model_inputs` tries the sizes real models accept with ONNX Runtime (images: multiples of 32;
sequences: several lengths; batch 1 when a larger batch is refused) and keeps the first
that runs. When none runs, the last one is returned and the verifier's error says how to
pass inputs instead (`refused_hint`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir.meta import EXAMPLE_INPUTS_KEY, EXAMPLE_INPUTS_SOURCE_KEY

if TYPE_CHECKING:
    import onnx

DEFAULT_BATCH = 2
DEFAULT_SEQUENCE = 16
DEFAULT_SPATIAL = 64  # image sides: a multiple of 32, as strided CNNs and feature pyramids need
DEFAULT_SAMPLE_RATE = 16000
MAX_SAMPLE_BYTES = 1 << 30  # per synthesized input

# (spatial, sequence) sizes tried in order by `model_inputs` until ONNX Runtime runs the model.
SIZE_CANDIDATES = ((DEFAULT_SPATIAL, DEFAULT_SEQUENCE), (32, 64), (48, 256), (96, 512), (128, 1024),
                   (224, 128), (320, 32), (640, 4096))

STATE_NAME = re.compile(r"state|hidden|cache|memory|past|^[hc]\d*$|^[hc]_?(0|in|init)", re.IGNORECASE)
SAMPLE_RATE_NAME = re.compile(r"^sr$|sample_?rate|sampling_?rate", re.IGNORECASE)
IMAGE_CHANNELS = (1, 3, 4)

_PLAN_KEY = "slimgraph.input_plan"  # model.meta: the sizes found to run, keyed by the inputs' signature


@dataclass(frozen=True)
class Sizes:
    """The size of each role's open axes; `dims` fixes named axes explicitly."""

    batch: int = DEFAULT_BATCH
    sequence: int = DEFAULT_SEQUENCE
    spatial: int | None = None  # None: like sequence
    dims: tuple[tuple[str, int], ...] = ()


def is_state(value: ir.Value) -> bool:
    return value.dtype is not None and value.dtype.is_floating_point() and bool(STATE_NAME.search(value.name or ""))


def _is_image(value: ir.Value) -> bool:
    shape = value.shape
    return shape is not None and len(shape) == 4 and isinstance(shape[1], int) and shape[1] in IMAGE_CHANNELS


def _role(value: ir.Value, axis: int) -> str:
    if axis == 0 or is_state(value):
        return "batch"
    if _is_image(value) and axis >= 2:
        return "spatial"
    return "sequence"


def _open(dim: ir.SymbolicDim | int) -> bool:
    return not isinstance(dim, int) or dim < 0  # -1: what older exporters write for "any"


def concrete_shape(value: ir.Value, sizes: Sizes, named: dict[str, int]) -> tuple[int, ...]:
    """The input's shape with open axes sized by role; `named` collects and shares named sizes."""
    if value.shape is None:
        raise SlimgraphError(f"input {value.name!r} has no shape; pass example inputs explicitly")
    by_role = {"batch": sizes.batch, "sequence": sizes.sequence,
               "spatial": sizes.spatial if sizes.spatial is not None else sizes.sequence}
    shape = []
    for axis, dim in enumerate(value.shape):
        if not _open(dim):
            shape.append(dim)
            continue
        name = None if isinstance(dim, int) or dim.value in (None, "", "?") else dim.value  # "?": unnamed too
        if name is not None and name in named:
            shape.append(named[name])
            continue
        parts = [p.strip() for p in name.split("+")] if name is not None and "+" in name else []
        if parts and all(p in named for p in parts):
            named[name] = sum(named[p] for p in parts)
            shape.append(named[name])
            continue
        size = by_role[_role(value, axis)]
        if name is not None:
            named[name] = size
        shape.append(size)
    return tuple(shape)


def index_bound(value: ir.Value) -> int | None:
    """The row count of a constant table this integer input indexes (Gather data, axis 0)."""
    bounds = []
    for node, index in value.uses():
        if node.op_type == "Gather" and index == 1:
            table = node.inputs[0]
            axis = node.attributes.get_int("axis", 0)
            if table is not None and table.shape is not None and isinstance(table.shape[axis], int):
                bounds.append(table.shape[axis])
    return min(bounds) if bounds else None


def sample_value(value: ir.Value, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    try:
        dtype = value.dtype.numpy() if value.dtype is not None else np.float32
    except TypeError:  # UNDEFINED, or a type numpy has no array for (found by fuzzing)
        raise SlimgraphError(f"input {value.name!r} has element type {value.dtype.name}, which cannot be "
                             "synthesized; pass inputs with --calib inputs.npz") from None
    size = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
    if size > MAX_SAMPLE_BYTES:  # a file declaring absurd dims (found by fuzzing) must not exhaust memory
        dims = "×".join(map(str, shape))
        raise SlimgraphError(f"input {value.name!r} of shape {dims} would take {size / 2**30:,.0f} GiB to synthesize; "
                             "pass inputs with --calib inputs.npz")
    name = (value.name or "").lower()
    if np.issubdtype(dtype, np.bool_):
        return np.ones(shape, dtype=dtype)
    if np.issubdtype(dtype, np.integer):
        if shape == () and SAMPLE_RATE_NAME.search(name):
            return np.array(DEFAULT_SAMPLE_RATE, dtype=dtype)
        if re.search(r"mask", name):
            return np.ones(shape, dtype=dtype)
        if re.search(r"token_type|segment", name):
            return np.zeros(shape, dtype=dtype)
        if re.search(r"position", name) and len(shape) >= 1:
            return np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        high = index_bound(value) or 100
        return rng.integers(0, high, size=shape, dtype=dtype)
    if is_state(value):
        return np.zeros(shape, dtype=dtype)
    return rng.standard_normal(shape).astype(dtype)


def sample_inputs(
    model: ir.Model,
    *,
    batch: int = DEFAULT_BATCH,
    sequence: int = DEFAULT_SEQUENCE,
    spatial: int | None = None,
    dims: dict[str, int] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """One feed for every graph input that is not an initializer (`spatial` defaults to `sequence`)."""
    return _feeds(model, Sizes(batch, sequence, spatial, tuple((dims or {}).items())), seed)


def _feeds(model: ir.Model, sizes: Sizes, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    named = dict(sizes.dims)
    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    shapes = {}
    for value in sorted(inputs, key=_has_sum_dim):  # sums once the axes they add up are sized
        shapes[value.name] = concrete_shape(value, sizes, named)
    return {value.name: sample_value(value, shapes[value.name], rng) for value in inputs}


def _has_sum_dim(value: ir.Value) -> bool:
    return value.shape is not None and any("+" in str(getattr(d, "value", "") or "") for d in value.shape)


def model_inputs(model: ir.Model, *, seed: int = 0, count: int = 2) -> tuple[list[dict[str, np.ndarray]], str]:
    """The inputs a pipeline verifies and calibrates on, and where they came from.

    A frontend that knows real inputs (a tokenizer, the user's example inputs) stores them in
    `model.meta[EXAMPLE_INPUTS_KEY]`; otherwise they are synthesized, in the first sizes that
    ONNX Runtime runs (remembered in `model.meta` for the next call).
    """
    examples = model.meta.get(EXAMPLE_INPUTS_KEY)
    if examples:
        return list(examples), model.meta.get(EXAMPLE_INPUTS_SOURCE_KEY, "example inputs")
    signature = _signature(model)
    remembered = model.meta.get(_PLAN_KEY)
    if remembered is not None and remembered[0] == signature:
        plan = remembered[1]
    else:
        plan = _find_plan(model, seed, count)
        model.meta[_PLAN_KEY] = (signature, plan)
    feeds = [_feeds(model, sizes, seed + i) for i, sizes in zip(range(count), _batched(plan, count))]
    return feeds, "synthesized"


def refused_hint(source: str | None) -> str:
    """What to do when the model refuses synthesized inputs (appended to the verifier's error)."""
    if not (source or "").startswith("synthesized"):
        return ""
    return ("; slimgraph synthesized these inputs and no shape it tried ran: pass your own with "
            "--calib inputs.npz (one array per input name), or skip verification with --no-verify (exact passes only)")


def _batched(plan: tuple[Sizes, bool], count: int) -> Iterator[Sizes]:
    """Sample i has batch 1 + i, unless the model takes batch 1 only."""
    sizes, batch_one = plan
    for i in range(count):
        yield Sizes(1 if batch_one else 1 + i, sizes.sequence, sizes.spatial, sizes.dims)


def _signature(model: ir.Model) -> tuple:
    return tuple((v.name, v.dtype, None if v.shape is None else tuple(str(d) for d in v.shape))
                 for v in model.graph.inputs if not v.is_initializer())


def _find_plan(model: ir.Model, seed: int, count: int) -> tuple[Sizes, bool]:
    """The first candidate sizes whose samples ONNX Runtime runs: (sizes, batch 1 only)."""
    from slimgraph.measure import evaluate  # (onnxruntime loads only when a search runs)

    default = (Sizes(batch=1, sequence=DEFAULT_SEQUENCE, spatial=DEFAULT_SPATIAL), False)
    try:
        session = evaluate.make_session(model)
    except SlimgraphError:
        return default  # the verifier reports why the model does not load
    tried = set()
    outline = _outline(model)
    for spatial, sequence in SIZE_CANDIDATES:
        sizes = Sizes(batch=1, sequence=sequence, spatial=spatial)
        first = _feeds(model, sizes, seed)
        key = tuple((n, a.shape) for n, a in first.items())
        if key in tried:
            continue  # these sizes change no axis this model has open
        tried.add(key)
        if _empties_an_activation(outline, first) or not _runs(session, first):
            continue
        for batch_one in (False, True):
            if all(_runs(session, _feeds(model, s, seed + i)) for i, s in
                   enumerate(_batched((sizes, batch_one), count)) if i > 0):
                return sizes, batch_one
    return default


def _outline(model: ir.Model) -> onnx.ModelProto:
    """The model without its large float weights (their shapes stay): enough for shape inference."""
    import onnx

    proto = ir.serde.serialize_model(model)
    for tensor in proto.graph.initializer:
        if tensor.data_type != onnx.TensorProto.INT64 and np.prod(tensor.dims, dtype=np.int64) > 64:
            tensor.ClearField("raw_data")
            tensor.ClearField("float_data")
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return proto


def _empties_an_activation(outline: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> bool:
    """Whether these input sizes shrink an activation (rank ≥ 3) to zero length, as a small image
    does after enough strided layers. Such sizes are never tried: ONNX Runtime's CPU kernels can
    divide by the empty axis (a Reshape to -1 stopped a whole process with SIGFPE, found by
    benchmarks/fuzz.py), which no exception handler catches."""
    import onnx

    proto = onnx.ModelProto()
    proto.CopyFrom(outline)
    for value in proto.graph.input:
        if value.name in feeds:
            shape = value.type.tensor_type.shape
            shape.ClearField("dim")
            for size in feeds[value.name].shape:
                shape.dim.add().dim_value = size
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # (shape inference cannot tell; ONNX Runtime will)
        return False
    for value in inferred.graph.value_info:
        dims = value.type.tensor_type.shape.dim
        if len(dims) >= 3 and any(d.HasField("dim_value") and d.dim_value == 0 for d in dims):
            return True
    return False


def _runs(session, feeds: dict[str, np.ndarray]) -> bool:
    from slimgraph.measure import evaluate

    try:
        evaluate.run(session, feeds)
    except SlimgraphError:
        return False
    return True
