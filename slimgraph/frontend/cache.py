"""A disk cache of exported models: the second `load` of the same HF folder or `.gguf` skips the export.

Exporting a transformer through torch.export takes seconds to minutes; reading the result back
takes well under a second. An entry is keyed by what decides the export's result:

- the source's content: SHA-256 over the relative path and bytes of every file (a folder) or of
  the file itself (a `.gguf`), so editing any file invalidates it, and a copy elsewhere hits it.
  Of a folder's safetensors files only the headers count (names, dtypes, shapes, offsets): a
  folder captured without its weights (`slimgraph.frontend.lazy_weights`) has an entry that holds
  no weights, only where each lies, so new values under the same names are read fresh. An entry
  whose weights were exported into it records the folder's full digest and is used only while
  it matches; one whose example inputs were computed with the weights (a KV-cache export's past),
  the safetensors files' sizes and modification times;
- the exporter: the versions of torch, transformers, onnxscript, onnx_ir and slimgraph, plus a
  digest of the source of the modules on the capture path (`CAPTURE_MODULES`: a change to the
  capture code while developing must not serve stale graphs);
- the kind of load (`hf-folder`, `gguf`) and its options (`kv_cache`: a graph with past/present
  keys and values is another export of the same files).

An entry is a folder `<root>/exports/<key>/` with `model.onnx` (nodes keep their
`pkg.torch.onnx.name_scopes` metadata), `model.onnx.data` (the weights), `inputs.npz` (the
example inputs), and `entry.json` (the inputs' source string, each file's SHA-256, and where the
weights bound to the source's files lie; those are empty in `model.onnx`). It is
written into a temporary folder and renamed into place, so a reader sees a whole entry or
none. An entry whose files do not match `entry.json`, or that fails to parse, is removed and
rebuilt, never trusted.

The weights are read back memory-mapped (mapped at load, so an entry pruned or rebuilt later
does not pull them away), each wrapped in an `ir.LazyTensor`. Left as `ir.ExternalTensor`s,
they would be saved by reference to the cache's data file (onnx_ir keeps external tensors
external when a model is saved without external data), and the saved model would break once
moved or pruned; wrapped, they are saved like any in-memory weight.

While a display is live (`stage` given: the CLI's spinner), the export runs in a worker process
that writes the entry, and this process reads it back (`slimgraph.frontend.export_worker`).

Reading an entry touches it; after each write, the least recently used entries beyond
`SLIMGRAPH_CACHE_MAX_GB` (default 8) are removed. `SLIMGRAPH_NO_CACHE=1` turns the cache off;
`SLIMGRAPH_CACHE` moves the root (default `~/.cache/slimgraph`, shared with `slimgraph.zoo`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.frontend.lazy_weights import bound_sources, rebind
from slimgraph.ir.meta import EXAMPLE_INPUTS_KEY, EXAMPLE_INPUTS_SOURCE_KEY, INPUTS_READ_WEIGHTS_KEY

FORMAT = 2  # bump when the layout of an entry changes
MODEL_FILE, DATA_FILE, INPUTS_FILE, ENTRY_FILE = "model.onnx", "model.onnx.data", "inputs.npz", "entry.json"
CHUNK = 1 << 20
DEFAULT_MAX_GB = 8.0
STALE_STAGING_S = 24 * 3600
# The modules whose code decides the exported graph (export options, weight names, example inputs).
# Listed rather than globbed so that edits elsewhere in the package keep the cache warm.
CAPTURE_MODULES = ("frontend/torch_module.py", "frontend/hf_folder.py", "frontend/gguf_file.py",
                   "frontend/kv_cache.py", "ir/cache_signature.py", "frontend/calibration.py", "frontend/cache.py", "frontend/lazy_weights.py", "ir/graph.py", "ir/structure.py", "ir/meta.py")


def cache_root() -> Path:
    """`$SLIMGRAPH_CACHE`, or `~/.cache/slimgraph`: exports here, downloaded wheels in `slimgraph.zoo`."""
    return Path(os.environ.get("SLIMGRAPH_CACHE") or Path.home() / ".cache" / "slimgraph")


def usage() -> dict[str, tuple[int, int]]:
    """What the cache holds: folder (exports, wheels, …) → (entries, bytes)."""
    root = cache_root()
    if not root.is_dir():
        return {}
    found = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = [f for f in folder.rglob("*") if f.is_file() and not f.is_symlink()]
        found[folder.name] = (sum(1 for _ in folder.iterdir()), sum(f.stat().st_size for f in files))
    return found


def clear() -> int:
    """Remove everything in the cache; returns the bytes freed."""
    freed = sum(size for _, size in usage().values())
    root = cache_root()
    if root.is_dir():
        for entry in root.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    return freed


def enabled() -> bool:
    return os.environ.get("SLIMGRAPH_NO_CACHE", "").strip() not in {"1", "true", "yes"}


Stage = Callable[[str], None]  # told which stage a load is in (the CLI shows it beside its spinner)
EXPORTING = "exporting with torch"  # the spinner's clock shows how long: a minute or more the first time


def cached_export(kind: str, source: Path, export: Callable[[], ir.Model], options: dict | None = None,
                  stage: Stage | None = None) -> ir.Model:
    """The model `export()` makes from `source` with `options` (JSON values that change the
    export), from the cache when an intact entry exists; `stage` hears which it is, and when it is
    given, `export` (then a picklable callable) runs in a worker process.

    The returned model carries the example inputs and their source in `model.meta`; the
    caller sets what depends on where the source is (`SOURCE_KEY`, `TOKENIZER_KEY`).
    """
    if not enabled():
        if stage is None:
            return export()
        stage(EXPORTING + " in a worker process (the export cache is off)")
        with tempfile.TemporaryDirectory(prefix="slimgraph-export-") as folder:
            return _export_in_worker(export, Path(folder) / "entry", source)
    say = stage or (lambda what: None)
    say("looking in the export cache")
    entry = cache_root() / "exports" / entry_key(kind, source, options)
    if entry.is_dir():
        say("reading the export from the cache")
        model = _read(entry, source)
        if model is not None:
            with contextlib.suppress(OSError):
                os.utime(entry / ENTRY_FILE)  # most recently used: pruned last
            return model
        shutil.rmtree(entry, ignore_errors=True)  # corrupt or partial: rebuild
    if stage is not None:
        stage(EXPORTING + " in a worker process")
        model = _export_in_worker(export, entry, source)
    else:
        model = export()
        write_entry(entry, model, source)
    _prune(entry.parent, keep=entry)
    return model


def _export_in_worker(export: Callable[[], ir.Model], entry: Path, source: Path) -> ir.Model:
    from slimgraph.frontend.export_worker import run_in_worker

    run_in_worker(functools.partial(_export_into, export, entry, source))
    model = _read(entry, source)
    if model is None:  # the worker could not write the entry (disk full, read-only cache): as without a display
        return export()
    return model


def _export_into(export: Callable[[], ir.Model], entry: Path, source: Path) -> None:
    """In the worker: export, and write the entry (an entry another process wrote first is kept)."""
    write_entry(entry, export(), source)


def export_once(kind: str, source: Path, export: Callable[[Path, Any, Any], ir.Model], example_inputs: Any,
                dynamic_shapes: Any, kv_cache: bool, stage: Stage | None = None) -> ir.Model:
    """`export(source, example_inputs, dynamic_shapes)`, through the cache when the inputs are the
    frontend's own: inputs chosen by the caller are not part of the key, so those export every time
    (in this process: they need not pickle)."""
    if example_inputs is None and dynamic_shapes is None:
        options = {"kv_cache": True} if kv_cache else None
        return cached_export(kind, source, functools.partial(export, source, None, None), options, stage)
    if stage is not None:
        stage(EXPORTING)
    return export(source, example_inputs, dynamic_shapes)


def entry_key(kind: str, source: Path, options: dict | None = None) -> str:
    digest = hashlib.sha256()
    digest.update(f"slimgraph-export-cache {FORMAT} {kind}\n".encode())
    if options:
        digest.update(json.dumps(options, sort_keys=True).encode() + b"\n")
    digest.update(json.dumps(exporter_versions(), sort_keys=True).encode())
    digest.update(content_digest(source, safetensors_headers_only=source.is_dir()).encode())
    return digest.hexdigest()[:32]


def exporter_versions() -> dict[str, str]:
    """The versions installed (read from their metadata: importing torch to ask would cost a
    cache hit seconds and hundreds of MB)."""
    from importlib.metadata import version

    import slimgraph

    return {
        **{name: version(name) for name in ("torch", "transformers", "onnxscript")},
        "onnx_ir": ir.__version__,
        "slimgraph": slimgraph.__version__,
        "slimgraph-capture-code": _capture_code_digest(),
    }


def _capture_code_digest() -> str:
    package = Path(__file__).parent.parent
    digest = hashlib.sha256()
    for name in CAPTURE_MODULES:
        path = package / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b""))
    return digest.hexdigest()


def content_digest(source: Path, *, safetensors_headers_only: bool = False) -> str:
    """SHA-256 over a file's bytes, or over every file of a folder (relative path, then bytes; of a
    safetensors file only its header, with `safetensors_headers_only`)."""
    digest = hashlib.sha256()
    if source.is_file():
        _update(digest, source)
        return digest.hexdigest()
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        relative = path.relative_to(source).as_posix()
        if any(part.startswith(".") for part in relative.split("/")):
            continue  # .git, .cache, editor files: not the model
        digest.update(relative.encode() + b"\0")
        if safetensors_headers_only and path.suffix == ".safetensors":
            _update_header(digest, path)
        else:
            _update(digest, path)
    return digest.hexdigest()


def weights_stamp(folder: Path) -> dict[str, list[int]]:
    """Each safetensors file's size and modification time: rewritten files, other stamps (hashing
    a large checkpoint's bytes on every load would cost more than it saves)."""
    return {path.name: [path.stat().st_size, path.stat().st_mtime_ns] for path in sorted(folder.glob("*.safetensors"))}


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    _update(digest, path)
    return digest.hexdigest()


def _update(digest, path: Path) -> None:
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)


def _update_header(digest, path: Path) -> None:
    with open(path, "rb") as f:
        prefix = f.read(8)
        digest.update(prefix + f.read(min(int.from_bytes(prefix.ljust(8, b"\0"), "little"), CHUNK * 100)))


def write_entry(entry: Path, model: ir.Model, source: Path) -> None:
    """Stage the entry in a temporary folder beside it, then rename: readers never see half an entry.

    Failing to write the cache (disk full, read-only home) must not fail the load: the model
    in memory is fine, so the error is swallowed and the next load exports again.
    """
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    except OSError:
        return
    bound = bound_sources(model)
    try:
        with _without_bound_weights(model, bound):
            ir.save(model, staging / MODEL_FILE, external_data=DATA_FILE)  # leaves `model` as it was
        feeds = model.meta.get(EXAMPLE_INPUTS_KEY) or []
        np.savez(staging / INPUTS_FILE, **{f"{i}/{name}": array for i, feed in enumerate(feeds)
                                           for name, array in feed.items()})
        files = {name: file_digest(staging / name) for name in (MODEL_FILE, DATA_FILE, INPUTS_FILE)
                 if (staging / name).is_file()}
        record = {"format": FORMAT, "inputs_source": model.meta.get(EXAMPLE_INPUTS_SOURCE_KEY),
                  "feeds": len(feeds), "files": files,
                  "bound": {name: weight.to_json(source) for name, weight in bound.items()}}
        if source.is_dir() and not bound:  # the weights are in the entry: valid for these bytes only
            record["source_digest"] = content_digest(source)
        elif model.meta.get(INPUTS_READ_WEIGHTS_KEY):  # the example inputs are: valid while the files are unchanged
            record["weights_stamp"] = weights_stamp(source)
        (staging / ENTRY_FILE).write_text(json.dumps(record, indent=1))
        os.rename(staging, entry)
    except OSError:
        pass  # another process renamed its entry first (same key, same content), or the disk is full
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _without_bound_weights(model: ir.Model, bound: dict) -> Iterator[None]:
    """Bound weights are saved empty (entry.json says where they lie), then put back."""
    values = [model.graph.initializers[name] for name in bound]
    held = [(value.const_value, value.shape) for value in values]
    for value in values:
        value.const_value = ir.Tensor(np.zeros(0, value.const_value.dtype.numpy()), name=value.name)
    try:
        yield
    finally:
        for value, (tensor, shape) in zip(values, held):
            value.const_value, value.shape = tensor, shape


def _prune(folder: Path, keep: Path) -> None:
    """Remove the least recently used entries until the folder fits `SLIMGRAPH_CACHE_MAX_GB`."""
    try:
        limit = float(os.environ.get("SLIMGRAPH_CACHE_MAX_GB") or DEFAULT_MAX_GB) * 1e9
    except ValueError:
        limit = DEFAULT_MAX_GB * 1e9
    entries = []
    try:
        listing = list(folder.iterdir())
    except OSError:
        return
    for entry in listing:
        try:
            if entry.name.startswith("."):
                if time.time() - entry.stat().st_mtime > STALE_STAGING_S:
                    shutil.rmtree(entry, ignore_errors=True)  # left by a process killed while writing
                continue
            used = (entry / ENTRY_FILE).stat().st_mtime
            size = sum(f.stat().st_size for f in entry.iterdir())
        except OSError:
            continue  # being written or removed by another process
        entries.append((used, size, entry))
    total = sum(size for _, size, _ in entries)
    for _, size, entry in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if entry != keep:
            shutil.rmtree(entry, ignore_errors=True)  # a process reading it keeps its open files
            total -= size


def _read(entry: Path, source: Path) -> ir.Model | None:
    """The entry's model, or None when any file is missing, altered or unreadable, or when the
    weights it holds were exported from other bytes than the source's."""
    try:
        record = json.loads((entry / ENTRY_FILE).read_text())
        if record.get("format") != FORMAT or MODEL_FILE not in record["files"]:
            return None
        for name, expected in record["files"].items():
            if file_digest(entry / name) != expected:
                return None
        if "source_digest" in record and content_digest(source) != record["source_digest"]:
            return None
        if "weights_stamp" in record and weights_stamp(source) != record["weights_stamp"]:
            return None
        model = ir.load(entry / MODEL_FILE)
        _wrap_external_tensors(model)
        rebind(model, source, record["bound"])
        feeds: list[dict[str, np.ndarray]] = [{} for _ in range(record["feeds"])]
        with np.load(entry / INPUTS_FILE) as data:
            for key in data.files:
                index, name = key.split("/", 1)
                feeds[int(index)][name] = data[key]
    except Exception:  # json, protobuf, zip, missing files: a bad entry is rebuilt, whatever broke it
        return None
    model.meta[EXAMPLE_INPUTS_KEY] = feeds
    model.meta[EXAMPLE_INPUTS_SOURCE_KEY] = record["inputs_source"]
    return model


def _wrap_external_tensors(model: ir.Model) -> None:
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                tensor.numpy()  # maps the file now (reads nothing): the mapping outlives the file's removal
                value.const_value = ir.LazyTensor(lambda t=tensor: t, dtype=tensor.dtype, shape=tensor.shape,
                                                  name=tensor.name, doc_string=tensor.doc_string)
