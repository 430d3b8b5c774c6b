"""The frontend's `DataReader`: how passes read files for the models `slimgraph.load` returns.

Passes do no file I/O and may not import frontends; `load` leaves `READER` in `model.meta`
(`slimgraph.ir.meta.READER_KEY`), where `slimgraph.passes.reader_of` finds it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.ir.meta import SOURCE_KEY, TOKENIZER_KEY
from slimgraph.passes.adapters.records import Adapter, BaseWeights


class FrontendReader:
    """Calibration files and image folders, tokenizers, PEFT adapters and their base models' weights,
    the model's Hugging Face config."""

    def calibration(self, path: Path, model: ir.Model) -> tuple[list[dict[str, np.ndarray]], str]:
        from slimgraph.frontend.calibration import load_calibration

        return load_calibration(path, model)

    def tokenizer(self, model: ir.Model) -> Any | None:
        from slimgraph.frontend.calibration import load_tokenizer

        source = model.meta.get(TOKENIZER_KEY)
        return load_tokenizer(Path(source)) if source else None

    def adapter(self, path: str | Path) -> Adapter:
        from slimgraph.frontend.peft_files import read_adapter

        return read_adapter(path)

    def base_weights(self, adapter: Adapter, base: str) -> tuple[BaseWeights | None, str]:
        from slimgraph.frontend.peft_files import base_weights

        return base_weights(adapter, base)

    def model_config(self, model: ir.Model) -> dict[str, Any] | None:
        source = model.meta.get(SOURCE_KEY)
        path = Path(source) if source else None
        if path is not None and (path / "config.json").is_file():
            return json.loads((path / "config.json").read_text())
        if path is not None and path.suffix.lower() == ".gguf":
            from slimgraph.frontend.gguf_file import check_gguf

            return check_gguf(path).to_dict()
        return None


READER = FrontendReader()
