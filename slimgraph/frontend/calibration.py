"""Calibration inputs from a file: `.npz` of named arrays, or text (one sample a line).

Text is tokenized with the tokenizer of the Hugging Face folder the model was loaded from.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir.meta import SOURCE_KEY

TEXT_BATCH = 8


def load_calibration(path: Path, model: ir.Model) -> tuple[list[dict[str, np.ndarray]], str]:
    if not path.is_file():
        raise SlimgraphError(f"no such calibration file: {path}")
    names = [v.name for v in model.graph.inputs if not v.is_initializer()]
    if path.suffix.lower() == ".npz":
        return [_load_npz(path, names)], f"{path.name} (npz)"
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if not lines:
        raise SlimgraphError(f"calibration file {path} has no samples")
    source = model.meta.get(SOURCE_KEY)
    folder = Path(source) if source else None
    if folder is None or not has_tokenizer(folder):
        raise SlimgraphError(
            f"text calibration ({path.name}) needs a model loaded from a Hugging Face folder with a tokenizer; "
            "use a .npz of input arrays instead"
        )
    return tokenize_lines(folder, lines, names), f"{path.name}: {len(lines)} samples"


def _load_npz(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise SlimgraphError(f"{path} is not a readable .npz file: {exc}") from exc
    missing = [n for n in names if n not in arrays]
    if missing:
        raise SlimgraphError(f"{path} lacks model inputs: {', '.join(missing)} (has: {', '.join(arrays) or 'nothing'})")
    return {n: arrays[n] for n in names}


def has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file())


def load_tokenizer(folder: Path):
    """The folder's tokenizer, able to pad (decoder-only models often have no pad token)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def tokenize_lines(folder: Path, lines: list[str], names: list[str], batch: int = TEXT_BATCH
                   ) -> list[dict[str, np.ndarray]]:
    """Feeds for the model inputs `names`, `batch` lines at a time, with the folder's tokenizer."""
    tokenizer = load_tokenizer(folder)
    feeds = []
    for start in range(0, len(lines), batch):
        encoded = tokenizer(lines[start : start + batch], padding=True, truncation=True, max_length=128,
                            return_tensors="np")
        missing = [n for n in names if n not in encoded]
        if missing:
            raise SlimgraphError(f"the tokenizer does not produce model inputs: {', '.join(missing)}")
        feeds.append({n: encoded[n].astype(np.int64) for n in names})
    return feeds
