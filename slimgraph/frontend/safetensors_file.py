"""A small safetensors reader: name → numpy array, memory-mapped, bfloat16 included.

The format: 8 bytes (little-endian u64) giving the header's length N, N bytes of JSON
`{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the data; offsets count from the end of the header.

Why not the `safetensors` package: its numpy reader refuses bfloat16 (adapters and base models
saved in bf16 are common), its torch reader needs torch, which merging an adapter into an ONNX
model should not, and it is not one of slimgraph's core dependencies.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np

from slimgraph.errors import SlimgraphError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
MAX_HEADER_BYTES = 100_000_000  # the format's own limit


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """The tensor entries of the header (without `__metadata__`) and where the data starts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SlimgraphError(f"{path} is not a safetensors file ({size} bytes)")
        length = int.from_bytes(prefix, "little")
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise SlimgraphError(f"{path} is truncated or not a safetensors file (its header claims {length:,} "
                                 f"bytes; the file has {size:,})")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SlimgraphError(f"{path} is not a safetensors file: its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SlimgraphError(f"{path} is not a safetensors file: its header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + length


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a `.safetensors` file, as read-only arrays mapped from the file."""
    path = Path(path)
    header, start = read_header(path)
    size = path.stat().st_size
    data = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros(0, np.uint8)
    tensors = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
            what = entry.get("dtype") if isinstance(entry, dict) else entry
            raise SlimgraphError(f"{path}: tensor {name!r} has dtype {what!r}, which slimgraph does not read "
                                 f"(it reads {', '.join(DTYPES)})")
        dtype = DTYPES[entry["dtype"]]
        try:
            shape = [int(d) for d in entry["shape"]]
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SlimgraphError(f"{path}: tensor {name!r} has an unreadable entry in the header: {entry}") from None
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise SlimgraphError(f"{path}: tensor {name!r} ({entry['dtype']} {shape}) does not fit its "
                                 f"{end - begin} bytes")
        if start + end > size:
            raise SlimgraphError(f"{path} is truncated: tensor {name!r} ends at byte {start + end:,} of a "
                                 f"{size:,}-byte file")
        tensors[name] = data[start + begin:start + end].view(dtype).reshape(shape)
    return tensors
