"""heal: train the current model toward a teacher through its PyTorch lowering, and write the result back.

    student = the IR lowered to PyTorch (this backend's fx module, parameters named after initializers)
    teacher = the model the pipeline started from (`teacher=original`, ONNX Runtime) or the model
              before this pass (`teacher=before`)
    W ← W + ΔW, ΔW minimizing loss(student(x), teacher(x)) over the calibration feeds x

What trains (`train`): `lora` (default) adds a rank-`rank` product `A·B` (B starts at zero) to every
linear's weight and merges it in afterwards, as merge-lora would; `norms` the scale and shift of the
normalization layers; `biases` every 1-D bias; `all` all of these, the convolutions' and the embedding
tables (the model's own weights, not the constants a pass built, such as a DCT basis). The loss (`loss=auto`) is the
KL divergence of the next-token distributions for a language model's logits, the cosine distance of
the sentence embeddings for a sentence encoder (outputs compared as Verify compares them: mean-pooled,
at kept columns, around compressed tokens), the mean squared error relative to the teacher's otherwise.

The feeds are the pipeline's calibration inputs, one feed a step, in turn; the held-out quarter the
pipeline keeps for Verify is never trained on. Every `steps // 10` steps the loss on the first feeds is
measured and the best weights are kept; `max_minutes` stops early with them. The result is an ordinary
IR: later passes (quantization) and every backend take it. A pass that trains lives beside the backend
it trains through (passes may not import backends); the registry finds it here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from slimgraph.errors import SlimgraphError
from slimgraph.ir.edit import replace_constant
from slimgraph.ir.meta import OUTPUT_MAPS_KEY
from slimgraph.ir.structure import find_embeddings, find_linears
from slimgraph.measure import evaluate
from slimgraph.passes import Pass, PassContext, PassResult, register_pass
from slimgraph.passes._infra.options import option

NORM_OPS = {"LayerNormalization", "SimplifiedLayerNormalization", "BatchNormalization", "InstanceNormalization",
            "GroupNormalization", "RMSNormalization"}


@register_pass
@dataclass(frozen=True, kw_only=True)
class Heal(Pass):
    """Distil the model toward the original through its PyTorch lowering: W → W + ΔW (LoRA, norms, biases or all)."""

    name: ClassVar[str] = "heal"
    exact: ClassVar[bool] = False
    steps: int = option(200, low=1)
    lr: float = option(1e-3, low=0, low_open=True)
    train: Literal["lora", "norms", "biases", "all"] = "lora"
    rank: int = option(8, low=1)
    loss: Literal["auto", "kl", "mse", "cosine"] = "auto"
    teacher: Literal["original", "before"] = "original"
    max_minutes: float = option(10.0, low=0, low_open=True)

    def check(self, model: ir.Model) -> list[str]:
        """The initializers `run` trains."""
        super().check(model)
        names = self._trained(model)
        if not names:
            what = {"lora": "linear (MatMul/Gemm with a constant 2-D float weight)", "norms": "normalization layer",
                    "biases": "1-D float bias", "all": "float weight"}[self.train]
            raise SlimgraphError(f"{self.name}: train={self.train} found no {what} to train")
        return names

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        import torch

        names = self.check(model)
        if not ctx.inputs:
            raise SlimgraphError(f"{self.name}: no calibration inputs to train on")
        teacher = self._teacher(model, ctx)
        feeds = [dict(f) for f in ctx.inputs]
        targets = evaluate.run_all(teacher, feeds)
        torch.manual_seed(ctx.seed)
        student = _Student(model, names, self.train, self.rank)
        maps = {} if self.teacher == "before" else dict(model.meta.get(OUTPUT_MAPS_KEY) or {})
        loss_of = _Loss(self._loss_kind(model, maps), maps)
        optimizer = torch.optim.AdamW(student.trainable, lr=self.lr, weight_decay=0.0)
        probe = list(range(min(2, len(feeds))))
        every = max(1, self.steps // 10)
        best_loss, best_state = student.probe_loss(loss_of, feeds, targets, probe), student.state()
        first_loss, started, step = best_loss, time.perf_counter(), 0
        for step in range(1, self.steps + 1):
            i = (step - 1) % len(feeds)
            optimizer.zero_grad()
            value = loss_of(student.forward(feeds[i]), targets[i], feeds[i])
            if not torch.isfinite(value):  # (a feed the student cannot fit yet: no step from it)
                continue
            value.backward()
            optimizer.step()
            if ctx.progress is not None:
                ctx.progress(f"heal ({loss_of.kind} loss {value.item():.4g})", step, self.steps)
            if step % every == 0 or step == self.steps:
                probed = student.probe_loss(loss_of, feeds, targets, probe)
                if probed < best_loss:
                    best_loss, best_state = probed, student.state()
            if time.perf_counter() - started > self.max_minutes * 60:
                break
        student.load(best_state)
        student.write_back(model)
        return PassResult(True, {
            "trained": f"{self.train}" + (f" rank {self.rank}" if self.train == "lora" else "")
                       + f" on {len(student.paths)} weights ({student.trainable_count():,} values trained)",
            "steps": f"{step} of {self.steps} in {time.perf_counter() - started:.1f} s, lr {self.lr:g}",
            "loss": f"{loss_of.kind}: {first_loss:.4g} → {best_loss:.4g} (on {len(probe)} calibration feeds)",
            "teacher": "the original model" if self.teacher == "original" else "the model before heal",
            "data": f"{len(feeds)} calibration feeds ({ctx.inputs_source})",
        })

    def _trained(self, model: ir.Model) -> list[str]:
        graph = model.graph
        float_weights = {name for name, v in graph.initializers.items()
                         if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT}
        linears = [lin.weight for lin in find_linears(model) if lin.weight in float_weights]
        norms = [v.name for node in graph if node.op_type in NORM_OPS for v in node.inputs[1:]
                 if v is not None and v.name in float_weights and len(v.shape or ()) == 1]
        biases = [name for name in float_weights if len(graph.initializers[name].shape or ()) == 1
                  and _reads_as_bias(graph.initializers[name])]
        if self.train == "all":  # the model's own weights, not the constants a pass built (a DCT basis, a 1.0)
            tables = [e.table for e in find_embeddings(model) if e.table in float_weights]
            convs = [node.inputs[1].name for node in graph if node.op_type in ("Conv", "ConvTranspose")
                     and node.inputs[1] is not None and node.inputs[1].name in float_weights]
            return list(dict.fromkeys([*linears, *convs, *tables, *norms, *biases]))
        return list(dict.fromkeys({"lora": linears, "norms": norms, "biases": biases}[self.train]))

    def _teacher(self, model: ir.Model, ctx: PassContext) -> ir.Model:
        if self.teacher == "before":
            return model.clone()
        if ctx.reference is None:
            raise SlimgraphError(f"{self.name}: teacher=original needs the original model, which the pipeline keeps "
                                 "when it verifies (drop --no-verify), or use teacher=before")
        return ctx.reference

    def _loss_kind(self, model: ir.Model, maps: dict) -> str:
        if self.loss != "auto":
            return self.loss
        if any(m.pooled_by for m in maps.values()):
            return "cosine"
        logits = [v for v in model.graph.outputs if "logits" in v.name.lower() and len(v.shape or ()) >= 2]
        return "kl" if logits else "mse"  # (KL of softmaxes: for logits, not for probabilities or scores)


def _reads_as_bias(value: ir.Value) -> bool:
    """A 1-D constant added to a linear's or a convolution's output (or a Gemm/Conv's bias input)."""
    for node, index in value.uses():
        if node.op_type in ("Gemm", "Conv", "ConvTranspose") and index == 2:
            return True
        if node.op_type == "Add":
            other = node.inputs[1 - index] if len(node.inputs) == 2 else None
            producer = other.producer() if other is not None else None
            if producer is not None and producer.op_type in ("MatMul", "Gemm", "Conv"):
                return True
    return False


def _low_rank_delta(shape: tuple[int, int], rank: int) -> Any:
    """A torch parametrization `W ↦ W + A·B` of a 2-D weight: A [rows, r] small and random, B [r, cols]
    zero, so that training starts from the weight as it is. (torch is imported only when heal runs.)"""
    import torch
    from torch import nn

    class LowRankDelta(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            r = min(rank, *shape)
            self.a = nn.Parameter(torch.randn(shape[0], r) / r)
            self.b = nn.Parameter(torch.zeros(r, shape[1]))

        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return weight + self.a @ self.b

    return LowRankDelta()


class _Student:
    """The IR's fx module with the chosen initializers trainable (or, for LoRA, low-rank deltas on them)."""

    def __init__(self, model: ir.Model, names: list[str], train: str, rank: int) -> None:
        import torch
        from torch.nn.utils import parametrize

        from slimgraph.backends.pytorch import PyTorchArtifact
        from slimgraph.backends.pytorch.builder import attribute_path

        self.artifact = PyTorchArtifact(model, style="fx")
        self.module = self.artifact.module
        self.module.train(False)
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.paths: dict[str, tuple[str, bool]] = {}
        self.trainable: list[torch.nn.Parameter] = []
        for name in names:
            path, transposed = self.artifact.sources.get(name, (attribute_path(name), False))
            try:
                parameter = self.module.get_parameter(path)
            except AttributeError:  # folded into another constant, or held as a buffer: not trainable
                continue
            self.paths[name] = (path, transposed)
            if train == "lora":
                owner, _, attribute = path.rpartition(".")
                delta = _low_rank_delta(tuple(parameter.shape), rank)
                parametrize.register_parametrization(self.module.get_submodule(owner), attribute, delta)
                self.trainable += [delta.a, delta.b]
            else:
                parameter.requires_grad_(True)
                self.trainable.append(parameter)
        if not self.trainable:
            raise SlimgraphError("heal: none of the chosen weights is a parameter of the PyTorch lowering")
        self.input_names = self.artifact.input_names
        self.output_names = self.artifact.output_names

    def forward(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        from slimgraph.backends.pytorch.tensors import to_torch

        outputs = self.module(*[to_torch(np.asarray(feeds[n])) for n in self.input_names])
        return dict(zip(self.output_names, outputs))

    def probe_loss(self, loss_of: _Loss, feeds: list[dict], targets: list[dict], probe: list[int]) -> float:
        import torch

        with torch.no_grad():
            return float(np.mean([loss_of(self.forward(feeds[i]), targets[i], feeds[i]).item() for i in probe]))

    def state(self) -> list:
        return [p.detach().clone() for p in self.trainable]

    def load(self, state: list) -> None:
        import torch

        with torch.no_grad():
            for parameter, values in zip(self.trainable, state):
                parameter.copy_(values)

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.trainable)

    def write_back(self, model: ir.Model) -> None:
        """Each trained weight (a LoRA delta merged in) into its initializer, in the graph's layout."""
        from torch.nn.utils import parametrize

        from slimgraph.backends.pytorch.tensors import to_numpy

        for name, (path, transposed) in self.paths.items():
            owner, _, attribute = path.rpartition(".")
            holder = self.module.get_submodule(owner)
            if parametrize.is_parametrized(holder, attribute):
                parametrize.remove_parametrizations(holder, attribute, leave_parametrized=True)
            array = to_numpy(self.module.get_parameter(path).detach())  # float32, as every trained weight
            replace_constant(model.graph.initializers[name], array.T if transposed else array)


class _Loss:
    """The distance between the student's and the teacher's outputs, as Verify compares them."""

    def __init__(self, kind: str, maps: dict) -> None:
        self.kind, self.maps = kind, maps

    def __call__(self, student: dict, teacher: dict[str, np.ndarray], feeds: dict[str, np.ndarray]):
        import torch
        import torch.nn.functional as F

        from slimgraph.backends.pytorch.tensors import to_torch

        total, compared = 0.0, 0
        for name, target in teacher.items():
            out_map = self.maps.get(name)
            if name not in student or (out_map is not None and out_map.added):
                continue
            got, want = student[name], to_torch(np.asarray(target, np.float32))
            if out_map is not None and out_map.columns is not None:
                want = want[..., torch.as_tensor(out_map.columns)]
            elif out_map is not None and out_map.token_mean:
                got, want = got.mean(dim=1), want.mean(dim=1)
            elif out_map is not None and out_map.replaced_tokens:
                start, n, m = out_map.replaced_tokens
                got = torch.cat([got[:, :start], got[:, start + m:]], dim=1)
                want = torch.cat([want[:, :start], want[:, start + n:]], dim=1)
            elif out_map is not None and out_map.pooled_by:  # every real token: more to learn from than their mean
                real = to_torch(np.asarray(feeds[out_map.pooled_by])) != 0
                got, want = got[real], want[real]
            compared += 1
            if self.kind == "mse":
                total = total + ((got - want) ** 2).mean() / (want**2).mean().clamp_min(1e-12)
                continue
            got, want = got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])  # rows of the last axis
            if self.kind == "kl":
                total = total + F.kl_div(F.log_softmax(got, -1), F.log_softmax(want, -1), log_target=True,
                                         reduction="batchmean")
            else:
                total = total + (1 - F.cosine_similarity(got, want, dim=-1)).mean()
        if not compared:
            raise SlimgraphError(f"heal: none of the model's outputs ({', '.join(student)}) is one of the teacher's "
                                 f"({', '.join(teacher)})")
        return total

