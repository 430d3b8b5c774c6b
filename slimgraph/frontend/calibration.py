"""Calibration inputs from a file: `.npz` of named arrays, text (one sample a line), or a folder of
images (`slimgraph.frontend.images`).

Text is tokenized with the tokenizer the model was loaded with (`model.meta[TOKENIZER_KEY]`):
a Hugging Face folder's, or the one inside a `.gguf` file.
"""

from __future__ import annotations

import functools
import zipfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError, first_line
from slimgraph.frontend import images
from slimgraph.ir.cache_signature import ATTENTION_MASK, INPUT_IDS, cache_layers, prompt_feeds
from slimgraph.ir.meta import TOKENIZER_KEY

TEXT_BATCH = 8


def load_calibration(path: Path, model: ir.Model) -> tuple[list[dict[str, np.ndarray]], str]:
    folder, preprocess = images.split_spec(path)
    if folder.is_dir():
        return images.load_images(folder, preprocess, model)
    if not path.is_file():
        raise SlimgraphError(f"no such calibration file: {path}")
    names = [v.name for v in model.graph.inputs if not v.is_initializer()]
    if path.suffix.lower() == ".npz":
        return [match_inputs(path, _load_npz(path, names), model)], f"{path.name} (npz)"
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if not lines:
        raise SlimgraphError(f"calibration file {path} has no samples")
    source = model.meta.get(TOKENIZER_KEY)
    folder = Path(source) if source else None
    if folder is None or not has_tokenizer(folder):
        raise SlimgraphError(
            f"text calibration ({path.name}) needs a model loaded from a Hugging Face folder with a tokenizer "
            "or from a .gguf file; "
            "use a .npz of input arrays instead"
        )
    if cache_layers(model):  # a decoder's step: the prompt with an empty past, positions from the mask
        encoded = tokenize_lines(folder, lines, [INPUT_IDS, ATTENTION_MASK])
        return [prompt_feeds(model, feeds) for feeds in encoded], f"{path.name}: {len(lines)} prompts"
    return tokenize_lines(folder, lines, names), f"{path.name}: {len(lines)} samples"


def _load_npz(path: Path, names: list[str] | None) -> dict[str, np.ndarray]:
    """The arrays for the model inputs `names` (all of them when None)."""
    if not zipfile.is_zipfile(path):  # else numpy tries pickle and answers with allow_pickle advice
        raise SlimgraphError(f"{path} is not a .npz file (not a zip of arrays; write one with numpy.savez)")
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
    except ValueError as exc:
        raise SlimgraphError(f"{path} holds Python objects, not numeric arrays ({first_line(exc)})") from exc
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise SlimgraphError(f"{path} is not a readable .npz file: {first_line(exc)}") from exc
    if names is None:
        return arrays
    missing = [n for n in names if n not in arrays]
    if missing:
        raise SlimgraphError(f"{path} lacks model inputs: {', '.join(missing)} (has: {', '.join(arrays) or 'nothing'})")
    return {n: arrays[n] for n in names}


def has_tokenizer(folder: Path) -> bool:
    """An HF folder with tokenizer files, or a `.gguf` file (which carries its tokenizer)."""
    if folder.is_file():
        return folder.suffix.lower() == ".gguf"
    return folder.is_dir() and ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file())


def load_tokenizer(folder: Path):
    """The folder's (or `.gguf` file's) tokenizer, able to pad (decoder-only models often have no pad token)."""
    if folder.is_file():
        return _gguf_tokenizer(str(folder), folder.stat().st_mtime_ns)
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


@functools.lru_cache(maxsize=2)
def _gguf_tokenizer(path: str, mtime_ns: int):
    """Kept per file and modification time: building it from the GGUF vocabulary takes seconds."""
    import transformers

    file = Path(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name, local_files_only=True)
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


def check_calibration_file(path: Path, model_path: Path | None = None) -> None:
    """What can be checked before the model is loaded (or exported): the file exists and is
    a readable .npz of arrays or a text file with samples, and text has a tokenizer to go to.
    The arrays are checked against the graph's inputs by `load_calibration`."""
    folder, _ = images.split_spec(path)  # a bad option in the images' spec fails here
    if folder.is_dir():
        images.image_files(folder)
        images.pillow()
        return
    if not path.exists():
        raise SlimgraphError(f"no such calibration file: {path}")
    if not path.is_file():
        raise SlimgraphError(f"calibration {path} is neither a file nor a folder")
    if path.suffix.lower() == ".npz":
        arrays = _load_npz(path, None)
        if not arrays:
            raise SlimgraphError(f"calibration file {path} holds no arrays")
        return
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise SlimgraphError(f"calibration file {path} is neither .npz nor UTF-8 text (one sample a line)") from None
    if not text.strip():
        raise SlimgraphError(f"calibration file {path} has no samples (it is empty)")
    if model_path is not None and not has_tokenizer(model_path):
        raise SlimgraphError(
            f"text calibration ({path.name}) needs a model with a tokenizer (a Hugging Face folder or a .gguf "
            f"file), and {model_path} has none; use a .npz of input arrays instead"
        )


def match_inputs(path: Path, arrays: dict[str, np.ndarray], model: ir.Model) -> dict[str, np.ndarray]:
    """The arrays checked against the graph inputs (rank, fixed dimensions, dtype), each cast
    to its input's dtype where numpy casts within the same kind (int32 → int64, float64 → float32)."""
    checked = {}
    for value in model.graph.inputs:
        if value.is_initializer() or value.name not in arrays:
            continue
        array = arrays[value.name]
        if value.shape is not None:
            expected = "×".join(str(d) for d in value.shape) or "a scalar"
            fixed = [(i, d) for i, d in enumerate(value.shape) if isinstance(d, int)]
            if array.ndim != len(value.shape) or any(array.shape[i] != d for i, d in fixed):
                got = "×".join(map(str, array.shape)) or "a scalar"
                raise SlimgraphError(f"{path.name}: input '{value.name}' has shape {got}; the model takes {expected}")
        if value.dtype is not None:
            target = value.dtype.numpy()
            if array.dtype != target:
                if not np.can_cast(array.dtype, target, casting="same_kind"):
                    raise SlimgraphError(f"{path.name}: input '{value.name}' is {array.dtype}; the model takes "
                                         f"{np.dtype(target)}")
                array = array.astype(target)
        checked[value.name] = array
    return checked
