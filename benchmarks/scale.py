"""Peak memory of `slimgraph optimize` against model size: Hugging Face decoders far larger than
this machine's memory.

Each model is a bf16 Hugging Face folder with random weights written from a real config
(SmolLM2-135M, Qwen2-0.5B, TinyLlama-1.1B, Llama-3.2-3B, Llama-3-8B shapes), in the shards and
index a published checkpoint has; nothing is downloaded. Each is optimized through the CLI, in
a fresh process, with

    slimgraph optimize FOLDER -p 'quantize-weights{bits=4}' -o q.onnx

verified as a user's run is (from 1 GB of weights, one block at a time: `evaluate.run_by_blocks`;
`--no-verify` measures without it). Printed per
model: fp32 weight bytes, the output's bytes, the process's peak RSS and its ratio to the fp32
bytes with the export made (cold) and read from the export cache (warm), `inspect`'s peak RSS and
time, how many linears became MatMulNBits, and the logits' cosine on a prompt against transformers'
bf16 model and against the float32 model with the file's int4 weights dequantized into it (up to
1.2B parameters the whole model; above, whose float32 reference does not fit, its first 2 blocks
with the same weights, optimized the same way); then a PNG plot of peak RSS against fp32 bytes
(`--plot`). Results accumulate in `--work`'s results.json, so an 8B run can come on its own.

    .venv/bin/python benchmarks/scale.py [--models 0.1B,0.5B,1B] [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
         "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2}
CONFIGS = {
    "0.1B": {**LLAMA, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
             "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
             "rope_theta": 100000.0},  # SmolLM2-135M
    "0.5B": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "rms_norm_eps": 1e-6,
             "max_position_embeddings": 2048, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
             "rope_theta": 1000000.0},  # Qwen2-0.5B
    "1B": {**LLAMA, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
           "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000, "tie_word_embeddings": False,
           "rope_theta": 10000.0},  # TinyLlama-1.1B
    "3B": {**LLAMA, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
           "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True,
           "rope_theta": 500000.0},  # Llama-3.2-3B (without its rope scaling)
    "8B": {**LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
           "rope_theta": 500000.0},  # Llama-3-8B
}
PIPELINE = "quantize-weights{bits=4}"
SHARD_BYTES = 5_000_000_000  # as transformers' save_pretrained shards


def write_random_checkpoint(folder: Path, config: dict, seed: int = 0) -> int:
    """A bf16 folder (config.json, sharded safetensors + index) with N(0, 0.02) weights and unit
    norms, written one tensor at a time (never the whole model in memory); returns its parameters."""
    import ml_dtypes
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}, indent=1))
    hf_config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = getattr(transformers, config["architectures"][0])(hf_config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    rng = np.random.default_rng(seed)
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name in names:
            nbytes = math.prod(shapes[name]) * 2
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with open(folder / file, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            for name in names:
                shape = shapes[name]
                rows = max(1, (1 << 24) // max(1, math.prod(shape[1:])))  # 16M values at a time
                for start in range(0, shape[0], rows):
                    part = (min(rows, shape[0] - start), *shape[1:])
                    if name.endswith("norm.weight"):
                        values = np.ones(part, np.float32)
                    else:
                        values = rng.standard_normal(part, np.float32) * np.float32(0.02)
                    f.write(values.astype(ml_dtypes.bfloat16).tobytes())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(math.prod(shapes[n]) for n in shapes)


def check_fidelity(folder: Path, quantized: Path) -> tuple[float, float]:
    """Logit cosines of the quantized model in ONNX Runtime, on a 24-token prompt, against
    transformers' bf16 model and against its float32 model with every linear's weight replaced by
    the int4 weight the file holds, dequantized (what the file means: this one checks the graph)."""
    import onnx_ir as ir
    import onnxruntime as ort
    import torch
    import transformers

    from slimgraph.ir.graph import module_path
    from slimgraph.ir.nbits import BlockQuantized, unpack

    config = json.loads((folder / "config.json").read_text())
    ids = torch.randint(0, config["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(0))
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())}
    session = ort.InferenceSession(str(quantized), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], feeds)[0]
    del session

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        return float(a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b))

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        bf16 = cosine(got, model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.float().numpy())
        model = model.float()
        graph = ir.load(quantized)
        for node in graph.graph:
            if node.op_type != "MatMulNBits":
                continue
            bits, block, k, n = (node.attributes.get_int(a) for a in ("bits", "block_size", "K", "N"))
            blocks = -(-k // block)
            codes = unpack(node.inputs[1].const_value.numpy().reshape(n, -1), bits)[:, :blocks * block]
            zero_points = unpack(node.inputs[3].const_value.numpy().reshape(n, -1), bits)[:, :blocks]
            scales = node.inputs[2].const_value.numpy().reshape(n, blocks)
            weight = BlockQuantized(codes, scales, zero_points, bits, block, k).dequantize()
            linear = model.get_submodule(module_path(node))
            linear.weight = torch.nn.Parameter(torch.from_numpy(weight.T.copy()))  # (unties a tied head)
        reference = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    return bf16, cosine(got, reference)


# Runs the CLI and writes its peak RSS (VmHWM, read at exit) to the file named first. Not ru_maxrss from
# wait4: a forked child starts from its parent's, and this process has held a float32 model by then.
PEAK_WRAPPER = """
import atexit, runpy, sys
peak_file = sys.argv.pop(1)
def write_peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open(peak_file, "w").write(line.split()[1])
atexit.register(write_peak)
sys.argv[0] = "slimgraph"
runpy.run_module("slimgraph", run_name="__main__", alter_sys=True)
"""


def first_blocks(folder: Path, blocks: int) -> Path:
    """A folder of the model's first `blocks` decoder blocks (its config with fewer layers, the same
    safetensors files linked: the tensors of later blocks are simply not read)."""
    small = folder.with_name(f"{folder.name}-{blocks}-blocks")
    small.mkdir(exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "num_hidden_layers": blocks}, indent=1))
    for path in folder.glob("*.safetensors*"):
        link = small / path.name
        if not link.exists():
            link.symlink_to(path.resolve())
    return small


def run_cli(args: list[str], env: dict) -> tuple[int, float, float, str]:
    """Exit code, peak RSS (bytes), wall seconds and output of one CLI run in a fresh process."""
    with tempfile.TemporaryDirectory() as folder:
        peak_file = Path(folder) / "peak"
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, str(peak_file), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        wall = time.perf_counter() - start
        peak = int(peak_file.read_text()) * 1024 if peak_file.is_file() else float("nan")
        return done.returncode, peak, wall, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="0.1B,0.5B,1B,3B")
    parser.add_argument("--work", type=Path, default=None, help="where the folders are written (kept across runs)")
    parser.add_argument("--plot", type=Path, default=Path("scale.png"))
    parser.add_argument("--fidelity-up-to", type=float, default=1.2,
                        help="check logits against transformers for models up to this many billion parameters "
                             "(the reference runs in float32: 4 bytes a parameter)")
    parser.add_argument("--blocks", type=int, default=2, help="larger models: check their first BLOCKS blocks")
    parser.add_argument("--no-verify", action="store_true", help="optimize with --no-verify")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="slimgraph-scale-"))
    verify = ["--no-verify"] if args.no_verify else []
    # Every model measured in this --work folder, this run's and earlier runs' (an 8B run takes its own time)
    saved = work / "results.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    rows = []
    for name in args.models.split(","):
        folder = work / f"llama-{name}"
        if not (folder / "model.safetensors.index.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            started = time.perf_counter()
            parameters = write_random_checkpoint(folder, CONFIGS[name])
            print(f"wrote {folder} ({parameters / 1e9:.2f}B parameters) in {time.perf_counter() - started:.0f} s",
                  flush=True)
        fp32 = 2 * sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        out = work / f"q-{name}.onnx"
        cache = work / "cache" / name
        shutil.rmtree(cache, ignore_errors=True)  # the first run exports
        env = {**os.environ, "SLIMGRAPH_CACHE": str(cache)}
        runs = []
        for _ in ("cold", "warm"):  # cold: the export is made (in this process: a pipe); warm: read from the cache
            code, peak, wall, text = run_cli(["optimize", str(folder), "-p", PIPELINE, "-o", str(out), *verify,
                                              "--json"], env)
            if code != 0:
                raise SystemExit(f"{name}: exit {code}: {text.strip()[-2000:]}")
            runs.append((peak, wall))
        code, inspect_peak, inspect_wall, text = run_cli(["inspect", str(folder), "--json"], env)
        import onnx

        ops = [n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node]
        written = sum(p.stat().st_size for p in work.glob(f"q-{name}.onnx*"))
        if fp32 / 4 <= args.fidelity_up_to * 1e9:
            cosines = check_fidelity(folder, out)
        else:  # the float32 reference would not fit: the first blocks, with the same weights and the same path
            small = first_blocks(folder, args.blocks)
            small_out = work / f"q-{name}-{args.blocks}-blocks.onnx"
            code, _, _, text = run_cli(["optimize", str(small), "-p", PIPELINE, "-o", str(small_out), *verify], env)
            if code != 0:
                raise SystemExit(f"{name}, {args.blocks} blocks: exit {code}: {text.strip()[-2000:]}")
            cosines = check_fidelity(small, small_out)
            print(f"{name}: (logit cosines of its first {args.blocks} blocks, on their own)")
        rows.append((name, fp32, written, runs, (inspect_peak, inspect_wall), ops.count("MatMulNBits"), cosines))
        results[name] = rows[-1][1:]
        print(f"{name}: fp32 {fp32 / 1e9:.2f} GB → {written / 1e9:.2f} GB; peak RSS cold {runs[0][0] / 1e9:.2f} GB "
              f"({runs[0][1]:.0f} s), warm {runs[1][0] / 1e9:.2f} GB ({runs[1][1]:.0f} s); MatMulNBits "
              f"{ops.count('MatMulNBits')}, MatMul left {ops.count('MatMul')}"
              + (f"; logit cosine vs bf16 {cosines[0]:.4f}, vs dequantized int4 {cosines[1]:.6f}" if cosines else ""),
              flush=True)
    saved.write_text(json.dumps(results))
    rows = sorted(([name, *row] for name, row in results.items()), key=lambda row: row[1])
    print()
    print(f"{'model':6} {'fp32':>9} {'output':>9} {'peak RSS cold':>14} {'warm':>15} {'inspect':>15} "
          f"{'cos bf16':>8} {'cos int4 ref':>12}")
    for name, fp32, written, runs, inspected, nbits, cosines in rows:
        (cold, cold_s), (warm, warm_s) = runs
        print(f"{name:6} {fp32 / 1e9:6.2f} GB {written / 1e9:6.2f} GB {cold / 1e9:5.2f} GB {cold / fp32:4.2f}x "
              f"{warm / 1e9:5.2f} GB {warm / fp32:4.2f}x {inspected[0] / 1e9:5.2f} GB {inspected[1]:4.1f} s "
              + (f"{cosines[0]:8.4f} {cosines[1]:12.6f}" if cosines else f"{'-':>8} {'-':>12}"))
    print("(peak RSS: the CLI process's own VmHWM, as a ratio to the fp32 weight bytes; cold: the export made, warm: "
          "read from the export cache; wall times above)")
    if rows:
        _plot(rows, args.plot)


def _plot(rows: list[tuple], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot)")
        return
    fp32 = [r[1] / 1e9 for r in rows]
    figure, axes = plt.subplots(figsize=(6, 4))
    for index, label in ((0, "cold (the export made)"), (1, "warm (the export cached)")):
        axes.plot(fp32, [r[3][index][0] / 1e9 for r in rows], "o-", label=f"optimize -p '{PIPELINE}', {label}")
    axes.plot(fp32, fp32, ":", color="grey", label="the fp32 weights")
    for row, x in zip(rows, fp32):
        axes.annotate(row[0], (x, row[3][0][0] / 1e9), textcoords="offset points", xytext=(4, 4))
    axes.set_xlabel("fp32 weight bytes (GB)")
    axes.set_ylabel("peak RSS (GB)")
    axes.legend(loc="upper left", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
