"""Triton backend: the PyTorch backend's module, with the ops slimgraph's passes create run as
generated Triton kernels (plan.py says which), saved as `model.py` + `kernels.py` + `model.safetensors`.

On a machine without a CUDA GPU the kernels run in Triton's interpreter (slow; it is how the
tests check them on CPU).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.backends.output import check_writable
from slimgraph.backends.pytorch import has_subgraphs
from slimgraph.errors import SlimgraphError


def require_triton() -> None:
    """One clear line when triton (or torch) is missing, before any work is done."""
    for package in ("triton", "torch"):
        if importlib.util.find_spec(package) is None:
            raise SlimgraphError(f"the triton backend needs {package}: pip install 'slimgraph[triton]'")


class TritonArtifact:
    """A model compiled to Triton kernels + PyTorch glue: `artifact.module` is the module model.py
    defines (calling `artifact.kernels`, the loaded kernels.py; `artifact.code` its source, None for
    the flat fx style of a graph with control flow); `artifact.report` lists which ops run as kernels
    and which on the PyTorch lowering."""

    backend = "triton"

    @staticmethod
    def check_output(path: Path) -> None:
        require_triton()
        if path.suffix:
            raise SlimgraphError(f"-o {path}: the triton backend writes a folder (model.py + kernels.py + "
                                 "model.safetensors); give a path without a suffix")
        check_writable(path, folder=True)

    def __init__(self, model: ir.Model, *, device: str | None = None, ternary: str = "mixpe",
                 fuse: bool = True, launch: dict[str, int] | None = None) -> None:
        """`device`: "cuda" (the default when a GPU is there) or "cpu" (Triton's interpreter);
        `ternary`: the GEMV for ternary weights, "mixpe" or "lut" (T-MAC); `fuse`: fuse elementwise
        chains and norms (fusion.py); `launch`: launch settings (codegen.SETTINGS, e.g. GEMV_BLOCK_N)
        written into kernels.py. When interpreting, the others are widened (codegen.INTERPRETER_SETTINGS)."""
        require_triton()
        import torch

        from slimgraph.backends.triton.builder import TritonBuilder
        from slimgraph.backends.triton.codegen import INTERPRETER_SETTINGS, kernels_source, launchers, load_kernels
        from slimgraph.backends.triton.plan import TERNARY, fill_kernel_shapes, plan
        from slimgraph.ir.graph import ensure_shapes

        if ternary not in TERNARY:
            raise SlimgraphError(f"ternary={ternary!r}; expected one of {', '.join(TERNARY)}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SlimgraphError("device cuda: no CUDA GPU is available (device='cpu' runs Triton's interpreter)")
        if self.device.type not in ("cuda", "cpu"):
            raise SlimgraphError(f"device {self.device}: the triton backend runs on cuda (or cpu, interpreted)")
        if model.functions:  # (as the PyTorch backend: its lowering table holds ONNX ops, not the model's own)
            from onnx_ir.passes.common import InlinePass

            model = model.clone()
            InlinePass()(model)
        fill_kernel_shapes(model)
        ensure_shapes(model)
        self.model = model
        self.plan = plan(model, ternary=ternary, fuse=fuse)
        self.report = self.plan.report(model.graph)
        self.source = kernels_source(self.plan, self.report, launch)
        self.kernels = load_kernels(self.source, self, interpret=self.device.type != "cuda")
        if self.device.type != "cuda":
            for name, value in INTERPRETER_SETTINGS.items():
                if name not in (launch or {}):
                    setattr(self.kernels, name, value)
        calls = launchers(self.kernels, self.plan)
        self.code = None
        if has_subgraphs(model):  # control flow: the flat fx style, as the PyTorch backend writes it
            self.module = TritonBuilder(model, self.plan, calls).build()
        else:
            from slimgraph.backends.pytorch.structured import generate, instantiate

            self.code = generate(model, make_builder=lambda m, layers: TritonBuilder(m, self.plan, calls, layers))
            self.module = instantiate(self.code, {"kernels": self.kernels})
        self.module = self.module.to(self.device)
        self.input_names = [v.name for v in model.graph.inputs if not v.is_initializer()]
        self.output_names = [v.name for v in model.graph.outputs]

    def __repr__(self) -> str:
        where = "cuda" if self.device.type == "cuda" else "cpu, interpreted"
        return (f"<TritonArtifact {len(self.plan.sources)} launchers, {sum(self.report.triton.values())} nodes in "
                f"kernels, {sum(self.report.pytorch.values())} on PyTorch ({where})>")

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        """Run on positional inputs (graph order) and/or named inputs; returns name → numpy array."""
        from slimgraph.backends.pytorch import run_module

        return run_module(self.module, self.input_names, self.output_names, args, kwargs, self.device)

    def save(self, path: str | os.PathLike) -> Path:
        """`DIR/` → DIR/model.py + DIR/kernels.py + DIR/model.safetensors. model.py is structured as the
        PyTorch backend writes it (a class per kind of block, the launchers called as `kernels.<name>`),
        or the flat fx forward for a graph with control flow."""
        from slimgraph.backends.pytorch.codegen import current_weights, save_directory, save_structured

        path = Path(path)
        self.check_output(path)
        if self.code is not None:
            return save_structured(self.code.source, current_weights(self.module, self.code.weights), path,
                                   companions={"kernels": self.source})
        return save_directory(self.module, path, companions={"kernels": self.source})
