"""Adapters on SmolLM2-135M, side by side in one run (ratios; the machines are shared and noisy).

(a) Switching between two adapters of one kind on a compiled artifact (ONNX Runtime and PyTorch):
    SHiRA (a scatter of its values, after restoring the saved ones) vs LoRA (B·A fused into each
    weight, after restoring the base) vs what one would do without in-place switching: merge the
    adapter into the model and build a new session (PyTorch: a new module). The SHiRA paper reports
    5–16x faster switching than LoRA fusion on CPU.
(b) Latency at batch 1, one token (a decode step's matrix shapes; the export has no KV cache): the
    merged model vs LoRA left unfused (two extra MatMuls per adapted linear, as PEFT runs an
    unmerged adapter; the paper: up to 30% slower) vs the switchable artifact (its adapted weights
    are session inputs, which ORT does not prepack).

Both kinds adapt every linear of the 30 blocks at r=8 (SHiRA: r·(m+n) values per weight, about 1%
of it, as many parameters as the LoRA); PEFT makes them (random values: timing does not depend on
training).

    .venv/bin/python benchmarks/adapters.py [--runs N] [--latency-runs N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(folder: Path, root: Path) -> dict[str, Path]:
    """Two LoRA and two SHiRA adapters for the model in `folder`, saved by PEFT."""
    import torch
    from peft import LoraConfig, ShiraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    configs = {
        "lora_a": LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False),
        "lora_b": LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False),
        "shira_a": ShiraConfig(r=8, target_modules=TARGETS, init_weights=False, random_seed=1),
        "shira_b": ShiraConfig(r=8, target_modules=TARGETS, init_weights=False, random_seed=2),
    }
    paths = {}
    for i, (name, config) in enumerate(configs.items()):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), config)
        with torch.no_grad():  # keep the adapted model usable: small deltas
            for param in (p for n, p in model.named_parameters() if "lora_B" in n or "shira_weight" in n):
                param.mul_(0.01)
        model.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def toggler(artifact, names: list[str]):
    """A call that switches `artifact` to the next of `names` (it starts on the first)."""
    artifact.set_adapter(names[0])
    state = {"i": 0}

    def switch() -> None:
        state["i"] = (state["i"] + 1) % len(names)
        artifact.set_adapter(names[state["i"]])

    return switch


def rebuild(model, path: Path, backend: str):
    """Without in-place switching: merge the adapter into a copy and build what runs it anew."""
    from slimgraph.adapters import merge
    from slimgraph.backends import compile

    def run() -> None:
        copy = model.clone()
        merge(copy, path, verify=False)
        artifact = compile(copy, backend=backend)
        if backend == "onnxruntime":
            artifact.session  # noqa: B018 (built on first use: build it now)

    return run


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(t) for name, t in times.items()}


def part_a(model, paths: dict[str, Path], runs: int) -> None:
    from slimgraph.backends import compile
    from slimgraph.bench import alternating_runs

    print(f"(a) switching between two adapters, median of {runs} switches (rebuild: of {max(2, runs // 4)})")
    for backend in ("onnxruntime", "pytorch"):
        shira, lora = compile(model, backend=backend), compile(model, backend=backend)
        for name in ("shira_a", "shira_b"):
            shira.load_adapter(paths[name], name)
        for name in ("lora_a", "lora_b"):
            lora.load_adapter(paths[name], name)
        switches = medians(alternating_runs({
            "SHiRA scatter": toggler(shira, ["shira_a", "shira_b"]),
            "LoRA fuse": toggler(lora, ["lora_a", "lora_b"]),
        }, runs))
        rebuilt = medians(alternating_runs({
            "SHiRA merge + rebuild": rebuild(model, paths["shira_b"], backend),
            "LoRA merge + rebuild": rebuild(model, paths["lora_b"], backend),
        }, max(2, runs // 4), warmup=0))
        scatter = switches["SHiRA scatter"]
        print(f"  {backend}")
        for name, seconds in {**switches, **rebuilt}.items():
            print(f"    {name:<24}{seconds * 1e3:10.1f} ms   {seconds / scatter:8.1f}x the SHiRA scatter")
        print(f"    LoRA fuse / SHiRA scatter: {switches['LoRA fuse'] / scatter:.1f}x (the paper: 5–16x)")
        del shira, lora


def unfused_lora(model, path: Path):
    """`y = x W + (x Aᵀ)(s Bᵀ)` at every adapted linear: the adapter left as extra MatMuls."""
    import onnx_ir as ir

    from slimgraph.frontend.peft_files import read_adapter
    from slimgraph.ir.edit import add_initializer, insert_after
    from slimgraph.passes.adapters.targets import match_modules

    model = model.clone()
    adapter = read_adapter(path)
    for target in match_modules(model, adapter, None).targets:
        module, linear = adapter.modules[target.module], target.linear
        a = add_initializer(model, f"{target.name}.lora_A", np.ascontiguousarray(module.a.T))
        b = add_initializer(model, f"{target.name}.lora_B", np.ascontiguousarray(module.b.T * module.scaling))
        down = ir.node("MatMul", [linear.node.inputs[0], a], name=f"{target.name}_lora_A")
        up = ir.node("MatMul", [down.outputs[0], b], name=f"{target.name}_lora_B")
        add = ir.node("Add", [linear.output, up.outputs[0]], name=f"{target.name}_lora")
        insert_after(model, linear.output, [down, up, add], add.outputs[0])
    return model


def part_b(model, paths: dict[str, Path], runs: int) -> None:
    from slimgraph.adapters import merge
    from slimgraph.backends import compile
    from slimgraph.bench import alternating_runs

    feeds = {"input_ids": np.array([[504]], np.int64), "attention_mask": np.ones((1, 1), np.int64)}
    merged = model.clone()
    merge(merged, paths["lora_a"], verify=False)
    fused, unfused = compile(merged), compile(unfused_lora(model, paths["lora_a"]))
    switchable = compile(model)
    switchable.load_adapter(paths["lora_a"], "lora_a")
    switchable.set_adapter("lora_a")
    reference = fused(**feeds)["logits"]
    for name, artifact in (("unfused", unfused), ("switchable", switchable)):
        error = np.abs(artifact(**feeds)["logits"] - reference).max() / np.abs(reference).max()
        assert error < 1e-4, f"{name} LoRA differs from the merged model by {error:.1e}"
    times = medians(alternating_runs({
        "fused (merged weights)": lambda: fused(**feeds),
        "unfused LoRA (extra MatMuls)": lambda: unfused(**feeds),
        "switchable (weights as inputs)": lambda: switchable(**feeds),
    }, runs, warmup=3))
    base = times["fused (merged weights)"]
    print(f"(b) ONNX Runtime latency, batch 1, one token, median of {runs}")
    for name, seconds in times.items():
        print(f"    {name:<32}{seconds * 1e3:8.2f} ms   {seconds / base:5.2f}x fused")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=12, help="switches per contender")
    parser.add_argument("--latency-runs", type=int, default=60)
    args = parser.parse_args()

    import slimgraph
    from slimgraph.zoo import smollm2

    folder = smollm2.hf_folder()
    started = time.perf_counter()
    model = slimgraph.load(folder)
    with tempfile.TemporaryDirectory(prefix="slimgraph-adapters-") as tmp:
        paths = make_adapters(folder, Path(tmp))
        print(f"SmolLM2-135M: LoRA r=8 and SHiRA r=8 on the 210 linears of its 30 blocks "
              f"(setup {time.perf_counter() - started:.0f} s)")
        part_a(model, paths, args.runs)
        part_b(model, paths, args.latency_runs)


if __name__ == "__main__":
    main()
