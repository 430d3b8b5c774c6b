"""Checkpoints of a block-wise pass (`slimgraph.passes.blockwise`), so that a run interrupted
after block k resumes at block k + 1 (`optimize --resume`) and writes the file an uninterrupted
run writes, byte for byte.

A folder (one per pass, under the run's) holds one pass's progress:

- `step-{i}.npz`: what step i computed (per linear: its quantized codes, scales, ...), enough to
  make the same rewrite again without computing it;
- `state-{i}.npz`: the residual stream after step i (per calibration feed), what step i + 1 reads;
- `progress.json`: the run's key, the steps done and, per step, the names in the order they were
  rewritten; written last (atomically), so it never names a step whose files are not complete.

The key counts what the work depends on: the run (the CLI's: input file, pipeline), the pass's
options, the graph it starts from and the calibration inputs. A folder with another key is
cleared and started again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

Arrays = dict[str, np.ndarray]


@dataclass
class Progress:
    done: int  # steps done
    state: list[Arrays]  # after the last step done, per feed
    steps: list[dict[str, Arrays]]  # per step done: name → its arrays, in the order rewritten


class Checkpoints:
    def __init__(self, root: Path, run: str = "") -> None:
        self.root = root  # a folder per pass in it
        self.folder = root
        self.run = run
        self._key: str | None = None

    def start(self, pass_text: str, model: ir.Model, inputs: Sequence[Arrays]) -> Progress | None:
        """Begin a pass's checkpoints; the progress of an interrupted run of the same work, if any."""
        digest = hashlib.sha256(f"{self.run}\n{pass_text}\n".encode())
        for node in model.graph:
            digest.update(f"{node.op_type}:{node.name}:{[v.name if v else '' for v in node.inputs]}\n".encode())
        for name, value in model.graph.initializers.items():
            tensor = value.const_value
            digest.update(f"{name}:{tensor.dtype if tensor else None}:{tensor.shape if tensor else None}\n".encode())
        for feeds in inputs:
            for name in sorted(feeds):
                digest.update(name.encode())
                digest.update(np.ascontiguousarray(feeds[name]).tobytes())
        self._key = digest.hexdigest()
        self.folder = self.root / hashlib.sha256(pass_text.encode()).hexdigest()[:12]  # one folder per pass
        try:
            saved = json.loads((self.folder / "progress.json").read_text())
        except (OSError, ValueError):
            saved = None
        if not saved or saved.get("key") != self._key:
            self.clear()
            return None
        done = saved["done"]
        steps = []
        for i, names in enumerate(saved["order"]):
            with np.load(self.folder / f"step-{i}.npz") as data:
                steps.append({name: {k.split("/", 1)[1]: data[k] for k in data.files if k.split("/", 1)[0] == name}
                              for name in names})
        with np.load(self.folder / f"state-{done - 1}.npz") as data:
            state: list[Arrays] = [{} for _ in range(len(inputs))]
            for k in data.files:
                feed, name = k.split("/", 1)
                state[int(feed)][name] = data[k]
        return Progress(done, state, steps)

    def save(self, step: int, results: dict[str, Arrays], state: list[Arrays], order: list[list[str]]) -> None:
        """Step `step` done: what it computed (`results`, name → arrays, in the order rewritten), the
        state after it, and the order of every step so far."""
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_npz(self.folder / f"step-{step}.npz",
                   {f"{name}/{field}": array for name, arrays in results.items() for field, array in arrays.items()})
        _write_npz(self.folder / f"state-{step}.npz",
                   {f"{i}/{name}": array for i, held in enumerate(state) for name, array in held.items()})
        staged = self.folder / "progress.json.tmp"
        staged.write_text(json.dumps({"key": self._key, "done": step + 1, "order": order}))
        os.replace(staged, self.folder / "progress.json")
        (self.folder / f"state-{step - 1}.npz").unlink(missing_ok=True)

    def clear(self) -> None:
        """Forget this pass's progress."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def remove(self) -> None:
        """Forget every pass's progress (the run finished)."""
        shutil.rmtree(self.root, ignore_errors=True)


def _write_npz(path: Path, arrays: Arrays) -> None:
    staged = path.with_name(path.name + ".tmp")
    with open(staged, "wb") as f:
        np.savez(f, **arrays)
    os.replace(staged, path)
