"""Frontend for torch `nn.Module`s and `.pt2` files: torch.export, then the ONNX exporter.

`torch.onnx.export(..., dynamo=True)` yields an onnx_ir.Model whose nodes keep the module
path in `pkg.torch.onnx.name_scopes`. Linear weights come out transposed under generated
names (`val_83`); we rename them after the module they belong to.

A transformers causal LM loaded with `kv_cache=True` is exported with past/present keys and
values instead (`slimgraph.ir.cache_signature`); `example_inputs` is then its prompt.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.errors import ANSI, SlimgraphError, first_line
from slimgraph.ir.graph import module_path
from slimgraph.ir.meta import EXAMPLE_INPUTS_KEY, EXAMPLE_INPUTS_SOURCE_KEY, SOURCE_KEY
from slimgraph.ir.structure import find_linear

GENERATED_NAME = re.compile(r"^_?val_\d+$")  # names the exporter gives folded constants


def load_module(
    module: Any,
    *,
    example_inputs: Any,
    dynamic_shapes: dict[str, dict[int, str]] | None = None,
    output_names: list[str] | None = None,
    inputs_source: str = "example inputs",
    kv_cache: bool = False,
    bind_weights: Callable[[ir.Model], None] | None = None,
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> ir.Model:
    """For a module built without its weights (`slimgraph.frontend.lazy_weights`): `bind_weights`
    replaces its stand-in parameters in the export before the exporter's optimizer folds anything
    from them, and `forward_context` is where it runs with its real weights (a KV-cache export's
    example steps)."""
    import torch

    if example_inputs is None:
        raise SlimgraphError(f"exporting {type(module).__name__} needs example_inputs (a tuple or dict of tensors)")
    if kv_cache:
        from slimgraph.frontend.kv_cache import check_kv_options, export_causal_lm

        check_kv_options(kv_cache, dynamic_shapes)
        if not isinstance(example_inputs, dict) or "input_ids" not in example_inputs:
            raise SlimgraphError("kv_cache=True takes example_inputs as a dict with input_ids (and attention_mask): "
                                 "a prompt of at least 4 tokens")
        return export_causal_lm(module, example_inputs, inputs_source=inputs_source,
                                export=functools.partial(load_module, bind_weights=bind_weights),
                                forward_context=forward_context)
    args, kwargs = _split_inputs(example_inputs)
    module.eval()
    if output_names is None:
        output_names = _output_names(module, args, kwargs)
    model = _export(
        lambda: torch.onnx.export(
            module,
            args,
            kwargs=kwargs,
            dynamo=True,
            dynamic_shapes=_to_torch_dims(dynamic_shapes),
            output_names=output_names,
            optimize=bind_weights is None,
            verbose=False,
        ),
        type(module).__name__,
    )
    if bind_weights is not None:
        import onnxscript

        bind_weights(model)
        onnxscript.optimizer.optimize(model)  # what optimize=True runs
    name_linear_weights(model)
    model.meta[EXAMPLE_INPUTS_KEY] = [_feeds(model, args, kwargs)]
    model.meta[EXAMPLE_INPUTS_SOURCE_KEY] = inputs_source
    return model


def load_pt2(path: Path, *, example_inputs: Any = None) -> ir.Model:
    import torch

    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise SlimgraphError(f"{path} is not a valid .pt2 file (torch.export.save): {first_line(exc, limit=300)}") from exc
    model = _export(lambda: torch.onnx.export(program, dynamo=True, optimize=True, verbose=False), path.name)
    name_linear_weights(model)
    if example_inputs is None and program.example_inputs is not None:
        example_inputs = program.example_inputs
    if example_inputs is not None:
        args, kwargs = example_inputs if _is_args_kwargs(example_inputs) else _split_inputs(example_inputs)
        model.meta[EXAMPLE_INPUTS_KEY] = [_feeds(model, tuple(args), dict(kwargs))]
        model.meta[EXAMPLE_INPUTS_SOURCE_KEY] = "example inputs saved in the .pt2"
    model.meta[SOURCE_KEY] = str(path)
    return model


def _export(run_export, what: str) -> ir.Model:
    # The exporter prints progress lines and warnings; keep our own output clean.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed"
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = run_export()
    except Exception as exc:
        raise SlimgraphError(f"could not export {what}: {_export_reason(exc)}") from exc
    return program.model


def name_linear_weights(model: ir.Model) -> int:
    """Give generated linear-weight names the module's name: `val_83` → `encoder.layer.0.attention.self.query.weight`.

    The tensor is the ONNX MatMul weight ([in, out], the transpose of torch's), so the
    name says which module it belongs to, not that it is the torch tensor itself.
    """
    taken = set(model.graph.initializers)
    renamed = 0
    for node in model.graph:
        linear = find_linear(node)
        scope = module_path(node)
        if linear is None or not scope:
            continue
        weight = node.inputs[1]
        if not weight.is_initializer() or not GENERATED_NAME.match(weight.name or ""):
            continue
        new_name = f"{scope}.weight"
        if new_name in taken or len(weight.uses()) != 1:
            continue
        taken.discard(weight.name)
        weight.name = new_name
        taken.add(new_name)
        renamed += 1
    return renamed


def _output_names(module: Any, args: tuple, kwargs: dict) -> list[str] | None:
    """Name graph outputs after a dict-like result's keys (a transformers ModelOutput: logits, …)."""
    import torch

    with torch.no_grad():
        outputs = module(*args, **kwargs)
    if hasattr(outputs, "keys"):
        return [k for k, v in outputs.items() if isinstance(v, torch.Tensor)]
    return None


def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _is_args_kwargs(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], tuple) and isinstance(value[1], dict)


def _to_torch_dims(dynamic_shapes: dict[str, Any] | None) -> dict[str, Any] | None:
    """{"input_ids": {0: "batch", 1: "seq"}} → the same with shared torch.export.Dim objects."""
    if not dynamic_shapes:
        return None
    import torch

    dims: dict[str, Any] = {}

    def convert(spec: Any) -> Any:
        if isinstance(spec, str):
            return dims.setdefault(spec, torch.export.Dim(re.sub(r"\W", "_", spec)))
        if isinstance(spec, dict):
            return {k: convert(v) for k, v in spec.items()}
        if isinstance(spec, (list, tuple)):
            return type(spec)(convert(v) for v in spec)
        return spec

    return convert(dynamic_shapes)


def _feeds(model: ir.Model, args: tuple, kwargs: dict) -> dict[str, np.ndarray]:
    import torch

    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    by_name = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    feeds = {}
    for value in inputs:
        if value.name in by_name:
            feeds[value.name] = by_name[value.name].detach().cpu().numpy()
    if len(feeds) < len(inputs) and len(tensors) == len(inputs) - len(feeds):
        missing = [v for v in inputs if v.name not in feeds]
        for value, tensor in zip(missing, tensors):
            feeds[value.name] = tensor.detach().cpu().numpy()
    return feeds


def _export_reason(exc: BaseException) -> str:
    """One line: the unsupported op if one is named, else the innermost cause's first line."""
    chain = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    text = ANSI.sub("", "\n".join(str(e) for e in chain))
    ops = re.findall(r"\b(aten::\w+(?:\.\w+)?|aten\.\w+(?:\.\w+)?)", text)
    if ops:
        return f"unsupported op {ops[0]}"
    reason = first_line(chain[-1], limit=300)
    if re.search(r"\w*Cache\b.* in output", text):
        reason += (" (a transformers model: set model.config.use_cache = False before exporting, or load it with "
                   "kv_cache=True)")
    where = re.search(r'File "([^"]+)", line (\d+), in (\w+)', text)
    if where:
        reason += f" (at {Path(where.group(1)).name}:{where.group(2)} in {where.group(3)})"
    return reason
